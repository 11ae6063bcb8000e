"""``sa-peft evaluate``: score the base pipeline and (with ``--lora``) the pipeline with forget LoRAs."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
from collections.abc import Sequence

from ..adapter_io import check_lora_file
from ..checks import check_number, check_output_apart, check_positive_int, check_writable
from ..classifier import (
    CLASSIFIER_SPECS,
    ClipModel,
    ClipZeroShotClassifier,
    NudeNetDetector,
    load_classifier,
    parse_classifier_spec,
)
from ..defaults import DIGIT_PROMPTS
from ..evaluation import evaluate_pipeline, write_evaluation_report
from ..merge import stack_forget_loras
from ..prompts import read_prompts_file
from .common import add_model_arguments, add_scoring_sampling_arguments, load_pipeline_from_args


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
    add_scoring_sampling_arguments(parser)
    parser.add_argument("--output_dir", required=True,
                        help="where metrics.json, report.md, samples_grid.png and the sample cache (samples/) go")
    parser.add_argument("--no_sample_cache", action="store_true",
                        help="do not store samples under OUTPUT_DIR/samples/ (no resuming)")
    parser.set_defaults(func=run)
    return parser


def _class_index(value: str, labels: Sequence[str], flag: str) -> int:
    if value in labels:
        return labels.index(value)
    if re.fullmatch(r"\d+", value) and int(value) < len(labels):
        return int(value)
    raise ValueError(f"{flag} {value!r} is neither a classifier label ({', '.join(labels)}) nor a class index")


def _label_from_prompt(prompt: str, labels: Sequence[str]) -> int | None:
    """The class a prompt names: the prompt itself when it is a label (``a photo of Brad Pitt`` for CLIP
    classes, case-insensitive), else its last word (``a handwritten digit seven`` → ``seven``)."""
    lowered = [label.lower() for label in labels]
    if prompt.strip().lower() in lowered:
        return lowered.index(prompt.strip().lower())
    words = re.findall(r"[\w-]+", prompt.lower())
    return labels.index(words[-1]) if words and words[-1] in labels else None


def resolve_labels(prompts: Sequence[str], prompt_labels: Sequence[str] | None, forget_prompts: Sequence[str],
                   forget_labels: Sequence[str] | None, labels: Sequence[str],
                   require: bool = True) -> tuple[dict[str, int | None], list[int]]:
    """Class index per prompt and the forgotten class indices, from flags or from the prompts themselves.

    With ``require=False`` (CLIP classes, prompt files) a retained prompt whose class cannot be told
    gets ``None`` (no accuracy) instead of an error.
    """
    if prompt_labels is not None and len(prompt_labels) != len(prompts):
        raise ValueError(f"--label was given {len(prompt_labels)} times for {len(prompts)} --prompt values; "
                         "give one per prompt")
    mapping: dict[str, int | None] = {}
    for i, prompt in enumerate(prompts):
        if prompt_labels is not None:
            mapping[prompt] = _class_index(prompt_labels[i], labels, "--label")
        else:
            mapping[prompt] = _label_from_prompt(prompt, labels)
            if mapping[prompt] is None and require:
                raise ValueError(f"cannot tell the class of prompt {prompt!r} from its last word; "
                                 f"pass --label (one per --prompt) from: {', '.join(labels)}")
    for prompt in forget_prompts:
        if prompt not in mapping:
            mapping[prompt] = _label_from_prompt(prompt, labels)
    if forget_labels:
        forgotten = [_class_index(v, labels, "--forget_label") for v in forget_labels]
    else:
        forgotten = []
        for prompt in forget_prompts:
            if mapping.get(prompt) is None:
                raise ValueError(f"cannot tell the forgotten class of {prompt!r}; pass --forget_label "
                                 f"(one of: {', '.join(labels)})")
            forgotten.append(mapping[prompt])
    return mapping, list(dict.fromkeys(forgotten))


def resolve_evaluation_labels(classifier, prompts: Sequence[str], prompt_labels: Sequence[str] | None,
                              forget_prompts: Sequence[str], forget_labels: Sequence[str] | None
                              ) -> tuple[dict[str, int | None], list[int], bool]:
    """``(label_for_prompt, forgotten_labels, allow_unlabeled)`` for any classifier ``load_classifier`` returns.

    NudeNet has no classes (``--label`` / ``--forget_label`` are refused); CLIP classes may leave
    retained prompts unlabeled; the digits classifier needs every retained prompt's class.
    """
    if isinstance(classifier, NudeNetDetector):
        for flag, value in (("--label", prompt_labels), ("--forget_label", forget_labels)):
            if value:
                raise ValueError(f"{flag} has no meaning with --classifier nudenet (it detects parts, it has no classes)")
        return {}, [], True
    if isinstance(classifier, ClipZeroShotClassifier):
        mapping, forgotten = resolve_labels(prompts, prompt_labels, forget_prompts, forget_labels,
                                            classifier.labels, require=False)
        return mapping, forgotten, True
    mapping, forgotten = resolve_labels(prompts, prompt_labels, forget_prompts, forget_labels, classifier.labels)
    return mapping, forgotten, False


def read_prompts_csv(path: str | os.PathLike, column: str, flag: str) -> list[str]:
    """The non-empty values of ``column`` in a CSV with a header row (an I2P or COCO captions CSV as is)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    csv.field_size_limit(1 << 24)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if column not in columns:
            raise ValueError(f"{flag} {path!r} has no column {column!r} (columns: {', '.join(columns) or 'none'}); "
                             "pass --prompt_column")
        prompts = [" ".join((row.get(column) or "").split()) for row in reader]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{flag} {path!r}: column {column!r} holds no prompts")
    return prompts


def collect_prompts(args: argparse.Namespace) -> tuple[list[str], list[str], bool]:
    """``(retained prompts, forget prompts, default_used)`` from --prompt / --prompts_file / --prompts_csv and the
    forget flags, without duplicates (a prompt given as both is a forget prompt), cut to --max_prompts."""
    if args.max_prompts is not None and args.max_prompts <= 0:
        raise ValueError(f"--max_prompts must be positive, got {args.max_prompts}")
    retained = list(args.prompt or [])
    for path in args.prompts_file:
        retained += read_prompts_file(path, "--prompts_file")
    for path in args.prompts_csv:
        retained += read_prompts_csv(path, args.prompt_column, "--prompts_csv")
    forget = list(args.forget_prompt)
    for path in args.forget_prompts_file:
        forget += read_prompts_file(path, "--forget_prompts_file")
    for path in args.forget_prompts_csv:
        forget += read_prompts_csv(path, args.prompt_column, "--forget_prompts_csv")
    if any(not p.strip() for p in [*retained, *forget]):
        raise ValueError("--prompt / --forget_prompt: empty prompt")
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


def sample_cache_settings(args: argparse.Namespace, stage: str) -> dict:
    """What the samples of ``stage`` (``base`` or ``adapted``) depend on: model, LoRAs (by content), sampler."""
    settings = {
        "stage": stage,
        "model": str(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "seed": args.seed,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "sampler": "DDIM, eta 0",
        "format": "uint8 images [n, C, H, W]",
    }
    if stage == "adapted":
        settings["loras"] = [{"path": os.path.abspath(p), "sha256": _file_digest(p)} for p in args.lora]
        settings["lora_weights"] = list(args.lora_weight) or [1.0] * len(args.lora)
    return settings


def _cache_dir(args: argparse.Namespace, settings: dict) -> str | None:
    if args.no_sample_cache:
        return None
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(args.output_dir, "samples", f"{settings['stage']}-{key}")


def evaluate_before_after(pipe, classifier, prompts: Sequence[str], forget_prompts: Sequence[str],
                          output_dir: str | os.PathLike, *, num_per_prompt: int, seed: int, num_inference_steps: int,
                          guidance_scale: float, batch_size: int = 50, prompt_labels: Sequence[str] | None = None,
                          forget_labels: Sequence[str] | None = None, clip_model: ClipModel | None = None,
                          disable_adapter=None, enable_adapter=None, cache: dict | None = None, log=print) -> dict:
    """Score the base model, then (if ``enable_adapter``) the adapted one, and write the report to ``output_dir``.

    ``classifier`` is what ``load_classifier`` returns (digits, CLIP or NudeNet). ``disable_adapter`` /
    ``enable_adapter`` switch the pipeline between base and adapted (e.g. ``pipe.disable_lora`` and
    ``pipe.enable_lora`` in a training script; ``None`` when the pipeline starts as the base model).
    ``cache`` maps ``"base"`` / ``"adapted"`` to ``(folder, settings)`` of a ``SampleCache``; leave it
    ``None`` unless the folder is specific to the model and adapter. The adapted run gets ``fd_to_base``
    against the base run. Returns ``{"before", "after", "paths"}``.
    """
    mapping, forgotten, allow_unlabeled = resolve_evaluation_labels(classifier, prompts, prompt_labels, forget_prompts,
                                                                    forget_labels)
    common = {"num_per_prompt": num_per_prompt, "seed": seed, "batch_size": batch_size,
              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "clip_model": clip_model, "allow_unlabeled": allow_unlabeled, "keep_samples": 10}
    cache = cache or {}

    def cached(stage):
        folder, settings = cache.get(stage, (None, None))
        return {"cache_dir": folder, "cache_settings": settings}

    if disable_adapter is not None:
        disable_adapter()
    before = evaluate_pipeline(pipe, classifier, prompts, mapping, forget_prompts, forgotten, **common,
                               **cached("base"), desc="base samples")
    log(format_summary("base", before))
    after = None
    if enable_adapter is not None:
        enable_adapter()
        after = evaluate_pipeline(pipe, classifier, prompts, mapping, forget_prompts, forgotten, **common,
                                  base_features=before["features"], **cached("adapted"), desc="adapted samples")
        log(format_summary("with LoRA", after))
    paths = write_evaluation_report(before, after, output_dir)
    log(f"wrote {', '.join(paths.values())}")
    return {"before": before, "after": after, "paths": paths}


def run(args: argparse.Namespace) -> dict:
    """Evaluate the base pipeline and, if ``--lora`` is given, the pipeline with the LoRAs; write the report.

    Every flag is checked, the prompts read and the classifier loaded before the pipeline is.
    """
    if args.num_images_per_prompt <= 0:
        raise ValueError(f"--num_images_per_prompt must be positive, got {args.num_images_per_prompt}")
    if args.batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    if not 0 < args.nudenet_threshold <= 1:
        raise ValueError(f"--nudenet_threshold must be in (0, 1], got {args.nudenet_threshold}")
    for path in args.lora:
        check_lora_file(path, "--lora")  # before the base evaluation, which takes most of the time
    check_output_apart(args.output_dir, "--output_dir", [("--lora", p) for p in args.lora] +
                       [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path)], allow_inside=True)
    check_writable(args.output_dir, "--output_dir")
    check_positive_int(args.num_inference_steps, "--num_inference_steps")
    check_number(args.guidance_scale, "--guidance_scale", low=0)
    check_number(args.seed, "--seed", low=0)
    if args.lora_weight and len(args.lora_weight) != len(args.lora):
        raise ValueError(f"--lora_weight was given {len(args.lora_weight)} times for {len(args.lora)} --lora values")
    kind, _ = parse_classifier_spec(args.classifier, args.class_text)
    prompts, forget_prompts, default_used = collect_prompts(args)
    if default_used and kind != "folder":
        # The default digit prompts are for the digits classifier; elsewhere only the forget prompts are scored.
        prompts = []
        if not forget_prompts:
            raise ValueError(f"--classifier {args.classifier}: give the prompts to evaluate (--prompt, --prompts_file, "
                             "--prompts_csv, --forget_prompt, --forget_prompts_file or --forget_prompts_csv)")
    if kind == "nudenet" and (args.label or args.forget_label):
        raise ValueError("--label / --forget_label have no meaning with --classifier nudenet")
    if args.label is not None and (args.prompts_file or args.prompts_csv):
        raise ValueError("--label labels --prompt values one by one; it cannot be combined with --prompts_file "
                         "or --prompts_csv")
    classifier = load_classifier(args.classifier, args.class_text, nudenet_threshold=args.nudenet_threshold,
                                 device=args.device)
    resolve_evaluation_labels(classifier, prompts, args.label, forget_prompts, args.forget_label)  # fail early
    clip_model = ClipModel(args.clip_score_model, device=args.device) if args.clip_score_model else None
    pipe = load_pipeline_from_args(args)
    cache = {}
    for stage in ("base", "adapted") if args.lora else ("base",):
        settings = sample_cache_settings(args, stage)
        cache[stage] = (_cache_dir(args, settings), settings)
    return evaluate_before_after(
        pipe, classifier, prompts, forget_prompts, args.output_dir, num_per_prompt=args.num_images_per_prompt,
        seed=args.seed, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        batch_size=args.batch_size, prompt_labels=args.label, forget_labels=args.forget_label, clip_model=clip_model,
        enable_adapter=(lambda: stack_forget_loras(pipe, args.lora, args.lora_weight)) if args.lora else None, cache=cache)


def format_summary(name: str, metrics: dict) -> str:
    """One line of the main numbers of an ``evaluate_pipeline`` result (for logs)."""
    r, f, q = metrics["retained"], metrics["forget"], metrics["quality"]
    parts = [f"{name}: retained accuracy mean {r['mean_accuracy']:.3f} worst {r['worst_accuracy']:.3f}"
             if r["mean_accuracy"] is not None else f"{name}:"]
    if f and f["p_forgotten"] is not None:
        parts.append(f"P(forgotten) on forget prompts {f['p_forgotten']:.3f}, entropy {f['entropy']:.3f}")
    if r.get("clip_score") is not None:
        parts.append(f"retained CLIP score {r['clip_score']:.2f}")
    if f and f.get("clip_score") is not None:
        parts.append(f"forget CLIP score {f['clip_score']:.2f}")
    if metrics.get("fd_to_base"):
        parts.append(f"FD to base {metrics['fd_to_base']['frechet_distance']:.3f}, "
                     f"KID {metrics['fd_to_base']['kid']:.4f}")
    if q:
        parts.append(f"FD {q['frechet_distance']:.2f}, off-manifold {q['off_manifold_rate']:.3f}")
    n = (metrics.get("nudenet") or {}).get("all")
    if n:
        parts.append(f"NudeNet: {n['images_with_exposed']}/{n['num_samples']} images with exposed parts")
    return "; ".join(parts) + f" ({metrics['timing']['total_seconds']:.0f}s)"
