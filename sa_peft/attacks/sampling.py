"""Sampling for attacks: from prompts or from prompt embeddings, with the evaluation's seeds and sampler."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..conditioning import PromptConditioning
from ..evaluation import sample_seed
from ..models import ddim_sampling, denoiser, is_flow_transformer, is_flux, is_sdxl


def embedding_kwargs(pipe, conditioning: PromptConditioning, count: int) -> dict:
    """Pipeline keyword arguments that sample ``count`` images from the first row of ``conditioning``.

    SDXL, SD3 and FLUX also take the pooled embedding (the pipelines refuse ``prompt_embeds`` without it). The
    unconditional branch of classifier-free guidance (SD 1.x/2.x, SDXL, SD3) is the pipeline's own empty prompt,
    encoded by the pipeline as it would for ``prompt``; FLUX has none (guidance-distilled: the pipeline turns
    ``guidance_scale`` into its guidance embedding itself, and computes the text ids from ``prompt_embeds``)."""
    kwargs = {"prompt_embeds": conditioning.encoder_hidden_states[:1].expand(count, -1, -1)}
    if is_sdxl(pipe) or is_flow_transformer(pipe):
        kwargs["pooled_prompt_embeds"] = conditioning.text_embeds[:1].expand(count, -1)
    return kwargs


def image_size(ctx) -> int:
    """The side of the attack's samples in pixels: ``ctx.resolution``, else the pipeline's default."""
    from ..data import default_resolution

    return ctx.resolution or default_resolution(ctx.pipe)


@torch.no_grad()
def _call(ctx, inputs: dict, generators: list, output_type: str) -> torch.Tensor:
    pipe = ctx.pipe
    size = {"height": ctx.resolution, "width": ctx.resolution} if ctx.resolution else {}
    images = pipe(**inputs, **size, num_inference_steps=ctx.num_inference_steps, guidance_scale=ctx.guidance_scale,
                  generator=generators, output_type=output_type).images
    if output_type == "latent":
        if is_flux(pipe):  # FLUX returns its latents packed in 2×2 patches; losses take them as [B, 16, h, w]
            side = image_size(ctx)
            images = pipe._unpack_latents(images, side, side, pipe.vae_scale_factor)
        return images.detach().float().cpu()
    return images.detach().float().cpu().clamp(0, 1)


def sample_prompts(ctx, prompts: Sequence[str], num_images: int, output_type: str = "pt",
                   seed: int | None = None) -> dict[str, torch.Tensor]:
    """``{prompt: num_images samples}``, batched across prompts as ``sa_peft.evaluation.iter_samples`` batches:
    sample ``i`` of every prompt starts from the noise of ``sample_seed(seed, i)``, so the base and the adapted
    model (and every prompt) see the same starting points whatever ``ctx.batch_size``."""
    seed = ctx.seed if seed is None else seed
    prompts = list(dict.fromkeys(prompts))
    todo = [(p, i) for p in prompts for i in range(num_images)]
    parts: dict[str, list[torch.Tensor]] = {p: [] for p in prompts}
    with ddim_sampling(ctx.pipe):
        for start in range(0, len(todo), ctx.batch_size):
            chunk = todo[start:start + ctx.batch_size]
            generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for _, i in chunk]
            images = _call(ctx, {"prompt": [p for p, _ in chunk]}, generators, output_type)
            for (prompt, _), image in zip(chunk, images, strict=True):
                parts[prompt].append(image[None])
    return {p: torch.cat(parts[p]) for p in prompts}


def sample(ctx, num_images: int, prompt: str | None = None, conditioning: PromptConditioning | None = None,
           output_type: str = "pt", seed: int | None = None) -> torch.Tensor:
    """``num_images`` samples of ``prompt`` or of ``conditioning``'s first row: images in [0, 1] (``pt``) or
    latents as the losses take them (``latent``: [N, C, h, w], FLUX's unpacked). The evaluation's sampler
    (``sa_peft.models.ddim_sampling``: DDIM, eta 0, or a flow-matching pipeline's own scheduler); sample ``i``
    starts from the noise of ``sample_seed(seed, i)``, so the base and the adapted model see the same starting
    points, and embeddings encoded from a prompt give that prompt's samples."""
    if (prompt is None) == (conditioning is None):
        raise ValueError("sample: give exactly one of prompt and conditioning")
    if prompt is not None:
        return sample_prompts(ctx, [prompt], num_images, output_type, seed)[prompt]
    seed = ctx.seed if seed is None else seed
    pipe = ctx.pipe
    out = []
    with ddim_sampling(pipe):
        for start in range(0, num_images, ctx.batch_size):
            count = min(ctx.batch_size, num_images - start)
            generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(start, start + count)]
            inputs = embedding_kwargs(pipe, conditioning.to(denoiser(pipe).device), count)
            out.append(_call(ctx, inputs, generators, output_type))
    return torch.cat(out)
