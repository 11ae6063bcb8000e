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
