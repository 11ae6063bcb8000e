"""The forgetting signal, the verdict, adaptive λ, replay distillation and the rank-1 Fisher penalty."""

from __future__ import annotations

import pytest
import torch
from conftest import add_forget_lora

from sa_peft.conditioning import encode_prompts
from sa_peft.diffusion_loss import noise_scheduler_for
from sa_peft.ewc import Rank1FisherPenalty
from sa_peft.fisher import estimate_fisher, load_fisher, save_fisher
from sa_peft.forgetting import (
    EQUAL_LOSSES,
    SAMPLE_CHECK_MAX_PROMPTS,
    AdaptiveLambda,
    ForgettingProbe,
    forgetting_signal,
    forgetting_warning,
    verdict_lines,
    with_sample_check,
    with_sample_shares,
)
from sa_peft.lora import iter_adapted_layers, resolve_lora_targets
from sa_peft.objective import adapters_disabled, selective_amnesia_loss

PROMPTS = ["brad pitt", "a photo of a cat"]


def base_and_now(concept_base, surrogate_base, concept_now, surrogate_now, replay_base=1.0, drift_now=0.0):
    base = {"concepts": [{"concept_loss": concept_base, "surrogate_loss": surrogate_base}], "replay_loss": replay_base,
            "replay_drift": 0.0}
    now = {"concepts": [{"concept_loss": concept_now, "surrogate_loss": surrogate_now}], "replay_loss": replay_base,
           "replay_drift": drift_now}
    return base, now


def test_preference_is_one_for_the_base_and_negative_once_the_surrogate_is_preferred():
    base, _ = base_and_now(0.2, 0.4, 0, 0)
    same = forgetting_signal(base, base, ["c"], -0.5, 0.05)
    assert same["concepts"]["c"]["preference"] == pytest.approx(1.0)
    assert not same["reached"] and same["retained"] and same["retention"] == 0
    # concept loss 0.5, surrogate 0.3: gap +0.2 against a base gap of −0.2 → preference −1
    # retention = drift / the base replay loss: 0.08 / 2 = 0.04
    _, now = base_and_now(0.2, 0.4, 0.5, 0.3, replay_base=2.0, drift_now=0.08)
    base2, _ = base_and_now(0.2, 0.4, 0, 0, replay_base=2.0)
    signal = forgetting_signal(base2, now, ["c"], -0.5, 0.05)
    assert signal["concepts"]["c"]["preference"] == pytest.approx(-1.0)
    assert signal["reached"] and signal["concepts"]["c"]["forgotten"]
    assert signal["retention"] == pytest.approx(0.04) and signal["retained"]
    # halfway: equal losses → preference 0, not forgotten at threshold −0.5; retention past its bound
    _, now = base_and_now(0.2, 0.4, 0.3, 0.3, drift_now=0.06)
    signal = forgetting_signal(base, now, ["c"], -0.5, 0.05)
    assert signal["concepts"]["c"]["preference"] == pytest.approx(0.0)
    assert not signal["reached"] and not signal["retained"]


def test_verdict_needs_every_concept():
    base = {"concepts": [{"concept_loss": 0.2, "surrogate_loss": 0.4}] * 2, "replay_loss": 1.0, "replay_drift": 0.0}
    now = {"concepts": [{"concept_loss": 0.6, "surrogate_loss": 0.3}, {"concept_loss": 0.2, "surrogate_loss": 0.4}],
           "replay_loss": 1.0, "replay_drift": 0.0}
    signal = forgetting_signal(base, now, ["a", "b"], -0.5, 0.05)
    assert signal["concepts"]["a"]["forgotten"] and not signal["concepts"]["b"]["forgotten"]
    assert not signal["reached"] and signal["max_preference"] == pytest.approx(1.0)
    text = "\n".join(verdict_lines({"reached": False, "trained_steps": 7, "concepts": signal["concepts"],
                                    "threshold": -0.5, "retained": True, "retention": 0.0, "retention_bound": 0.05}))
    assert "NOT FORGOTTEN after 7 steps" in text and "'b': preference +1.000" in text


def test_without_a_surrogate_prompt_the_verdict_says_its_reference_is_lenient():
    """Noise and image-folder surrogates have no swap reference: the signal tags the concept "equal losses", and
    the verdict and the run's warning say that such a "forgotten" wants checking (digits: up to 21 of 50 samples of
    the concept were left while it said forgotten)."""
    base = {"concepts": [{"concept_loss": 0.2, "surrogate_loss": 0.4},
                         {"concept_loss": 0.2, "surrogate_loss": 0.26, "target_gap": -0.01}], "replay_loss": 1.0}
    now = {"concepts": [{"concept_loss": 0.5, "surrogate_loss": 0.3}, {"concept_loss": 0.5, "surrogate_loss": 0.3}],
           "replay_loss": 1.0, "replay_drift": 0.0}
    signal = forgetting_signal(base, now, ["noise", "prompt"], 0.0, 0.05)
    assert [c["reference"] for c in signal["concepts"].values()] == [EQUAL_LOSSES, "swap"] and signal["reached"]
    summary = {**signal, "trained_steps": 3}
    noise_line, prompt_line = verdict_lines(summary)[1:]
    assert "forgotten; its reference is equal losses (no surrogate prompt" in noise_line
    assert "check samples (--classifier)" in noise_line and "equal losses" not in prompt_line
    warning = forgetting_warning(summary)
    assert warning.startswith("WARNING: ['noise'] forgotten by the signal, but its reference is equal losses")
    assert warning.endswith("a surrogate prompt (--surrogate_prompt) gives the signal its calibrated reference.")
    only_prompt = {**summary, "concepts": {"prompt": signal["concepts"]["prompt"]}}
    assert forgetting_warning(only_prompt) is None
    assert forgetting_warning({**only_prompt, "retained": False, "retention": 0.06}) == (
        "WARNING: forgotten, but the predictions on held-out replay images drifted by 6.00e-02 (bound 5.00e-02): "
        "other concepts may have changed; try a higher --replay_weight or --ewc_lambda.")
    not_yet = {**only_prompt, "reached": False, "concepts": {"prompt": {**signal["concepts"]["prompt"], "forgotten": False}}}
    assert forgetting_warning(not_yet) == (
        "WARNING: the concept was NOT forgotten: the adapted model still prefers its own images of ['prompt'] to the "
        "surrogate's. Try a larger step budget (--max_train_steps), a higher --learning_rate, a lower --ewc_lambda, "
        "or a surrogate closer to the concept (--surrogate_prompt).")
    attacked = {**not_yet, "concepts": {"prompt": {**not_yet["concepts"]["prompt"], "attacked_preference": 0.3}}}
    assert "(under the plain prompt or under the soft-prompt attack, --robust_forgetting)." in forgetting_warning(attacked)


def test_adaptive_lambda_halves_when_stalled_doubles_when_retention_breaks_and_stops_once_reached():
    lam = AdaptiveLambda(8.0, min_progress=0.1, decay=0.5)

    def sig(pref, retention, reached=False):
        return {"max_preference": pref, "retention": retention, "retention_bound": 0.05, "reached": reached}

    assert lam.update(sig(0.9, 0.0)) == 8.0  # first check: nothing to compare with
    assert lam.update(sig(0.5, 0.0)) == 8.0  # good progress
    assert lam.update(sig(0.45, 0.0)) == 4.0  # stalled, retention far inside its bound
    assert lam.update(sig(0.44, 0.04)) == 4.0  # stalled, but retention near its bound: hold
    assert lam.update(sig(0.40, 0.06)) == 8.0  # retention out of bound: stronger
    assert lam.update(sig(-0.6, 0.0, reached=True)) == 8.0  # forgotten: λ no longer moves
    low = AdaptiveLambda(1.0, decay=0.5, min_factor=1 / 4)
    for pref in (0.9, 0.9, 0.9, 0.9, 0.9):
        low.update(sig(pref, 0.0))
    assert low.value == 0.25  # floor


def make_probe(pipe, seed=0):
    cond = encode_prompts(pipe, PROMPTS)
    gen = torch.Generator().manual_seed(seed)
    shape = (4, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    concept, surrogate, replay = (torch.randn(shape, generator=gen) for _ in range(3))
    scheduler = noise_scheduler_for(pipe.scheduler)
    probe = ForgettingProbe(cond, ["brad pitt"], [concept], [surrogate], replay, torch.ones(4, dtype=torch.long),
                            scheduler.config.num_train_timesteps, num_timesteps=3, seed=seed)
    return probe, scheduler, cond


def test_probe_measures_one_for_the_frozen_model_and_moves_with_the_adapter(tiny_pipe):
    probe, scheduler, _ = make_probe(tiny_pipe)
    base = probe.calibrate(tiny_pipe.unet, scheduler)
    assert probe.measure(tiny_pipe.unet, scheduler)["concepts"]["brad pitt"]["preference"] == pytest.approx(1.0)
    # Fixed noise: measuring twice gives the same numbers.
    assert probe.calibrate(tiny_pipe.unet, scheduler) == base
    add_forget_lora(tiny_pipe.unet)  # random non-zero A and B
    moved = probe.measure(tiny_pipe.unet, scheduler)
    assert moved["concepts"]["brad pitt"]["preference"] != pytest.approx(1.0)
    assert moved["retention"] > 0
    # Retention is the drift of the replay predictions from the frozen model's, relative to its error there.
    batch = probe.replay
    with torch.no_grad():
        noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        kwargs = probe.conditioning.unet_kwargs(batch.prompt_ids)
        adapted = tiny_pipe.unet(noisy, batch.timesteps, **kwargs).sample
        with adapters_disabled(tiny_pipe.unet):
            frozen = tiny_pipe.unet(noisy, batch.timesteps, **kwargs).sample
    expected = (adapted - frozen).square().mean() / (frozen - batch.noise).square().mean()
    assert moved["retention"] == pytest.approx(float(expected), rel=1e-4)
    with adapters_disabled(tiny_pipe.unet):
        frozen_signal = probe.measure(tiny_pipe.unet, scheduler)
        assert frozen_signal["concepts"]["brad pitt"]["preference"] == pytest.approx(1.0)
        assert frozen_signal["retention"] == pytest.approx(0.0, abs=1e-12)
    assert probe.measure(tiny_pipe.unet, scheduler) == moved  # adapters back on


def test_probe_rejects_bad_settings(tiny_pipe):
    cond = encode_prompts(tiny_pipe, PROMPTS)
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="`forgetting_threshold`"):
        ForgettingProbe(cond, ["brad pitt"], [x], [x], x, torch.ones(2, dtype=torch.long), 1000, threshold=float("nan"))
    with pytest.raises(ValueError, match="per forget prompt"):
        ForgettingProbe(cond, ["brad pitt"], [x, x], [x], x, torch.ones(2, dtype=torch.long), 1000)


def test_distilled_replay_is_zero_for_a_no_op_adapter_and_measures_the_drift_otherwise(tiny_pipe):
    unet, scheduler = tiny_pipe.unet, noise_scheduler_for(tiny_pipe.scheduler)
    cond = encode_prompts(tiny_pipe, PROMPTS)
    add_forget_lora(unet, randomize=False)  # B = 0: the adapted model is the base model
    gen = lambda: torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 1])

    def loss(target):
        return selective_amnesia_loss(unet, scheduler, cond, x, ids[:1].repeat(2), x, ids, None, 0.0, 1.0,
                                      generator=gen(), replay_target=target)

    assert loss("distill").replay.item() < 1e-10  # batch-size rounding only
    assert loss("noise").replay.item() > 0.01
    with torch.no_grad():
        for layer in iter_adapted_layers(unet):
            layer.module.lora_B["default"].weight.normal_(0, 0.2)
    drift = loss("distill")
    assert drift.replay.item() > 0
    drift.total.backward()  # the frozen pass must not cut the adapted pass's gradients
    grads = [layer.module.lora_B["default"].weight.grad for layer in iter_adapted_layers(unet)]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="`replay_target`"):
        loss("frozen")


def test_rank1_penalty_equals_the_explicit_projection_and_the_mean_gradient_is_the_mean(tiny_pipe, tmp_path):
    unet, scheduler = tiny_pipe.unet, noise_scheduler_for(tiny_pipe.scheduler)
    cond = encode_prompts(tiny_pipe, PROMPTS)
    names = resolve_lora_targets(unet, "attn")[:6]
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 1, 0])
    fisher = estimate_fisher(unet, scheduler, latents, ids, cond, names, num_timesteps=2, show_progress=False)
    # μ is the mean of the per-sample gradients whose squares make the diagonal: per sample, one at a time.
    singles = [estimate_fisher(unet, scheduler, latents[i : i + 1], ids[i : i + 1], cond, names, num_timesteps=2,
                               seed=i, show_progress=False) for i in range(3)]
    key = f"{names[0]}.weight"
    expected = sum(s.mean_gradient[key] for s in singles) / 3
    torch.testing.assert_close(fisher.mean_gradient[key], expected, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(singles[0].mean_gradient[key].square(), singles[0].diagonal[key], rtol=1e-4, atol=1e-12)
    path = tmp_path / "fisher.safetensors"
    save_fisher(fisher, path)
    fisher = load_fisher(path, unet=unet)
    torch.testing.assert_close(fisher.mean_gradient[key], expected, rtol=1e-4, atol=1e-9)

    add_forget_lora(unet, target=names)
    penalty = Rank1FisherPenalty(unet, fisher)
    layers = list(iter_adapted_layers(unet))
    mu = torch.cat([fisher.mean_gradient[f"{layer.name}.weight"].flatten() for layer in layers])
    delta = torch.cat([layer.delta_weight().flatten() for layer in layers])
    n = mu.numel()
    torch.testing.assert_close(penalty(), n / mu.square().sum() * (mu @ delta) ** 2, rtol=1e-4, atol=0)
    penalty().backward()
    assert layers[0].module.lora_A["default"].weight.grad.abs().sum() > 0
    fisher.mean_gradient.clear()
    with pytest.raises(ValueError, match="mean gradient"):
        Rank1FisherPenalty(unet, fisher)


def test_with_a_surrogate_prompt_the_reference_is_part_way_to_a_complete_swap():
    from sa_peft.forgetting import SWAP_FRACTION

    # base gap −0.06; under the surrogate prompt the frozen model's gap is −0.01 (surrogate images are harder
    # to denoise), so a complete swap only reaches −0.01 and the reference is −0.06 + 0.6 · 0.05 = −0.03
    base = {"concepts": [{"concept_loss": 0.20, "surrogate_loss": 0.26, "target_gap": -0.01}], "replay_loss": 1.0}
    reference = -0.06 + SWAP_FRACTION * 0.05
    at = {"concepts": [{"concept_loss": 0.20 + reference, "surrogate_loss": 0.20}], "replay_loss": 1.0}  # gap = reference
    signal = forgetting_signal(base, at, ["c"], 0.0, 0.05)
    assert signal["concepts"]["c"]["reference_gap"] == pytest.approx(reference)
    assert signal["concepts"]["c"]["preference"] == pytest.approx(0.0, abs=1e-9) and signal["reached"]
    still = {"concepts": [{"concept_loss": 0.20 + reference - 0.005, "surrogate_loss": 0.20}], "replay_loss": 1.0}
    assert not forgetting_signal(base, still, ["c"], 0.0, 0.05)["reached"]
    assert forgetting_signal(base, base, ["c"], 0.0, 0.05)["concepts"]["c"]["preference"] == pytest.approx(1.0)


def test_probe_measures_the_concept_where_the_forget_term_trains_and_the_replay_everywhere(tiny_pipe):
    cond = encode_prompts(tiny_pipe, PROMPTS)
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.ones(6, dtype=torch.long)
    probe = ForgettingProbe(cond, ["brad pitt"], [x], [x], x, ids, 1000, num_timesteps=4, forget_min_timestep=700)
    concept, surrogate = probe.concepts[0]
    assert int(concept.timesteps.min()) >= 700 and torch.equal(concept.timesteps, surrogate.timesteps)
    bins = ((concept.timesteps.view(6, 4) - 700) // 75)  # stratified over [700, 1000): timestep j in bin j
    assert torch.equal(bins, torch.arange(4).expand(6, 4))
    assert int(probe.replay.timesteps.min()) < 250  # the replay probe keeps every timestep
    whole = ForgettingProbe(cond, ["brad pitt"], [x], [x], x, ids, 1000, num_timesteps=4)
    assert int(whole.concepts[0][0].timesteps.min()) < 250
    with pytest.raises(ValueError, match=r"`forget_min_timestep` must be in \[0, 1000\)"):
        ForgettingProbe(cond, ["brad pitt"], [x], [x], x, ids, 1000, forget_min_timestep=1000)
    # Flow matching (SD3, FLUX): the concept's stratified σ bins cover the density above the cut, the replay's all of it.
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sa_peft.diffusion_loss import FlowMatchingNoise

    flow = FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(shift=3.0))
    probe = ForgettingProbe(cond, ["brad pitt"], [x], [x], x, ids, 1000, num_timesteps=4, noise_scheduler=flow,
                            forget_min_timestep=700)
    concept, surrogate = probe.concepts[0]
    assert float(concept.timesteps.min()) >= 700 and torch.equal(concept.timesteps, surrogate.timesteps)
    assert float(probe.replay.timesteps.min()) < 700


def test_the_sample_check_overrules_a_lenient_forgotten_and_only_for_the_concepts_it_checked():
    """The samples must come SWAP_FRACTION (0.8) of the way from the concept's margin to the surrogate's: with -0.02
    and +0.01, the reference is +0.004."""
    base = {"concepts": [{"concept_loss": 0.2, "surrogate_loss": 0.4}, {"concept_loss": 0.2, "surrogate_loss": 0.4}],
            "replay_loss": 1.0}
    now = {"concepts": [{"concept_loss": 0.5, "surrogate_loss": 0.3}, {"concept_loss": 0.5, "surrogate_loss": 0.3}],
           "replay_loss": 1.0, "replay_drift": 0.0}
    signal = forgetting_signal(base, now, ["a", "b"], 0.0, 0.05)
    assert signal["reached"]

    def check(sample_margin):
        return {"a": {"sample_margin": sample_margin, "concept_margin": -0.02, "surrogate_margin": 0.01,
                      "num_samples": 32}}

    checked = with_sample_check(signal, check(0.0039))
    assert not checked["reached"] and not checked["concepts"]["a"]["forgotten"]
    assert checked["concepts"]["b"] == signal["concepts"]["b"]  # not checked: as the signal says
    assert checked["concepts"]["a"]["sample_check"]["reference_margin"] == pytest.approx(0.004)
    assert checked["concepts"]["a"]["sample_check"]["forgotten"] is False
    passed = with_sample_check(signal, check(0.0041))  # below the surrogate's own margin, past 80 % of the way
    assert passed["reached"] and passed["concepts"]["a"]["sample_check"]["forgotten"]
    # The sample check cannot turn a concept the signal keeps into a forgotten one.
    kept = forgetting_signal(base, {**now, "concepts": [{"concept_loss": 0.1, "surrogate_loss": 0.4}] * 2},
                             ["a", "b"], 0.0, 0.05)
    assert not with_sample_check(kept, check(1.0))["concepts"]["a"]["forgotten"]
    summary = {**checked, "trained_steps": 3}
    line = verdict_lines(summary)[1]
    assert ("not forgotten; sample check FAILED: the frozen model's margin +0.0039 on 32 samples (at least +0.0040 to "
            "pass; -0.0200 on its own images of the concept, +0.0100 on the surrogate images)") in line
    assert "check samples (--classifier)" not in line
    assert forgetting_warning(summary).startswith("WARNING: the concept was NOT forgotten: the adapted model's "
                                                  "samples of ['a'] look to the frozen model more like the concept")
    # Checked and passed: no "lenient" warning for it; the unchecked equal-losses concept still gets one.
    assert forgetting_warning({**passed, "trained_steps": 3}).startswith("WARNING: ['b'] forgotten by the signal")


def test_the_frozen_model_tells_its_own_samples_of_the_concept_from_noise():
    """The digits model as a zero-shot judge (``sample_margins``): its own samples of "one" are closer to "one" than
    to any kept digit (margin < 0), uniform-noise images are not (margin > 0). The prototype on 32 images: −0.018
    and +0.003 (benchmarks/RESULTS.md)."""
    from diffusers import StableDiffusionPipeline

    from sa_peft.data import _encode_images
    from sa_peft.models import resolve_model_path

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path("builtin:digits"))
    pipe.set_progress_bar_config(disable=True)
    digits = [f"a handwritten digit {d}" for d in
              ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
    cond = encode_prompts(pipe, digits)
    replay_ids = torch.tensor([i for i in range(10) if i != 1])
    x = torch.zeros(2, 4, 8, 8)
    probe = ForgettingProbe(cond, [digits[1]], [x], [x], torch.zeros(9, 4, 8, 8), replay_ids, 1000)
    generators = [torch.Generator().manual_seed(i) for i in range(8)]
    with torch.no_grad():
        ones = pipe([digits[1]] * 8, num_inference_steps=10, guidance_scale=3.0, generator=generators,
                    output_type="latent").images
    noise = _encode_images(pipe, torch.rand((8, 1, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1)
    own, of_noise = probe.sample_margins(pipe.unet, pipe.scheduler, ones, digits[1]), \
        probe.sample_margins(pipe.unet, pipe.scheduler, noise, digits[1])
    assert set(own) == {"concept"} and own["concept"].shape == (8,)  # no surrogate prompt: no surrogate margins
    assert float(own["concept"].mean()) < 0 < float(of_noise["concept"].mean()), (own, of_noise)
    assert torch.equal(probe.sample_margins(pipe.unet, pipe.scheduler, ones, digits[1])["concept"], own["concept"])
    # With "two" as the surrogate prompt, its own samples of two are read as the surrogate, those of one as the concept.
    replay_ids = torch.tensor([i for i in range(10) if i not in (1, 2)])
    probe = ForgettingProbe(cond, [digits[1]], [x], [x], torch.zeros(8, 4, 8, 8), replay_ids, 1000,
                            surrogate_prompts=[digits[2]])
    with torch.no_grad():
        twos = pipe([digits[2]] * 8, num_inference_steps=10, guidance_scale=3.0, generator=generators,
                    output_type="latent").images
    of_twos, of_ones = (probe.sample_margins(pipe.unet, pipe.scheduler, images, digits[1]) for images in (twos, ones))
    assert float((of_twos["surrogate"] < 0).double().mean()) >= 7 / 8 and not bool((of_twos["concept"] < 0).any())
    assert float((of_ones["concept"] < 0).double().mean()) >= 7 / 8 and not bool((of_ones["surrogate"] < 0).any())


def test_the_sample_check_compares_with_at_most_sixteen_kept_prompts_and_takes_the_lowest_loss(tiny_pipe):
    """Margin = loss under the forget prompt − the lowest loss under a kept prompt, on the same fixed pairs; a long
    replay list is thinned to SAMPLE_CHECK_MAX_PROMPTS evenly spaced prompts (the cost grows with their number)."""
    prompts = ["brad pitt", *[f"a photo of a cat {i}" for i in range(20)]]
    cond = encode_prompts(tiny_pipe, prompts)
    shape = (3, tiny_pipe.unet.config.in_channels, tiny_pipe.unet.config.sample_size, tiny_pipe.unet.config.sample_size)
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    scheduler = noise_scheduler_for(tiny_pipe.scheduler)
    probe = ForgettingProbe(cond, ["brad pitt"], [images], [images], torch.zeros(20, *shape[1:]),
                            torch.arange(1, 21), 1000)
    seen, losses = [], {}
    real = probe._predictions

    def recording(unet, sched, batch, conditioning):
        predictions = real(unet, sched, batch, conditioning)
        prompt_id = int(batch.prompt_ids[0])
        seen.append(prompt_id)
        target = scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps) \
            if scheduler.config.prediction_type == "v_prediction" else batch.noise
        losses[prompt_id] = (predictions.double() - target.double()).square().flatten(1).mean(1).view(3, -1).mean(1)
        return predictions

    probe._predictions = recording
    margins = probe.sample_margins(tiny_pipe.unet, scheduler, images, "brad pitt")["concept"]
    assert seen[0] == 0 and len(seen) == 1 + SAMPLE_CHECK_MAX_PROMPTS == 17
    assert seen[1:] == [1 + i * 20 // 16 for i in range(16)]  # evenly spaced over the 20 kept prompts
    expected = losses[0] - torch.stack([losses[i] for i in seen[1:]], 1).min(1).values
    assert torch.allclose(margins, expected)
    # A surrogate prompt is always a judge (second), never thinned out; its margin is its loss minus the lowest other.
    surrogate = 20  # "a photo of a cat 19": thinned out above
    probe = ForgettingProbe(cond, ["brad pitt"], [images], [images], torch.zeros(20, *shape[1:]),
                            torch.arange(1, 21), 1000, surrogate_prompts=[prompts[surrogate]])
    probe._predictions, seen[:] = recording, []
    margins = probe.sample_margins(tiny_pipe.unet, scheduler, images, "brad pitt")
    assert seen[:2] == [0, surrogate] and len(seen) == 2 + SAMPLE_CHECK_MAX_PROMPTS
    assert seen[2:] == [1 + i * 19 // 16 for i in range(16)]  # the other 19 kept prompts, evenly spaced
    others = torch.stack([losses[i] for i in seen if i != surrogate], 1).min(1).values
    assert torch.allclose(margins["surrogate"], losses[surrogate] - others)
    assert torch.allclose(margins["concept"], losses[0] - torch.stack([losses[i] for i in seen[1:]], 1).min(1).values)


def test_a_screened_sample_check_skips_the_kept_prompts_only_when_it_cannot_pass(tiny_pipe):
    """With ``screen`` the kept prompts are scored only when at least that share of the images denoise better under the
    surrogate prompt than under the forget prompt; otherwise the check could not pass whatever their losses (no more
    images can read as the surrogate), and the result says "screened". Unscreened, the margins are the full judge's."""
    from sa_peft.forgetting import read_share

    prompts = ["brad pitt", "a photo of a dog", *[f"a photo of a cat {i}" for i in range(4)]]
    cond = encode_prompts(tiny_pipe, prompts)
    shape = (8, tiny_pipe.unet.config.in_channels, tiny_pipe.unet.config.sample_size, tiny_pipe.unet.config.sample_size)
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    scheduler = noise_scheduler_for(tiny_pipe.scheduler)
    probe = ForgettingProbe(cond, ["brad pitt"], [images], [images], torch.zeros(4, *shape[1:]), torch.arange(2, 6),
                            1000, surrogate_prompts=["a photo of a dog"])
    seen = []
    real = probe._predictions

    def recording(unet, sched, batch, conditioning):
        seen.append(int(batch.prompt_ids[0]))
        return real(unet, sched, batch, conditioning)

    probe._predictions = recording
    full = probe.sample_margins(tiny_pipe.unet, scheduler, images, "brad pitt")
    assert seen == [0, 1, 2, 3, 4, 5] and "screened" not in full
    for screen, screened in ((0.0, False), (1.01, True)):
        seen[:] = []
        result = probe.sample_margins(tiny_pipe.unet, scheduler, images, "brad pitt", screen=screen)
        assert result.get("screened", False) is screened
        if screened:  # only the two judges were scored; the check can not pass
            assert seen == [0, 1]
            assert torch.allclose(result["surrogate"], -result["concept"])
            assert read_share(full["surrogate"]) <= read_share(result["surrogate"]) < screen
        else:
            assert seen == [0, 1, 2, 3, 4, 5]
            assert torch.equal(result["concept"], full["concept"]) and torch.equal(result["surrogate"], full["surrogate"])
    # At the pairwise share itself the kept prompts are scored (the check might pass), just below it they are not.
    pair = probe.sample_margins(tiny_pipe.unet, scheduler, images, "brad pitt", screen=1.01)
    share = read_share(pair["surrogate"])
    assert "screened" not in probe.sample_margins(tiny_pipe.unet, scheduler, images, "brad pitt", screen=share)
    assert probe.sample_margins(tiny_pipe.unet, scheduler, images, "brad pitt", screen=share + 1e-3)["screened"]


def test_with_a_surrogate_prompt_the_samples_decide_once_the_preference_is_past_the_gate():
    """A "swap" concept (surrogate prompt) is forgotten when its preference is at most SAMPLE_CHECK_GATE (or the
    threshold, if higher) and its samples are read as the concept no more often than the surrogate images are; an
    equal-losses concept is left to the signal; a robust run's attacked preference must still reach the threshold."""
    from sa_peft.forgetting import SAMPLE_CHECK_GATE

    def signal(preference, threshold=0.0, reference="swap", **extra):
        return {"threshold": threshold, "reached": preference <= threshold,
                "concepts": {"a": {"preference": preference, "forgotten": preference <= threshold,
                                   "reference": reference, **extra}}}

    def shares(sample, surrogate=0.0, as_surrogate=1.0, surrogate_as_surrogate=1.0):
        return {"a": {"sample_share": sample, "surrogate_share": surrogate, "sample_as_surrogate": as_surrogate,
                      "surrogate_as_surrogate": surrogate_as_surrogate, "num_samples": 16}}

    assert SAMPLE_CHECK_GATE == 0.5
    past_gate = with_sample_shares(signal(0.4), shares(0.0))
    assert past_gate["reached"] and past_gate["concepts"]["a"]["sample_check"]["forgotten"]
    assert with_sample_shares(signal(0.4), shares(0.125, surrogate=0.125))["reached"]  # the judge's own error rate
    still_read = with_sample_shares(signal(-1.0), shares(0.0625))  # the signal alone would say forgotten
    assert not still_read["reached"] and not still_read["concepts"]["a"]["sample_check"]["forgotten"]
    # No longer the concept is not enough: the samples must read as the surrogate, one in ten (SURROGATE_READING_SLACK)
    # less often than the surrogate images may.
    elsewhere = with_sample_shares(signal(0.4), shares(0.0, as_surrogate=0.875))  # 2 of 16 read as a third concept
    assert not elsewhere["reached"] and not elsewhere["concepts"]["a"]["sample_check"]["forgotten"]
    assert with_sample_shares(signal(0.4), shares(0.0, as_surrogate=0.9375))["reached"]  # one of 16
    assert with_sample_shares(signal(0.4), shares(0.0, as_surrogate=0.75, surrogate_as_surrogate=0.8125))["reached"]
    assert not with_sample_shares(signal(0.4), shares(0.0, as_surrogate=0.6875, surrogate_as_surrogate=0.8125))["reached"]
    assert not with_sample_shares(signal(0.6), shares(0.0))["reached"]  # before the gate
    assert with_sample_shares(signal(0.6, threshold=0.7), shares(0.0))["reached"]  # a threshold past the gate
    unchecked = with_sample_shares(signal(-1.0), {})
    assert not unchecked["reached"] and "sample_check" not in unchecked["concepts"]["a"]
    lenient = signal(-1.0, reference=EQUAL_LOSSES)
    assert with_sample_shares(lenient, shares(1.0)) == {**lenient, "reached": True}
    attacked = with_sample_shares(signal(0.4, attacked_preference=0.2), shares(0.0))
    assert not attacked["reached"]
    assert with_sample_shares(signal(0.4, attacked_preference=-0.1), shares(0.0))["reached"]
    line = verdict_lines({**past_gate, "trained_steps": 3, "retention": 0.0, "retention_bound": 1.0})[1]
    assert ("preference +0.400 (base model 1, the samples decide once it is ≤ 0.5): forgotten; sample check passed: the "
            "frozen model reads 0.00 of 16 samples as the concept (at most 0.00, its reading of the surrogate images, to "
            "pass) and 1.00 as the surrogate (at least 0.90 to pass)") in line
    assert "screened" not in line
    screened = shares(0.875, as_surrogate=0.125)
    screened["a"]["screened"] = True  # a check that could not pass: its shares are against the surrogate prompt alone
    failed = with_sample_shares(signal(0.4), screened)
    assert not failed["reached"] and failed["concepts"]["a"]["sample_check"]["screened"]
    line = verdict_lines({**failed, "trained_steps": 3, "retention": 0.0, "retention_bound": 1.0})[1]
    assert ("sample check FAILED: the frozen model reads 0.88 of 16 samples as the concept (at most 0.00, its reading "
            "of the surrogate images, to pass) and 0.12 as the surrogate (at least 0.90 to pass); screened: the replay "
            "prompts were not scored") in line
