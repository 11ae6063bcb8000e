"""Resolving model paths (``builtin:`` aliases, local folders, hub ids) and loading pipelines."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from .errors import InputError, MissingInputError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODELS = {"digits": "digits", "digits-sd3": "digits-sd3", "digits-classifier": "digits-classifier"}
BUILTIN_SCRIPTS = {"digits-sd3": "train_digits_sd3_model.py"}  # the others: train_digits_model.py


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
            f"examples/digits/{BUILTIN_SCRIPTS.get(alias, 'train_digits_model.py')} to build it"
        )
    return str(folder)


def load_pipeline(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    supported: tuple[str, ...] | None = None,
):
    """Load a Stable Diffusion (1.x/2.x) or SDXL pipeline (or one of ``supported``, default ``UNET_PIPELINES``) from
    a built-in alias, folder or hub id.

    Raises a clear error when a local path is not a diffusers pipeline folder, or holds another pipeline class (read
    from its ``model_index.json`` before any weight is loaded). Weights are read from safetensors only and no remote
    code is ever trusted.
    """
    from diffusers import DiffusionPipeline

    path = resolve_model_path(name_or_path)
    class_name = None  # read from a local folder's model_index.json; a hub id's is known once loaded
    absent = {}
    if os.path.exists(path):
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "model_index.json")):
            raise InputError(
                f"`pretrained_model_name_or_path` {path!r} is not a diffusers pipeline folder (no "
                "model_index.json); pass a folder written by save_pretrained, a hub id, or builtin:digits"
            )
        with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
        class_name = index.get("_class_name")
        check_pipeline_class(class_name, path, supported)
        absent = absent_components(class_name, index)
    elif str(name_or_path).count("/") != 1 or os.path.isabs(path) or path.startswith((".", "~")):
        raise MissingInputError(
            f"`pretrained_model_name_or_path` {path!r}: no such folder, and it does not look like a hub id "
            "(owner/name)"
        )
    # Only Stable Diffusion 1.x/2.x pipelines have a safety checker; SD3's and FLUX's would warn about the keyword.
    no_checker = {} if class_name in TRANSFORMER_PIPELINES else {"safety_checker": None}
    pipe = DiffusionPipeline.from_pretrained(
        path,
        revision=revision,
        variant=variant,
        cache_dir=cache_dir,
        dtype=torch_dtype,
        use_safetensors=True,
        **no_checker,
        **absent,
    )
    check_pipeline_class(type(pipe).__name__, path, supported)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def absent_components(class_name: str | None, index: dict) -> dict:
    """``{name: None}`` for the components an SD3 folder declares absent (``[null, null]`` in model_index.json).

    SD3 runs without its T5 (the pipeline zero-pads the T5 part of the context; ``builtin:digits-sd3`` has none), but
    diffusers only loads such a folder when ``text_encoder_3=None, tokenizer_3=None`` are passed: they are not among
    the pipeline's optional components."""
    if class_name != SD3_PIPELINE:
        return {}
    return {name: None for name in ("text_encoder_3", "tokenizer_3") if (index.get(name) or [None])[0] is None}


# The pipeline class names sa-peft records (adapter headers' ``base_pipeline``) and trains.
SD_PIPELINE = "StableDiffusionPipeline"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
SD3_PIPELINE = "StableDiffusion3Pipeline"
FLUX_PIPELINE = "FluxPipeline"
UNET_PIPELINES = (SD_PIPELINE, SDXL_PIPELINE)
# The flow-matching transformer families (SD3's joint blocks; FLUX's double- and single-stream blocks).
TRANSFORMER_PIPELINES = (SD3_PIPELINE, FLUX_PIPELINE)
# What the training script takes: the UNet families and the flow-matching transformers.
TRAINING_PIPELINES = (*UNET_PIPELINES, *TRANSFORMER_PIPELINES)


def check_pipeline_class(class_name: str | None, source: str, supported: tuple[str, ...] | None = None) -> None:
    """Refuse a pipeline class sa-peft cannot train or evaluate, naming the ones it can."""
    supported = supported or UNET_PIPELINES
    if class_name not in supported:
        raise InputError(f"`pretrained_model_name_or_path` {source!r} is a {class_name or 'pipeline of unknown class'}, "
                         f"which this command does not support; supported pipelines: {', '.join(supported)}")


def is_sd3(model) -> bool:
    """SD3: a pipeline or model whose denoiser is an ``SD3Transformer2DModel`` (joint text-image attention, a
    flow-matching model)."""
    return type(getattr(model, "transformer", model)).__name__ == "SD3Transformer2DModel"


def is_flux(model) -> bool:
    """FLUX: a pipeline or model whose denoiser is a ``FluxTransformer2DModel`` (double- and single-stream blocks over
    packed 2×2 latent patches, rotary position ids, a flow-matching model)."""
    return type(getattr(model, "transformer", model)).__name__ == "FluxTransformer2DModel"


def is_flow_transformer(model) -> bool:
    """A flow-matching transformer (SD3 or FLUX): the families whose LoRA presets and saved keys are a transformer's."""
    return is_sd3(model) or is_flux(model)


def denoiser(pipe) -> torch.nn.Module:
    """The network a forget LoRA adapts: ``pipe.unet``, or ``pipe.transformer`` for transformer pipelines (SD3, FLUX)."""
    transformer = getattr(pipe, "transformer", None)
    return transformer if transformer is not None else pipe.unet


def is_sdxl(model) -> bool:
    """SDXL: a pipeline, UNet, UNet config or stored layout dict with SDXL's added text-time conditioning
    (the pooled embeddings and size ids that only SDXL's UNet takes)."""
    unet = getattr(model, "unet", model)
    config = getattr(unet, "config", unet)
    return (config.get("addition_embed_type") if hasattr(config, "get") else None) == "text_time"


def sampler_description(pipe) -> str:
    """How ``ddim_sampling`` samples ``pipe``, in words (evaluation reports)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        return "FlowMatchEulerDiscreteScheduler (the pipeline's own)"
    return "DDIM, eta 0"


@contextlib.contextmanager
def ddim_sampling(pipe):
    """Sample with DDIM (eta 0, as the reference code does) whatever the pipeline's own scheduler; restored after.

    A flow-matching pipeline (SD3) keeps its own scheduler: DDIM's ᾱ schedule means nothing to a model trained on
    x_σ = (1−σ)·x₀ + σ·ε."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        yield pipe
        return
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = original
