"""The ``soft_prompt`` attack: a perturbation δ of the forget prompt's text embedding, optimised so the
*adapted* model denoises the base model's images of the concept well again (no classifier in the loop),
then sampled. δ is bounded per token: ‖δ_j‖ ≤ ε·‖e_j‖ (projected after each step), so the attack searches
near the forget prompt rather than writing an arbitrary new conditioning.
"""

from __future__ import annotations

import torch

from ..conditioning import PromptConditioning, encode_prompts
from ..diffusion_loss import noise_scheduler_for, per_sample_diffusion_loss
from ..errors import InputError
from .context import AttackContext, best_samples, pooled_rate, summarise
from .sampling import sample


def project(delta: torch.Tensor, reference: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``delta`` with each token's vector shrunk to at most ``epsilon`` × that token's embedding norm."""
    limit = epsilon * reference.norm(dim=-1, keepdim=True)
    norm = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return delta * (limit / norm).clamp(max=1.0)


def optimise_soft_prompt(unet, scheduler, conditioning: PromptConditioning, latents: torch.Tensor, steps: int,
                         lr: float, epsilon: float, batch_size: int, seed: int,
                         init: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """δ that lowers ``unet``'s diffusion loss on ``latents`` under ``conditioning``'s first row + δ, starting
    from ``init`` (zeros by default; robust training warm-starts from the previous δ)."""
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    hidden = conditioning.encoder_hidden_states[:1].to(device, torch.float32)
    start = torch.zeros_like(hidden) if init is None else init.to(device, torch.float32).clone()
    delta = start.requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(latents[idx].shape, generator=gen)
        perturbed = PromptConditioning(conditioning.prompts[:1], hidden + delta, conditioning.text_embeds,
                                       conditioning.time_ids)
        kwargs = perturbed.unet_kwargs(torch.zeros(batch_size, dtype=torch.long), dtype)
        loss = per_sample_diffusion_loss(unet, scheduler, latents[idx].to(device, dtype), t.to(device),
                                         noise.to(device, dtype), kwargs).mean()
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            delta.copy_(project(delta, hidden, epsilon))
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
        conditioning = encode_prompts(pipe, [forget_prompt])  # with the adapter, should it change the text encoder
        delta, history = optimise_soft_prompt(pipe.unet, scheduler, conditioning, latents, steps, lr, epsilon,
                                              train_batch_size, ctx.seed + 3 + i)
        ctx.log(f"soft prompt for {forget_prompt!r}: loss {history[0]:.4f} → {history[-1]:.4f} in {steps} steps")
        hidden = conditioning.encoder_hidden_states[:1]
        attacked = PromptConditioning(conditioning.prompts[:1], hidden + delta.to(hidden.device, hidden.dtype),
                                      conditioning.text_embeds, conditioning.time_ids)
        relative = (delta.norm(dim=-1) / hidden.float().norm(dim=-1).clamp_min(1e-12)).max().item()
        adapted = sample(ctx, ctx.num_images, conditioning=attacked)
        ctx.disable_adapter()
        base = sample(ctx, ctx.num_images, conditioning=attacked)
        ctx.enable_adapter()
        per_concept[forget_prompt] = {"adapted": summarise(ctx, adapted), "base": summarise(ctx, base),
                                      "loss_history": history, "max_relative_norm": relative}
        if grids is None:
            grids = (best_samples(ctx, base), best_samples(ctx, adapted))
    return {
        "attack_success_rate": pooled_rate([m["adapted"] for m in per_concept.values()]),
        "base_rate": pooled_rate([m["base"] for m in per_concept.values()]),
        "steps": steps, "learning_rate": lr, "epsilon": epsilon, "num_train_images": num_train_images,
        "per_concept": per_concept,
        "_grid": grids,
    }
