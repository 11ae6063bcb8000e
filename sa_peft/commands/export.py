"""``sa-peft export``: convert a saved forget LoRA to another key layout."""

from __future__ import annotations

import argparse
import os

from ..adapter_io import LORA_WEIGHT_NAME, export_kohya, resolve_adapter_file
from ..checks import check_output_apart, check_writable
from ..errors import InputError
from .common import speaking_flags

FORMATS = ("kohya",)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a kohya/A1111/ComfyUI-keyed copy of a forget LoRA",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("path", help="adapter .safetensors file or a training output folder")
    parser.add_argument("--format", choices=FORMATS, default="kohya",
                        help="kohya: kohya-ss's key names (lora_unet_…, lora_te_/lora_te1_/lora_te2_text_model_…; "
                             "lora_down/lora_up/alpha), read by A1111, ComfyUI, kohya-ss and diffusers")
    parser.add_argument("--output", default=None,
                        help="file to write (.safetensors); default: beside the input, '<name>_kohya.safetensors'")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(func=speaking_flags(run, parser))


def default_output(source: str, fmt: str) -> str:
    stem = os.path.splitext(source)[0]
    return f"{stem}_{fmt}.safetensors"


def run(args: argparse.Namespace) -> str:
    source = resolve_adapter_file(args.path, "sa-peft export")
    output = args.output or default_output(source, args.format)
    if not output.endswith(".safetensors"):
        raise InputError(f"--output {output!r} must end in .safetensors")
    check_output_apart(output, "output", [("path", source)])
    check_writable(output, "output")
    if os.path.exists(output) and not args.overwrite:
        raise InputError(f"--output {output!r} already exists; pass --overwrite to replace it or choose another --output")
    export_kohya(source, output)
    print(f"wrote {output} ({args.format} keys) from {source}")
    if os.path.basename(source) == LORA_WEIGHT_NAME:
        print(f'load it with pipe.load_lora_weights("{os.path.dirname(output) or "."}", '
              f'weight_name="{os.path.basename(output)}")')
    return output
