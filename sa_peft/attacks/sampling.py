"""Sampling for attacks: from a prompt or from prompt embeddings, with the evaluation's seeds and sampler."""

from __future__ import annotations

import torch

from ..conditioning import PromptConditioning
from ..evaluation import sample_seed
from ..models import ddim_sampling, is_sdxl


def embedding_kwargs(pipe, conditioning: PromptConditioning, count: int) -> dict:
    """Pipeline keyword arguments that sample ``count`` images from the first row of ``conditioning``
    (SDXL also needs the pooled embedding); the unconditional branch is the pipeline's own empty prompt."""
    kwargs = {"prompt_embeds": conditioning.encoder_hidden_states[:1].expand(count, -1, -1)}
    if is_sdxl(pipe):
        kwargs["pooled_prompt_embeds"] = conditioning.text_embeds[:1].expand(count, -1)
    return kwargs


@torch.no_grad()
def sample(ctx, num_images: int, prompt: str | None = None, conditioning: PromptConditioning | None = None,
           output_type: str = "pt", seed: int | None = None) -> torch.Tensor:
    """``num_images`` samples of ``prompt`` or of ``conditioning``'s first row: images in [0, 1] (``pt``) or
    latents (``latent``). DDIM (eta 0) as in ``sa_peft.evaluation.iter_samples``; sample ``i`` starts from the
    noise of ``sample_seed(seed, i)``, so the base and the adapted model see the same starting points."""
    if (prompt is None) == (conditioning is None):
        raise ValueError("sample: give exactly one of prompt and conditioning")
    seed = ctx.seed if seed is None else seed
    pipe = ctx.pipe
    out = []
    with ddim_sampling(pipe):
        for start in range(0, num_images, ctx.batch_size):
            count = min(ctx.batch_size, num_images - start)
            generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(start, start + count)]
            inputs = ({"prompt": [prompt] * count} if prompt is not None
                      else embedding_kwargs(pipe, conditioning.to(pipe.unet.device), count))
            images = pipe(**inputs, num_inference_steps=ctx.num_inference_steps, guidance_scale=ctx.guidance_scale,
                          generator=generators, output_type=output_type).images
            out.append(images.detach().float().cpu() if output_type == "latent"
                       else images.detach().float().cpu().clamp(0, 1))
    return torch.cat(out)
