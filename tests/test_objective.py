"""The Selective Amnesia objective: forget + γ·replay + λ·EWC, targets, Min-SNR weighting, gradient flow."""

from __future__ import annotations

import pytest
import torch
from conftest import add_forget_lora, random_fisher
from diffusers.training_utils import compute_snr

from sa_peft.conditioning import PromptConditioning, encode_prompts
from sa_peft.ewc import EWCPenalty
from sa_peft.objective import NonFiniteLossError, SALoss, adapters_disabled, check_finite_loss, selective_amnesia_loss
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

PROMPTS = ["brad pitt", "a photo of a cat", "a red car"]


def setup(prediction_type="epsilon"):
    pipe = build_tiny_pipeline(prediction_type=prediction_type)
    conditioning = encode_prompts(pipe, PROMPTS)
    names = add_forget_lora(pipe.unet, "xattn", rank=2)
    ewc = EWCPenalty(pipe.unet, random_fisher(pipe.unet, names))
    gen = torch.Generator().manual_seed(0)
    batch = {
        "surrogate_latents": torch.randn(2, 4, 16, 16, generator=gen),
        "surrogate_prompt_ids": torch.tensor([0, 0]),
        "replay_latents": torch.randn(2, 4, 16, 16, generator=gen),
        "replay_prompt_ids": torch.tensor([1, 2]),
    }
    return pipe, conditioning, ewc, batch


def loss(pipe, conditioning, batch, ewc, ewc_lambda=2.0, replay_weight=0.5, seed=11, **kwargs):
    return selective_amnesia_loss(
        pipe.unet,
        pipe.scheduler,
        conditioning,
        **batch,
        ewc_penalty=ewc,
        ewc_lambda=ewc_lambda,
        replay_weight=replay_weight,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def hand_losses(pipe, conditioning, latents, prompt_ids, seed, target="auto"):
    """Per-sample losses with the same draws the objective makes: noise first, then timesteps."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        prediction = pipe.unet(
            noisy, timesteps, encoder_hidden_states=conditioning.encoder_hidden_states[prompt_ids]
        ).sample
    if target == "auto":
        target = pipe.scheduler.config.prediction_type
    expected = pipe.scheduler.get_velocity(latents, noise, timesteps) if target == "v_prediction" else noise
    return (prediction - expected).square().mean(dim=(1, 2, 3)), timesteps


def test_total_is_forget_plus_weighted_replay_plus_weighted_ewc():
    pipe, conditioning, ewc, batch = setup()
    out = loss(pipe, conditioning, batch, ewc, ewc_lambda=2.0, replay_weight=0.5)
    latents = torch.cat([batch["surrogate_latents"], batch["replay_latents"]])
    ids = torch.cat([batch["surrogate_prompt_ids"], batch["replay_prompt_ids"]])
    per_sample, _ = hand_losses(pipe, conditioning, latents, ids, seed=11)
    torch.testing.assert_close(out.forget, per_sample[:2].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.replay, per_sample[2:].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.ewc, ewc().detach(), rtol=1e-6, atol=0)
    assert out.ewc > 0 and out.replay > 0
    torch.testing.assert_close(out.total, out.forget + 0.5 * out.replay + 2.0 * out.ewc, rtol=1e-6, atol=0)
    assert out.total.requires_grad and not out.forget.requires_grad
    parts = out.parts()
    assert set(parts) == {"loss", "forget", "replay", "ewc"}
    assert parts["loss"] == pytest.approx(out.total.item())


def test_zero_weights_drop_terms():
    pipe, conditioning, ewc, batch = setup()
    calls = []

    def counting():
        calls.append(1)
        return ewc()

    no_replay = loss(pipe, conditioning, batch, counting, ewc_lambda=2.0, replay_weight=0.0)
    assert no_replay.replay.item() == 0.0
    per_sample, _ = hand_losses(pipe, conditioning, batch["surrogate_latents"], batch["surrogate_prompt_ids"], seed=11)
    torch.testing.assert_close(no_replay.forget, per_sample.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(no_replay.total, no_replay.forget + 2.0 * no_replay.ewc, rtol=1e-6, atol=0)
    assert calls == [1]

    no_ewc = loss(pipe, conditioning, batch, counting, ewc_lambda=0.0, replay_weight=0.5)
    assert no_ewc.ewc.item() == 0.0 and calls == [1]  # the penalty is not even evaluated
    torch.testing.assert_close(no_ewc.total, no_ewc.forget + 0.5 * no_ewc.replay, rtol=1e-6, atol=0)

    none = selective_amnesia_loss(
        pipe.unet,
        pipe.scheduler,
        conditioning,
        batch["surrogate_latents"],
        batch["surrogate_prompt_ids"],
        None,
        None,
        None,
        ewc_lambda=5.0,
        replay_weight=1.0,
        generator=torch.Generator().manual_seed(11),
    )
    torch.testing.assert_close(none.total, no_replay.forget, rtol=1e-6, atol=0)
    assert none.replay.item() == 0.0 and none.ewc.item() == 0.0


def test_v_prediction_target_is_used():
    pipe, conditioning, ewc, batch = setup(prediction_type="v_prediction")
    out = loss(pipe, conditioning, batch, ewc, replay_weight=0.0)
    lat, ids = batch["surrogate_latents"], batch["surrogate_prompt_ids"]
    v_loss, _ = hand_losses(pipe, conditioning, lat, ids, seed=11, target="v_prediction")
    eps_loss, _ = hand_losses(pipe, conditioning, lat, ids, seed=11, target="epsilon")
    torch.testing.assert_close(out.forget, v_loss.mean(), rtol=1e-5, atol=0)
    assert not torch.isclose(out.forget, eps_loss.mean(), rtol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_snr_gamma_weights_the_per_sample_losses(prediction_type):
    pipe, conditioning, ewc, batch = setup(prediction_type)
    gamma = 0.5
    plain = loss(pipe, conditioning, batch, ewc)
    weighted = loss(pipe, conditioning, batch, ewc, snr_gamma=gamma)
    latents = torch.cat([batch["surrogate_latents"], batch["replay_latents"]])
    ids = torch.cat([batch["surrogate_prompt_ids"], batch["replay_prompt_ids"]])
    per_sample, timesteps = hand_losses(pipe, conditioning, latents, ids, seed=11)
    snr = compute_snr(pipe.scheduler, timesteps)
    weights = snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert not torch.allclose(weights, torch.ones_like(weights))
    torch.testing.assert_close(weighted.forget, (per_sample[:2] * weights[:2]).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(weighted.replay, (per_sample[2:] * weights[2:]).mean(), rtol=1e-5, atol=0)
    assert not torch.isclose(plain.total, weighted.total, rtol=1e-6)


def test_noise_offset_changes_the_loss():
    pipe, conditioning, ewc, batch = setup()
    plain = loss(pipe, conditioning, batch, ewc)
    offset = loss(pipe, conditioning, batch, ewc, noise_offset=0.5)
    assert not torch.isclose(plain.forget, offset.forget, rtol=1e-4)


def test_gradients_reach_only_lora_parameters():
    pipe, conditioning, ewc, batch = setup()
    out = loss(pipe, conditioning, batch, ewc)
    out.total.backward()
    lora = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert lora
    assert all(p.grad is not None for p in lora.values())
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in pipe.unet.named_parameters() if n not in lora)
    assert all(p.grad is None for p in pipe.text_encoder.parameters())
    assert all(p.grad is None for p in pipe.vae.parameters())


def test_noise_offset_is_one_constant_per_sample_and_channel(monkeypatch):
    import sa_peft.objective as objective_module

    pipe, conditioning, ewc, batch = setup()
    seen = []
    original = objective_module.per_sample_diffusion_loss

    def recording(unet, scheduler, latents, timesteps, noise, kwargs):
        seen.append((noise.clone(), timesteps.clone()))
        return original(unet, scheduler, latents, timesteps, noise, kwargs)

    monkeypatch.setattr(objective_module, "per_sample_diffusion_loss", recording)
    loss(pipe, conditioning, batch, ewc, seed=11, noise_offset=0.5)
    (noise, timesteps), = seen
    shape = (4, 4, 16, 16)  # surrogate and replay batches together
    gen = torch.Generator().manual_seed(11)
    plain = torch.randn(shape, generator=gen)
    offset = noise - plain
    # the offset is constant over the pixels of each (sample, channel) ...
    per_channel = offset[:, :, :1, :1]
    torch.testing.assert_close(offset, per_channel.expand(shape), rtol=0, atol=1e-6)
    # ... and is noise_offset times the next standard normal draw, one per (sample, channel), then the timesteps
    torch.testing.assert_close(per_channel, 0.5 * torch.randn(4, 4, 1, 1, generator=gen), rtol=1e-6, atol=1e-6)
    assert per_channel.flatten().unique().numel() == 16
    assert torch.equal(timesteps, torch.randint(0, 1000, (4,), generator=gen))


def test_one_replay_sample_counts_and_an_empty_replay_batch_is_dropped():
    pipe, conditioning, ewc, batch = setup()
    one = {**batch, "replay_latents": batch["replay_latents"][:1], "replay_prompt_ids": batch["replay_prompt_ids"][:1]}
    out = loss(pipe, conditioning, one, ewc, replay_weight=0.5)
    latents = torch.cat([one["surrogate_latents"], one["replay_latents"]])
    ids = torch.cat([one["surrogate_prompt_ids"], one["replay_prompt_ids"]])
    per_sample, _ = hand_losses(pipe, conditioning, latents, ids, seed=11)
    torch.testing.assert_close(out.forget, per_sample[:2].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.replay, per_sample[2], rtol=1e-5, atol=0)
    assert out.replay > 0

    empty = {**batch, "replay_latents": batch["replay_latents"][:0], "replay_prompt_ids": batch["replay_prompt_ids"][:0]}
    out = loss(pipe, conditioning, empty, ewc, replay_weight=0.5)
    assert out.replay.item() == 0.0 and torch.isfinite(out.total)
    per_sample, _ = hand_losses(pipe, conditioning, batch["surrogate_latents"], batch["surrogate_prompt_ids"], seed=11)
    torch.testing.assert_close(out.forget, per_sample.mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_noise_and_conditioning_follow_the_latents_dtype(monkeypatch, dtype):
    """The UNet sees noise, offset and text embeddings in the model dtype (a float32 draw must be cast)."""
    import sa_peft.objective as objective_module

    pipe, conditioning, _, batch = setup()
    pipe.unet.to(dtype)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    seen = []
    original = objective_module.per_sample_diffusion_loss

    def recording(unet, scheduler, latents, timesteps, noise, kwargs):
        seen.append((noise.dtype, kwargs["encoder_hidden_states"].dtype, timesteps.dtype))
        return original(unet, scheduler, latents, timesteps, noise, kwargs)

    monkeypatch.setattr(objective_module, "per_sample_diffusion_loss", recording)
    out = loss(pipe, conditioning, batch, None, ewc_lambda=0.0, noise_offset=0.1, snr_gamma=5.0)
    assert seen == [(dtype, dtype, torch.int64)]
    assert torch.isfinite(out.total) and out.total.requires_grad


def distill_hand(pipe, conditioning, batch, seed, base_unet=None, base_conditioning=None):
    """Forget and distilled-replay losses by hand: the replay target is the frozen model's prediction."""
    latents = torch.cat([batch["surrogate_latents"], batch["replay_latents"]])
    ids = torch.cat([batch["surrogate_prompt_ids"], batch["replay_prompt_ids"]])
    n = len(batch["surrogate_latents"])
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    base = pipe.unet if base_unet is None else base_unet
    base_hidden = (base_conditioning or conditioning).encoder_hidden_states[ids[n:]]
    with torch.no_grad():
        prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=conditioning.encoder_hidden_states[ids]).sample
        with adapters_disabled(base):
            frozen = base(noisy[n:], timesteps[n:], encoder_hidden_states=base_hidden).sample
    if pipe.scheduler.config.prediction_type == "v_prediction":
        forget_target = pipe.scheduler.get_velocity(latents[:n], noise[:n], timesteps[:n])
    else:
        forget_target = noise[:n]
    forget = (prediction[:n] - forget_target).square().mean(dim=(1, 2, 3))
    replay = (prediction[n:] - frozen).square().mean(dim=(1, 2, 3))
    return forget, replay, timesteps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_distilled_replay_target_is_the_frozen_models_prediction(prediction_type):
    pipe, conditioning, ewc, batch = setup(prediction_type)
    out = loss(pipe, conditioning, batch, ewc, ewc_lambda=2.0, replay_weight=0.5, replay_target="distill")
    forget, replay, _ = distill_hand(pipe, conditioning, batch, seed=11)
    torch.testing.assert_close(out.forget, forget.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.replay, replay.mean(), rtol=1e-5, atol=0)
    assert out.replay > 0  # the adapter is random: it drifted from the frozen model
    torch.testing.assert_close(out.total, out.forget + 0.5 * out.replay + 2.0 * out.ewc, rtol=1e-6, atol=0)
    # Min-SNR weights apply to the distilled replay term as well.
    gamma = 0.5
    weighted = loss(pipe, conditioning, batch, ewc, snr_gamma=gamma, replay_target="distill")
    _, _, timesteps = distill_hand(pipe, conditioning, batch, seed=11)
    snr = compute_snr(pipe.scheduler, timesteps)
    weights = snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(weighted.replay, (replay * weights[2:]).mean(), rtol=1e-5, atol=0)
    # The adapters are switched back on, and the frozen pass did not cut the adapted pass's gradients.
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert all(not m.disable_adapters for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer))
    out.total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pipe.unet.named_parameters() if "lora_B" in n)


def test_distilled_replay_uses_the_given_base_unet_and_base_conditioning():
    pipe, conditioning, _, batch = setup()
    other = build_tiny_pipeline(seed=1).unet  # another model, without adapters
    hidden = conditioning.encoder_hidden_states
    base_conditioning = PromptConditioning(conditioning.prompts, hidden * 1.5 + 0.25, None, None)
    out = loss(pipe, conditioning, batch, None, ewc_lambda=0.0, replay_target="distill",
               base_unet=other, base_conditioning=base_conditioning)
    forget, replay, _ = distill_hand(pipe, conditioning, batch, seed=11, base_unet=other,
                                     base_conditioning=base_conditioning)
    torch.testing.assert_close(out.forget, forget.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.replay, replay.mean(), rtol=1e-5, atol=0)
    _, own, _ = distill_hand(pipe, conditioning, batch, seed=11)
    assert not torch.isclose(out.replay, own.mean(), rtol=1e-3)
    with pytest.raises(ValueError, match="`replay_target` must be one of .*'noise'.*'distill'.*got 'frozen'"):
        loss(pipe, conditioning, batch, None, replay_target="frozen")


def test_adapters_disabled_switches_every_lora_layer_off_and_restores_each_ones_state():
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe, conditioning, _, batch = setup()
    unet = pipe.unet
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) > 2
    layers[1].enable_adapters(False)  # one layer already off: it must stay off afterwards
    x = batch["surrogate_latents"]
    t = torch.tensor([10, 500])
    kwargs = {"encoder_hidden_states": conditioning.encoder_hidden_states[batch["surrogate_prompt_ids"]]}
    with torch.no_grad():
        adapted = unet(x, t, **kwargs).sample
        with adapters_disabled(unet) as model:
            assert model is unet
            assert all(m.disable_adapters for m in layers)
            frozen = unet(x, t, **kwargs).sample
        assert [m.disable_adapters for m in layers] == [i == 1 for i in range(len(layers))]
        unet.disable_adapters()
        reference = unet(x, t, **kwargs).sample
    torch.testing.assert_close(frozen, reference, rtol=0, atol=0)
    assert not torch.allclose(adapted, frozen)


def test_check_finite_loss_passes_finite_losses_and_names_step_parts_and_flags_otherwise():
    def parts(total):
        return SALoss(total=torch.tensor(total), forget=torch.tensor(1.0), replay=torch.tensor(0.25), ewc=torch.tensor(2.0))

    assert check_finite_loss(parts(1e30), 3) is None
    assert issubclass(NonFiniteLossError, ValueError)
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(NonFiniteLossError) as info:
            check_finite_loss(parts(bad), 7)
        assert str(info.value) == (
            f"the training loss is not finite at step 7 (loss {bad}, forget 1.0, replay 0.25, ewc 2.0); no adapter was "
            "written. Lower `learning_rate`, `ewc_lambda` or `noise_offset`, or train without `mixed_precision` fp16")


def test_prediction_target_refuses_other_prediction_types_by_name():
    from types import SimpleNamespace

    from sa_peft.diffusion_loss import prediction_target

    scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type="sample"))
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'; expected 'epsilon' or 'v_prediction'"):
        prediction_target(scheduler, x, x, torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_distilled_replay_conditions_the_frozen_pass_in_the_model_dtype(dtype):
    """The frozen pass gets the text embeddings cast to the UNet's dtype, like the adapted pass."""
    pipe, conditioning, _, batch = setup()
    pipe.unet.to(dtype)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].dtype), with_kwargs=True)
    try:
        out = loss(pipe, conditioning, batch, None, ewc_lambda=0.0, replay_target="distill")
    finally:
        hook.remove()
    assert seen == [dtype, dtype]  # the frozen pass, then the adapted one
    assert torch.isfinite(out.total) and out.replay > 0


def test_ddpm_timesteps_are_uniform_integers_from_the_given_or_the_global_generator():
    """``generator=None`` (the objective's default) draws from torch's global generator, as ``torch.randint`` does."""
    from sa_peft.diffusion_loss import sample_timesteps

    scheduler = build_tiny_pipeline(num_train_timesteps=50).scheduler
    torch.manual_seed(5)
    expected = torch.randint(0, 50, (64,))
    torch.manual_seed(5)
    got = sample_timesteps(scheduler, 64, None, "cpu")
    assert torch.equal(got, expected) and got.dtype == torch.long
    seeded = sample_timesteps(scheduler, 64, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert torch.equal(seeded, torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(5)))
    assert 0 <= int(seeded.min()) and int(seeded.max()) <= 49 and len(set(seeded.tolist())) > 20


def test_forget_min_timestep_moves_only_the_surrogate_batch_into_the_noisiest_timesteps(monkeypatch):
    """The surrogate samples train at t ∈ [min, T) (the same draws moved there), the replay samples at every t."""
    pipe, conditioning, ewc, batch = setup()
    seen = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda sample, timestep, **kw: (seen.append(timestep.clone()),
                                                                              forward(sample, timestep, **kw))[1])
    T = pipe.scheduler.config.num_train_timesteps
    out = loss(pipe, conditioning, batch, ewc, replay_target="distill", forget_min_timestep=T // 2, seed=3)
    frozen, adapted = seen  # distillation: the frozen pass on the replay batch, then both batches
    drawn = hand_losses(pipe, conditioning, torch.cat([batch["surrogate_latents"], batch["replay_latents"]]),
                        torch.cat([batch["surrogate_prompt_ids"], batch["replay_prompt_ids"]]), seed=3)[1]
    expected = torch.cat([T // 2 + drawn[:2] * (T - T // 2) // T, drawn[2:]])
    assert torch.equal(adapted, expected) and torch.equal(frozen, drawn[2:])
    assert bool((adapted[:2] >= T // 2).all()) and not torch.equal(adapted[:2], drawn[:2])
    plain = loss(pipe, conditioning, batch, ewc, replay_target="distill", seed=3)
    assert not torch.isclose(out.forget, plain.forget) and torch.isclose(out.replay, plain.replay)


def test_noisiest_timesteps_cover_the_upper_range_uniformly():
    from sa_peft.diffusion_loss import noisiest_timesteps

    scheduler = build_tiny_pipeline().scheduler
    T = scheduler.config.num_train_timesteps
    moved = noisiest_timesteps(scheduler, torch.arange(T), 600)
    assert int(moved.min()) == 600 and int(moved.max()) == T - 1
    counts = torch.bincount(moved - 600)
    assert len(counts) == T - 600 and int(counts.min()) >= 2 and int(counts.max()) <= 3  # every t in [600, T), evenly
    assert torch.equal(noisiest_timesteps(scheduler, torch.arange(T), 0), torch.arange(T))
    with pytest.raises(ValueError, match=r"`forget_min_timestep` must be in \[0, 1000\)"):
        noisiest_timesteps(scheduler, torch.arange(4), T)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_noisiest_timesteps_follow_the_density_restricted_to_the_upper_range(scheme, shift):
    """SD3/FLUX: the forget term's σ is drawn from the training density conditioned on t ≥ min (every draw there, in
    the proportions the unrestricted density gives those timesteps), and the probe's stratified bins likewise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sa_peft.diffusion_loss import FlowMatchingNoise, noisiest_timesteps

    flow = FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(shift=shift), weighting_scheme=scheme)
    gen = torch.Generator().manual_seed(0)
    unrestricted = flow.sample_timesteps(100_000, gen)
    moved = noisiest_timesteps(flow, torch.zeros(100_000), 500, gen)
    assert float(moved.min()) >= 500  # "mode" reached 499 when the range was widened by half a grid step
    conditional = unrestricted[unrestricted >= 500]
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(torch.quantile(moved, quantiles), torch.quantile(conditional, quantiles), rtol=0, atol=8.0)
    stratified = flow.stratified_timesteps(64, 8, gen, min_timestep=500)
    assert float(stratified.min()) >= 500
    # timestep j of every row from bin j: the rows' columns are ordered by the density's quantiles
    column_means = stratified.mean(0)
    assert bool((column_means[1:] - column_means[:-1] != 0).all())
    assert torch.equal(noisiest_timesteps(flow, unrestricted[:8], 0, gen), unrestricted[:8])
    with pytest.raises(ValueError, match=r"`forget_min_timestep` must be in \[0, 1000\)"):
        noisiest_timesteps(flow, torch.zeros(4), 1000, gen)
