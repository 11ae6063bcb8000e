"""Validation images during training and the before/after grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from .io_utils import atomic_path


@torch.no_grad()
def generate_validation_images(
    pipe, prompts: Sequence[str], num_images: int, seed: int, resolution: int,
    guidance_scale: float, num_inference_steps: int,
) -> dict[str, list[Image.Image]]:
    """``num_images`` per prompt with fixed per-image seeds, so every validation round is comparable."""
    from diffusers import DDIMScheduler

    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        images = {}
        for prompt in prompts:
            generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
            images[prompt] = pipe(
                [prompt] * num_images, height=resolution, width=resolution, guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps, generator=generators,
            ).images
    finally:
        pipe.scheduler = original
    return images


def image_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2) -> Image.Image:
    """Paste rows of equally sized images into one RGB grid."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB"), (pad + j * (w + pad), pad + i * (h + pad)))
    return grid


def save_before_after_grid(before: dict[str, list[Image.Image]], after: dict[str, list[Image.Image]], path: str) -> None:
    """One row per prompt: the base model's images, a gap, then the adapted model's images."""
    rows = []
    for prompt, images in before.items():
        gap = Image.new("RGB", images[0].size, "white")
        rows.append([*images, gap, *after[prompt]])
    with atomic_path(path) as tmp:
        image_grid(rows).save(tmp, format="PNG")
