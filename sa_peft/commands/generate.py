"""``sa-peft generate``: build a surrogate or replay set with the frozen pipeline."""

from __future__ import annotations

import argparse

from ..checks import check_output_apart, check_positive_int, check_writable
from ..data import generate_replay_set, generate_surrogate_set
from ..errors import InputError
from ..models import TRAINING_PIPELINES
from ..prompts import read_prompts_file
from ..run_lock import folder_lock
from .common import (
    add_generation_arguments,
    add_model_arguments,
    check_generation_arguments,
    load_pipeline_from_args,
    speaking_flags,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate a surrogate or replay set (latents + PNG previews)",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("kind", choices=["surrogate", "replay"], help="which set to build")
    parser.add_argument("--output_dir", required=True, help="folder of the set; an interrupted run resumes there")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    parser.add_argument("--forget_prompt", action="append", default=[], help="forget prompt (repeatable; surrogate)")
    parser.add_argument("--surrogate_prompt", default=None, help="prompt whose images stand in for the concept")
    parser.add_argument("--surrogate_data_dir", default=None, help="folder of your own stand-in images")
    parser.add_argument("--surrogate_type", default=None, choices=["noise", "uniform_noise", "gaussian_noise"],
                        help="noise images as surrogate")
    parser.add_argument("--num_surrogate_images", type=int, default=64, help="surrogate images")
    parser.add_argument("--replay_prompts_file", default=None, help="text file, one prompt per line (replay)")
    parser.add_argument("--num_replay_images_per_prompt", type=int, default=8, help="replay images per prompt")
    parser.set_defaults(func=speaking_flags(run, parser))


def run(args: argparse.Namespace) -> None:
    if args.kind == "surrogate" and not args.forget_prompt:
        raise InputError("--forget_prompt is required for a surrogate set")
    if args.kind == "replay" and args.replay_prompts_file is None:
        raise InputError("--replay_prompts_file is required for a replay set")
    check_generation_arguments(args)
    check_positive_int(args.num_surrogate_images, "num_surrogate_images")
    check_positive_int(args.num_replay_images_per_prompt, "num_replay_images_per_prompt")
    check_output_apart(args.output_dir, "output_dir", [
        ("surrogate_data_dir", args.surrogate_data_dir), ("replay_prompts_file", args.replay_prompts_file),
        ("pretrained_model_name_or_path", args.pretrained_model_name_or_path)])
    check_writable(args.output_dir, "output_dir")
    with folder_lock(args.output_dir, "output_dir"):  # one writer per set folder
        result = _generate(args)
    print(f"{args.kind} set: {len(result.latents)} images in {args.output_dir}")


def _generate(args: argparse.Namespace):
    if args.kind == "surrogate":
        pipe = load_pipeline_from_args(args, supported=TRAINING_PIPELINES)
        return generate_surrogate_set(
            pipe, args.output_dir, args.forget_prompt, args.num_surrogate_images,
            surrogate_prompt=args.surrogate_prompt, surrogate_data_dir=args.surrogate_data_dir,
            surrogate_type=args.surrogate_type, seed=args.seed, resolution=args.resolution,
            guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
        )
    else:
        prompts = read_prompts_file(args.replay_prompts_file, "replay_prompts_file")
        pipe = load_pipeline_from_args(args, supported=TRAINING_PIPELINES)
        return generate_replay_set(
            pipe, args.output_dir, prompts, args.num_replay_images_per_prompt, seed=args.seed,
            resolution=args.resolution, guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
        )
