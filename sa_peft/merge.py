"""Stacking forget LoRAs on a pipeline, fusing them into the base, and saving the merged model.

A merged model is written in two forms:

* a diffusers pipeline folder (``save_pretrained``, safetensors weights), loadable with
  ``DiffusionPipeline.from_pretrained``;
* a **single ``.safetensors`` checkpoint in the original layout** of the model family, the file A1111 and ComfyUI
  load and diffusers reads with ``from_single_file``. diffusers 0.42 converts only from those layouts;
  ``sa_peft.ldm_layout`` (SD 1.x/2.x/SDXL: ``model.diffusion_model.…``, ``first_stage_model.…``,
  ``cond_stage_model.…`` or SDXL's ``conditioner.embedders.0/1.…``) and ``sa_peft.transformer_layout`` (SD3:
  ``model.diffusion_model.joint_blocks.…`` with the VAE and ``text_encoders.clip_l/clip_g/t5xxl.…``; FLUX: the
  transformer alone, ``double_blocks.…``/``single_blocks.…``, as Black Forest Labs ship it) invert its readers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import save_file

from .adapter_io import LORA_COMPONENTS, load_adapter_file, read_adapter_metadata, resolve_adapter_file
from .errors import InputError
from .io_utils import atomic_dir, atomic_path
from .lora import lora_models
from .models import FLUX_PIPELINE, SD3_PIPELINE, SDXL_PIPELINE

# Header entry naming the layout of a merged single file (for ``sa-peft inspect``); nothing reads it back.
SINGLE_FILE_FORMATS = {"StableDiffusionPipeline": "original-sd", SDXL_PIPELINE: "original-sd",
                       SD3_PIPELINE: "original-sd3", FLUX_PIPELINE: "original-flux-transformer"}
SINGLE_FILE_KEY = "sa_peft_checkpoint"
SINGLE_FILE_LAYOUTS = {"original-sd": "original Stable Diffusion layout", "original-sd3": "original SD3 layout",
                       "original-flux-transformer": "original FLUX transformer layout"}
SINGLE_FILE_PIPELINES = tuple(SINGLE_FILE_FORMATS)


def adapter_names(count: int) -> list[str]:
    """Adapter names for stacked LoRAs. diffusers filters load warnings by substring, so no name may be
    contained in another (``forget_1`` is in ``forget_10``) or in a key (``b`` is in ``lora_B``)."""
    return [f"forget_{i:03d}_" for i in range(count)]


def _loaded_layer_count(pipe, adapter: str) -> int:
    from peft.tuners.lora import LoraLayer

    count = 0
    # SD3's and FLUX's LoRAs live on ``pipe.transformer``; LORA_COMPONENTS lists the UNet families' (kohya export).
    for name in ("transformer", *LORA_COMPONENTS):
        component = getattr(pipe, name, None)
        if isinstance(component, torch.nn.Module):
            count += sum(1 for m in component.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A)
    return count


def _file_layer_count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(1 for k in tensors if k.endswith((".lora_A.weight", ".lora_down.weight")))


def check_lora_weights(loras: Sequence[str], weights: Sequence[float] | None, parameter: str = "lora") -> list[float]:
    """One weight per LoRA (default 1.0 each); errors name the flags."""
    if not loras:
        raise InputError(f"no adapter given: pass `{parameter}` PATH (repeatable)")
    if weights is None or len(weights) == 0:
        return [1.0] * len(loras)
    if len(weights) != len(loras):
        raise InputError(f"`{parameter}_weight` was given {len(weights)} times for {len(loras)} `{parameter}` values; "
                         f"give one `{parameter}_weight` per `{parameter}`, in the same order (or none for 1.0 each)")
    return [float(w) for w in weights]


def stack_forget_loras(pipe, loras: Sequence[str | os.PathLike], weights: Sequence[float] | None = None,
                       parameter: str = "lora") -> list[str]:
    """Load each LoRA (a ``.safetensors`` file or a training output folder; diffusers or kohya keys) as its own
    adapter with diffusers' ``load_lora_weights`` and activate them together with ``set_adapters(names, weights)``.

    Raises if a LoRA's layers do not all attach to this pipeline (diffusers only warns and drops them), which
    happens when it was trained for another base model.
    """
    weights = check_lora_weights([os.fspath(p) for p in loras], weights, parameter)
    files = [resolve_adapter_file(p, parameter) for p in loras]
    names = adapter_names(len(files))
    for name, path in zip(names, files):
        tensors, _ = load_adapter_file(path, parameter)
        expected = _file_layer_count(tensors)
        base = read_adapter_metadata(path, parameter).get("sa_peft", {}).get("base_model")
        trained_for = f" (it was trained for {base!r})" if base else ""
        try:
            # From the file, so that diffusers reads the adapter config (alpha, rsLoRA) in its header.
            pipe.load_lora_weights(os.path.dirname(os.path.abspath(path)), weight_name=os.path.basename(path),
                                   adapter_name=name, use_safetensors=True)
        except (ValueError, RuntimeError, KeyError) as err:
            reason = " ".join(str(err).split())[:300]
            raise InputError(f"`{parameter}` {path!r} does not fit this {type(pipe).__name__}{trained_for} ({reason}); "
                             "pass the base model it was trained on with `pretrained_model_name_or_path`") from None
        loaded = _loaded_layer_count(pipe, name)
        if loaded != expected:
            raise InputError(f"`{parameter}` {path!r}: only {loaded} of its {expected} LoRA layers match this "
                             f"{type(pipe).__name__}{trained_for}; pass the base model it was trained on with "
                             "`pretrained_model_name_or_path`")
    pipe.set_adapters(names, adapter_weights=weights)
    return names


def fuse_forget_loras(pipe, names: Sequence[str]):
    """Fuse the named (already weighted) adapters into the base weights with diffusers' ``fuse_lora`` and
    remove the LoRA layers with ``unload_lora_weights``; the pipeline is then a plain pipeline. Every component a
    LoRA can live on is fused: ``FluxPipeline.fuse_lora`` fuses only the transformer by default, and unloading
    would then drop a ``--train_text_encoder`` CLIP LoRA unfused."""
    components = list(lora_models(pipe))
    pipe.fuse_lora(components=components, adapter_names=list(names), lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe


def merge_forget_loras(pipe, loras: Sequence[str | os.PathLike], weights: Sequence[float] | None = None):
    """Stack ``loras`` with ``weights`` and fuse them into ``pipe`` (in place); returns the pipeline."""
    return fuse_forget_loras(pipe, stack_forget_loras(pipe, loras, weights))


def merge_info(base_model: str, loras: Sequence[str], weights: Sequence[float]) -> dict:
    """What a merged model is made of, for the single file's header and ``sa-peft inspect``."""
    from . import __version__

    entries = []
    for path, weight in zip(loras, weights):
        file = resolve_adapter_file(path)
        entries.append({"file": os.path.basename(file), "weight": weight,
                        "sa_peft": read_adapter_metadata(file).get("sa_peft")})
    return {"kind": "merged", "base_model": str(base_model), "loras": entries, "sa_peft_version": __version__}


def save_merged_pipeline(pipe, output_dir: str | os.PathLike, overwrite: bool = False) -> str:
    """``save_pretrained`` (safetensors) into ``output_dir``, which appears whole or not at all."""
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return os.fspath(output_dir)


def original_layout_state_dict(pipe) -> dict[str, torch.Tensor]:
    """``pipe``'s weights in its family's original layout (see ``sa_peft.ldm_layout`` and
    ``sa_peft.transformer_layout``): the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.``,
    the text encoder under ``cond_stage_model.transformer.`` (SD 1.x CLIP) or ``cond_stage_model.model.`` (SD 2.x
    OpenCLIP), or SDXL's two under ``conditioner.embedders.0.transformer.`` and ``conditioner.embedders.1.model.``;
    SD3's transformer under ``model.diffusion_model.`` with the VAE and its text encoders under
    ``text_encoders.clip_l/clip_g/t5xxl.transformer.``; FLUX's transformer alone (its files hold nothing else)."""
    from . import ldm_layout, transformer_layout

    name = type(pipe).__name__
    if name not in SINGLE_FILE_PIPELINES:
        raise InputError(f"single-file checkpoints support {', '.join(SINGLE_FILE_PIPELINES)}, not {name}")

    def weights(module):
        out, seen = {}, set()
        for k, v in module.state_dict().items():
            v = v.detach().cpu().contiguous()
            # T5 ties encoder.embed_tokens to shared: safetensors refuses tensors that share memory, so the second
            # name gets a copy (only it: a copy of every tensor would double the memory of a full-size model).
            out[k] = v.clone() if v.data_ptr() in seen else v
            seen.add(v.data_ptr())
        return out

    if name == FLUX_PIPELINE:
        return transformer_layout.flux_transformer_to_original(weights(pipe.transformer))
    out = ldm_layout.vae_to_ldm(weights(pipe.vae), pipe.vae.config)
    if name == SD3_PIPELINE:
        out.update(transformer_layout.sd3_transformer_to_original(weights(pipe.transformer)))
        out.update(ldm_layout.clip_to_ldm(weights(pipe.text_encoder), transformer_layout.SD3_CLIP_L_PREFIX))
        out.update(ldm_layout.clip_to_ldm(weights(pipe.text_encoder_2), transformer_layout.SD3_CLIP_G_PREFIX))
        if pipe.text_encoder_3 is not None:
            out.update({transformer_layout.SD3_T5_PREFIX + k: v for k, v in weights(pipe.text_encoder_3).items()})
        return out
    out.update(ldm_layout.unet_to_ldm(weights(pipe.unet), pipe.unet.config))
    if name == SDXL_PIPELINE:
        out.update(ldm_layout.clip_to_ldm(weights(pipe.text_encoder), ldm_layout.SDXL_CLIP_PREFIX))
        out.update(ldm_layout.openclip_to_ldm(weights(pipe.text_encoder_2), ldm_layout.SDXL_OPENCLIP_PREFIX))
    elif ldm_layout.is_openclip(pipe.text_encoder):
        out.update(ldm_layout.openclip_to_ldm(weights(pipe.text_encoder), ldm_layout.SD2_OPENCLIP_PREFIX))
    else:
        out.update(ldm_layout.clip_to_ldm(weights(pipe.text_encoder), ldm_layout.SD1_CLIP_PREFIX))
    return out


def single_file_caveats(pipe) -> list[str]:
    """What the original layout cannot carry for ``pipe``, as sentences (empty when the file reads back whole).

    SD3's layout has no CLIP-L text projection (diffusers' ``from_single_file`` and ComfyUI use the identity there,
    as Stability AI's code does), and diffusers tells SD3's or SDXL's two CLIP encoders apart by their width only."""
    out = []
    if type(pipe).__name__ == SD3_PIPELINE:
        projection = pipe.text_encoder.text_projection.weight
        if not torch.equal(projection.detach().cpu(), torch.eye(*projection.shape, dtype=projection.dtype)):
            out.append("the CLIP-L text projection is not the identity, and the original SD3 layout has none: "
                       "diffusers' from_single_file and ComfyUI will use the identity, so the file's pooled "
                       "embedding (and its images) differ from the merged pipeline folder's")
    if type(pipe).__name__ in (SD3_PIPELINE, SDXL_PIPELINE):
        widths = [m.config.hidden_size for m in (pipe.text_encoder, pipe.text_encoder_2)]
        if widths[0] == widths[1]:
            out.append(f"both CLIP encoders are {widths[0]} wide: diffusers' from_single_file tells them apart by "
                       "width and will read the first for both (ComfyUI reads each by its prefix)")
    return out


def save_single_file_checkpoint(pipe, path: str | os.PathLike, info: dict | None = None) -> str:
    """Write ``pipe`` as one ``.safetensors`` checkpoint in its family's original layout, the file A1111, ComfyUI
    and diffusers' ``from_single_file`` read. ``info`` (what was merged) goes in the header as ``sa_peft``.

    Configs, tokenizers and the scheduler are not in the file (original checkpoints do not carry them). Read it
    with ``StableDiffusionPipeline.from_single_file(path, config=<base pipeline folder or hub id>)`` (or
    ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``); full-size checkpoints are also recognised without
    ``config``. A FLUX file is the transformer alone: ``FluxTransformer2DModel.from_single_file(path,
    config=<base>, subfolder="transformer")`` (diffusers 0.42 reads only full-size FLUX transformers, whose width
    it assumes) or ComfyUI's "Load Diffusion Model". SD3's CLIP-L text projection is not in the original layout:
    diffusers and ComfyUI read it as the identity, as Stability AI's reference code uses it.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise InputError(f"`single_file` {path!r} must end in .safetensors")
    tensors = original_layout_state_dict(pipe)
    metadata = {SINGLE_FILE_KEY: SINGLE_FILE_FORMATS[type(pipe).__name__], "pipeline_class": type(pipe).__name__,
                "sa_peft": json.dumps(info or {}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path
