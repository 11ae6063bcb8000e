"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse
import functools

import torch

from ..checks import check_number, check_positive_int
from ..errors import flags_of, input_errors_as_flags
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


def add_scoring_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling flags of the commands that score samples with a classifier (evaluate, attack)."""
    parser.add_argument("--num_inference_steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance")
    parser.add_argument("--batch_size", type=int, default=50, help="images per pipeline call")


def check_generation_arguments(args: argparse.Namespace) -> None:
    """The sampling flags of ``add_generation_arguments`` and the seed, before the pipeline is loaded
    (``--num_inference_steps 0`` was a ZeroDivisionError inside the scheduler)."""
    check_positive_int(args.num_inference_steps, "num_inference_steps")
    check_positive_int(args.resolution, "resolution")
    check_number(args.guidance_scale, "guidance_scale", low=0)
    check_number(args.seed, "seed", low=0)


def load_pipeline_from_args(args: argparse.Namespace, supported: tuple[str, ...] | None = None):
    """The command's pipeline on ``--device``; ``supported``: the pipeline classes it takes (default: the UNet ones)."""
    pipe = load_pipeline(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
                         supported=supported)
    return pipe.to(args.device)


def speaking_flags(run, parser: argparse.ArgumentParser):
    """``run`` with the library's input errors naming ``parser``'s flags instead of the parameters."""

    @functools.wraps(run)
    def run_with_flags(args: argparse.Namespace):
        with input_errors_as_flags(flags_of([parser])):
            return run(args)

    return run_with_flags
