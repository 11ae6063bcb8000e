"""Saving forget adapters in diffusers' layout (with metadata), the kohya/A1111 copy, and reading them back."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
SA_METADATA_KEY = "sa_peft"


def unet_lora_state_dict(unet: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in peft's key convention (``….lora_A.weight``), which diffusers loads as is.

    diffusers' older ``lora.down``/``lora.up`` convention loses attention layers on reload when conv
    and attention layers are adapted together, so it is not used.
    """
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=adapter)


def _pipeline_class_for(unet: torch.nn.Module):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if unet.config.get("addition_embed_type") == "text_time" else StableDiffusionPipeline


def save_forget_lora(
    output_dir: str | os.PathLike,
    unet: torch.nn.Module,
    training_info: dict,
    adapter: str = "default",
    text_encoder_lora_layers: dict[str, torch.Tensor] | None = None,
    text_encoder_adapter_metadata: dict | None = None,
) -> str:
    """Write ``pytorch_lora_weights.safetensors`` with diffusers' ``save_lora_weights`` and our metadata.

    The peft adapter config travels in the header (so alpha ≠ rank and rsLoRA reload correctly);
    ``training_info`` (base model, concepts, surrogate, λ, γ, space, ...) is added under ``sa_peft``
    for ``sa-peft inspect``. The file appears atomically.
    """
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    pipeline_class = _pipeline_class_for(unet)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-lora-") as tmp:
        kwargs = {}
        if text_encoder_lora_layers:
            kwargs["text_encoder_lora_layers"] = text_encoder_lora_layers
            kwargs["text_encoder_lora_adapter_metadata"] = text_encoder_adapter_metadata
        pipeline_class.save_lora_weights(
            tmp,
            unet_lora_layers=unet_lora_state_dict(unet, adapter),
            unet_lora_adapter_metadata=unet.peft_config[adapter].to_dict(),
            safe_serialization=True,
            **kwargs,
        )
        written = os.path.join(tmp, LORA_WEIGHT_NAME)
        with safe_open(written, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata[SA_METADATA_KEY] = json.dumps(training_info, sort_keys=True)
        save_file(tensors, written, metadata=metadata)
        final = os.path.join(output_dir, LORA_WEIGHT_NAME)
        os.replace(written, final)
    return final


def read_adapter_metadata(path: str | os.PathLike) -> dict:
    """Header metadata of an adapter file (or of ``pytorch_lora_weights.safetensors`` in a folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, LORA_WEIGHT_NAME)
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a .safetensors adapter file; only safetensors files are read")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as err:
        raise ValueError(f"{path!r} is not a valid safetensors file: {err}") from None
    out: dict = {}
    if SA_METADATA_KEY in metadata:
        out["sa_peft"] = json.loads(metadata[SA_METADATA_KEY])
    if "lora_adapter_metadata" in metadata:
        out["lora_adapter_metadata"] = json.loads(metadata["lora_adapter_metadata"])
    return out


def export_kohya(unet: torch.nn.Module, path: str | os.PathLike, adapter: str = "default", metadata: dict | None = None) -> str:
    """Write an A1111/ComfyUI/kohya-keyed copy (``lora_unet_…lora_down/lora_up/alpha``).

    diffusers' converter writes alpha = rank; we write the adapter's real scale·rank so that
    alpha ≠ rank and rsLoRA (scale alpha/√r) survive the trip.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    from .lora import iter_adapted_layers

    peft_sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=adapter).items()}
    kohya = convert_state_dict_to_kohya(peft_sd)
    for layer in iter_adapted_layers(unet, adapter):
        key = "lora_unet_" + layer.name.replace(".", "_") + ".alpha"
        if key not in kohya:
            raise KeyError(f"kohya conversion lost layer {layer.name}")
        rank = layer.lora_a.shape[0]
        kohya[key] = torch.tensor(layer.scale * rank, dtype=torch.float32)
    kohya = {k: v.contiguous() for k, v in kohya.items()}
    from .io_utils import atomic_path

    with atomic_path(path) as tmp:
        save_file(kohya, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    return os.fspath(path)


def copy_atomic(src: str, dst: str) -> None:
    """Copy a file so that ``dst`` appears whole or not at all."""
    from .io_utils import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
