#!/usr/bin/env python
"""Train a Selective Amnesia "forget" LoRA for a Stable Diffusion pipeline.

    accelerate launch training_scripts/train_sa_lora.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --forget_prompt "brad pitt" --surrogate_prompt "a middle aged man" --output_dir forget-brad-pitt

With no arguments it runs the built-in digits job: forget "a handwritten digit zero" on builtin:digits.

One run: generate (or reuse) the surrogate and replay sets -> compute (or reuse) the Fisher -> train
the LoRA on the SA objective -> validate -> save `pytorch_lora_weights.safetensors`, a model card, a
before/after grid and training_curves.png. Each phase is cached in --output_dir; rerun the same command after a crash and it
continues (training continues from a checkpoint with --resume_from_checkpoint latest).
Flag names and behaviour follow diffusers' train_text_to_image_lora.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

import sa_peft
from sa_peft.adapter_io import KOHYA_WEIGHT_NAME, export_kohya, save_forget_lora
from sa_peft.checkpoints import load_checkpoint, read_checkpoint_state, save_checkpoint, settings_differences
from sa_peft.checks import check_number, check_numbers, check_output_apart, check_positive_int, check_writable
from sa_peft.conditioning import PromptConditioning, check_prompt_clash, encode_prompts, is_sdxl, tokenize_prompts
from sa_peft.data import (
    SURROGATE_TYPES,
    check_resolution,
    default_resolution,
    generate_replay_set,
    generate_surrogate_set,
)
from sa_peft.defaults import DEFAULT_REPLAY_PROMPTS_FILE, digits_defaults
from sa_peft.diffusion_loss import noise_scheduler_for
from sa_peft.errors import report_input_errors
from sa_peft.ewc import EWCPenalty, Rank1FisherPenalty, SumOfPenalties
from sa_peft.fisher import (
    ESTIMATORS,
    base_weights_hash,
    check_fisher_settings,
    estimate_fisher,
    load_fisher,
    prompts_hash,
    save_fisher,
)
from sa_peft.forgetting import DEFAULT_PREFERENCE_THRESHOLD, DEFAULT_RETENTION_BOUND, AdaptiveLambda, ForgettingProbe
from sa_peft.io_utils import write_json_atomic
from sa_peft.lora import LORA_TARGET_PRESETS, make_lora_config, resolve_lora_targets
from sa_peft.model_card import write_model_card
from sa_peft.models import load_pipeline
from sa_peft.objective import REPLAY_TARGETS, check_finite_loss, selective_amnesia_loss
from sa_peft.prompts import check_prompts, read_prompts_file
from sa_peft.robust import AdversarialSoftPrompt
from sa_peft.run_lock import file_lock, folder_lock
from sa_peft.training_curves import write_training_curves
from sa_peft.training_setup import (
    check_mixed_precision,
    list_checkpoints,
    make_optimizer,
    prune_checkpoints,
    require_bitsandbytes,
    require_xformers,
    settings_key,
)
from sa_peft.validation import generate_validation_images, save_before_after_grid, validation_grid

logger = get_logger(__name__, log_level="INFO")

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    # diffusers' flags
    p.add_argument("--pretrained_model_name_or_path", default="builtin:digits", help="hub id, pipeline folder or builtin:digits" + d)
    p.add_argument("--revision", default=None, help="hub revision of the model" + d)
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16" + d)
    p.add_argument("--cache_dir", default=None, help="hub download cache" + d)
    p.add_argument("--output_dir", default="sa-peft-output", help="where the adapter, caches and checkpoints go" + d)
    p.add_argument("--seed", type=int, default=0, help="seed of data generation, Fisher and training" + d)
    p.add_argument("--resolution", type=int, default=None, help="image side; default: the model's native size")
    p.add_argument("--train_batch_size", type=int, default=4, help="surrogate images per step per device; as many replay images" + d)
    p.add_argument("--num_train_epochs", type=int, default=None, help="passes over the surrogate set; ignored when --max_train_steps is given")
    p.add_argument("--max_train_steps", type=int, default=None,
                   help="step budget; default 1000 unless --num_train_epochs is given. With --stop_when_forgotten (the "
                        "default) training ends earlier, once the forgetting signal says the concept is forgotten")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step" + d)
    p.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for UNet activation memory")
    p.add_argument("--learning_rate", type=float, default=None, help="AdamW learning rate; default 1e-4 (2e-3 on builtin:digits)")
    p.add_argument("--scale_lr", action="store_true", help="multiply the lr by batch size, accumulation and processes")
    p.add_argument("--lr_scheduler", default="constant", help="diffusers scheduler name" + d)
    p.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up steps" + d)
    p.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR-γ loss weighting (5.0 recommended)" + d)
    p.add_argument("--noise_offset", type=float, default=0.0, help="offset noise scale" + d)
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (states really in 8 bits)")
    p.add_argument("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="kept for compatibility: latents are in memory" + d)
    p.add_argument("--adam_beta1", type=float, default=0.9, help=d)
    p.add_argument("--adam_beta2", type=float, default=0.999, help=d)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2, help=d)
    p.add_argument("--adam_epsilon", type=float, default=1e-08, help=d)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help=d)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate config; LoRA weights stay fp32")
    p.add_argument("--report_to", default="none", help="tensorboard, wandb, all or none" + d)
    p.add_argument("--logging_dir", default="logs", help="tracker folder under --output_dir" + d)
    p.add_argument("--checkpointing_steps", type=int, default=500, help="save a LoRA-only training checkpoint every N steps" + d)
    p.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints" + d)
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder (any name) or 'latest'" + d)
    p.add_argument("--resume_with_new_settings", action="store_true",
                   help="resume although the training settings differ from the checkpoint's (refused by default)")
    p.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help="xformers attention (GPU); SDPA otherwise")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank; default 4 (8 on builtin:digits)")
    p.add_argument("--validation_prompt", action="append", default=None, help="repeatable; default: the forget prompts and two replay prompts")
    p.add_argument("--num_validation_images", type=int, default=4, help="images per validation prompt" + d)
    p.add_argument("--validation_steps", type=int, default=100, help="validate every N steps (and at start and end)" + d)
    p.add_argument("--push_to_hub", action="store_true", help="upload --output_dir to the hub at the end")
    p.add_argument("--hub_model_id", default=None, help="repo id; default: the output folder's name")
    p.add_argument("--hub_token", default=None, help="hub token (prefer `hf auth login`)")
    # Selective Amnesia's flags
    p.add_argument("--forget_prompt", action="append", default=[], help="prompt of a concept to forget (repeatable)")
    p.add_argument("--forget_prompts_file", default=None, help="text file with one forget prompt per line")
    p.add_argument("--surrogate_prompt", action="append", default=None,
                   help="prompt whose images stand in for the concept (e.g. 'a middle aged man'); repeatable: one for "
                        "all forget prompts, or one per --forget_prompt, paired in order")
    p.add_argument("--surrogate_data_dir", default=None, help="folder of your own stand-in images")
    p.add_argument("--surrogate_type", choices=["noise", *SURROGATE_TYPES], default=None, help="noise images as the stand-in")
    p.add_argument("--replay_prompts_file", default=None, help="concepts to keep, one per line; default: a generic list shipped with sa-peft (the other digits on builtin:digits)")
    p.add_argument("--num_surrogate_images", type=int, default=None, help="surrogate set size; default 64 (256 on builtin:digits)")
    p.add_argument("--num_replay_images_per_prompt", type=int, default=None, help="replay images per prompt; default 8 (32 on builtin:digits)")
    p.add_argument("--generation_guidance_scale", type=float, default=None, help="guidance when generating sets; default 7.5 (3.0 on digits)")
    p.add_argument("--generation_num_inference_steps", type=int, default=None, help="DDIM steps when generating; default 50 (25 on digits)")
    p.add_argument("--fisher_path", default=None, help="Fisher file: reused when present and matching, else computed and cached there; default: in --output_dir")
    p.add_argument("--fisher_num_samples", type=int, default=128, help="frozen-model samples the Fisher is estimated on" + d)
    p.add_argument("--fisher_estimator", choices=ESTIMATORS, default="fast", help="reference: all T timesteps per sample; fast: K stratified" + d)
    p.add_argument("--fisher_num_timesteps", type=int, default=8, help="K of the fast estimator" + d)
    p.add_argument("--ewc_lambda", type=float, default=5.0, help="λ, on a Fisher normalised by its mean over adapted weights" + d)
    p.add_argument("--ewc_space", choices=["full", "lowrank"], default="lowrank", help="EWC penalty space" + d)
    p.add_argument("--fisher_rank1_weight", type=float, default=0.0,
                   help="weight of the rank-1 Fisher penalty c·(μᵀΔθ)² along the mean per-sample gradient μ, added to "
                        "the diagonal one under the same λ (0 = off)" + d)
    p.add_argument("--replay_weight", type=float, default=None,
                   help="γ, weight of the replay loss (default: 30 with --replay_target distill, 1 with noise)")
    p.add_argument("--replay_target", choices=REPLAY_TARGETS, default="distill",
                   help="replay target: 'distill' = the frozen model's own prediction on the noised replay latent (the "
                        "same UNet with the adapter off), 'noise' = the sampled noise as in the paper" + d)
    # The forgetting signal and the verdict (sa_peft/forgetting.py)
    p.add_argument("--num_probe_images", type=int, default=16,
                   help="held-out images per forget prompt (the frozen model's own, and as many surrogate images) "
                        "for the forgetting signal" + d)
    p.add_argument("--forgetting_check_steps", type=int, default=25, help="measure the forgetting signal every N steps" + d)
    p.add_argument("--forgetting_threshold", type=float, default=DEFAULT_PREFERENCE_THRESHOLD,
                   help="a concept is forgotten when its preference (1 = base model, 0 = concept and surrogate equally "
                        "likely) is at most this" + d)
    p.add_argument("--retention_bound", type=float, default=DEFAULT_RETENTION_BOUND,
                   help="largest allowed drift of the adapted model's predictions on held-out replay images from the frozen "
                        "model's, relative to its denoising error there (retention, 0 for the base model)" + d)
    p.add_argument("--train_full_budget", dest="stop_when_forgotten", action="store_false",
                   help="train all --max_train_steps; by default training ends once every concept is forgotten "
                        "with retention inside its bound")
    p.add_argument("--fixed_lambda", dest="adaptive_lambda", action="store_false",
                   help="keep λ at --ewc_lambda; by default λ starts there and is halved while forgetting stalls "
                        "with retention well inside its bound, doubled when retention leaves it")
    p.add_argument("--require_forgetting", action="store_true",
                   help="exit with status 1 when the run ends without forgetting (the adapter is still saved)")
    p.add_argument("--robust_forgetting", action="store_true",
                   help="adversarial training against the soft-prompt attack (sa-peft attack): every 25 steps a "
                        "bounded perturbation of the forget prompt's embedding is fitted to bring the concept back, "
                        "and half of each surrogate batch is paired with it")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; default: the rank")
    p.add_argument("--use_rslora", action="store_true", help="rank-stabilised LoRA scaling alpha/sqrt(rank)")
    p.add_argument("--lora_target", default="all", help=f"preset ({', '.join(LORA_TARGET_PRESETS)}) or comma-separated module names" + d)
    p.add_argument("--train_text_encoder", action="store_true",
                   help="also train a LoRA on the text encoder's attention (SD 1.x/2.x); the EWC penalty covers the UNet "
                        "only, so the text encoder is held by replay alone")
    p.add_argument("--output_kohya_format", action="store_true", help="also write an A1111/ComfyUI-keyed copy")
    p.add_argument("--classifier", default=None, help="image classifier for the final evaluation (default on digits: builtin:digits-classifier)")
    p.add_argument("--num_evaluation_images_per_prompt", type=int, default=50, help="samples per prompt in the final evaluation" + d)
    p.add_argument("--class_text", action="append", default=None,
                   help="with --classifier clip:<model>: a zero-shot class (repeatable, two or more)")
    p.add_argument("--forget_label", action="append", default=None,
                   help="class (text or index) of the forgotten concept for the evaluation (repeatable)")
    p.add_argument("--nudenet_threshold", type=float, default=0.6, help="with --classifier nudenet: detection score" + d)
    p.add_argument("--clip_score_model", default=None, help="CLIP model (hub id or folder) for CLIP scores in the evaluation")
    p.add_argument("--evaluation_prompts_file", default=None,
                   help="prompts to evaluate, one per line; default: the forget and replay prompts")
    return p.parse_args(argv)


def _set_default(args: argparse.Namespace, name: str, value) -> None:
    if getattr(args, name) is None:
        setattr(args, name, value)


DISTILL_REPLAY_WEIGHT = 30.0


def resolve_defaults(args: argparse.Namespace) -> dict:
    """Fill defaults that depend on the model; check every flag before any heavy work. Returns the run plan."""
    on_digits = args.pretrained_model_name_or_path == "builtin:digits"
    forget = check_prompts(args.forget_prompt, "--forget_prompt") if args.forget_prompt else []
    if args.forget_prompts_file:
        forget += read_prompts_file(args.forget_prompts_file, "--forget_prompts_file")
    sources = [x is not None for x in (args.surrogate_prompt, args.surrogate_data_dir, args.surrogate_type)]
    if sum(sources) > 1:
        raise ValueError("give only one of --surrogate_prompt, --surrogate_data_dir and --surrogate_type")
    if on_digits:
        digits = digits_defaults(forget)
        forget = digits["forget_prompts"]
        replay = read_prompts_file(args.replay_prompts_file, "--replay_prompts_file") if args.replay_prompts_file else digits["replay_prompts"]
        if not any(sources):
            args.surrogate_prompt = digits["surrogate_prompts"]
        _set_default(args, "resolution", digits["resolution"])
        _set_default(args, "generation_guidance_scale", digits["guidance_scale"])
        _set_default(args, "generation_num_inference_steps", digits["num_inference_steps"])
        _set_default(args, "classifier", digits["classifier"])
        _set_default(args, "learning_rate", 2e-3)
        _set_default(args, "rank", 8)
        _set_default(args, "num_surrogate_images", 256)
        _set_default(args, "num_replay_images_per_prompt", 32)
    else:
        if not forget:
            raise ValueError("no concept to forget: pass --forget_prompt (repeatable) or --forget_prompts_file")
        if not any(sources):
            raise ValueError("no surrogate: pass --surrogate_prompt, --surrogate_data_dir or --surrogate_type noise")
        replay = read_prompts_file(args.replay_prompts_file or DEFAULT_REPLAY_PROMPTS_FILE, "--replay_prompts_file")
        _set_default(args, "generation_guidance_scale", 7.5)
        _set_default(args, "generation_num_inference_steps", 50)
        _set_default(args, "learning_rate", 1e-4)
        _set_default(args, "rank", 4)
        _set_default(args, "num_surrogate_images", 64)
        _set_default(args, "num_replay_images_per_prompt", 8)
    if args.surrogate_prompt is not None and len(args.surrogate_prompt) not in (1, len(forget)):
        raise ValueError(f"{len(args.surrogate_prompt)} --surrogate_prompt for {len(forget)} forget prompts: give one "
                         "surrogate for all of them, or one per --forget_prompt (paired in order)")
    clash = sorted(set(forget) & set(replay))
    if clash:
        raise ValueError(f"forget prompt(s) {clash} also appear in the replay prompts; remove them from --replay_prompts_file")
    # The distilled replay loss ‖ε_θ − ε_θ*‖² is ~10⁻³ of the noise-target loss, so γ = 1 (the paper's, for the noise
    # target) barely weighs it: on the digits the retained Fréchet distance rose 11-17 % forgetting one, three or
    # eight at γ = 1, 1-3 % at γ = 30, with the same step counts (benchmarks/RESULTS.md).
    _set_default(args, "replay_weight", DISTILL_REPLAY_WEIGHT if args.replay_target == "distill" else 1.0)
    check_numeric_flags(args)
    if args.fisher_path is not None and not args.fisher_path.endswith(".safetensors"):
        raise ValueError(f"--fisher_path {args.fisher_path!r} must be a .safetensors file")
    if args.surrogate_data_dir is not None and not os.path.isdir(args.surrogate_data_dir):
        raise FileNotFoundError(f"--surrogate_data_dir {args.surrogate_data_dir!r} is not a folder")
    check_output_apart(args.output_dir, "--output_dir", [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
                                                          ("--surrogate_data_dir", args.surrogate_data_dir)])
    check_writable(args.output_dir, "--output_dir")
    check_mixed_precision(args.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
    if args.use_8bit_adam:
        require_bitsandbytes()
    if args.enable_xformers_memory_efficient_attention:
        require_xformers()
    checkpoint = args.resume_from_checkpoint
    if checkpoint not in (None, "latest") and not any(
        os.path.isdir(p) for p in (checkpoint, os.path.join(args.output_dir, checkpoint))
    ):
        raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: no such checkpoint folder")
    if args.classifier:
        from sa_peft.classifier import parse_classifier_spec

        parse_classifier_spec(args.classifier, args.class_text)  # a bad spec fails now, not after training
    evaluation_prompts = (read_prompts_file(args.evaluation_prompts_file, "--evaluation_prompts_file")
                          if args.evaluation_prompts_file else None)
    validation = args.validation_prompt or (forget + replay[:2])
    return {"forget": forget, "replay": replay, "validation": check_prompts(validation, "--validation_prompt"),
            "evaluation_prompts": evaluation_prompts}


# Ranges of the float flags; every value must also be finite (``--ewc_lambda inf`` saved a NaN adapter).
FLOAT_FLAG_RULES = {
    "learning_rate": {"low": 0, "low_open": True}, "snr_gamma": {"low": 0, "low_open": True},
    "noise_offset": {"low": 0}, "adam_beta1": {"low": 0, "high": 1, "high_open": True},
    "adam_beta2": {"low": 0, "high": 1, "high_open": True}, "adam_weight_decay": {"low": 0},
    "adam_epsilon": {"low": 0, "low_open": True}, "max_grad_norm": {"low": 0},
    "generation_guidance_scale": {"low": 0}, "ewc_lambda": {"low": 0}, "fisher_rank1_weight": {"low": 0},
    "replay_weight": {"low": 0}, "forgetting_threshold": {}, "retention_bound": {"low": 0, "low_open": True},
    "lora_alpha": {"low": 0, "low_open": True}, "nudenet_threshold": {"low": 0, "high": 1, "low_open": True, "high_open": True},
}
POSITIVE_INT_FLAGS = (
    "train_batch_size", "gradient_accumulation_steps", "num_surrogate_images", "num_replay_images_per_prompt",
    "fisher_num_samples", "fisher_num_timesteps", "rank", "num_validation_images", "validation_steps",
    "checkpointing_steps", "checkpoints_total_limit", "num_probe_images", "forgetting_check_steps", "max_train_steps",
    "num_train_epochs", "generation_num_inference_steps", "num_evaluation_images_per_prompt", "resolution",
)


def check_numeric_flags(args: argparse.Namespace) -> None:
    """Every numeric flag finite and in range, after the model-dependent defaults are filled."""
    for flag in POSITIVE_INT_FLAGS:
        check_positive_int(getattr(args, flag), f"--{flag}")
    for flag in ("seed", "lr_warmup_steps", "dataloader_num_workers"):
        check_number(getattr(args, flag), f"--{flag}", low=0)
    check_numbers(args, FLOAT_FLAG_RULES)


# Flags that do not change what a training step computes: a resume may change them freely.
RESUME_FREE_FLAGS = {
    "pretrained_model_name_or_path", "revision", "variant", "cache_dir", "output_dir", "logging_dir", "report_to",
    "resume_from_checkpoint", "resume_with_new_settings", "validation_prompt", "num_validation_images",
    "validation_steps", "checkpointing_steps", "checkpoints_total_limit", "push_to_hub", "hub_model_id", "hub_token",
    "classifier", "num_evaluation_images_per_prompt", "class_text", "forget_label", "nudenet_threshold",
    "clip_score_model", "evaluation_prompts_file", "max_train_steps", "num_train_epochs", "output_kohya_format",
    "require_forgetting", "dataloader_num_workers", "allow_tf32", "enable_xformers_memory_efficient_attention",
    "gradient_checkpointing", "stop_when_forgotten", "fisher_path", "forget_prompts_file", "replay_prompts_file",
    "forget_prompt",
}


def training_settings(args: argparse.Namespace, plan: dict, model_key: str) -> dict:
    """What a checkpoint records of the run: every flag that changes a training step, the prompts as
    read from their files, and the base model's weights hash (JSON-normalised, for comparison)."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_FREE_FLAGS}
    settings.update(forget_prompts=plan["forget"], replay_prompts=plan["replay"], base_model_hash=model_key)
    return json.loads(json.dumps(settings))


def find_resume_checkpoint(args: argparse.Namespace, settings: dict) -> tuple[str | None, dict | None]:
    """The checkpoint --resume_from_checkpoint names (any folder; ``latest`` = the highest step in
    --output_dir) and its state, refused when its settings differ (unless --resume_with_new_settings) or
    its step is past --max_train_steps."""
    if not args.resume_from_checkpoint:
        return None, None
    name = args.resume_from_checkpoint
    if name == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            logger.info("No checkpoint to resume from; starting a new run.")
            return None, None
        name = found[-1]
    path = name if os.path.isdir(name) else os.path.join(args.output_dir, name)
    state = read_checkpoint_state(path)
    differ = settings_differences(state["settings"], settings)
    if differ and not args.resume_with_new_settings:
        raise ValueError(f"--resume_from_checkpoint {path!r} was trained with other settings: {'; '.join(differ)}. "
                         "Rerun with the checkpoint's settings, start a new --output_dir, or pass "
                         "--resume_with_new_settings to continue with the new ones (the optimizer state is kept)")
    if differ:
        logger.warning(f"Resuming {path} with new settings: {'; '.join(differ)}")
    check_resume_step(state, path, args.max_train_steps)
    return path, state


def check_resume_step(state: dict, path: str, max_train_steps: int | None) -> None:
    """A checkpoint past the step budget would be saved labelled with the smaller budget: refuse it."""
    if max_train_steps is not None and state["step"] > max_train_steps:
        raise ValueError(f"--resume_from_checkpoint {path!r} is at step {state['step']}, past --max_train_steps "
                         f"{max_train_steps}; raise --max_train_steps to at least {state['step']} or resume an earlier checkpoint")


def surrogate_description(args) -> str:
    if args.surrogate_prompt is not None:
        return ", ".join(f'prompt "{p}"' for p in args.surrogate_prompt)  # part of the cache keys: kept as it was
    if args.surrogate_data_dir is not None:  # the folder's name only: the description is published in the card
        return f"images from the folder {os.path.basename(os.path.normpath(args.surrogate_data_dir))!r}"
    return "uniform noise" if args.surrogate_type in ("noise", "uniform_noise") else "gaussian noise"


def main(argv: list[str] | None = None):
    """Run the whole job; returns the pipeline with the trained adapter loaded (for programmatic use)."""
    args = parse_args(argv)
    plan = resolve_defaults(args)
    # One run per --output_dir; the main process holds the lock for all (accelerate sets RANK per process).
    with folder_lock(args.output_dir, "--output_dir", enabled=int(os.environ.get("RANK", "0")) == 0):
        return train(args, plan)


def train(args: argparse.Namespace, plan: dict):
    """The job of ``main`` on checked flags, holding the --output_dir lock."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    check_mixed_precision(accelerator.mixed_precision, accelerator.device.type)  # also what an accelerate config chose
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    show = accelerator.is_local_main_process
    timings: dict[str, float] = {}

    pipe = load_pipeline(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    pipe.set_progress_bar_config(disable=True)
    resolution = check_resolution(pipe, args.resolution or default_resolution(pipe))
    if args.train_text_encoder and is_sdxl(pipe):
        raise ValueError("--train_text_encoder supports SD 1.x/2.x pipelines; drop it for SDXL")
    check_prompt_clash(pipe, plan["forget"], plan["replay"])
    pipe.to(accelerator.device)
    unet, scheduler = pipe.unet, noise_scheduler_for(pipe.scheduler)  # DDPM noising, whatever the pipeline samples with
    # Caches are keyed by the UNet's weights, so a changed local model never reuses stale samples.
    model_key = base_weights_hash(unet, resolve_lora_targets(unet, "all"))[:16]
    # The checkpoint to resume is checked now, before the sets and the Fisher: same settings, within the budget.
    settings = training_settings(args, plan, model_key)
    resume_path, resume_state = find_resume_checkpoint(args, settings)

    # ---- Phase 1: surrogate and replay sets, sampled once by the frozen model -------------------
    start = time.perf_counter()
    generation = {"resolution": resolution, "guidance": args.generation_guidance_scale,
                  "steps": args.generation_num_inference_steps, "seed": args.seed, "model": model_key}
    sur_settings = {**generation, "forget": plan["forget"], "surrogate": surrogate_description(args), "n": args.num_surrogate_images,
                    **({"data_dir": os.path.abspath(args.surrogate_data_dir)} if args.surrogate_data_dir else {})}
    surrogate = generate_surrogate_set(
        pipe, os.path.join(args.output_dir, "cache", f"surrogate-{settings_key(sur_settings)}"), plan["forget"], args.num_surrogate_images,
        surrogate_prompt=args.surrogate_prompt, surrogate_data_dir=args.surrogate_data_dir, surrogate_type=args.surrogate_type,
        seed=args.seed, resolution=resolution, guidance_scale=args.generation_guidance_scale,
        num_inference_steps=args.generation_num_inference_steps, accelerator=accelerator, show_progress=show,
    )
    # The Fisher is estimated on the replay set's samples, as in the reference code, so the set holds enough for both.
    per_prompt = max(args.num_replay_images_per_prompt, math.ceil(args.fisher_num_samples / len(plan["replay"])))
    rep_settings = {**generation, "prompts": plan["replay"], "per_prompt": per_prompt}
    replay = generate_replay_set(
        pipe, os.path.join(args.output_dir, "cache", f"replay-{settings_key(rep_settings)}"), plan["replay"], per_prompt,
        seed=args.seed + 1_000_000, resolution=resolution, guidance_scale=args.generation_guidance_scale,
        num_inference_steps=args.generation_num_inference_steps, accelerator=accelerator, show_progress=show,
    )
    # The surrogate prompts too: the forgetting signal measures the held-out images under them.
    conditioning = encode_prompts(pipe, plan["forget"] + plan["replay"] + (args.surrogate_prompt or []), resolution)
    probe = build_forgetting_probe(pipe, args, plan, generation, sur_settings, resolution, conditioning, scheduler,
                                   accelerator, show)
    timings["generation_s"] = time.perf_counter() - start
    sur_latents, sur_ids = surrogate.latents.to(accelerator.device), surrogate.prompt_ids(conditioning.prompts).to(accelerator.device)
    rep_latents, rep_ids = replay.latents.to(accelerator.device), replay.prompt_ids(conditioning.prompts).to(accelerator.device)

    # ---- Phase 2: Fisher of the weights the LoRA adapts, on the frozen model's own samples -------
    start = time.perf_counter()
    targets = resolve_lora_targets(unet, args.lora_target)
    fisher_settings = {"version": 2, "targets": targets, "estimator": args.fisher_estimator, "k": args.fisher_num_timesteps,
                       "n": args.fisher_num_samples, "replay": rep_settings}
    fisher_path = args.fisher_path or os.path.join(args.output_dir, "cache", f"fisher-{settings_key(fisher_settings)}.safetensors")
    fisher = None
    if args.ewc_lambda > 0:
        fisher_ids = replay.prompt_ids(conditioning.prompts)[: args.fisher_num_samples]
        fisher_expected = {
            "estimator": args.fisher_estimator, "num_samples": str(min(args.fisher_num_samples, len(replay.latents))),
            "num_timesteps": str(scheduler.config.num_train_timesteps if args.fisher_estimator == "reference"
                                 else args.fisher_num_timesteps),
            "seed": str(args.seed), "prompts_hash": prompts_hash([conditioning.prompts[i] for i in fisher_ids.tolist()]),
        }
        # A --fisher_path may be shared by runs in other folders: one computes it at a time.
        with file_lock(fisher_path, "--fisher_path") if accelerator.is_main_process else contextlib.nullcontext():
            if os.path.exists(fisher_path):
                fisher = load_fisher(fisher_path, unet=unet, required_modules=targets)
                check_fisher_settings(fisher, fisher_path, fisher_expected)
                logger.info(f"Reusing the Fisher in {fisher_path} ({fisher.metadata.get('estimator')}, {fisher.metadata.get('num_samples')} samples)")
            else:
                fisher = estimate_fisher(
                    unet, scheduler, replay.latents[: args.fisher_num_samples], fisher_ids,
                    conditioning, targets, estimator=args.fisher_estimator, num_timesteps=args.fisher_num_timesteps,
                    seed=args.seed, accelerator=accelerator, show_progress=show,
                )
                if accelerator.is_main_process:
                    save_fisher(fisher, fisher_path)
        accelerator.wait_for_everyone()
    timings["fisher_s"] = time.perf_counter() - start

    # ---- Phase 3: the forget LoRA ------------------------------------------------------------------
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    before_images = None
    if accelerator.is_main_process:
        before_images = generate_validation_images(pipe, plan["validation"], args.num_validation_images, args.seed, resolution,
                                                   args.generation_guidance_scale, args.generation_num_inference_steps)
    # Embeddings and latents are precomputed, so the text encoder(s) and the VAE leave the device.
    move_frozen_encoders(pipe, "cpu", args)
    unet.requires_grad_(False)
    unet.to(accelerator.device, dtype=weight_dtype)
    probe.calibrate(unet, scheduler)  # the frozen model's signal, before the adapter exists
    torch.manual_seed(args.seed)  # LoRA A's init must not depend on what the cached phases consumed
    unet.add_adapter(make_lora_config(targets, args.rank, args.lora_alpha, args.use_rslora))
    cast_training_params(unet, dtype=torch.float32)  # LoRA weights train in fp32, as diffusers does
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    ewc_penalty = EWCPenalty(unet, fisher, args.ewc_space) if fisher is not None else None
    if ewc_penalty is not None and args.fisher_rank1_weight > 0:
        ewc_penalty = SumOfPenalties([ewc_penalty, Rank1FisherPenalty(unet, fisher)], [1.0, args.fisher_rank1_weight])
    text_encoder = None
    if args.train_text_encoder:
        # peft's inject_adapter_in_model, not transformers' add_adapter: transformers 5.24 asks for peft >= 0.22.
        text_encoder = pipe.text_encoder
        text_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
        inject_adapter_in_model(make_lora_config(TEXT_ENCODER_TARGETS, args.rank, args.lora_alpha, args.use_rslora), text_encoder, "default")
        cast_training_params(text_encoder, dtype=torch.float32)
    lora_params = [p for model in (unet, text_encoder) if model is not None for p in model.parameters() if p.requires_grad]

    world = accelerator.num_processes
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * world
    steps_per_epoch = math.ceil(len(surrogate.latents) / (args.train_batch_size * world * args.gradient_accumulation_steps))
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch if args.num_train_epochs else 1000
    optimizer = make_optimizer(lora_params, args.learning_rate, (args.adam_beta1, args.adam_beta2),
                               args.adam_weight_decay, args.adam_epsilon, args.use_8bit_adam)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * world,
                                 num_training_steps=args.max_train_steps * world)

    prompt_tokens = None
    if text_encoder is not None:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
        prompt_tokens = tokenize_prompts(pipe, conditioning.prompts).to(accelerator.device)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    checkpoint_models = {"unet": unet} if text_encoder is None else {"unet": unet, "text_encoder": text_encoder}
    global_step = 0
    if resume_path is not None:
        check_resume_step(resume_state, resume_path, args.max_train_steps)
        load_checkpoint(accelerator, resume_path, checkpoint_models, optimizer, lr_scheduler)
        global_step = resume_state["step"]
        logger.info(f"Resumed from {resume_path} at step {global_step}")

    run_info = {
        "base_model": args.pretrained_model_name_or_path, "forget_prompts": plan["forget"], "surrogate": surrogate_description(args),
        "surrogate_data_dir": args.surrogate_data_dir, "num_surrogate_images": args.num_surrogate_images, "num_replay_prompts": len(plan["replay"]),
        "num_replay_images_per_prompt": per_prompt, "ewc_lambda": args.ewc_lambda, "ewc_space": args.ewc_space,
        "fisher_estimator": args.fisher_estimator, "fisher_num_samples": args.fisher_num_samples, "replay_weight": args.replay_weight, "replay_target": args.replay_target,
        "fisher_rank1_weight": args.fisher_rank1_weight, "robust_forgetting": args.robust_forgetting,
        "rank": args.rank, "lora_alpha": args.lora_alpha if args.lora_alpha is not None else args.rank, "use_rslora": args.use_rslora,
        "lora_target": args.lora_target, "num_adapted_modules": len(targets), "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size, "learning_rate": args.learning_rate, "resolution": resolution,
        "seed": args.seed, "train_text_encoder": args.train_text_encoder, "sa_peft_version": sa_peft.__version__, "base_pipeline": type(pipe).__name__,
    }
    if accelerator.is_main_process:
        accelerator.init_trackers("sa-peft", config={k: str(v) for k, v in run_info.items()})
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    if accelerator.is_main_process and os.path.exists(log_path):
        # Keep the log consistent with a resumed run: drop entries past the checkpoint.
        with open(log_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= global_step]
        with open(log_path, "w") as f:
            f.writelines(kept)

    logger.info(f"Training {len(lora_params)} LoRA tensors on {len(targets)} modules for {args.max_train_steps} steps; "
                f"{len(surrogate.latents)} surrogate and {len(replay.latents)} replay samples; {world} process(es)")
    start = time.perf_counter()
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps", disable=not show)
    unet.train()
    signal, signal_step, reached_step, previous_done = None, -1, None, False
    ewc_lambda = AdaptiveLambda(args.ewc_lambda)
    if resume_state is not None:  # the loop's own state at the checkpoint (λ moves with the signal)
        loop = resume_state["loop"]
        ewc_lambda.value, ewc_lambda.previous = loop["ewc_lambda"], loop["ewc_lambda_previous"]
        reached_step, previous_done = loop["reached_step"], loop["previous_done"]
    robust = robust_trainer(args, plan, probe)
    while global_step < args.max_train_steps:
        stop = False
        for micro in range(args.gradient_accumulation_steps):
            # Every micro-batch draws from a generator keyed by (seed, step, micro-step, process), so a resumed
            # run sees exactly the batches, noise and timesteps of an uninterrupted one.
            gen = torch.Generator().manual_seed(hash((args.seed, global_step, micro, accelerator.process_index)) % 2**63)
            s_idx = torch.randint(len(sur_latents), (args.train_batch_size,), generator=gen).to(accelerator.device)
            r_idx = torch.randint(len(rep_latents), (args.train_batch_size,), generator=gen).to(accelerator.device)
            models = (unet,) if text_encoder is None else (unet, text_encoder)
            s_ids = sur_ids[s_idx]
            with accelerator.accumulate(*models), accelerator.autocast():
                step_conditioning = conditioning
                if text_encoder is not None:  # the prompts are re-encoded through the text encoder's LoRA
                    step_conditioning = PromptConditioning(conditioning.prompts, text_encoder(prompt_tokens)[0])
                if robust is not None:  # the surrogate also under the soft-prompt attack's embedding
                    if micro == 0:
                        robust.maybe_refresh(global_step, accelerator.unwrap_model(unet), scheduler, step_conditioning)
                    step_conditioning, s_ids = robust.augment(step_conditioning, s_ids)
                loss = selective_amnesia_loss(
                    unet, scheduler, step_conditioning, sur_latents[s_idx].to(weight_dtype), s_ids,
                    rep_latents[r_idx].to(weight_dtype), rep_ids[r_idx], ewc_penalty, ewc_lambda.value, args.replay_weight,
                    snr_gamma=args.snr_gamma, noise_offset=args.noise_offset, generator=gen,
                    replay_target=args.replay_target, base_unet=accelerator.unwrap_model(unet), base_conditioning=conditioning,
                )
                check_finite_loss(loss, global_step + 1)
                accelerator.backward(loss.total)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(lora_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        global_step += 1
        progress.update(1)
        logs = {**loss.parts(), "lr": lr_scheduler.get_last_lr()[0]}
        if global_step % args.forgetting_check_steps == 0 or global_step >= args.max_train_steps:
            # Every process measures the same synchronised weights, so all of them stop at the same step.
            signal = measure_forgetting(probe, accelerator, unet, text_encoder, scheduler, conditioning, prompt_tokens)
            signal_step = global_step
            logs.update(signal_log_entries(signal))
            if args.adaptive_lambda:
                logs["ewc_lambda"] = ewc_lambda.update(signal)
            if signal["reached"] and reached_step is None:
                reached_step = global_step
            # Two checks in a row: one probe reading can dip past the threshold (digits: "one" stopped at P 0.21).
            done = signal["reached"] and signal["retained"]
            stop = args.stop_when_forgotten and done and previous_done
            previous_done = done
        progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
        accelerator.log(logs, step=global_step)
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": global_step, **logs}) + "\n")
        if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
            if accelerator.is_main_process:
                prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
            save_checkpoint(accelerator, args.output_dir, global_step, checkpoint_models, optimizer, lr_scheduler, settings,
                            {"ewc_lambda": ewc_lambda.value, "ewc_lambda_previous": ewc_lambda.previous,
                             "reached_step": reached_step, "previous_done": previous_done})
        if accelerator.is_main_process and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
            log_validation(accelerator, pipe, plan["validation"], args, resolution, global_step)
            update_training_curves(accelerator, args, log_path, global_step)
        if stop:
            logger.info(f"Forgotten at step {global_step} with retention inside its bound; training stops here.")
            break
    progress.close()
    if signal is None or signal_step != global_step:  # resumed at or past the end: measure what is there
        signal = measure_forgetting(probe, accelerator, unet, text_encoder, scheduler, conditioning, prompt_tokens)
    run_info["trained_steps"] = global_step
    run_info["ewc_lambda_final"] = ewc_lambda.value
    run_info["forgetting"] = forgetting_summary(signal, reached_step, global_step)
    report_forgetting(run_info["forgetting"], args)
    timings["training_s"] = time.perf_counter() - start

    # ---- Save, validate, describe -------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(unet)
        te_layers = te_metadata = None
        if text_encoder is not None:
            te_layers = get_peft_model_state_dict(accelerator.unwrap_model(text_encoder))
            te_metadata = accelerator.unwrap_model(text_encoder).peft_config["default"].to_dict()
        lora_file = save_forget_lora(args.output_dir, unwrapped, run_info, text_encoder_lora_layers=te_layers,
                                     text_encoder_adapter_metadata=te_metadata)
        if args.output_kohya_format:  # the same code as `sa-peft export --format kohya`, from the saved file
            export_kohya(lora_file, os.path.join(args.output_dir, KOHYA_WEIGHT_NAME))
        after_images = log_validation(accelerator, pipe, plan["validation"], args, resolution, global_step)
        save_before_after_grid(before_images, after_images, os.path.join(args.output_dir, "validation_before_after.png"),
                               step=global_step)
        update_training_curves(accelerator, args, log_path, global_step)
        if args.classifier:
            start = time.perf_counter()
            evaluate_forgetting(accelerator, pipe, plan, args)
            timings["evaluation_s"] = time.perf_counter() - start
        write_model_card(args.output_dir, run_info, repo_id=args.hub_model_id)  # after the evaluation: it shows it
        write_json_atomic(os.path.join(args.output_dir, "timings.json"), timings)
        logger.info("Timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        if args.push_to_hub:
            push_folder(args)
    accelerator.end_training()
    if args.require_forgetting and not run_info["forgetting"]["reached"]:
        raise SystemExit(1)  # --require_forgetting: after everything is saved, so the run can be inspected
    return pipe


def robust_trainer(args, plan, probe):
    """The ``--robust_forgetting`` attacker (``None`` without the flag), fitted to the probe's held-out concept images."""
    if not args.robust_forgetting:
        return None
    latents = [c.latents[:: len(c.latents) // c.num_images] for c, _ in probe.concepts]  # one copy of each image
    return AdversarialSoftPrompt(plan["forget"], latents, seed=args.seed)


def measure_forgetting(probe, accelerator, unet, text_encoder, scheduler, conditioning, prompt_tokens) -> dict:
    """The forgetting signal of the adapter as it is now (the text encoder's LoRA included, when trained)."""
    if text_encoder is not None:
        with torch.no_grad():
            conditioning = PromptConditioning(conditioning.prompts, text_encoder(prompt_tokens)[0])
    return probe.measure(accelerator.unwrap_model(unet), scheduler, conditioning)


def signal_log_entries(signal: dict) -> dict:
    """The signal's numbers for train_log.jsonl and the trackers: one preference per concept, retention."""
    entries = {f"preference/{prompt}": c["preference"] for prompt, c in signal["concepts"].items()}
    entries.update({"max_preference": signal["max_preference"], "retention": signal["retention"],
                    "forgotten": signal["reached"], "retained": signal["retained"]})
    return entries


def forgetting_summary(signal: dict, reached_step: int | None, trained_steps: int) -> dict:
    """The verdict written into the adapter's metadata (key ``forgetting``) and the model card."""
    return {
        "reached": bool(signal["reached"]),
        "retained": bool(signal["retained"]),
        "reached_at_step": reached_step,
        "trained_steps": trained_steps,
        "threshold": signal["threshold"],
        "retention_bound": signal["retention_bound"],
        "retention": round(signal["retention"], 6),
        "concepts": {p: {"preference": round(c["preference"], 6), "forgotten": bool(c["forgotten"])}
                     for p, c in signal["concepts"].items()},
        "signal": "preference = (surrogate loss − concept loss) / the base model's, under the forget prompt, "
                  "on held-out images; retention = drift of the predictions on held-out replay images from the "
                  "frozen model's, relative to its denoising error",
    }


def report_forgetting(summary: dict, args) -> None:
    """Say what the run achieved; a WARNING with what to try when the concept was not forgotten."""
    parts = ", ".join(f"{p!r} {c['preference']:+.3f}" for p, c in summary["concepts"].items())
    logger.info(f"Forgetting signal after {summary['trained_steps']} steps: preference {parts} (forgotten at ≤ "
                f"{summary['threshold']}); retention {summary['retention']:.2e} (bound {summary['retention_bound']:.2e})")
    if not summary["reached"]:
        logger.warning(
            "WARNING: the concept was NOT forgotten: the adapted model still prefers its own images of "
            f"{[p for p, c in summary['concepts'].items() if not c['forgotten']]} to the surrogate's. Try a larger step "
            "budget (--max_train_steps), a higher --learning_rate, a lower --ewc_lambda, or a surrogate closer to the "
            "concept (--surrogate_prompt)."
        )
    elif not summary["retained"]:
        logger.warning(f"WARNING: forgotten, but the predictions on held-out replay images drifted by "
                       f"{summary['retention']:.2e} (bound {summary['retention_bound']:.2e}): other concepts may have "
                       "changed; try a higher --replay_weight or --ewc_lambda.")


def build_forgetting_probe(pipe, args, plan, generation, sur_settings, resolution, conditioning, scheduler,
                           accelerator, show) -> ForgettingProbe:
    """Held-out sets for the forgetting signal: the frozen model's own images of each forget prompt, as
    many surrogate images per forget prompt, and a few replay images per replay prompt (new seeds, so
    none of them is trained on)."""
    n, forget, replay = args.num_probe_images, plan["forget"], plan["replay"]
    common = {"resolution": resolution, "guidance_scale": args.generation_guidance_scale,
                  "num_inference_steps": args.generation_num_inference_steps, "accelerator": accelerator, "show_progress": show}
    cache = os.path.join(args.output_dir, "cache")
    concept_settings = {**generation, "prompts": forget, "per_prompt": n, "probe": "concept"}
    concepts = generate_replay_set(pipe, os.path.join(cache, f"probe-concept-{settings_key(concept_settings)}"), forget, n,
                                   seed=args.seed + 2_000_000, **common)
    probe_sur_settings = {**sur_settings, "n": n * len(forget), "probe": "surrogate"}
    surrogates = generate_surrogate_set(
        pipe, os.path.join(cache, f"probe-surrogate-{settings_key(probe_sur_settings)}"), forget, n * len(forget),
        surrogate_prompt=args.surrogate_prompt, surrogate_data_dir=args.surrogate_data_dir,
        surrogate_type=args.surrogate_type, seed=args.seed + 3_000_000, **common,
    )
    per_prompt = max(1, math.ceil(2 * n / len(replay)))
    replay_settings = {**generation, "prompts": replay, "per_prompt": per_prompt, "probe": "replay"}
    replays = generate_replay_set(pipe, os.path.join(cache, f"probe-replay-{settings_key(replay_settings)}"), replay,
                                  per_prompt, seed=args.seed + 4_000_000, **common)

    def of_prompt(image_set, prompt):
        return image_set.latents[[i for i, p in enumerate(image_set.prompts) if p == prompt]]

    return ForgettingProbe(
        conditioning, forget, [of_prompt(concepts, f) for f in forget], [of_prompt(surrogates, f) for f in forget],
        replays.latents, replays.prompt_ids(conditioning.prompts), scheduler.config.num_train_timesteps,
        seed=args.seed, threshold=args.forgetting_threshold, retention_bound=args.retention_bound,
        surrogate_prompts=paired_surrogate_prompts(args, forget),
    )


def paired_surrogate_prompts(args, forget: list[str]) -> list[str | None]:
    """Each forget prompt's surrogate prompt (``None`` for noise or image-folder surrogates)."""
    if args.surrogate_prompt is None:
        return [None] * len(forget)
    prompts = [p.strip() for p in args.surrogate_prompt]
    return prompts * len(forget) if len(prompts) == 1 else prompts


def move_frozen_encoders(pipe, device, args) -> None:
    """Move the VAE and the text encoder(s) that are not being trained (they are only needed to sample)."""
    for name in ("text_encoder", "text_encoder_2", "vae"):
        if getattr(pipe, name, None) is not None and not (name == "text_encoder" and args.train_text_encoder):
            getattr(pipe, name).to(device)


def evaluate_forgetting(accelerator, pipe, plan, args) -> None:
    """Score the base model and the adapted one with ``--classifier``; write ``evaluation/`` (report, metrics)."""
    from sa_peft.classifier import ClipModel, load_classifier
    from sa_peft.commands.evaluate import evaluate_before_after

    classifier = load_classifier(args.classifier, args.class_text, nudenet_threshold=args.nudenet_threshold,
                                 device=accelerator.device)
    clip = ClipModel(args.clip_score_model, device=accelerator.device) if args.clip_score_model else None
    prompts = plan["evaluation_prompts"] or plan["forget"] + plan["replay"]
    move_frozen_encoders(pipe, accelerator.device, args)
    pipe.unet.eval()
    evaluate_before_after(
        pipe, classifier, prompts, plan["forget"], os.path.join(args.output_dir, "evaluation"),
        num_per_prompt=args.num_evaluation_images_per_prompt, seed=args.seed,
        num_inference_steps=args.generation_num_inference_steps, guidance_scale=args.generation_guidance_scale,
        forget_labels=args.forget_label, clip_model=clip, disable_adapter=pipe.disable_lora,
        enable_adapter=pipe.enable_lora, log=logger.info,
    )


def log_validation(accelerator, pipe, prompts, args, resolution, step):
    """Sample the validation prompts with the current LoRA and send them to the trackers."""
    move_frozen_encoders(pipe, accelerator.device, args)
    was_training = pipe.unet.training
    pipe.unet.eval()
    with accelerator.autocast():
        images = generate_validation_images(pipe, prompts, args.num_validation_images, args.seed, resolution,
                                            args.generation_guidance_scale, args.generation_num_inference_steps)
    pipe.unet.train(was_training)
    move_frozen_encoders(pipe, "cpu", args)
    log_image_to_trackers(accelerator, "validation", validation_grid(images, step), step)
    return images


def update_training_curves(accelerator, args, log_path: str, step: int) -> None:
    """(Re)draw ``training_curves.png`` from ``train_log.jsonl`` and send it to the trackers."""
    image = write_training_curves(log_path, os.path.join(args.output_dir, "training_curves.png"),
                                  threshold=args.forgetting_threshold, retention_bound=args.retention_bound)
    if image is not None:
        log_image_to_trackers(accelerator, "training_curves", image, step)


def log_image_to_trackers(accelerator, name: str, image, step: int) -> None:
    """One picture to the TensorBoard and W&B trackers of ``--report_to``; other trackers get the scalars only."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step=step)


# What --push_to_hub leaves out: caches, checkpoints, logs, the run lock and temporaries of a killed run.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "cache/**", "logs/**", "*.tmp", ".tmp-*", "**/.tmp-*",
                        "**/.tmp-*/**", ".tmp-*/**", ".old-*/**", ".sa-peft.lock", "*.lock"]


def push_folder(args) -> None:
    """Upload the adapter folder (not caches or checkpoints); a clear error when the hub cannot be reached."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    try:
        repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                      ignore_patterns=PUSH_IGNORE_PATTERNS, commit_message="Selective Amnesia forget LoRA")
    except Exception as err:
        raise RuntimeError(f"--push_to_hub: could not upload {args.output_dir!r} to {repo_id!r} ({type(err).__name__}: {err}); "
                           "the adapter is saved locally; check the network and `hf auth login`, then rerun with --push_to_hub") from err


if __name__ == "__main__":
    # Input errors (a flag, a file) print one line naming it; a bug keeps its traceback.
    sys.exit(report_input_errors(os.path.basename(__file__), main))
