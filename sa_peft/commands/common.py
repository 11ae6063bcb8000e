"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse

import torch

from ..models import load_pipeline


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained_model_name_or_path", default="builtin:digits",
                        help="diffusers pipeline folder, hub id, or builtin:digits (default: %(default)s)")
    parser.add_argument("--revision", default=None, help="hub revision (default: %(default)s)")
    parser.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (default: %(default)s)")
    parser.add_argument("--cache_dir", default=None, help="hub cache folder (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run on (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's native size)")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance (default: %(default)s)")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps (default: %(default)s)")


def load_pipeline_from_args(args: argparse.Namespace):
    pipe = load_pipeline(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    return pipe.to(args.device)
