"""Resolving model paths (``builtin:`` aliases, local folders, hub ids) and loading pipelines."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .errors import InputError, MissingInputError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODELS = {"digits": "digits", "digits-classifier": "digits-classifier"}


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Return a local folder for ``builtin:<name>``; any other value is returned unchanged.

    Local folders and hub ids pass through, so diffusers resolves them as usual.
    """
    name = str(name_or_path)
    if not name.startswith(BUILTIN_PREFIX):
        return name
    alias = name[len(BUILTIN_PREFIX) :]
    if alias not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        raise InputError(f"unknown built-in model {name!r}; known: {known}")
    folder = BUILTIN_DIR / BUILTIN_MODELS[alias]
    if not folder.is_dir():
        raise MissingInputError(
            f"built-in model {name!r} is not installed at {folder}; reinstall sa-peft or run "
            "examples/digits/train_digits_model.py to build it"
        )
    return str(folder)


def load_pipeline(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
):
    """Load a Stable Diffusion (1.x/2.x) or SDXL pipeline from a built-in alias, folder or hub id.

    Raises a clear error when a local path is not a diffusers pipeline folder. Weights are read
    from safetensors only and no remote code is ever trusted.
    """
    from diffusers import DiffusionPipeline

    path = resolve_model_path(name_or_path)
    if os.path.exists(path):
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "model_index.json")):
            raise InputError(
                f"`pretrained_model_name_or_path` {path!r} is not a diffusers pipeline folder (no "
                "model_index.json); pass a folder written by save_pretrained, a hub id, or builtin:digits"
            )
    elif str(name_or_path).count("/") != 1 or os.path.isabs(path) or path.startswith((".", "~")):
        raise MissingInputError(
            f"`pretrained_model_name_or_path` {path!r}: no such folder, and it does not look like a hub id "
            "(owner/name)"
        )
    pipe = DiffusionPipeline.from_pretrained(
        path,
        revision=revision,
        variant=variant,
        cache_dir=cache_dir,
        dtype=torch_dtype,
        use_safetensors=True,
        safety_checker=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The pipeline class name sa-peft records for SDXL bases (adapter headers' ``base_pipeline``).
SDXL_PIPELINE = "StableDiffusionXLPipeline"


def is_sdxl(model) -> bool:
    """SDXL: a pipeline, UNet, UNet config or stored layout dict with SDXL's added text-time conditioning
    (the pooled embeddings and size ids that only SDXL's UNet takes)."""
    unet = getattr(model, "unet", model)
    config = getattr(unet, "config", unet)
    return (config.get("addition_embed_type") if hasattr(config, "get") else None) == "text_time"


@contextlib.contextmanager
def ddim_sampling(pipe):
    """Sample with DDIM (eta 0, as the reference code does) whatever the pipeline's own scheduler; restored after."""
    from diffusers import DDIMScheduler

    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = original
