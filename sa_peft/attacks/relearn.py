"""The ``relearn`` attack: fuse the forget adapter, fine-tune the whole denoiser (UNet or SD3/FLUX transformer, with
its family's diffusion loss) on benign data (the retained
concepts' samples of the base model, or a user's images) and follow P(concept) as it comes back.

benchmarks/RESULTS.md measured it first on the digits: the default forget-zero LoRA fused, then 300 steps of
AdamW (lr 1e-4, batch 32) on the retained digits, brings 20 % zeros back; ``fine_tune_unet`` is that loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from ..conditioning import PromptConditioning, encode_prompts
from ..data import IMAGE_EXTENSIONS, _encode_images, _load_image
from ..diffusion_loss import noise_scheduler_for, per_sample_diffusion_loss, sample_timesteps
from ..errors import InputError, MissingInputError
from ..merge import fuse_forget_loras
from ..models import denoiser
from ..training_setup import make_optimizer
from .context import AttackContext, best_samples, pooled_rate, summarise
from .sampling import sample


def fine_tune_unet(unet, scheduler, latents: torch.Tensor, prompt_ids: torch.Tensor, conditioning: PromptConditioning,
                   steps: int, lr: float = 1e-4, batch_size: int = 32, seed: int = 0,
                   callback: Callable[[int], None] | None = None, gradient_checkpointing: bool = False,
                   use_8bit_adam: bool = False) -> list[float]:
    """Plain diffusion-loss fine-tuning of every weight of ``unet`` (the denoiser: a UNet or an SD3/FLUX transformer)
    with AdamW, noised and weighted by ``scheduler`` (``noise_scheduler_for``: DDPM, or flow matching with its
    timestep density); ``callback(step)`` runs after step 0 (before training) and after every step, so a caller can
    measure the curve at the steps it wants. Returns the training loss of step 1, every 10th step and the last.

    A whole FLUX transformer's AdamW states are twice its weights: ``use_8bit_adam`` (bitsandbytes' AdamW8bit)
    keeps them in 8 bits and ``gradient_checkpointing`` recomputes activations in the backward pass, the training
    script's memory features, for attackers with a consumer GPU."""
    unet.train().requires_grad_(True)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(unet.parameters(), lr, (0.9, 0.999), 1e-2, 1e-8, use_8bit_adam)  # torch's defaults
    gen = torch.Generator().manual_seed(seed)
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    history = []
    if callback is not None:
        callback(0)
    for step in range(1, steps + 1):
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        t = sample_timesteps(scheduler, batch_size, gen, "cpu")  # the family's density (uniform for DDPM)
        noise = torch.randn(latents[idx].shape, generator=gen)
        loss = per_sample_diffusion_loss(unet, scheduler, latents[idx].to(device, dtype), t.to(device),
                                         noise.to(device, dtype), conditioning.unet_kwargs(prompt_ids[idx], dtype)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == steps:
            history.append(round(loss.item(), 5))
        if callback is not None:
            unet.eval()
            callback(step)
            unet.train()
    if gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    unet.eval().requires_grad_(False)
    return history


def read_image_folder(folder: str, resolution: int, channels: int, default_prompt: str) -> tuple[torch.Tensor, list[str]]:
    """Images of ``folder`` (in [-1, 1]) and their captions: ``<name>.txt`` beside an image, else ``default_prompt``."""
    if not os.path.isdir(folder):
        raise MissingInputError(f"`relearn_data_dir` {folder!r} is not a folder")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise InputError(f"`relearn_data_dir` {folder!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    images, prompts = [], []
    for name in names:
        images.append(_load_image(os.path.join(folder, name), resolution, channels))
        caption = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        if os.path.isfile(caption):
            with open(caption, encoding="utf-8") as f:
                prompts.append(f.read().strip())
        else:
            prompts.append(default_prompt)
    return torch.stack(images), prompts


def benign_data(ctx: AttackContext, prompts: Sequence[str], images_per_prompt: int, data_dir: str | None,
                data_prompt: str) -> tuple[torch.Tensor, list[str]]:
    """Latents and prompts to fine-tune on: the base model's samples of ``prompts`` (seed stream ``seed + 4``),
    plus the images of ``data_dir``."""
    latents, captions = [], []
    ctx.disable_adapter()
    try:
        for j, prompt in enumerate(prompts):
            latents.append(sample(ctx, images_per_prompt, prompt=prompt, output_type="latent", seed=ctx.seed + 4 + j))
            captions += [prompt] * images_per_prompt
    finally:
        ctx.enable_adapter()
    if data_dir:
        from .sampling import image_size

        images, folder_prompts = read_image_folder(data_dir, image_size(ctx),
                                                   ctx.pipe.vae.config.in_channels, data_prompt)
        with torch.no_grad():
            latents.append(_encode_images(ctx.pipe, images).float().cpu())
        captions += folder_prompts
    return torch.cat(latents), captions


def run_relearn_attack(ctx: AttackContext, adapter_names: Sequence[str], prompts: Sequence[str] = (),
                       images_per_prompt: int = 32, data_dir: str | None = None, data_prompt: str = "",
                       steps: int = 300, eval_steps: Sequence[int] | None = None, lr: float = 1e-4,
                       batch_size: int = 32, gradient_checkpointing: bool = False, use_8bit_adam: bool = False) -> dict:
    """Fuse ``adapter_names`` into ``ctx.pipe`` (in place: run it last), fine-tune, and score the forget
    prompts at each of ``eval_steps`` (default: every quarter of ``steps``)."""
    if not prompts and not data_dir:
        raise InputError("the relearn attack needs benign data: pass `relearn_prompt` / `relearn_prompts_file` "
                         "or `relearn_data_dir`")
    eval_steps = sorted(set(eval_steps if eval_steps else [0, steps // 4, steps // 2, 3 * steps // 4, steps]))
    if eval_steps[-1] > steps or eval_steps[0] < 0:
        raise InputError(f"`relearn_eval_steps` must lie in 0..{steps}, got {eval_steps}")
    latents, captions = benign_data(ctx, prompts, images_per_prompt, data_dir, data_prompt)
    pipe = fuse_forget_loras(ctx.pipe, adapter_names)
    ctx.enable_adapter = ctx.disable_adapter = (lambda: None)  # the adapter is part of the weights now
    conditioning = encode_prompts(pipe, captions, ctx.resolution, ctx.guidance_scale)  # FLUX-dev: the sampling guidance
    prompt_ids = torch.tensor([conditioning.prompts.index(c) for c in captions], dtype=torch.long)
    curve, last = [], {}

    def measure(step: int) -> None:
        if step not in eval_steps:
            return
        images = {p: sample(ctx, ctx.num_images, prompt=p) for p in ctx.forget_prompts}
        parts = [summarise(ctx, x) for x in images.values()]
        curve.append({"step": step, "success_rate": pooled_rate(parts),
                      "mean_concept_score": sum(p["mean_concept_score"] for p in parts) / len(parts)})
        ctx.log(f"relearn step {step}: concept rate {curve[-1]['success_rate']:.3f}")
        last["images"] = torch.cat(list(images.values()))

    history = fine_tune_unet(denoiser(pipe), noise_scheduler_for(pipe.scheduler), latents, prompt_ids, conditioning,
                             steps, lr, batch_size, ctx.seed + 5, measure, gradient_checkpointing, use_8bit_adam)
    return {
        "attack_success_rate": curve[-1]["success_rate"],
        "recovery_curve": curve, "loss_history": history,
        "steps": steps, "learning_rate": lr, "batch_size": batch_size, "num_benign_images": len(latents),
        "gradient_checkpointing": gradient_checkpointing, "use_8bit_adam": use_8bit_adam,
        "benign_prompts": list(dict.fromkeys(captions)),
        "_grid": (None, best_samples(ctx, last["images"])),
    }
