"""Saving forget adapters in diffusers' layout (with metadata), the kohya/A1111 copy, and reading them back."""

from __future__ import annotations

import json
import math
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import InputError, MissingInputError
from .io_utils import share_file
from .models import FLUX_PIPELINE, SD3_PIPELINE, SDXL_PIPELINE, TRANSFORMER_PIPELINES, is_flux, is_sd3, is_sdxl
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
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if is_flux(unet):
        return FluxPipeline
    if is_sd3(unet):
        return StableDiffusion3Pipeline
    return StableDiffusionXLPipeline if is_sdxl(unet) else StableDiffusionPipeline


def save_forget_lora(
    output_dir: str | os.PathLike,
    unet: torch.nn.Module,
    training_info: dict,
    adapter: str = "default",
    text_encoder_lora_layers: dict[str, torch.Tensor] | None = None,
    text_encoder_adapter_metadata: dict | None = None,
    text_encoder_2_lora_layers: dict[str, torch.Tensor] | None = None,
    text_encoder_2_adapter_metadata: dict | None = None,
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
        if text_encoder_2_lora_layers:
            if pipeline_class.__name__ not in (SDXL_PIPELINE, SD3_PIPELINE):
                raise ValueError("text_encoder_2_lora_layers: only SDXL and SD3 have a second CLIP text encoder")
            kwargs["text_encoder_2_lora_layers"] = text_encoder_2_lora_layers
            kwargs["text_encoder_2_lora_adapter_metadata"] = text_encoder_2_adapter_metadata
        # SD3's and FLUX's savers name the denoiser "transformer" (keys ``transformer.…``), SD/SDXL's "unet".
        denoiser = "transformer" if pipeline_class.__name__ in TRANSFORMER_PIPELINES else "unet"
        kwargs[f"{denoiser}_lora_layers"] = unet_lora_state_dict(unet, adapter)
        kwargs[f"{denoiser}_lora_adapter_metadata"] = unet.peft_config[adapter].to_dict()
        pipeline_class.save_lora_weights(tmp, safe_serialization=True, **kwargs)
        written = os.path.join(tmp, LORA_WEIGHT_NAME)
        with safe_open(written, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        metadata[SA_METADATA_KEY] = json.dumps(training_info, sort_keys=True)
        metadata[UNET_LAYOUT_KEY] = json.dumps(unet_layout_info(unet), sort_keys=True)
        save_file(tensors, written, metadata=metadata)
        share_file(written)
        final = os.path.join(output_dir, LORA_WEIGHT_NAME)
        os.replace(written, final)
    return final


def resolve_adapter_file(path: str | os.PathLike, parameter: str = "lora") -> str:
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
            raise MissingInputError(f"`{parameter}` {path!r}: the folder holds no .safetensors adapter file; pass the "
                                    f"folder a training run wrote (it holds {LORA_WEIGHT_NAME}) or the file itself")
        raise InputError(f"`{parameter}` {path!r}: the folder holds several .safetensors files ({', '.join(files)}) and no "
                         f"{LORA_WEIGHT_NAME}; pass the file itself")
    if not os.path.exists(path):
        raise MissingInputError(f"`{parameter}` {path!r}: no such file or folder")
    if not path.endswith(".safetensors"):
        raise InputError(f"`{parameter}` {path!r} is not a .safetensors file; adapters are read only from safetensors "
                         "(never pickle/.bin/.pt/.ckpt); convert it or pass the .safetensors file")
    return path


def _header(path: str, parameter: str) -> dict[str, str]:
    return read_safetensors_header(path, parameter, "pass an adapter written by sa-peft or diffusers' save_lora_weights")


def load_adapter_file(path: str | os.PathLike, parameter: str = "lora") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the raw header metadata of an adapter file (or folder); safetensors only."""
    path = resolve_adapter_file(path, parameter)
    metadata = _header(path, parameter)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return tensors, metadata


def check_lora_file(path: str | os.PathLike, parameter: str = "lora") -> str:
    """The adapter file of ``path``, refused now (not after sampling) unless it is a safetensors LoRA.

    ``sa-peft evaluate --lora <bad file>`` failed only after the whole base evaluation. Only the header
    and the key names are read.
    """
    file = resolve_adapter_file(path, parameter)
    _header(file, parameter)
    with safe_open(file, framework="pt") as f:
        keys = list(f.keys())
    if not any(k.endswith((".lora_A.weight", ".lora_down.weight", ".lora.down.weight")) for k in keys):
        raise InputError(f"`{parameter}` {os.fspath(path)!r}: {os.path.basename(file)!r} holds no LoRA weights (no lora_A/lora_down "
                         "keys); pass a forget LoRA written by sa-peft or diffusers' save_lora_weights")
    return file


def read_adapter_metadata(path: str | os.PathLike, parameter: str = "adapter") -> dict:
    """Header metadata of an adapter file (or of ``pytorch_lora_weights.safetensors`` in a folder).

    Returns ``{"sa_peft": training info, "lora_adapter_metadata": peft config}``, each only when present.
    """
    path = resolve_adapter_file(path, parameter)
    metadata = _header(path, parameter)
    out: dict = {}
    for key, name in ((SA_METADATA_KEY, "sa_peft"), ("lora_adapter_metadata", "lora_adapter_metadata")):
        if key in metadata:
            try:
                out[name] = json.loads(metadata[key])
            except json.JSONDecodeError:
                raise InputError(f"`{parameter}` {path!r}: the {key!r} header entry is not valid JSON; the file is damaged") from None
    return out


LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# kohya-ss's own prefixes: SD 1.x/2.x have one text encoder (``lora_te_``), SDXL two (``lora_te1_``/``lora_te2_``).
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_SDXL_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# What diffusers' convert_state_dict_to_kohya names each component (the tensors are looked up under these).
_DIFFUSERS_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# diffusers' kohya reader maps SDXL's added-conditioning MLP only from the sgm spelling (kohya's own for
# SDXL); the diffusers spelling ``add_embedding_linear_1`` would be read back as a non-existent module.
_KOHYA_RENAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# Header entry of an adapter file holding the UNet's block layout, which SDXL's kohya names depend on.
UNET_LAYOUT_KEY = "sa_peft_unet_layout"
_LAYOUT_FIELDS = ("layers_per_block", "down_block_types", "up_block_types", "addition_embed_type")


def unet_layout_info(unet_or_config) -> dict:
    """The UNet config fields that decide original-layout (sgm) names, as stored in adapter headers."""
    config = getattr(unet_or_config, "config", unet_or_config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k in _LAYOUT_FIELDS if (v := config.get(k)) is not None}


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
            raise InputError(f"{key}: DoRA adapters are not supported by the kohya export")
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
            raise InputError(f"{key}: rank {rank} in the file but {expected} in its adapter config; the file is damaged")
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        out[f"{component}.{module}"] = (rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)
    return out


def _kohya_text_encoder_module(module: str) -> str:
    """kohya names text-encoder layers from the ``CLIPTextModel`` root, through ``text_model``; transformers ≥ 5.6
    dropped that level from ``CLIPTextModel`` (not from ``CLIPTextModelWithProjection``), so it is put back."""
    module = module.removeprefix("text_model.")
    return module if module.startswith("text_projection") else "text_model." + module


def kohya_state_dict(
    state_dict: dict[str, torch.Tensor],
    configs: dict[str, dict],
    sdxl: bool = False,
    unet_layout: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Convert a peft-keyed LoRA state dict (``unet.<module>.lora_A.weight``, ...) with its adapter config into the
    keys kohya-ss's scripts write (and A1111/ComfyUI read): ``<prefix><module>.lora_down.weight``, ``.lora_up.weight``
    and ``.alpha``, with the module path's dots as underscores.

    * Text encoders: ``lora_te_text_model_…`` (SD 1.x/2.x) or ``lora_te1_text_model_…``/``lora_te2_text_model_…``
      (``sdxl``), whatever transformers' module nesting.
    * UNet: diffusers' module names for SD 1.x/2.x (kohya trains those on the diffusers UNet); for SDXL the original
      (sgm) names kohya's SDXL UNet has (``lora_unet_input_blocks_4_1_…``, ``…output_blocks_2_2_conv``,
      ``…label_emb_0_0``), which need ``unet_layout`` (``unet_layout_info``). A1111 finds no target for some diffusers
      names on SDXL (``up_blocks_0_upsamplers_0_conv``: its rules assume SD 1.x's blocks). Without a layout an SDXL
      UNet keeps diffusers' names (diffusers and ComfyUI read them) except the added-conditioning MLP, which is
      written ``label_emb_0_0/2`` (diffusers' reader maps only that spelling).

    ``alpha`` is scale·rank (diffusers writes alpha = rank, which loses alpha ≠ rank and rsLoRA), since kohya readers
    apply alpha / rank. Tensors come from diffusers' ``convert_state_dict_to_kohya``.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    from .ldm_layout import UnetLayout, unet_module_to_ldm

    unknown = sorted({k.split(".")[0] for k in state_dict} - set(LORA_COMPONENTS))
    if unknown:
        raise InputError(f"LoRA keys of unknown components {unknown}; expected keys starting with {LORA_COMPONENTS}")
    sdxl = sdxl or any(k.startswith("text_encoder_2.") for k in state_dict)
    prefixes = KOHYA_SDXL_PREFIXES if sdxl else KOHYA_PREFIXES
    layout = UnetLayout(unet_layout) if sdxl and unet_layout else None
    if layout is not None and not all(layout.up_has_attention[:-1]):
        # An upsampler after a block without attention is ``output_blocks.N.1.conv``, which diffusers' sgm reader
        # takes for an attention; SDXL's blocks never have one, but a UNet that does keeps diffusers' names.
        layout = None
    scales = layer_scales(state_dict, configs)
    if not scales:
        raise InputError("the adapter holds no LoRA layers (no '.lora_A.weight' keys)")
    converted = convert_state_dict_to_kohya(dict(state_dict))
    kohya: dict[str, torch.Tensor] = {}
    for name, (rank, scale) in scales.items():
        component, _, module = name.partition(".")
        source = _DIFFUSERS_KOHYA_PREFIXES[component] + module.replace(".", "_")
        if component != "unet":
            target = _kohya_text_encoder_module(module)
        elif layout is not None:
            target = unet_module_to_ldm(module, layout)
        else:
            target = _KOHYA_RENAMES.get(module, module)
        target = prefixes[component] + target.replace(".", "_")
        for part in ("lora_down.weight", "lora_up.weight"):
            if f"{source}.{part}" not in converted:
                raise KeyError(f"kohya conversion lost layer {name} ({source}.{part})")
            kohya[f"{target}.{part}"] = converted[f"{source}.{part}"].contiguous()
        kohya[f"{target}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return kohya


def _header_unet_layout(header: dict[str, str], source) -> dict:
    """The ``sa_peft_unet_layout`` header entry, checked: it only names blocks, and a bad one is an error."""
    from .ldm_layout import UnetLayout

    try:
        layout = json.loads(header[UNET_LAYOUT_KEY])
        if layout.get("layers_per_block") is not None:
            UnetLayout(layout)
        return layout
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise InputError(f"export source {os.fspath(source)!r}: the {UNET_LAYOUT_KEY!r} header entry is not a UNet "
                         f"layout ({err}); the file is damaged") from None


def _local_unet_layout(base_model: str | None) -> dict | None:
    """The UNet layout of a base model found locally (a folder or the hub cache); nothing is downloaded."""
    if not base_model:
        return None
    from diffusers import UNet2DConditionModel

    try:
        return unet_layout_info(UNet2DConditionModel.load_config(base_model, subfolder="unet", local_files_only=True))
    except (OSError, ValueError):
        return None


def export_kohya(
    source: str | os.PathLike | torch.nn.Module,
    path: str | os.PathLike,
    adapter: str = "default",
    metadata: dict | None = None,
) -> str:
    """Write an A1111/ComfyUI/kohya-keyed copy (``lora_unet_…``/``lora_te…`` ``lora_down/lora_up/alpha``) of a forget
    LoRA; see ``kohya_state_dict`` for the names.

    ``source`` is a saved adapter (a ``.safetensors`` file or a folder holding ``pytorch_lora_weights.safetensors``)
    or, for code that still holds it, a live UNet carrying ``adapter``; both go through ``kohya_state_dict``.
    From a file, the ``sa_peft`` training info is copied into the new file's header, and the SDXL UNet layout is
    read from the header (files written by ``save_forget_lora``) or from the base model's config if it is local.
    The file appears atomically. A FLUX adapter (``base_pipeline`` FluxPipeline in its header, or a live FLUX
    transformer) gets kohya's FLUX names instead (``sa_peft.kohya_flux``).
    """
    import warnings

    header_out: dict[str, str] = {}
    if isinstance(source, torch.nn.Module):
        from peft.utils import get_peft_model_state_dict

        flux = is_flux(source)
        # SD3's transformer keeps its component name, so that it is refused like an SD3 file (no kohya SD3 names).
        component = "transformer" if flux or is_sd3(source) else "unet"
        state_dict = {f"{component}.{k}": v for k, v in get_peft_model_state_dict(source, adapter_name=adapter).items()}
        configs = {component: source.peft_config[adapter].to_dict()}
        layout = unet_layout_info(source)
    else:
        state_dict, header = load_adapter_file(source, "export source")
        configs = component_configs(header)
        info = json.loads(header[SA_METADATA_KEY]) if SA_METADATA_KEY in header else {}
        if SA_METADATA_KEY in header:
            header_out[SA_METADATA_KEY] = header[SA_METADATA_KEY]
        layout = _header_unet_layout(header, source) if UNET_LAYOUT_KEY in header else _local_unet_layout(info.get("base_model"))
        if layout is None and info.get("base_pipeline") == SDXL_PIPELINE:
            layout = {"addition_embed_type": "text_time"}
        flux = info.get("base_pipeline") == FLUX_PIPELINE
    if not flux and any(k.startswith("transformer.") for k in state_dict):
        raise InputError(f"export {os.fspath(source) if not isinstance(source, torch.nn.Module) else 'of a live model'}: "
                         "an SD3 adapter has no kohya layout to convert to; ComfyUI reads the diffusers file (its "
                         "`transformer.` keys) as it is, so share pytorch_lora_weights.safetensors")
    if flux:  # kohya's FLUX names (fused qkv/linear1), sa_peft.kohya_flux
        from .kohya_flux import flux_kohya_state_dict

        scales = {k.partition(".")[2]: scale for k, (_, scale) in layer_scales(state_dict, configs).items()}
        kohya = flux_kohya_state_dict(state_dict, scales)
        text = {k: v for k, v in state_dict.items() if k.startswith("text_encoder.")}
        if text:  # --train_text_encoder's CLIP: kohya's FLUX scripts name it as SDXL's first encoder (lora_te1_…)
            kohya.update(kohya_state_dict(text, configs, sdxl=True))
        return _write_kohya(kohya, path, header_out, metadata, None)
    sdxl = is_sdxl(layout or {}) or any(
        k.startswith(("text_encoder_2.", "unet.add_embedding.")) for k in state_dict)
    if sdxl and not (layout or {}).get("layers_per_block"):
        warnings.warn(f"export {source!r}: SDXL adapter without its UNet layout (no {UNET_LAYOUT_KEY} header, base model "
                      "not found locally); UNet keys keep diffusers' names, which A1111 maps incompletely", stacklevel=2)
        layout = None
    kohya = kohya_state_dict(state_dict, configs, sdxl=sdxl, unet_layout=layout if sdxl else None)
    return _write_kohya(kohya, path, header_out, metadata, "sdxl_base_v1-0" if sdxl else None)


def _write_kohya(kohya: dict[str, torch.Tensor], path, header_out: dict[str, str], metadata: dict | None,
                 base_model_version: str | None) -> str:
    """The kohya file, atomically, with kohya's own header entries (network module, dim, base version)."""
    from .io_utils import atomic_path

    unet_ranks = {int(v.shape[0]) for k, v in kohya.items() if k.startswith("lora_unet_") and k.endswith("lora_down.weight")}
    header_out["ss_network_module"] = "networks.lora"
    if base_model_version:
        header_out["ss_base_model_version"] = base_model_version
    if len(unet_ranks) == 1:
        header_out["ss_network_dim"] = str(unet_ranks.pop())
    header_out.update({k: str(v) for k, v in (metadata or {}).items()})
    with atomic_path(path) as tmp:
        save_file(kohya, tmp, metadata=header_out)
    return os.fspath(path)
