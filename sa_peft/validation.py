"""Validation images during training and the before/after grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from .image_grid import render_grid
from .io_utils import atomic_path
from .models import ddim_sampling


@torch.no_grad()
def generate_validation_images(
    pipe, prompts: Sequence[str], num_images: int, seed: int, resolution: int,
    guidance_scale: float, num_inference_steps: int,
) -> dict[str, list[Image.Image]]:
    """``num_images`` per prompt with fixed per-image seeds, so every validation round is comparable."""
    images = {}
    with ddim_sampling(pipe):
        for prompt in prompts:
            generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
            images[prompt] = pipe(
                [prompt] * num_images, height=resolution, width=resolution, guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps, generator=generators,
            ).images
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
