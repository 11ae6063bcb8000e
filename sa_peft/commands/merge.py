"""``sa-peft merge``: fuse forget LoRAs (each with its weight) into the base model and save it."""

from __future__ import annotations

import argparse
import os

import torch

from ..adapter_io import read_adapter_metadata, resolve_adapter_file
from ..checks import check_output_apart, check_writable
from ..errors import InputError
from ..merge import (
    check_lora_weights,
    merge_forget_loras,
    merge_info,
    save_merged_pipeline,
    save_single_file_checkpoint,
    single_file_caveats,
)
from ..models import FLUX_PIPELINE, TRAINING_PIPELINES, load_pipeline
from .common import add_model_arguments, speaking_flags

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge", help="fuse forget LoRAs into the base model; save a pipeline folder and/or one .safetensors file",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--lora", action="append", default=[], required=True,
                        help="forget LoRA: .safetensors file or training output folder (repeatable)")
    parser.add_argument("--lora_weight", action="append", type=float, default=[],
                        help="weight of each --lora, in order (repeatable; default 1.0 each; negative allowed)")
    parser.add_argument("--output_dir", default=None, help="diffusers pipeline folder to write (save_pretrained)")
    parser.add_argument("--single_file", default=None,
                        help="also/instead write one .safetensors checkpoint in the family's original layout (SD 1.x/"
                             "2.x/SDXL/SD3: the A1111/ComfyUI checkpoint; FLUX: the transformer alone, for ComfyUI's "
                             "Load Diffusion Model; diffusers: from_single_file(path, config=<base>))")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of the saved weights (the merge itself is computed in float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_model_arguments(parser)
    parser.set_defaults(func=speaking_flags(run, parser), pretrained_model_name_or_path=None)
    for action in parser._actions:
        if action.dest == "pretrained_model_name_or_path":
            action.help = "base model (default: the base_model stored in the first --lora's sa-peft metadata)"


def _base_model(args, files: list[str]) -> str:
    if args.pretrained_model_name_or_path:
        return args.pretrained_model_name_or_path
    bases = {f: read_adapter_metadata(f, "lora").get("sa_peft", {}).get("base_model") for f in files}
    known = {b for b in bases.values() if b}
    if not known:
        raise InputError("the --lora files carry no sa-peft metadata naming their base model; "
                         "pass --pretrained_model_name_or_path")
    if len(known) > 1:
        raise InputError(f"the --lora files were trained on different base models ({', '.join(sorted(known))}); "
                         "pass --pretrained_model_name_or_path to choose one")
    return known.pop()


def check_outputs(args) -> None:
    if args.output_dir is None and args.single_file is None:
        raise InputError("nothing to write: pass --output_dir (pipeline folder) and/or --single_file (one .safetensors)")
    if args.single_file is not None:
        if not args.single_file.endswith(".safetensors"):
            raise InputError(f"--single_file {args.single_file!r} must end in .safetensors")
        if os.path.exists(args.single_file) and not args.overwrite:
            raise InputError(f"--single_file {args.single_file!r} already exists; pass --overwrite or choose another path")
    if args.output_dir is not None and os.path.exists(args.output_dir) and not args.overwrite:
        raise InputError(f"--output_dir {args.output_dir!r} already exists; pass --overwrite or choose a new folder")
    # --overwrite replaces --output_dir: it must not be (or hold) a --lora or the base model it reads.
    inputs = [("lora", p) for p in args.lora] + [("pretrained_model_name_or_path", args.pretrained_model_name_or_path)]
    for parameter, output in (("output_dir", args.output_dir), ("single_file", args.single_file)):
        if output is not None:
            check_output_apart(output, parameter, inputs)
            check_writable(output, parameter)


def check_flux_single_file(files: list[str]) -> None:
    """A FLUX single file is the transformer alone (as Black Forest Labs ship it): a LoRA on the text encoder would be
    lost from it, so refuse before merging anything."""
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            if any(k.startswith(("text_encoder", "lora_te")) for k in f.keys()):  # noqa: SIM118 (safe_open is not iterable)
                raise InputError(f"--lora {file!r} adapts FLUX's text encoder, and a FLUX --single_file holds the "
                                 "transformer only; pass --output_dir to save the whole merged pipeline")


def run(args: argparse.Namespace):
    check_outputs(args)
    weights = check_lora_weights(args.lora, args.lora_weight)
    files = [resolve_adapter_file(p, "lora") for p in args.lora]  # safetensors only, checked before loading
    base = _base_model(args, files)
    pipe = load_pipeline(base, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
                         supported=TRAINING_PIPELINES)
    if args.single_file is not None and type(pipe).__name__ == FLUX_PIPELINE:
        check_flux_single_file(files)
    pipe.to(args.device)
    merge_forget_loras(pipe, files, weights)
    pipe.to("cpu")
    if DTYPES[args.dtype] != torch.float32:
        pipe.to(DTYPES[args.dtype])
    info = merge_info(base, files, weights)
    written = []
    if args.output_dir is not None:
        written.append(save_merged_pipeline(pipe, args.output_dir, overwrite=args.overwrite))
    if args.single_file is not None:
        written.append(save_single_file_checkpoint(pipe, args.single_file, info))
        for caveat in single_file_caveats(pipe):
            print(f"NOTE: --single_file: {caveat}")
    summary = ", ".join(f"{os.path.basename(f)} × {w}" for f, w in zip(files, weights))
    print(f"merged {summary} into {base}; wrote {', '.join(written)}")
    return pipe
