"""``sa-peft fisher``: estimate and store the diagonal Fisher of the weights a forget LoRA adapts."""

from __future__ import annotations

import argparse
import os
import time

from ..checks import check_output_apart, check_positive_int, check_writable
from ..conditioning import encode_prompts
from ..data import generate_replay_set, load_image_set
from ..diffusion_loss import WEIGHTING_SCHEMES, noise_scheduler_for
from ..errors import InputError
from ..fisher import ESTIMATORS, save_fisher
from ..lora import LORA_TARGET_PRESETS, resolve_lora_targets
from ..models import TRAINING_PIPELINES, denoiser
from ..phases import estimate_fisher_on_set
from ..prompts import read_prompts_file
from ..run_lock import file_lock
from .common import (
    add_generation_arguments,
    add_model_arguments,
    check_generation_arguments,
    load_pipeline_from_args,
    speaking_flags,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("fisher", help="estimate the Fisher of the base UNet weights",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, help="Fisher file to write (.safetensors)")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts_file", default=None, help="prompts the frozen model samples for the Fisher")
    source.add_argument("--data_dir", default=None, help="an existing replay set to use instead of sampling")
    parser.add_argument("--samples_dir", default=None, help="where sampled images are cached (default: beside --output)")
    parser.add_argument("--fisher_num_samples", type=int, default=64, help="samples (with --prompts_file: per prompt round-robin)")
    parser.add_argument("--fisher_estimator", choices=ESTIMATORS, default="fast", help="reference: all T timesteps; fast: K stratified")
    parser.add_argument("--fisher_num_timesteps", type=int, default=8, help="K for the fast estimator")
    parser.add_argument("--lora_target", default="all", help=f"modules covered: a preset ({', '.join(LORA_TARGET_PRESETS)}) or names")
    parser.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="logit_normal",
                        help="flow-matching models (SD3): the σ density, as the training script's flag")
    parser.add_argument("--factored_only", action="store_true", help="store only row/column sums (low-rank penalty)")
    parser.set_defaults(func=speaking_flags(run, parser))


def run(args: argparse.Namespace) -> None:
    if not args.output.endswith(".safetensors"):
        raise InputError(f"--output {args.output!r} must end in .safetensors")
    check_generation_arguments(args)
    check_positive_int(args.fisher_num_samples, "fisher_num_samples")
    check_positive_int(args.fisher_num_timesteps, "fisher_num_timesteps")
    inputs = [("data_dir", args.data_dir), ("prompts_file", args.prompts_file),
              ("pretrained_model_name_or_path", args.pretrained_model_name_or_path)]
    for parameter, output in (("output", args.output), ("samples_dir", args.samples_dir)):
        if output is not None:
            check_output_apart(output, parameter, inputs)
            check_writable(output, parameter)
    prompts = read_prompts_file(args.prompts_file, "prompts_file") if args.prompts_file else None
    with file_lock(args.output, "output"):  # one writer per Fisher file
        _estimate(args, prompts)


def _estimate(args: argparse.Namespace, prompts: list[str] | None) -> None:
    pipe = load_pipeline_from_args(args, supported=TRAINING_PIPELINES)
    modules = resolve_lora_targets(denoiser(pipe), args.lora_target)
    if prompts is not None:
        per_prompt = -(-args.fisher_num_samples // len(prompts))
        # The folder is named by what it holds, so a rerun with other counts gets its own set.
        samples_dir = args.samples_dir or f"{os.path.splitext(args.output)[0]}-samples-{per_prompt}x{args.seed}"
        data = generate_replay_set(pipe, samples_dir, prompts, per_prompt, seed=args.seed, resolution=args.resolution,
                                   guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps)
    else:
        data = load_image_set(args.data_dir)
    if len(data.latents) < args.fisher_num_samples:
        raise InputError(f"--data_dir {args.data_dir!r} holds {len(data.latents)} samples, fewer than --fisher_num_samples "
                         f"{args.fisher_num_samples}; lower --fisher_num_samples or generate a larger set")
    # Only the prompts of the samples used are encoded.
    conditioning = encode_prompts(pipe, data.prompts[: args.fisher_num_samples], args.resolution,
                                  guidance_scale=args.guidance_scale)  # a guidance-distilled FLUX's embedding
    start = time.perf_counter()
    noise_scheduler = noise_scheduler_for(pipe.scheduler, weighting_scheme=args.weighting_scheme)  # SD3: its σ density
    fisher = estimate_fisher_on_set(denoiser(pipe), noise_scheduler, data, conditioning, modules,
                                    num_samples=args.fisher_num_samples, estimator=args.fisher_estimator,
                                    num_timesteps=args.fisher_num_timesteps, seed=args.seed)
    elapsed = time.perf_counter() - start
    save_fisher(fisher, args.output, factored_only=args.factored_only)
    print(f"Fisher over {len(modules)} modules from {args.fisher_num_samples} samples ({args.fisher_estimator}, "
          f"{fisher.metadata['unet_passes']} UNet passes) in {elapsed:.1f} s -> {args.output}")
