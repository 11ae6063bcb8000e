"""The Selective Amnesia objective, in one place.

    L = E_{x~q(x|c_f)} ℓ(x, c_f)  +  γ · E_{(x,c)~replay} ℓ(x, c)  +  λ · Σ_i F_i (θ_i − θ*_i)²

ℓ is the diffusion loss (ε- or v-prediction MSE, or the flow-matching loss for SD3, mean over latent elements,
one timestep and one noise draw per sample; ``diffusion_loss`` knows each model family), optionally Min-SNR-γ weighted and with offset noise as in diffusers'
scripts. The EWC term is an ``EWCPenalty`` over the forget adapter's LoRA layers.

Replay as distillation (``replay_target="distill"``): the replay term's target is the frozen model's
own prediction on the same noised replay latent, ‖ε_θ(x_t, c) − ε_θ*(x_t, c)‖², instead of the
sampled noise. The frozen model is the same UNet with its adapters switched off, so nothing is copied.
Its expectation is the replay loss minus an irreducible part that does not depend on θ, with far less
variance: a replay batch no longer says "denoise this image" but "predict what you predicted before".
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .conditioning import PromptConditioning
from .diffusion_loss import (
    model_prediction,
    noisiest_timesteps,
    per_sample_diffusion_loss,
    prediction_target,
    sample_timesteps,
    snr_weights,
)
from .errors import InputError

REPLAY_TARGETS = ("noise", "distill")


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run ``model`` as the frozen base: every LoRA layer of every adapter switched off, then restored."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m, was_disabled in zip(layers, previous):
            m.enable_adapters(not was_disabled)


@dataclass
class SALoss:
    """The total loss and its parts (detached parts are for logging)."""

    total: torch.Tensor
    forget: torch.Tensor
    replay: torch.Tensor
    ewc: torch.Tensor
    ablation: torch.Tensor | None = None  # --robust_forgetting's concept-ablation term, already in ``total``

    def parts(self) -> dict[str, float]:
        parts = {"loss": self.total.item(), "forget": self.forget.item(), "replay": self.replay.item(), "ewc": self.ewc.item()}
        return parts if self.ablation is None else {**parts, "ablation": self.ablation.item()}


class NonFiniteLossError(InputError):
    """The training loss became NaN or infinite; the run stops before anything is saved (a ValueError: the
    settings caused it, and the message names the flags to change)."""


def check_finite_loss(loss: SALoss, step: int) -> None:
    """Stop the run at the first non-finite loss: a NaN step turns every LoRA weight into NaN, and that
    adapter would be saved and carded as if it were trained (``--ewc_lambda inf`` did exactly that)."""
    if bool(torch.isfinite(loss.total.detach())):
        return
    parts = ", ".join(f"{k} {v}" for k, v in loss.parts().items())
    raise NonFiniteLossError(f"the training loss is not finite at step {step} ({parts}); no adapter was written. "
                             "Lower `learning_rate`, `ewc_lambda` or `noise_offset`, or train without `mixed_precision` fp16")


def selective_amnesia_loss(
    unet: torch.nn.Module,
    scheduler,
    conditioning: PromptConditioning,
    surrogate_latents: torch.Tensor,
    surrogate_prompt_ids: torch.Tensor,
    replay_latents: torch.Tensor | None,
    replay_prompt_ids: torch.Tensor | None,
    ewc_penalty: torch.nn.Module | None,
    ewc_lambda: float,
    replay_weight: float,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    generator: torch.Generator | None = None,
    replay_target: str = "noise",
    base_unet: torch.nn.Module | None = None,
    base_conditioning: PromptConditioning | None = None,
    forget_min_timestep: int = 0,
) -> SALoss:
    """Evaluate L on one surrogate batch (paired with forget prompts) and one replay batch.

    Both batches go through the UNet in a single call. ``replay_latents=None`` or ``replay_weight=0``
    drops the replay term; ``ewc_penalty=None`` or ``ewc_lambda=0`` drops the EWC term.
    ``replay_target="distill"`` makes the replay target the frozen model's prediction: ``base_unet``
    (default ``unet``; pass the unwrapped module under DDP) with its adapters disabled, conditioned on
    ``base_conditioning`` (default ``conditioning``; the frozen text encoder's, when it is trained).
    ``forget_min_timestep``: the surrogate batch's timesteps lie in [that, T) (``noisiest_timesteps``), the
    replay batch's in [0, T) as always.
    """
    if replay_target not in REPLAY_TARGETS:
        raise InputError(f"`replay_target` must be one of {REPLAY_TARGETS}, got {replay_target!r}")
    use_replay = replay_latents is not None and len(replay_latents) > 0 and replay_weight != 0
    latents = torch.cat([surrogate_latents, replay_latents]) if use_replay else surrogate_latents
    prompt_ids = torch.cat([surrogate_prompt_ids, replay_prompt_ids]) if use_replay else surrogate_prompt_ids
    device, dtype = latents.device, latents.dtype
    noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else None).to(device, dtype)
    if noise_offset:
        offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=generator.device if generator else None)
        noise = noise + noise_offset * offset.to(device, dtype)
    timesteps = sample_timesteps(scheduler, len(latents), generator, device)
    n = len(surrogate_latents)
    if forget_min_timestep:
        timesteps = torch.cat([noisiest_timesteps(scheduler, timesteps[:n], forget_min_timestep, generator), timesteps[n:]])
    kwargs = conditioning.unet_kwargs(prompt_ids, dtype)
    if use_replay and replay_target == "distill":
        # The frozen model's prediction first: switching adapters off and on touches requires_grad.
        base = unet if base_unet is None else base_unet
        base_kwargs = (base_conditioning or conditioning).unet_kwargs(prompt_ids[n:], dtype)
        noisy = scheduler.add_noise(latents[n:], noise[n:], timesteps[n:])
        with torch.no_grad(), adapters_disabled(base):
            frozen = model_prediction(base, noisy, timesteps[n:], base_kwargs)
        target = torch.cat([prediction_target(scheduler, latents[:n], noise[:n], timesteps[:n]), frozen.to(latents.dtype)])
        losses = per_sample_diffusion_loss(unet, scheduler, latents, timesteps, noise, kwargs, target=target)
    else:
        losses = per_sample_diffusion_loss(unet, scheduler, latents, timesteps, noise, kwargs)
    if snr_gamma is not None:
        losses = losses * snr_weights(scheduler, timesteps, snr_gamma).to(losses)
    forget = losses[:n].mean()
    replay = losses[n:].mean() if use_replay else torch.zeros((), device=device)
    ewc = ewc_penalty() if ewc_penalty is not None and ewc_lambda != 0 else torch.zeros((), device=device)
    total = forget + replay_weight * replay + ewc_lambda * ewc
    return SALoss(total=total, forget=forget.detach(), replay=replay.detach(), ewc=ewc.detach())
