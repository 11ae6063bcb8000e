"""The diffusion training loss ℓ, written once for the objective and the Fisher."""

from __future__ import annotations

import torch

from .errors import InputError


def noise_scheduler_for(scheduler):
    """The DDPM scheduler with ``scheduler``'s config, for noising training samples.

    Pipelines ship inference schedulers: ``add_noise`` of SDXL's ``EulerDiscreteScheduler`` returns
    x₀ + σ·ε (the UNet expects √ᾱ·x₀ + √(1−ᾱ)·ε) and indexes the inference timesteps, and PNDM has no
    ``get_velocity``. Training and the Fisher therefore noise with DDPM built from the same betas and
    ``prediction_type``, as diffusers' training scripts do; for DDPM/DDIM configs nothing changes.
    """
    from diffusers import DDPMScheduler

    if type(scheduler) is DDPMScheduler:
        return scheduler
    return DDPMScheduler.from_config(scheduler.config)


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """ε for epsilon-prediction schedulers, v = α·ε − σ·x₀ for v-prediction (SD 2.x)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise InputError(f"unsupported prediction_type {kind!r}; expected 'epsilon' or 'v_prediction'")


def per_sample_diffusion_loss(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    unet_kwargs: dict,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the UNet's prediction and its target, averaged over latent elements: one value per sample.

    ``target`` replaces the usual ε / v target (replay distillation passes the frozen model's prediction)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, **unet_kwargs, return_dict=False)[0]
    if target is None:
        target = prediction_target(scheduler, latents, noise, timesteps)
    return (prediction.float() - target.float()).square().flatten(1).mean(1)


def snr_weights(scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), as diffusers' training scripts apply them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma) / snr
    if scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=snr_gamma) / (snr + 1)
    return weights
