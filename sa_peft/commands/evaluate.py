"""``sa-peft evaluate``: score the base pipeline and (with ``--lora``) the pipeline with forget LoRAs."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence

from ..classifier import load_classifier
from ..defaults import DIGIT_PROMPTS
from ..evaluation import evaluate_pipeline, write_evaluation_report
from .common import add_model_arguments, load_pipeline_from_args


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
                        help="classifier folder or builtin:digits-classifier")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt to evaluate (repeatable; default: the ten digit prompts)")
    parser.add_argument("--label", action="append", default=None,
                        help="class of each --prompt, by name or index (repeatable, in order); default: the "
                             "prompt's last word when it is a classifier label")
    parser.add_argument("--forget_prompt", action="append", default=[],
                        help="prompt of a forgotten concept (repeatable); evaluated too")
    parser.add_argument("--forget_label", action="append", default=None,
                        help="forgotten class, by name or index (repeatable); default: the forget prompts' classes")
    parser.add_argument("--num_images_per_prompt", type=int, default=100, help="samples per prompt")
    parser.add_argument("--num_inference_steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance")
    parser.add_argument("--batch_size", type=int, default=50, help="images per pipeline call")
    parser.add_argument("--output_dir", required=True, help="where metrics.json, report.md and samples_grid.png go")
    parser.set_defaults(func=run)
    return parser


def _class_index(value: str, labels: Sequence[str], flag: str) -> int:
    if value in labels:
        return labels.index(value)
    if re.fullmatch(r"\d+", value) and int(value) < len(labels):
        return int(value)
    raise ValueError(f"{flag} {value!r} is neither a classifier label ({', '.join(labels)}) nor a class index")


def _label_from_prompt(prompt: str, labels: Sequence[str]) -> int | None:
    """The class named by the prompt's last word (``a handwritten digit seven`` → ``seven``), if any."""
    words = re.findall(r"[\w-]+", prompt.lower())
    return labels.index(words[-1]) if words and words[-1] in labels else None


def resolve_labels(prompts: Sequence[str], prompt_labels: Sequence[str] | None, forget_prompts: Sequence[str],
                   forget_labels: Sequence[str] | None, labels: Sequence[str]) -> tuple[dict[str, int | None], list[int]]:
    """Class index per prompt and the forgotten class indices, from flags or from the prompts' last words."""
    if prompt_labels is not None and len(prompt_labels) != len(prompts):
        raise ValueError(f"--label was given {len(prompt_labels)} times for {len(prompts)} --prompt values; "
                         "give one per prompt")
    mapping: dict[str, int | None] = {}
    for i, prompt in enumerate(prompts):
        if prompt_labels is not None:
            mapping[prompt] = _class_index(prompt_labels[i], labels, "--label")
        else:
            mapping[prompt] = _label_from_prompt(prompt, labels)
            if mapping[prompt] is None:
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
                raise ValueError(f"cannot tell the forgotten class of {prompt!r}; pass --forget_label")
            forgotten.append(mapping[prompt])
    return mapping, list(dict.fromkeys(forgotten))


def apply_loras(pipe, paths: Sequence[str], weights: Sequence[float]) -> list[str]:
    """Load each LoRA (safetensors only) as its own adapter and activate them all with their weights."""
    if weights and len(weights) != len(paths):
        raise ValueError(f"--lora_weight was given {len(weights)} times for {len(paths)} --lora values")
    names = []
    for i, path in enumerate(paths):
        name = f"lora_{i}"
        if os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise ValueError(f"--lora {path!r} is not a .safetensors file; only safetensors LoRAs are loaded")
            pipe.load_lora_weights(os.path.dirname(os.path.abspath(path)), weight_name=os.path.basename(path),
                                   adapter_name=name, use_safetensors=True)
        elif os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise ValueError(f"--lora folder {path!r} holds no .safetensors file")
            # diffusers' default file name first; a folder with one other safetensors file also works.
            weight_name = "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in files else None
            if weight_name is None and len(files) == 1:
                weight_name = files[0]
            if weight_name is None:
                raise ValueError(f"--lora folder {path!r} has several .safetensors files; pass the file itself")
            pipe.load_lora_weights(path, weight_name=weight_name, adapter_name=name, use_safetensors=True)
        else:
            raise FileNotFoundError(f"--lora {path!r}: no such file or folder")
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=list(weights) if weights else [1.0] * len(names))
    return names


def run(args: argparse.Namespace) -> dict:
    """Evaluate the base pipeline and, if ``--lora`` is given, the pipeline with the LoRAs; write the report."""
    if args.num_images_per_prompt <= 0:
        raise ValueError(f"--num_images_per_prompt must be positive, got {args.num_images_per_prompt}")
    for path in args.lora:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--lora {path!r}: no such file or folder")
    classifier = load_classifier(args.classifier)
    prompts = list(dict.fromkeys(args.prompt or DIGIT_PROMPTS))
    mapping, forgotten = resolve_labels(prompts, args.label, args.forget_prompt, args.forget_label, classifier.labels)
    pipe = load_pipeline_from_args(args)
    common = {"num_per_prompt": args.num_images_per_prompt, "seed": args.seed, "batch_size": args.batch_size,
              "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    before = evaluate_pipeline(pipe, classifier, prompts, mapping, args.forget_prompt, forgotten, **common)
    _print_summary("base", before)
    after = None
    if args.lora:
        apply_loras(pipe, args.lora, args.lora_weight)
        after = evaluate_pipeline(pipe, classifier, prompts, mapping, args.forget_prompt, forgotten, **common)
        _print_summary("with LoRA", after)
    paths = write_evaluation_report(before, after, args.output_dir)
    print(f"wrote {', '.join(paths.values())}")
    return {"before": before, "after": after, "paths": paths}


def _print_summary(name: str, metrics: dict) -> None:
    r, f, q = metrics["retained"], metrics["forget"], metrics["quality"]
    parts = [f"{name}: retained accuracy mean {r['mean_accuracy']:.3f} worst {r['worst_accuracy']:.3f}"
             if r["mean_accuracy"] is not None else f"{name}:"]
    if f:
        parts.append(f"P(forgotten) on forget prompts {f['p_forgotten']:.3f}, entropy {f['entropy']:.3f}")
    if q:
        parts.append(f"FD {q['frechet_distance']:.2f}, off-manifold {q['off_manifold_rate']:.3f}")
    print("; ".join(parts) + f" ({metrics['timing']['total_seconds']:.0f}s)")
