"""``sa-peft evaluate``: score the base pipeline and (with ``--lora``) the pipeline with forget LoRAs."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os

from ..adapter_io import check_lora_file
from ..before_after import evaluate_before_after, resolve_evaluation_labels
from ..checks import check_number, check_output_apart, check_positive_int, check_writable
from ..classifier import (
    CLASSIFIER_SPECS,
    ClipModel,
    load_classifier,
    parse_classifier_spec,
)
from ..defaults import DIGIT_PROMPTS
from ..errors import InputError, MissingInputError
from ..merge import stack_forget_loras
from ..models import TRAINING_PIPELINES, sampler_description
from ..prompts import read_prompts_file
from .common import add_model_arguments, add_scoring_sampling_arguments, load_pipeline_from_args, speaking_flags


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="score samples of the base pipeline and of the pipeline with forget LoRAs",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--lora", action="append", default=[],
                        help="forget LoRA folder or .safetensors file (repeatable; stacked)")
    parser.add_argument("--lora_weight", action="append", type=float, default=[],
                        help="scale of each --lora, in order (repeatable; default 1.0 each)")
    parser.add_argument("--classifier", default="builtin:digits-classifier",
                        help=f"what scores the samples: {CLASSIFIER_SPECS}")
    parser.add_argument("--class_text", action="append", default=[],
                        help="a zero-shot class of --classifier clip:<model> (repeatable, two or more), e.g. "
                             "'a photo of Brad Pitt' --class_text 'a photo of a man'")
    parser.add_argument("--nudenet_threshold", type=float, default=0.6,
                        help="--classifier nudenet: a part counts as shown at this detection score or above")
    parser.add_argument("--clip_score_model", default=None,
                        help="CLIP hub id or folder for CLIP scores (and FD to base) when --classifier is not clip: "
                             "(default: the clip: classifier's model; none otherwise)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="retained prompt to evaluate (repeatable; default without prompt files: the ten digit "
                             "prompts)")
    parser.add_argument("--prompts_file", action="append", default=[],
                        help="text file of retained prompts, one per line (repeatable)")
    parser.add_argument("--prompts_csv", action="append", default=[],
                        help="CSV of retained prompts (e.g. COCO captions), read from --prompt_column (repeatable)")
    parser.add_argument("--forget_prompts_file", action="append", default=[],
                        help="text file of forget prompts, one per line (repeatable)")
    parser.add_argument("--forget_prompts_csv", action="append", default=[],
                        help="CSV of forget prompts (e.g. an I2P CSV), read from --prompt_column (repeatable)")
    parser.add_argument("--prompt_column", default="prompt", help="column of --prompts_csv / --forget_prompts_csv")
    parser.add_argument("--max_prompts", type=int, default=None,
                        help="keep the first N retained and the first N forget prompts (after removing duplicates)")
    parser.add_argument("--label", action="append", default=None,
                        help="class of each --prompt, by name or index (repeatable, in order); default: the "
                             "prompt's last word when it is a classifier label, or the prompt itself when it is a "
                             "--class_text")
    parser.add_argument("--forget_prompt", action="append", default=[],
                        help="prompt of a forgotten concept (repeatable); evaluated too")
    parser.add_argument("--forget_label", action="append", default=None,
                        help="forgotten class, by name (a --class_text for clip:) or index (repeatable); default: the "
                             "forget prompts' classes")
    parser.add_argument("--num_images_per_prompt", type=int, default=100, help="samples per prompt")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels (default: the pipeline's own; FLUX's is 1024 whatever the model)")
    add_scoring_sampling_arguments(parser)
    parser.add_argument("--output_dir", required=True,
                        help="where metrics.json, report.md, samples_grid.png and the sample cache (samples/) go")
    parser.add_argument("--no_sample_cache", action="store_true",
                        help="do not store samples under OUTPUT_DIR/samples/ (no resuming)")
    parser.set_defaults(func=speaking_flags(run, parser))
    return parser


def read_prompts_csv(path: str | os.PathLike, column: str, parameter: str) -> list[str]:
    """The non-empty values of ``column`` in a CSV with a header row (an I2P or COCO captions CSV as is)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"`{parameter}` {path!r} does not exist")
    csv.field_size_limit(1 << 24)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if column not in columns:
            raise InputError(f"`{parameter}` {path!r} has no column {column!r} (columns: {', '.join(columns) or 'none'}); "
                             "pass --prompt_column")
        prompts = [" ".join((row.get(column) or "").split()) for row in reader]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise InputError(f"`{parameter}` {path!r}: column {column!r} holds no prompts")
    return prompts


def collect_prompts(args: argparse.Namespace) -> tuple[list[str], list[str], bool]:
    """``(retained prompts, forget prompts, default_used)`` from --prompt / --prompts_file / --prompts_csv and the
    forget flags, without duplicates (a prompt given as both is a forget prompt), cut to --max_prompts."""
    if args.max_prompts is not None and args.max_prompts <= 0:
        raise InputError(f"--max_prompts must be positive, got {args.max_prompts}")
    retained = list(args.prompt or [])
    for path in args.prompts_file:
        retained += read_prompts_file(path, "prompts_file")
    for path in args.prompts_csv:
        retained += read_prompts_csv(path, args.prompt_column, "prompts_csv")
    forget = list(args.forget_prompt)
    for path in args.forget_prompts_file:
        forget += read_prompts_file(path, "forget_prompts_file")
    for path in args.forget_prompts_csv:
        forget += read_prompts_csv(path, args.prompt_column, "forget_prompts_csv")
    if any(not p.strip() for p in [*retained, *forget]):
        raise InputError("--prompt / --forget_prompt: empty prompt")
    default_used = not retained and not (args.prompts_file or args.prompts_csv)
    if default_used:
        retained = list(DIGIT_PROMPTS)
    forget = list(dict.fromkeys(forget))[: args.max_prompts]
    retained = [p for p in dict.fromkeys(retained) if p not in forget][: args.max_prompts]
    return retained, forget, default_used


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def sample_cache_settings(args: argparse.Namespace, stage: str, sampler: str = "DDIM, eta 0") -> dict:
    """What the samples of ``stage`` (``base`` or ``adapted``) depend on: model, LoRAs (by content), sampler
    (``sampler_description`` of the pipeline: DDIM for the UNet families, their own scheduler for SD3 and FLUX)."""
    settings = {
        "stage": stage,
        "model": str(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "seed": args.seed,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "sampler": sampler,
        "format": "uint8 images [n, C, H, W]",
    }
    if getattr(args, "resolution", None) is not None:  # only when given: caches made without the flag stay valid
        settings["resolution"] = args.resolution
    if stage == "adapted":
        settings["loras"] = [{"path": os.path.abspath(p), "sha256": _file_digest(p)} for p in args.lora]
        settings["lora_weights"] = list(args.lora_weight) or [1.0] * len(args.lora)
    return settings


def _cache_dir(args: argparse.Namespace, settings: dict) -> str | None:
    if args.no_sample_cache:
        return None
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(args.output_dir, "samples", f"{settings['stage']}-{key}")


def run(args: argparse.Namespace) -> dict:
    """Evaluate the base pipeline and, if ``--lora`` is given, the pipeline with the LoRAs; write the report.

    Every flag is checked, the prompts read and the classifier loaded before the pipeline is.
    """
    if args.num_images_per_prompt <= 0:
        raise InputError(f"--num_images_per_prompt must be positive, got {args.num_images_per_prompt}")
    if args.batch_size <= 0:
        raise InputError(f"--batch_size must be positive, got {args.batch_size}")
    if not 0 < args.nudenet_threshold <= 1:
        raise InputError(f"--nudenet_threshold must be in (0, 1], got {args.nudenet_threshold}")
    for path in args.lora:
        check_lora_file(path, "lora")  # before the base evaluation, which takes most of the time
    check_output_apart(args.output_dir, "output_dir", [("lora", p) for p in args.lora] +
                       [("pretrained_model_name_or_path", args.pretrained_model_name_or_path)], allow_inside=True)
    check_writable(args.output_dir, "output_dir")
    check_positive_int(args.num_inference_steps, "num_inference_steps")
    check_positive_int(args.resolution, "resolution")
    check_number(args.guidance_scale, "guidance_scale", low=0)
    check_number(args.seed, "seed", low=0)
    if args.lora_weight and len(args.lora_weight) != len(args.lora):
        raise InputError(f"--lora_weight was given {len(args.lora_weight)} times for {len(args.lora)} --lora values")
    kind, _ = parse_classifier_spec(args.classifier, args.class_text)
    prompts, forget_prompts, default_used = collect_prompts(args)
    if default_used and kind != "folder":
        # The default digit prompts are for the digits classifier; elsewhere only the forget prompts are scored.
        prompts = []
        if not forget_prompts:
            raise InputError(f"--classifier {args.classifier}: give the prompts to evaluate (--prompt, --prompts_file, "
                             "--prompts_csv, --forget_prompt, --forget_prompts_file or --forget_prompts_csv)")
    if kind == "nudenet" and (args.label or args.forget_label):
        raise InputError("--label / --forget_label have no meaning with --classifier nudenet")
    if args.label is not None and (args.prompts_file or args.prompts_csv):
        raise InputError("--label labels --prompt values one by one; it cannot be combined with --prompts_file "
                         "or --prompts_csv")
    classifier = load_classifier(args.classifier, args.class_text, nudenet_threshold=args.nudenet_threshold,
                                 device=args.device)
    resolve_evaluation_labels(classifier, prompts, args.label, forget_prompts, args.forget_label)  # fail early
    clip_model = ClipModel(args.clip_score_model, device=args.device) if args.clip_score_model else None
    # SD 1.x/2.x and SDXL sample with DDIM; SD3 and FLUX with their own flow-matching scheduler (iter_samples).
    pipe = load_pipeline_from_args(args, supported=TRAINING_PIPELINES)
    cache = {}
    for stage in ("base", "adapted") if args.lora else ("base",):
        settings = sample_cache_settings(args, stage, sampler_description(pipe))
        cache[stage] = (_cache_dir(args, settings), settings)
    return evaluate_before_after(
        pipe, classifier, prompts, forget_prompts, args.output_dir, num_per_prompt=args.num_images_per_prompt,
        seed=args.seed, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        batch_size=args.batch_size, prompt_labels=args.label, forget_labels=args.forget_label, clip_model=clip_model,
        enable_adapter=(lambda: stack_forget_loras(pipe, args.lora, args.lora_weight)) if args.lora else None, cache=cache,
        resolution=args.resolution)
