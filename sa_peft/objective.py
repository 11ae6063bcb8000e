"""The Selective Amnesia objective, in one place.

    L = E_{x~q(x|c_f)} ℓ(x, c_f)  +  γ · E_{(x,c)~replay} ℓ(x, c)  +  λ · Σ_i F_i (θ_i − θ*_i)²

ℓ is the diffusion loss (ε- or v-prediction MSE, mean over latent elements, one uniform timestep and
one noise draw per sample), optionally Min-SNR-γ weighted and with offset noise as in diffusers'
scripts. The EWC term is an ``EWCPenalty`` over the forget adapter's LoRA layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import PromptConditioning
from .diffusion_loss import per_sample_diffusion_loss, snr_weights


@dataclass
class SALoss:
    """The total loss and its parts (detached parts are for logging)."""

    total: torch.Tensor
    forget: torch.Tensor
    replay: torch.Tensor
    ewc: torch.Tensor

    def parts(self) -> dict[str, float]:
        return {"loss": self.total.item(), "forget": self.forget.item(), "replay": self.replay.item(), "ewc": self.ewc.item()}


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
) -> SALoss:
    """Evaluate L on one surrogate batch (paired with forget prompts) and one replay batch.

    Both batches go through the UNet in a single call. ``replay_latents=None`` or ``replay_weight=0``
    drops the replay term; ``ewc_penalty=None`` or ``ewc_lambda=0`` drops the EWC term.
    """
    use_replay = replay_latents is not None and len(replay_latents) > 0 and replay_weight != 0
    latents = torch.cat([surrogate_latents, replay_latents]) if use_replay else surrogate_latents
    prompt_ids = torch.cat([surrogate_prompt_ids, replay_prompt_ids]) if use_replay else surrogate_prompt_ids
    device, dtype = latents.device, latents.dtype
    noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else None).to(device, dtype)
    if noise_offset:
        offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=generator.device if generator else None)
        noise = noise + noise_offset * offset.to(device, dtype)
    T = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, T, (len(latents),), generator=generator, device=generator.device if generator else None).to(device)
    losses = per_sample_diffusion_loss(unet, scheduler, latents, timesteps, noise, conditioning.unet_kwargs(prompt_ids, dtype))
    if snr_gamma is not None:
        losses = losses * snr_weights(scheduler, timesteps, snr_gamma).to(losses)
    n = len(surrogate_latents)
    forget = losses[:n].mean()
    replay = losses[n:].mean() if use_replay else torch.zeros((), device=device)
    ewc = ewc_penalty() if ewc_penalty is not None and ewc_lambda != 0 else torch.zeros((), device=device)
    total = forget + replay_weight * replay + ewc_lambda * ewc
    return SALoss(total=total, forget=forget.detach(), replay=replay.detach(), ewc=ewc.detach())
