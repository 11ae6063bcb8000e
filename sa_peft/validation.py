"""Validation images during training and the before/after grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from .image_grid import render_grid
from .io_utils import atomic_path
from .models import ddim_sampling

# Four 512² images: what SD 1.x validated per call before (one prompt of four images); SDXL stays one prompt a call.
VALIDATION_PIXELS_PER_CALL = 4 * 512 * 512


@torch.no_grad()
def encode_for_sampling(pipe, prompts: Sequence[str], guidance_scale: float) -> dict[str, dict[str, torch.Tensor]]:
    """Each prompt's embeddings as the pipeline's ``__call__`` takes them (``prompt_embeds``, and the pooled and
    negative ones its family needs at ``guidance_scale``), ``[1, ...]`` tensors on the CPU.

    Encoded once, so validation during training samples with the text encoders off the device: SD3's and FLUX's
    T5-XXL alone is about 9.5 GB in half precision, more than a consumer GPU has beside the transformer and the
    optimizer. The embeddings are those the pipeline would compute itself (its default sequence lengths), so the
    images are the same (tests/test_pictures.py checks it for every family).
    """
    from .models import is_flux, is_sd3, is_sdxl

    prompts = list(prompts)
    cfg = guidance_scale > 1  # the pipelines' do_classifier_free_guidance (no LCM UNets here)
    if is_flux(pipe):  # guidance-distilled: no negative prompt
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, num_images_per_prompt=1)
        tensors = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    elif is_sd3(pipe) or is_sdxl(pipe):
        extra = {"prompt_3": None} if is_sd3(pipe) else {}
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, **extra, num_images_per_prompt=1, do_classifier_free_guidance=cfg)
        tensors = {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                   "negative_pooled_prompt_embeds": negative_pooled}
    else:
        embeds, negative = pipe.encode_prompt(prompts, pipe.device, 1, cfg)
        tensors = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    return {prompt: {k: v[i:i + 1].cpu() for k, v in tensors.items() if v is not None}
            for i, prompt in enumerate(prompts)}


@torch.no_grad()
def generate_validation_images(
    pipe, prompts: Sequence[str], num_images: int, seed: int, resolution: int,
    guidance_scale: float, num_inference_steps: int,
    embeddings: dict[str, dict[str, torch.Tensor]] | None = None, output_type: str = "pil",
) -> dict[str, list[Image.Image]] | dict[str, torch.Tensor]:
    """``num_images`` per prompt with fixed per-image seeds, so every validation round is comparable.

    Small images go through the pipeline several prompts at a time (up to ``VALIDATION_PIXELS_PER_CALL``
    pixels per call, at least one prompt): a pipeline call costs about the same for 4 or 12 16-px digits
    (the UNet's per-call overhead dominates), and the main job validates five times. Each image keeps its own
    generator, so the images are those of one call per prompt. With ``embeddings`` (``encode_for_sampling``) the
    text encoders are not used, and may stay off the device. ``output_type="latent"``: each prompt's latents as one
    tensor, as the pipeline returns them (FLUX's packed).
    """
    per_call = max(1, VALIDATION_PIXELS_PER_CALL // (num_images * resolution * resolution))
    images = {}
    with ddim_sampling(pipe):
        for start in range(0, len(prompts), per_call):
            chunk = list(prompts[start:start + per_call])
            generators = [torch.Generator().manual_seed(seed + i) for _ in chunk for i in range(num_images)]
            if embeddings is None:
                conditioning = {"prompt": [p for p in chunk for _ in range(num_images)]}
            else:
                conditioning = {k: torch.cat([embeddings[p][k] for p in chunk for _ in range(num_images)])
                                .to(pipe.device) for k in embeddings[chunk[0]]}
            out = pipe(
                **conditioning, height=resolution, width=resolution,
                guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, generator=generators,
                output_type=output_type,
            ).images
            for k, prompt in enumerate(chunk):
                images[prompt] = out[k * num_images:(k + 1) * num_images]
    return images


def validation_grid(images: dict[str, list[Image.Image]], step: int) -> Image.Image:
    """The validation prompts' images at ``step``: one labelled row per prompt (for the trackers)."""
    return render_grid(list(images.items()), title=f"validation, step {step}")


def save_before_after_grid(before: dict[str, list[Image.Image]], after: dict[str, list[Image.Image]], path: str,
                           step: int | None = None) -> None:
    """One labelled row per prompt: the base model's images, then the adapted model's (same seeds)."""
    rows = [(prompt, [*images, *after[prompt]]) for prompt, images in before.items()]
    after_header = "after (forget LoRA)" if step is None else f"after (step {step})"
    grid = render_grid(rows, column_headers=["before (base model)", after_header], title="validation: before | after")
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
