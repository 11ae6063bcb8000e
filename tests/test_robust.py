"""``--robust_forgetting``: the in-loop soft-prompt attacker and how its embedding reaches the surrogate batch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import add_forget_lora
from train_helpers import load_train_module, run_training

from sa_peft import robust as robust_module
from sa_peft.conditioning import PromptConditioning, encode_prompts
from sa_peft.diffusion_loss import noise_scheduler_for, per_sample_diffusion_loss
from sa_peft.objective import adapters_disabled
from sa_peft.robust import AdversarialSoftPrompt, with_attack
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline


def _conditioning(prompts, dim=4, length=3):
    hidden = torch.arange(len(prompts) * length * dim, dtype=torch.float32).reshape(len(prompts), length, dim)
    return PromptConditioning(list(prompts), hidden)


def test_augment_pairs_every_other_surrogate_with_its_forget_prompts_perturbed_row():
    cond = _conditioning(["forget a", "keep", "forget b"])
    attacker = AdversarialSoftPrompt(["forget a", "forget b"], [torch.zeros(1)] * 2)
    attacker.deltas = [torch.full((1, 3, 4), 0.5), torch.full((1, 3, 4), -1.0)]
    ids = torch.tensor([0, 0, 2, 2, 0, 2])
    augmented, new_ids = attacker.augment(cond, ids)
    assert augmented.prompts[:3] == cond.prompts and len(augmented.prompts) == 5
    assert torch.equal(augmented.encoder_hidden_states[:3], cond.encoder_hidden_states)
    assert torch.equal(augmented.encoder_hidden_states[3], cond.encoder_hidden_states[0] + 0.5)
    assert torch.equal(augmented.encoder_hidden_states[4], cond.encoder_hidden_states[2] - 1.0)
    assert new_ids.tolist() == [0, 3, 2, 4, 0, 4]
    with pytest.raises(RuntimeError, match="maybe_refresh"):
        AdversarialSoftPrompt(["forget a"], [torch.zeros(1)]).augment(cond, ids)


def test_attacked_replaces_each_forget_prompts_row_by_its_perturbed_embedding():
    cond = _conditioning(["forget a", "keep", "forget b"])
    attacker = AdversarialSoftPrompt(["forget a", "forget b"], [torch.zeros(1)] * 2)
    with pytest.raises(RuntimeError, match="maybe_refresh"):
        attacker.attacked(cond)
    attacker.deltas = [torch.full((1, 3, 4), 0.5), torch.full((1, 3, 4), -1.0)]
    attacked = attacker.attacked(cond)
    assert attacked.prompts == cond.prompts  # the probe finds the forget prompts under their own names
    assert torch.equal(attacked.encoder_hidden_states[0], cond.encoder_hidden_states[0] + 0.5)
    assert torch.equal(attacked.encoder_hidden_states[1], cond.encoder_hidden_states[1])
    assert torch.equal(attacked.encoder_hidden_states[2], cond.encoder_hidden_states[2] - 1.0)
    assert torch.equal(cond.encoder_hidden_states, _conditioning(["a", "b", "c"]).encoder_hidden_states)  # not in place


def test_attack_embeddings_keep_the_pooled_rows_and_fluxs_text_ids_and_guidance():
    """FLUX's call marks itself by ``txt_ids`` (and a guidance-distilled one needs ``guidance``): a perturbed
    conditioning without them would call the transformer as another family's."""
    cond = _conditioning(["forget a", "keep"])
    cond = PromptConditioning(cond.prompts, cond.encoder_hidden_states, text_embeds=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
                              text_ids=torch.zeros(3, 3), guidance=3.5)
    attacker = AdversarialSoftPrompt(["forget a"], [torch.zeros(1)])
    attacker.deltas = [torch.full((1, 3, 4), 0.5)]
    augmented, ids = attacker.augment(cond, torch.tensor([0, 0]))
    attacked = attacker.attacked(cond)
    for out in (augmented, attacked):
        assert out.text_ids is cond.text_ids and out.guidance == 3.5 and out.time_ids is None
    assert augmented.text_embeds.tolist() == [[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]]  # the perturbed row's own pooled
    assert torch.equal(attacked.text_embeds, cond.text_embeds)
    kwargs = augmented.unet_kwargs(ids)
    assert set(kwargs) == {"encoder_hidden_states", "txt_ids", "guidance", "pooled_projections"}
    assert kwargs["pooled_projections"].tolist() == [[1.0, 2.0], [1.0, 2.0]] and kwargs["guidance"].tolist() == [3.5, 3.5]


def test_ablation_trains_the_concepts_images_towards_the_frozen_surrogate_prediction_half_under_the_attack():
    """The concept-ablation term: on the concept's images, noised, the adapted model's prediction under the forget
    prompt (even samples) or its perturbed row (odd samples) against the frozen model's under the surrogate prompt."""
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, "all", seed=5)
    scheduler = noise_scheduler_for(pipe.scheduler)
    cond = encode_prompts(pipe, ["brad pitt", "a photo of a cat", "a middle aged man"])
    gen = torch.Generator().manual_seed(0)
    concept_latents = torch.randn(6, 4, 8, 8, generator=gen)
    attacker = AdversarialSoftPrompt(["brad pitt"], [concept_latents[:2]], ablation_latents=concept_latents,
                                     ablation_concepts=torch.zeros(6, dtype=torch.long),
                                     anchor_prompts=["a middle aged man"], ablation_weight=2.0)
    attacker.deltas = [torch.randn(cond.encoder_hidden_states[:1].shape, generator=gen)]
    augmented, _ = attacker.augment(cond, torch.tensor([0]))
    loss = attacker.ablation_loss(pipe.unet, pipe.unet, scheduler, cond, augmented, cond, 4,
                                  torch.Generator().manual_seed(3), torch.float32)
    # The same draws by hand: 4 images, their noise and timesteps, in that order from the generator.
    gen = torch.Generator().manual_seed(3)
    x = concept_latents[torch.randint(6, (4,), generator=gen)]
    noise = torch.randn(x.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (4,), generator=gen)
    noisy = scheduler.add_noise(x, noise, t)
    with torch.no_grad():
        with adapters_disabled(pipe.unet):
            frozen = pipe.unet(noisy, t, encoder_hidden_states=cond.encoder_hidden_states[[2, 2, 2, 2]]).sample
        rows = augmented.encoder_hidden_states[[0, 3, 0, 3]]  # row 3: the forget prompt's perturbed embedding
        adapted = pipe.unet(noisy, t, encoder_hidden_states=rows).sample
    assert torch.allclose(loss.detach(), 2.0 * (adapted - frozen).square().mean(), rtol=1e-5)
    loss.backward()  # it trains the LoRA
    lora_grads = [p.grad for n, p in pipe.unet.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads) and any(g.abs().sum() > 0 for g in lora_grads)
    assert AdversarialSoftPrompt(["brad pitt"], [concept_latents]).ablation_loss(
        pipe.unet, pipe.unet, scheduler, cond, augmented, cond, 4, gen, torch.float32) is None
    with pytest.raises(ValueError, match="go together"):
        AdversarialSoftPrompt(["brad pitt"], [concept_latents], ablation_latents=concept_latents)


def test_a_robust_run_is_forgotten_only_when_forgotten_under_the_attack_too():
    def signal(*prefs):
        concepts = {f"c{i}": {"preference": p, "forgotten": p <= 0} for i, p in enumerate(prefs)}
        return {"concepts": concepts, "reached": all(p <= 0 for p in prefs), "max_preference": max(prefs), "retained": True}

    combined = with_attack(signal(-0.2, -0.1), signal(-0.05, 0.3))
    assert not combined["reached"] and combined["max_preference"] == 0.3
    assert combined["concepts"]["c0"]["forgotten"] and not combined["concepts"]["c1"]["forgotten"]
    assert combined["concepts"]["c1"]["attacked_preference"] == 0.3 and combined["concepts"]["c1"]["preference"] == -0.1
    assert with_attack(signal(-0.2, -0.1), signal(-0.05, -0.3))["reached"]
    assert not with_attack(signal(0.2), signal(-0.5))["reached"]
    from sa_peft.forgetting import verdict_lines

    text = "\n".join(verdict_lines({**combined, "trained_steps": 9, "threshold": 0.0, "retention": 0.0,
                                    "retention_bound": 0.05}))
    assert "NOT FORGOTTEN after 9 steps" in text
    assert "'c1': preference -0.100, +0.300 under the soft-prompt attack" in text and "c1'" in text.split("\n")[-1]


@pytest.mark.slow  # fast tier under 3 minutes: an attack optimisation (~5 s idle), also covered in CI
def test_refresh_finds_an_embedding_that_lowers_the_adapters_loss_on_the_concept():
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, "all", seed=5)
    scheduler = noise_scheduler_for(pipe.scheduler)
    cond = encode_prompts(pipe, ["brad pitt", "a photo of a cat"])
    latents = pipe("brad pitt", num_inference_steps=2, num_images_per_prompt=8, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    attacker = AdversarialSoftPrompt(["brad pitt"], [latents], every=10, attack_steps=15, lr=0.05, batch_size=4)
    assert attacker.maybe_refresh(0, pipe.unet, scheduler, cond)
    assert not attacker.maybe_refresh(5, pipe.unet, scheduler, cond)
    assert not attacker.maybe_refresh(0, pipe.unet, scheduler, cond)  # already fitted at this step (signal check)
    assert attacker.maybe_refresh(10, pipe.unet, scheduler, cond)
    augmented, _ = attacker.augment(cond, torch.tensor([0]))
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (64,), generator=gen)
    x = latents.repeat(8, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        plain = per_sample_diffusion_loss(pipe.unet, scheduler, x, t, noise, augmented.unet_kwargs(torch.zeros(64).long()))
        attacked = per_sample_diffusion_loss(pipe.unet, scheduler, x, t, noise,
                                             augmented.unet_kwargs(torch.full((64,), 2).long()))
    assert attacked.mean() < plain.mean()
    bound = cond.encoder_hidden_states[0].norm(dim=-1)
    assert (attacker.deltas[0][0].norm(dim=-1) <= bound * attacker.epsilon + 1e-5).all()


@pytest.mark.slow  # a full (tiny) training run: about 40 s on a shared core
def test_training_script_pairs_the_surrogates_with_the_attack_every_step(tiny_pipe_dir, tmp_path, monkeypatch):
    calls = {"refresh": [], "augment": 0}
    original_refresh, original_augment = AdversarialSoftPrompt.maybe_refresh, AdversarialSoftPrompt.augment

    def refresh(self, step, *args, **kwargs):
        done = original_refresh(self, step, *args, **kwargs)
        calls["refresh"].append((step, done))
        return done

    def augment(self, conditioning, ids):
        calls["augment"] += 1
        out = original_augment(self, conditioning, ids)
        assert (out[1] >= len(conditioning.prompts)).any()  # some surrogates see the perturbed embedding
        return out

    monkeypatch.setattr(robust_module.AdversarialSoftPrompt, "maybe_refresh", refresh)
    monkeypatch.setattr(robust_module.AdversarialSoftPrompt, "augment", augment)
    replay = tmp_path / "replay.txt"
    replay.write_text("a photo of a cat\n")
    run_training(load_train_module(), tiny_pipe_dir, tmp_path / "out", replay, "--forget_prompt", "brad pitt",
                 "--surrogate_type", "noise", "--robust_forgetting", "--train_full_budget")
    # The final signal check (step 3) refits δ to the trained weights and measures the signal under it too.
    assert calls["augment"] == 3 and calls["refresh"] == [(0, True), (1, False), (2, False), (3, True)]
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert "attacked_preference/brad pitt" in log[-1] and "preference/brad pitt" in log[-1]
    # A noise surrogate has no prompt to ablate the concept towards: no concept set, no ablation term.
    assert all("ablation" not in entry for entry in log)
    assert not list((tmp_path / "out" / "cache").glob("robust-concept-*"))


@pytest.mark.slow  # a full (tiny) training run: about 40 s on a shared core
def test_with_a_surrogate_prompt_the_concept_ablation_term_is_trained(tiny_pipe_dir, tmp_path, monkeypatch):
    seen = []
    original = AdversarialSoftPrompt.ablation_loss

    def ablation_loss(self, *args, **kwargs):
        seen.append((len(self.ablation_latents), self.anchor_prompts))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(robust_module.AdversarialSoftPrompt, "ablation_loss", ablation_loss)
    replay = tmp_path / "replay.txt"
    replay.write_text("a photo of a cat\n")
    run_training(load_train_module(), tiny_pipe_dir, tmp_path / "out", replay, "--forget_prompt", "brad pitt",
                 "--surrogate_prompt", "a middle aged man", "--robust_forgetting", "--train_full_budget")
    assert seen == [(robust_module.ABLATION_IMAGES_PER_PROMPT, ["a middle aged man"])] * 3  # one per step
    assert len(list((tmp_path / "out" / "cache").glob("robust-concept-*"))) == 1
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all(entry["ablation"] > 0 for entry in log)
    # Step 1: the LoRA is still zero, so replay (distilled) and EWC are ~0 and the loss is the forget term plus the
    # ablation term: the term is in what is back-propagated, not only logged.
    assert abs(log[0]["replay"]) < 1e-9 and log[0]["ewc"] == 0
    assert log[0]["loss"] == pytest.approx(log[0]["forget"] + log[0]["ablation"], rel=1e-6)


def test_least_attacked_state_keeps_the_least_attacked_candidate_and_restores_it():
    param = torch.nn.Parameter(torch.zeros(2))
    selection = robust_module.LeastAttackedState([param], every=100)
    assert not selection.restore() and torch.equal(param.data, torch.zeros(2))  # no candidate: untouched
    assert selection.due(100, last=False) and not selection.due(99, last=False) and selection.due(7, last=True)
    for step, shares in [(100, None), (200, {"a": 0.25, "b": 0.0}), (300, {"a": 0.5, "b": 0.0}),
                         (400, {"a": 0.0, "b": 0.25}), (500, None)]:
        param.data.fill_(step)
        selection.offer(step, shares)
    assert not selection.due(550, last=False) and selection.due(600, last=False)
    state, tensors = selection.state()
    resumed = robust_module.LeastAttackedState([param])
    resumed.load(state, tensors)
    for kept in (selection, resumed):
        assert kept.restore() and kept.best_step == 400 and torch.equal(param.data, torch.full((2,), 400.0))  # a tie goes to the later
        param.data.fill_(-1)
    assert selection.summary()["checks"] == {"100": None, "200": 0.25, "300": 0.5, "400": 0.25, "500": None}
    assert resumed.best_shares == {"a": 0.0, "b": 0.25}  # the largest share of the prompts decides
    assert selection.swap_in_average() is None  # no average_from: no mean


def test_the_mean_of_the_later_states_is_a_candidate_checked_last():
    """From ``average_from`` on every state checked (candidate or not) enters the mean; the mean, swapped in, is
    offered last and wins a tie; ``put_back`` undoes the swap; a checkpoint keeps the running sum."""
    param = torch.nn.Parameter(torch.zeros(2))
    selection = robust_module.LeastAttackedState([param], every=100, average_from=300)
    for step, shares in [(100, {"a": 0.5}), (200, {"a": 0.25}), (300, None), (400, {"a": 0.75})]:
        param.data.fill_(step)
        selection.offer(step, shares)
        if step == 300:
            assert selection.swap_in_average() is None  # one state: no mean yet
    state, tensors = selection.state()
    resumed = robust_module.LeastAttackedState([param], average_from=300)
    resumed.load(state, tensors)
    for kept in (selection, resumed):
        param.data.fill_(400)
        replaced = kept.swap_in_average()
        assert torch.equal(param.data, torch.full((2,), 350.0)) and kept.averaged_steps == [300, 400]
        kept.offer_average({"a": 0.25})  # ties step 200's reading: the mean, checked last, wins
        kept.put_back(replaced)
        assert torch.equal(param.data, torch.full((2,), 400.0))
        assert kept.restore() and kept.best_is_average and torch.equal(param.data, torch.full((2,), 350.0))
        assert kept.chosen() == "the mean of the states of steps 300-400"
        assert kept.summary()["average"] == {"steps": [300, 400], "attacked_sample_share": 0.25}
    param.data.fill_(400)
    worse = robust_module.LeastAttackedState([param], every=100, average_from=300)
    worse.offer(300, {"a": 0.0})
    worse.offer(400, None)
    replaced = worse.swap_in_average()
    worse.offer_average({"a": 0.0625})
    worse.put_back(replaced)
    assert worse.restore() and worse.best_step == 300 and not worse.best_is_average


def test_the_rechecks_upper_bound_is_clopper_pearsons():
    """The one-sided upper bound the verdict's WARNING uses equals the Clopper-Pearson bound (a beta quantile)."""
    from scipy.stats import beta

    from sa_peft.forgetting import share_upper_bound

    for count, n in [(0, 64), (2, 64), (3, 64), (4, 64), (7, 50), (1, 3)]:
        assert share_upper_bound(count, n) == pytest.approx(beta.ppf(0.9, count + 1, n - count), abs=1e-9)
    assert share_upper_bound(64, 64) == 1.0


def test_a_robust_verdict_is_the_attack_checks_reading_of_the_shipped_state():
    """Forgotten: forgotten under the plain prompt and at most ATTACKED_SHARE_BOUND (0.1) of the attacked samples (the
    verdict's re-check) read as the concept; the attacked preference (+0.4 here) no longer decides."""
    from sa_peft.forgetting import verdict_lines
    from sa_peft.robust import with_attack_check

    passed = {"forgotten": True, "sample_share": 0.0, "surrogate_share": 0.0, "sample_as_surrogate": 1.0,
              "surrogate_as_surrogate": 1.0, "num_samples": 16}
    concepts = {"plain": {"preference": -0.3, "attacked_preference": 0.4, "forgotten": False, "reference": "swap",
                          "sample_check": passed},
                "sampled_out": {"preference": 0.4, "forgotten": False, "reference": "swap", "sample_check": passed},
                "failed_check": {"preference": -0.3, "forgotten": False, "reference": "swap",
                                 "sample_check": {**passed, "forgotten": False}},
                "no_check": {"preference": 0.05, "forgotten": False, "reference": "equal losses"}}
    signal = {"concepts": concepts, "threshold": 0.1, "reached": False, "retained": True}
    shares = {p: 0.0625 for p in concepts}
    judged = with_attack_check(signal, shares)["concepts"]
    assert {p: c["forgotten"] for p, c in judged.items()} == {"plain": True, "sampled_out": True, "failed_check": False,
                                                               "no_check": True}
    assert judged["plain"]["attacked_sample_share"] == 0.0625
    assert not with_attack_check(signal, {**shares, "plain": 0.125})["concepts"]["plain"]["forgotten"]
    one = {**signal, "concepts": {"plain": concepts["plain"]}}
    assert with_attack_check(one, {"plain": 0.1})["reached"] and not with_attack_check(one, None)["reached"]
    assert not with_attack_check({**one, "concepts": {"plain": {**concepts["plain"], "preference": 0.6}}},
                                 {"plain": 0.0})["reached"]  # above the sample check's gate (0.5)
    text = "\n".join(verdict_lines({**with_attack_check(one, {"plain": 0.125}), "trained_steps": 9, "retention": 0.0,
                                    "retention_bound": 0.05}))
    assert "NOT FORGOTTEN" in text and "under a soft-prompt attack fitted afresh for the verdict 0.12 of the samples read as the concept" in text
    from sa_peft.forgetting import forgetting_warning

    warning = forgetting_warning({**with_attack_check(one, {"plain": 0.125}), "retention": 0.0, "retention_bound": 0.05})
    assert warning.startswith("WARNING: the concept was NOT forgotten under the soft-prompt attack") and "{'plain': 0.125}" in warning
    assert forgetting_warning({**with_attack_check(one, {"plain": 0.0625}), "retention": 0.0, "retention_bound": 0.05}) is None
    # Forgotten by the re-check's share, but 4 of 64 cannot rule out more than 0.10 at 90 % confidence (2 of 64 can).
    def rechecked_warning(count):
        return forgetting_warning({**with_attack_check(one, {"plain": count / 64}), "retention": 0.0, "retention_bound": 0.05,
                                   "robust_selection": {"verdict_check": {"attacked_sample_share": count / 64,
                                                                          "num_samples": 64}}})
    assert rechecked_warning(4).startswith("WARNING: forgotten under the soft-prompt attack by the verdict's re-check, "
                                           "but too close to call: 4 of its 64 samples") and "up to 0.12" in rechecked_warning(4)
    assert rechecked_warning(2) is None
    selection = {"chosen_step": 900, "attacked_sample_share": 0.0, "checks": {"1000": 0.1875, "200": None, "900": 0.0},
                 "attack_steps": 200, "num_samples": 16}
    line = verdict_lines({**with_attack_check(one, {"plain": 0.0}), "trained_steps": 1000, "retention": 0.0,
                          "retention_bound": 0.05, "robust_selection": selection})[-1]
    assert line.startswith("robust forgetting: ships the state of step 900 of 1000 (attacked samples read as the concept: "
                           "0.00, the fewest)") and line.endswith("200: -, 900: 0.00, 1000: 0.19")
    rechecked = {**selection, "verdict_check": {"attacked_sample_share": 0.140625, "num_samples": 64}}
    line = verdict_lines({**with_attack_check(one, {"plain": 0.140625}), "trained_steps": 1000, "retention": 0.0,
                          "retention_bound": 0.05, "robust_selection": rechecked})[-1]
    assert line.startswith("robust forgetting: ships the state of step 900 of 1000 (attacked samples read as the concept: "
                           "0.00, the fewest; re-checked for the verdict with a fresh attack and 64 fresh samples: 0.14, "
                           "9 of 64, at most 0.21 at 90 % confidence)")
    averaged = {**rechecked, "chosen_step": None, "chosen_average": True,
                "average": {"steps": [500, 600, 700, 800, 900, 1000], "attacked_sample_share": 0.0}}
    line = verdict_lines({**with_attack_check(one, {"plain": 0.0}), "trained_steps": 1000, "retention": 0.0,
                          "retention_bound": 0.05, "robust_selection": averaged})[-1]
    assert line.startswith("robust forgetting: ships the mean of the states of steps 500-1000 of 1000 (attacked "
                           "samples read as the concept: 0.00, the fewest; re-checked") and line.endswith(
                               "1000: 0.19, the mean of the states of steps 500-1000: 0.00")


@pytest.mark.slow  # two tiny training runs and three resumed ones: about 80 s of CPU
def test_a_robust_run_ships_the_checked_state_the_attack_served_worst(tiny_pipe_dir, tmp_path, monkeypatch):
    """Checks at steps 2, 4 and 6 (the last): the attacked samples read as the concept 0.5, 0 and 1 of the time, so the
    state of step 4 ships, byte-equal to checkpoint-4's, and the metadata says so. The first run measures the real
    check (δ fitted, samples drawn and judged) at every candidate; the second scripts the shares, and a third resumes
    the second from checkpoint-4."""
    from safetensors.torch import load_file

    from sa_peft.adapter_io import read_adapter_metadata

    train = load_train_module()
    monkeypatch.setattr(train, "plainly_forgotten", lambda *args: True)  # every state a candidate
    monkeypatch.setattr(robust_module, "SELECTION_ATTACK_STEPS", 5)  # the check's path, not its budget (200)
    monkeypatch.setattr(robust_module, "SELECTION_NUM_SAMPLES", 2)
    monkeypatch.setattr(robust_module, "VERDICT_NUM_SAMPLES", 3)
    # The in-loop attacker's path, not its budget (100 Adam steps at each of 36 refits: 714 s of this test's 790)
    monkeypatch.setattr(train, "AdversarialSoftPrompt",
                        lambda *args, **kwargs: robust_module.AdversarialSoftPrompt(*args, attack_steps=5, **kwargs))
    monkeypatch.setattr(train, "LeastAttackedState",
                        lambda params, **kwargs: robust_module.LeastAttackedState(params, every=2, **kwargs))
    measured = []
    original = train.attacked_sample_shares
    monkeypatch.setattr(train, "attacked_sample_shares", lambda run, step, verdict=False: measured.append(
        (step, verdict, original(run, step, verdict))) or measured[-1][2])
    drawn = []  # (number, seed) of the samples drawn under an attack
    margins = train.frozen_margins
    monkeypatch.setattr(train, "frozen_margins", lambda run, prompts, n, seed, **kw: (
        kw.get("embeddings") is not None and drawn.append((n, seed))) or margins(run, prompts, n, seed, **kw))
    replay = tmp_path / "replay.txt"
    replay.write_text("a photo of a cat\n")
    flags = ("--forget_prompt", "brad pitt", "--surrogate_prompt", "a middle aged man", "--robust_forgetting",
             "--train_full_budget", "--max_train_steps", "6", "--forgetting_check_steps", "2", "--checkpointing_steps", "2",
             "--retention_bound", "1e9")
    run_training(train, tiny_pipe_dir, tmp_path / "real", replay, *flags)
    forgetting = read_adapter_metadata(tmp_path / "real")["sa_peft"]["forgetting"]
    # the checks, the mean of steps 4 and 6 (the second half of the budget), then the verdict's re-check
    assert [(step, verdict) for step, verdict, _ in measured] == [(2, False), (4, False), (6, False), (6, False),
                                                                  (6, True)]
    assert forgetting["robust_selection"]["average"] == {"steps": [4, 6],
                                                         "attacked_sample_share": measured[3][2]["brad pitt"]}
    assert all(set(shares) == {"brad pitt"} and 0 <= shares["brad pitt"] <= 1 for *_, shares in measured)
    assert forgetting["concepts"]["brad pitt"]["attacked_sample_share"] == measured[-1][2]["brad pitt"]
    assert forgetting["robust_selection"]["verdict_check"]["num_samples"] == 3
    assert drawn[:4] == [(2, drawn[0][1])] * 4 and drawn[4][0] == 3 and drawn[4][1] != drawn[0][1]  # fresh samples
    log = [json.loads(line) for line in (tmp_path / "real" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "attacked_sample_share/brad pitt" in e] == [2, 4, 6]

    # The verdict is the re-check's: the chosen state read 0 at its check and 0.25 when re-checked, so not forgotten.
    scripted = iter([0.5, 0.0, 1.0, 0.5])  # steps 2, 4, 6, the mean
    monkeypatch.setattr(train, "attacked_sample_shares",
                        lambda run, step, verdict=False: {"brad pitt": 0.25 if verdict else next(scripted)})
    out = tmp_path / "scripted"
    run_training(train, tiny_pipe_dir, out, replay, *flags)
    shipped = load_file(str(out / "pytorch_lora_weights.safetensors"))
    at_four = load_file(str(out / "checkpoint-4" / "pytorch_lora_weights.safetensors"))
    assert shipped.keys() == at_four.keys() and all(torch.equal(shipped[k], at_four[k]) for k in shipped)
    selection = read_adapter_metadata(out)["sa_peft"]["forgetting"]["robust_selection"]
    assert selection["chosen_step"] == 4 and selection["checks"] == {"2": 0.5, "4": 0.0, "6": 1.0}
    assert (selection["attack_steps"], selection["num_samples"]) == (5, 2)
    assert selection["verdict_check"] == {"attacked_sample_share": 0.25, "num_samples": 3}
    forgetting = read_adapter_metadata(out)["sa_peft"]["forgetting"]
    assert forgetting["concepts"]["brad pitt"]["attacked_sample_share"] == 0.25 and not forgetting["reached"]

    # Resumed from checkpoint-4, whose choice so far is step 4 and whose running sum holds step 4's state: with step 6
    # and the mean reading worse, step 4's state still ships; with step 6 reading best, step 6's; with the mean tying
    # step 4 (and checked after it), the mean of steps 4 and 6 ships.
    def resume(step_six, mean):
        readings = iter([step_six, mean])
        monkeypatch.setattr(train, "attacked_sample_shares",
                            lambda run, step, verdict=False: {"brad pitt": 0.0 if verdict else next(readings)})
        run_training(train, tiny_pipe_dir, out, replay, *flags, "--resume_from_checkpoint", "checkpoint-4")
        return (load_file(str(out / "pytorch_lora_weights.safetensors")),
                read_adapter_metadata(out)["sa_peft"]["forgetting"]["robust_selection"])

    shipped, selection = resume(1.0, 1.0)
    assert all(torch.equal(shipped[k], at_four[k]) for k in shipped) and selection["chosen_step"] == 4
    at_six, selection = resume(0.0, 1.0)
    assert selection["chosen_step"] == 6 and not all(torch.equal(at_six[k], at_four[k]) for k in at_six)
    mean, selection = resume(1.0, 0.0)
    assert selection["chosen_average"] and selection["chosen_step"] is None
    assert all(torch.allclose(mean[k], (at_four[k] + at_six[k]) / 2) for k in mean)
