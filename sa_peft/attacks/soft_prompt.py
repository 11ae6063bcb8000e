"""The ``soft_prompt`` attack: a perturbation δ of the forget prompt's text embedding, optimised so the
*adapted* model denoises the base model's images of the concept well again (no classifier in the loop),
then sampled; beside it, as a control, the adapted model under δ's per-token norms in random directions. δ is
bounded per token: ‖δ_j‖ ≤ ε·‖e_j‖ (projected after each step), so the attack searches near the forget prompt rather
than writing an arbitrary new conditioning.

What is perturbed is the token sequence the denoiser attends to (``encoder_hidden_states``): the UNets'
cross-attention context, SD3's joint CLIP + T5 context, FLUX's T5 states. The pooled embedding (SDXL's
``text_embeds``, SD3's and FLUX's ``pooled_projections``) stays the prompt's own: it is not a token sequence, it
enters as one global modulation of every block (adaLN in SD3/FLUX), and keeping it fixed keeps the attack the same
attack on every family (SDXL's never perturbed it); ε is therefore measured on the context tokens alone. δ is
also zero where the context is exactly zero, which is SD3's CLIP states zero-padded to T5's width: the model
never saw those columns non-zero, and a perturbation there would be a conditioning no prompt can produce.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..conditioning import PromptConditioning, encode_prompts
from ..diffusion_loss import noise_scheduler_for, per_sample_diffusion_loss, sample_timesteps
from ..errors import InputError
from ..models import denoiser
from .context import AttackContext, best_samples, pooled_rate, summarise
from .sampling import sample


def project(delta: torch.Tensor, reference: torch.Tensor, epsilon: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """``delta`` (zero outside ``mask``) with each token's vector shrunk to at most ``epsilon`` × that token's
    embedding norm."""
    if mask is not None:
        delta = delta * mask
    limit = epsilon * reference.norm(dim=-1, keepdim=True)
    norm = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return delta * (limit / norm).clamp(max=1.0)


def random_direction_like(delta: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A perturbation with ``delta``'s per-token norms in random directions (zero outside ``mask``): the attack's
    control. If it brings the concept back as often as ``delta``, the bound is too loose, not the adapter weak."""
    direction = torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed)).to(delta) * mask.to(delta)
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12) * delta.norm(dim=-1, keepdim=True)


def perturbable(hidden: torch.Tensor) -> torch.Tensor:
    """Where δ may be non-zero: wherever the prompt's context is not exactly zero, i.e. everywhere but SD3's zero
    padding of its CLIP states (a text encoder's output is never exactly zero by chance)."""
    return hidden.ne(0).to(torch.float32)


def perturbed(conditioning: PromptConditioning, delta: torch.Tensor) -> PromptConditioning:
    """``conditioning``'s first row with ``delta`` added to its context; every other field (pooled embedding, SDXL's
    time ids, FLUX's text ids and guidance) is the prompt's own."""
    hidden = conditioning.encoder_hidden_states[:1]
    first = lambda t: None if t is None else t[:1]
    return replace(conditioning, prompts=conditioning.prompts[:1], encoder_hidden_states=hidden + delta.to(hidden),
                   text_embeds=first(conditioning.text_embeds), time_ids=first(conditioning.time_ids))


def optimise_soft_prompt(unet, scheduler, conditioning: PromptConditioning, latents: torch.Tensor, steps: int,
                         lr: float, epsilon: float, batch_size: int, seed: int) -> tuple[torch.Tensor, list[float]]:
    """δ that lowers ``unet``'s (the denoiser's) diffusion loss on ``latents`` under ``conditioning``'s first row + δ,
    starting from zero. ``scheduler`` is the training noise (``noise_scheduler_for``): its timestep density and loss,
    DDPM or flow matching."""
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    conditioning = conditioning.to(device)
    hidden = conditioning.encoder_hidden_states[:1].to(torch.float32)
    conditioning = replace(conditioning, encoder_hidden_states=hidden)  # e + δ summed in float32, then cast
    mask = perturbable(hidden)
    delta = torch.zeros_like(hidden).requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        t = sample_timesteps(scheduler, batch_size, gen, "cpu")  # the family's density (uniform for DDPM)
        noise = torch.randn(latents[idx].shape, generator=gen)
        kwargs = perturbed(conditioning, delta).unet_kwargs(torch.zeros(batch_size, dtype=torch.long), dtype)
        loss = per_sample_diffusion_loss(unet, scheduler, latents[idx].to(device, dtype), t.to(device),
                                         noise.to(device, dtype), kwargs).mean()
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            delta.copy_(project(delta, hidden, epsilon, mask))
        if step % 10 == 0 or step == steps - 1:
            history.append(round(loss.item(), 5))
    return delta.detach(), history


def run_soft_prompt_attack(ctx: AttackContext, steps: int = 200, lr: float = 1e-2, epsilon: float = 1.0,
                           num_train_images: int = 64, train_batch_size: int = 16) -> dict:
    """One δ per forget prompt, fitted against the adapted model; both models sampled with the perturbed embedding."""
    if epsilon <= 0:
        raise InputError(f"`soft_prompt_epsilon` must be positive, got {epsilon}")
    pipe = ctx.pipe
    scheduler = noise_scheduler_for(pipe.scheduler)
    per_concept, grids = {}, None
    for i, forget_prompt in enumerate(ctx.forget_prompts):
        latents = ctx.concept_latents(forget_prompt, num_train_images)
        ctx.enable_adapter()
        # With the adapter, should it change a text encoder; a guidance-distilled FLUX's losses at the sampling
        # guidance (the value its samples are drawn with).
        conditioning = encode_prompts(pipe, [forget_prompt], ctx.resolution, ctx.guidance_scale)
        delta, history = optimise_soft_prompt(denoiser(pipe), scheduler, conditioning, latents, steps, lr, epsilon,
                                              train_batch_size, ctx.seed + 3 + i)
        ctx.log(f"soft prompt for {forget_prompt!r}: loss {history[0]:.4f} → {history[-1]:.4f} in {steps} steps")
        hidden = conditioning.encoder_hidden_states[:1]
        attacked = perturbed(conditioning, delta)
        relative = (delta.norm(dim=-1) / hidden.float().norm(dim=-1).clamp_min(1e-12)).max().item()
        adapted = sample(ctx, ctx.num_images, conditioning=attacked)
        control = random_direction_like(delta, perturbable(hidden.float()), ctx.seed + 5 + i)
        adapted_control = sample(ctx, ctx.num_images, conditioning=perturbed(conditioning, control))
        ctx.disable_adapter()
        base = sample(ctx, ctx.num_images, conditioning=attacked)
        ctx.enable_adapter()
        per_concept[forget_prompt] = {"adapted": summarise(ctx, adapted), "base": summarise(ctx, base),
                                      "random_direction": summarise(ctx, adapted_control),
                                      "loss_history": history, "max_relative_norm": relative}
        if grids is None:
            grids = (best_samples(ctx, base), best_samples(ctx, adapted))
    return {
        "attack_success_rate": pooled_rate([m["adapted"] for m in per_concept.values()]),
        "base_rate": pooled_rate([m["base"] for m in per_concept.values()]),
        # The adapted model under δ's norms in random directions: what the bound alone brings back.
        "random_direction_rate": pooled_rate([m["random_direction"] for m in per_concept.values()]),
        "steps": steps, "learning_rate": lr, "epsilon": epsilon, "num_train_images": num_train_images,
        "per_concept": per_concept,
        "_grid": grids,
    }
