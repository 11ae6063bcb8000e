"""Stacking forget LoRAs on a pipeline, fusing them into the base, and saving the merged model.

A merged model is written in two forms:

* a diffusers pipeline folder (``save_pretrained``, safetensors weights), loadable with
  ``DiffusionPipeline.from_pretrained``;
* a **single ``.safetensors`` file** in sa-peft's own layout (format ``sa-peft-pipeline/1``): every model
  component's diffusers-keyed state dict with its component name as prefix (``unet.…``, ``vae.…``,
  ``text_encoder.…``, ``text_encoder_2.…``), and the small files of the pipeline folder (``model_index.json``,
  component configs, tokenizer and scheduler files) as text in the safetensors header. It is **not** an
  original-SD (A1111/ComfyUI/ldm-keyed) checkpoint: diffusers 0.42 ships converters from that layout only,
  not to it, so ``StableDiffusionPipeline.from_single_file`` cannot read this file (it looks for ldm keys such
  as ``model.diffusion_model.…``). Read it back with ``load_single_file_checkpoint``; for A1111/ComfyUI use the
  kohya export of the LoRAs (``sa-peft export --format kohya``) on the original base checkpoint instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter_io import load_adapter_file, read_adapter_metadata, resolve_adapter_file
from .io_utils import atomic_dir, atomic_path
from .safetensors_header import read_safetensors_header

SINGLE_FILE_FORMAT = "sa-peft-pipeline/1"
SINGLE_FILE_KEY = "sa_peft_checkpoint"
# Only these classes are rebuilt from a single-file checkpoint; nothing else in its header is imported or run.
ALLOWED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
ALLOWED_MODELS = {
    "diffusers": ("UNet2DConditionModel", "AutoencoderKL"),
    "transformers": ("CLIPTextModel", "CLIPTextModelWithProjection"),
}
ALLOWED_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def adapter_names(count: int) -> list[str]:
    """Adapter names for stacked LoRAs. diffusers filters load warnings by substring, so no name may be
    contained in another (``forget_1`` is in ``forget_10``) or in a key (``b`` is in ``lora_B``)."""
    return [f"forget_{i:03d}_" for i in range(count)]


def _loaded_layer_count(pipe, adapter: str) -> int:
    from peft.tuners.lora import LoraLayer

    count = 0
    for name in LORA_COMPONENTS:
        component = getattr(pipe, name, None)
        if isinstance(component, torch.nn.Module):
            count += sum(1 for m in component.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A)
    return count


def _file_layer_count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(1 for k in tensors if k.endswith((".lora_A.weight", ".lora_down.weight")))


def check_lora_weights(loras: Sequence[str], weights: Sequence[float] | None, flag: str = "--lora") -> list[float]:
    """One weight per LoRA (default 1.0 each); errors name the flags."""
    if not loras:
        raise ValueError(f"no adapter given: pass {flag} PATH (repeatable)")
    if weights is None or len(weights) == 0:
        return [1.0] * len(loras)
    if len(weights) != len(loras):
        raise ValueError(f"{flag}_weight was given {len(weights)} times for {len(loras)} {flag} values; "
                         f"give one {flag}_weight per {flag}, in the same order (or none for 1.0 each)")
    return [float(w) for w in weights]


def stack_forget_loras(pipe, loras: Sequence[str | os.PathLike], weights: Sequence[float] | None = None,
                       flag: str = "--lora") -> list[str]:
    """Load each LoRA (a ``.safetensors`` file or a training output folder; diffusers or kohya keys) as its own
    adapter with diffusers' ``load_lora_weights`` and activate them together with ``set_adapters(names, weights)``.

    Raises if a LoRA's layers do not all attach to this pipeline (diffusers only warns and drops them), which
    happens when it was trained for another base model.
    """
    weights = check_lora_weights([os.fspath(p) for p in loras], weights, flag)
    files = [resolve_adapter_file(p, flag) for p in loras]
    names = adapter_names(len(files))
    for name, path in zip(names, files):
        tensors, _ = load_adapter_file(path, flag)
        expected = _file_layer_count(tensors)
        base = read_adapter_metadata(path, flag).get("sa_peft", {}).get("base_model")
        trained_for = f" (it was trained for {base!r})" if base else ""
        try:
            # From the file, so that diffusers reads the adapter config (alpha, rsLoRA) in its header.
            pipe.load_lora_weights(os.path.dirname(os.path.abspath(path)), weight_name=os.path.basename(path),
                                   adapter_name=name, use_safetensors=True)
        except (ValueError, RuntimeError, KeyError) as err:
            reason = " ".join(str(err).split())[:300]
            raise ValueError(f"{flag} {path!r} does not fit this {type(pipe).__name__}{trained_for} ({reason}); "
                             "pass the base model it was trained on with --pretrained_model_name_or_path") from None
        loaded = _loaded_layer_count(pipe, name)
        if loaded != expected:
            raise ValueError(f"{flag} {path!r}: only {loaded} of its {expected} LoRA layers match this "
                             f"{type(pipe).__name__}{trained_for}; pass the base model it was trained on with "
                             "--pretrained_model_name_or_path")
    pipe.set_adapters(names, adapter_weights=weights)
    return names


def fuse_forget_loras(pipe, names: Sequence[str]):
    """Fuse the named (already weighted) adapters into the base weights with diffusers' ``fuse_lora`` and
    remove the LoRA layers with ``unload_lora_weights``; the pipeline is then a plain pipeline."""
    pipe.fuse_lora(adapter_names=list(names), lora_scale=1.0)
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


def _model_components(pipe) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _pipeline_skeleton(pipe) -> dict[str, str]:
    """The small files of ``pipe.save_pretrained`` (configs, tokenizers, scheduler), as {relative path: text}."""
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_config(tmp)
        for name, component in pipe.components.items():
            if component is None:
                continue
            folder = os.path.join(tmp, name)
            if isinstance(component, torch.nn.Module):
                os.makedirs(folder, exist_ok=True)
                if hasattr(component, "save_config"):  # diffusers models
                    component.save_config(folder)
                else:  # transformers models
                    component.config.save_pretrained(folder)
            elif hasattr(component, "save_pretrained"):  # tokenizers, schedulers
                component.save_pretrained(folder)
        for root, _, names in os.walk(tmp):
            for fname in names:
                full = os.path.join(root, fname)
                with open(full, encoding="utf-8") as f:
                    files[os.path.relpath(full, tmp).replace(os.sep, "/")] = f.read()
    return files


def save_single_file_checkpoint(pipe, path: str | os.PathLike, info: dict | None = None) -> str:
    """Write ``pipe`` as one ``.safetensors`` file in sa-peft's prefixed-diffusers layout (see the module
    docstring: not an A1111/ldm checkpoint); read it back with ``load_single_file_checkpoint``."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"--single_file {path!r} must end in .safetensors")
    if type(pipe).__name__ not in ALLOWED_PIPELINES:
        raise ValueError(f"single-file checkpoints support {', '.join(ALLOWED_PIPELINES)}, not {type(pipe).__name__}")
    tensors = {}
    for name, module in _model_components(pipe).items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    metadata = {
        SINGLE_FILE_KEY: SINGLE_FILE_FORMAT,
        "pipeline_class": type(pipe).__name__,
        "files": json.dumps(_pipeline_skeleton(pipe), sort_keys=True),
        "sa_peft": json.dumps(info or {}, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def _safe_relpath(rel: str, flag: str, path: str) -> str:
    norm = os.path.normpath(rel)
    if os.path.isabs(norm) or norm.startswith("..") or "\\" in rel:
        raise ValueError(f"{flag} {path!r}: its header names a file outside the checkpoint ({rel!r}); refusing it")
    return norm


def load_single_file_checkpoint(path: str | os.PathLike, torch_dtype: torch.dtype | None = None):
    """Rebuild the pipeline saved by ``save_single_file_checkpoint`` (sa-peft's own single-file layout).

    The header's configs, tokenizer and scheduler files are written to a temporary folder and read by
    diffusers' ``DiffusionPipeline.from_pretrained``; the models are built from their configs and given the
    file's tensors (all of them, strictly). Only the classes in ``ALLOWED_PIPELINES``/``ALLOWED_MODELS`` are
    rebuilt, nothing is unpickled and no remote code is run. ``torch_dtype`` casts the models (default: as
    stored).
    """
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline

    path = os.fspath(path)
    flag = "checkpoint"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such file")
    if not path.endswith(".safetensors"):
        raise ValueError(f"{flag} {path!r} is not a .safetensors file; only safetensors checkpoints are read")
    header = read_safetensors_header(path, flag)
    if header.get(SINGLE_FILE_KEY) != SINGLE_FILE_FORMAT:
        raise ValueError(f"{flag} {path!r} is not an sa-peft single-file checkpoint ({SINGLE_FILE_FORMAT}); "
                         "original-SD (A1111) checkpoints load with StableDiffusionPipeline.from_single_file")
    files = json.loads(header["files"])
    model_index = json.loads(files["model_index.json"])
    pipeline_class = model_index.get("_class_name")
    if pipeline_class not in ALLOWED_PIPELINES:
        raise ValueError(f"{flag} {path!r}: pipeline class {pipeline_class!r} is not one of {ALLOWED_PIPELINES}")
    models: dict[str, torch.nn.Module] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rel, text in files.items():
            target = os.path.join(tmp, _safe_relpath(rel, flag, path))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)
        for name, spec in model_index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
                continue
            library, class_name = spec
            if class_name in ALLOWED_MODELS.get(library, ()):
                module = __import__(library)
                cls = getattr(module, class_name)
                folder = os.path.join(tmp, name)
                with init_empty_weights():
                    if library == "diffusers":
                        model = cls.from_config(cls.load_config(folder))
                    else:
                        model = cls(cls.config_class.from_pretrained(folder))
                state = {}
                with safe_open(path, framework="pt") as f:
                    prefix = name + "."
                    for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        if key.startswith(prefix):
                            state[key[len(prefix):]] = f.get_tensor(key)
                model.load_state_dict(state, strict=True, assign=True)
                models[name] = (model if torch_dtype is None else model.to(torch_dtype)).eval()
            elif class_name in ALLOWED_TOKENIZERS and library == "transformers":
                continue  # read by from_pretrained from the files written above
            elif library == "diffusers" and class_name.endswith("Scheduler"):
                continue
            else:
                raise ValueError(f"{flag} {path!r}: component {name!r} of class {library}.{class_name} is not "
                                 "supported in single-file checkpoints")
        pipe = DiffusionPipeline.from_pretrained(tmp, **models, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
