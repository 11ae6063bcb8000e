"""Saving forget adapters in diffusers' layout (with metadata), the kohya/A1111 copy, and reading them back."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .safetensors_header import read_safetensors_header

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
    training_info = {"base_pipeline": pipeline_class.__name__, **training_info}
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
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        metadata[SA_METADATA_KEY] = json.dumps(training_info, sort_keys=True)
        save_file(tensors, written, metadata=metadata)
        final = os.path.join(output_dir, LORA_WEIGHT_NAME)
        os.replace(written, final)
    return final


def resolve_adapter_file(path: str | os.PathLike, flag: str = "--lora") -> str:
    """The adapter file a user named: a ``.safetensors`` file, or a folder holding
    ``pytorch_lora_weights.safetensors`` (or exactly one ``.safetensors`` file). Errors name ``flag``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if LORA_WEIGHT_NAME in files:
            return os.path.join(path, LORA_WEIGHT_NAME)
        if len(files) == 1:
            return os.path.join(path, files[0])
        if not files:
            raise FileNotFoundError(f"{flag} {path!r}: the folder holds no .safetensors adapter file; pass the "
                                    f"folder a training run wrote (it holds {LORA_WEIGHT_NAME}) or the file itself")
        raise ValueError(f"{flag} {path!r}: the folder holds several .safetensors files ({', '.join(files)}) and no "
                         f"{LORA_WEIGHT_NAME}; pass the file itself")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such file or folder")
    if not path.endswith(".safetensors"):
        raise ValueError(f"{flag} {path!r} is not a .safetensors file; adapters are read only from safetensors "
                         "(never pickle/.bin/.pt/.ckpt); convert it or pass the .safetensors file")
    return path


def _header(path: str, flag: str) -> dict[str, str]:
    return read_safetensors_header(path, flag, "pass an adapter written by sa-peft or diffusers' save_lora_weights")


def load_adapter_file(path: str | os.PathLike, flag: str = "--lora") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the raw header metadata of an adapter file (or folder); safetensors only."""
    path = resolve_adapter_file(path, flag)
    metadata = _header(path, flag)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return tensors, metadata


def read_adapter_metadata(path: str | os.PathLike, flag: str = "adapter") -> dict:
    """Header metadata of an adapter file (or of ``pytorch_lora_weights.safetensors`` in a folder).

    Returns ``{"sa_peft": training info, "lora_adapter_metadata": peft config}``, each only when present.
    """
    path = resolve_adapter_file(path, flag)
    metadata = _header(path, flag)
    out: dict = {}
    for key, name in ((SA_METADATA_KEY, "sa_peft"), ("lora_adapter_metadata", "lora_adapter_metadata")):
        if key in metadata:
            try:
                out[name] = json.loads(metadata[key])
            except json.JSONDecodeError:
                raise ValueError(f"{flag} {path!r}: the {key!r} header entry is not valid JSON; the file is damaged") from None
    return out


LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# diffusers' kohya reader maps SDXL's added-conditioning MLP only from the sgm spelling (kohya's own for
# SDXL); the diffusers spelling ``add_embedding_linear_1`` would be read back as a non-existent module.
_KOHYA_RENAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def component_configs(header: dict[str, str]) -> dict[str, dict]:
    """Per-component peft LoRA config (``r``, ``lora_alpha``, ``use_rslora``, patterns) from the header."""
    if "lora_adapter_metadata" not in header:
        return {}
    flat = json.loads(header["lora_adapter_metadata"])
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _pattern_value(patterns: dict | None, module: str, default):
    from peft.utils.other import get_pattern_key

    if not patterns:
        return default
    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def layer_scales(state_dict: dict[str, torch.Tensor], configs: dict[str, dict]) -> dict[str, tuple[int, float]]:
    """``{"<component>.<module>": (rank, scale)}`` for every LoRA layer of a peft-keyed state dict.

    The scale is peft's: alpha / r, or alpha / √r with rsLoRA, with ``rank_pattern``/``alpha_pattern``
    applied. Without a config (a file that is not from peft/diffusers' saver) diffusers' own default is
    assumed: alpha = r, scale 1.
    """
    out = {}
    for key, tensor in state_dict.items():
        if "lora_magnitude_vector" in key:
            raise ValueError(f"{key}: DoRA adapters are not supported by the kohya export")
        if not key.endswith(".lora_A.weight"):
            continue
        component, _, module = key[: -len(".lora_A.weight")].partition(".")
        rank = int(tensor.shape[0])
        config = configs.get(component)
        if config is None:
            out[f"{component}.{module}"] = (rank, 1.0)
            continue
        expected = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
        if expected != rank:
            raise ValueError(f"{key}: rank {rank} in the file but {expected} in its adapter config; the file is damaged")
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        out[f"{component}.{module}"] = (rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)
    return out


def kohya_state_dict(state_dict: dict[str, torch.Tensor], configs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Convert a peft-keyed LoRA state dict (``unet.<module>.lora_A.weight``, ...) with its adapter config into
    A1111/ComfyUI/kohya keys: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``.

    Keys come from diffusers' ``convert_state_dict_to_kohya``; ``alpha`` is rewritten to scale·rank (diffusers
    writes alpha = rank, which loses alpha ≠ rank and rsLoRA), since kohya readers apply alpha / rank.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    unknown = sorted({k.split(".")[0] for k in state_dict} - set(LORA_COMPONENTS))
    if unknown:
        raise ValueError(f"LoRA keys of unknown components {unknown}; expected keys starting with {LORA_COMPONENTS}")
    scales = layer_scales(state_dict, configs)
    if not scales:
        raise ValueError("the adapter holds no LoRA layers (no '.lora_A.weight' keys)")
    converted = convert_state_dict_to_kohya(dict(state_dict))
    kohya: dict[str, torch.Tensor] = {}
    for name, (rank, scale) in scales.items():
        component, _, module = name.partition(".")
        source = KOHYA_PREFIXES[component] + module.replace(".", "_")
        target = module
        if component == "unet":
            for old, new in _KOHYA_RENAMES.items():
                if module == old:
                    target = new
        target = KOHYA_PREFIXES[component] + target.replace(".", "_")
        for part in ("lora_down.weight", "lora_up.weight"):
            if f"{source}.{part}" not in converted:
                raise KeyError(f"kohya conversion lost layer {name} ({source}.{part})")
            kohya[f"{target}.{part}"] = converted[f"{source}.{part}"].contiguous()
        kohya[f"{target}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return kohya


def export_kohya(
    source: str | os.PathLike | torch.nn.Module,
    path: str | os.PathLike,
    adapter: str = "default",
    metadata: dict | None = None,
) -> str:
    """Write an A1111/ComfyUI/kohya-keyed copy (``lora_unet_…lora_down/lora_up/alpha``) of a forget LoRA.

    ``source`` is a saved adapter (a ``.safetensors`` file or a folder holding ``pytorch_lora_weights.safetensors``)
    or, for code that still holds it, a live UNet carrying ``adapter``; both go through ``kohya_state_dict``.
    From a file, the ``sa_peft`` training info is copied into the new file's header. The file appears atomically.
    """
    from .io_utils import atomic_path

    header_out: dict[str, str] = {}
    if isinstance(source, torch.nn.Module):
        from peft.utils import get_peft_model_state_dict

        state_dict = {f"unet.{k}": v for k, v in get_peft_model_state_dict(source, adapter_name=adapter).items()}
        configs = {"unet": source.peft_config[adapter].to_dict()}
    else:
        state_dict, header = load_adapter_file(source, "export source")
        configs = component_configs(header)
        if SA_METADATA_KEY in header:
            header_out[SA_METADATA_KEY] = header[SA_METADATA_KEY]
    kohya = kohya_state_dict(state_dict, configs)
    unet_ranks = {int(v.shape[0]) for k, v in kohya.items() if k.startswith("lora_unet_") and k.endswith("lora_down.weight")}
    header_out["ss_network_module"] = "networks.lora"
    if len(unet_ranks) == 1:
        header_out["ss_network_dim"] = str(unet_ranks.pop())
    header_out.update({k: str(v) for k, v in (metadata or {}).items()})
    with atomic_path(path) as tmp:
        save_file(kohya, tmp, metadata=header_out)
    return os.fspath(path)


def copy_atomic(src: str, dst: str) -> None:
    """Copy a file so that ``dst`` appears whole or not at all."""
    from .io_utils import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
