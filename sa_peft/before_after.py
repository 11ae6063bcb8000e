"""Scoring a pipeline before and after its forget LoRA: the class each prompt shows, and the two runs.

Shared by ``sa-peft evaluate``, ``sa-peft attack`` and the training script's final evaluation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from .classifier import ClipModel, ClipZeroShotClassifier, NudeNetDetector
from .errors import InputError
from .evaluation import evaluate_pipeline, write_evaluation_report
from .lora import adapters_fused, lora_models


def _class_index(value: str, labels: Sequence[str], parameter: str) -> int:
    if value in labels:
        return labels.index(value)
    if re.fullmatch(r"\d+", value) and int(value) < len(labels):
        return int(value)
    raise InputError(f"`{parameter}` {value!r} is neither a classifier label ({', '.join(labels)}) nor a class index")


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
        raise InputError(f"`label` was given {len(prompt_labels)} times for {len(prompts)} `prompt` values; "
                         "give one per prompt")
    mapping: dict[str, int | None] = {}
    for i, prompt in enumerate(prompts):
        if prompt_labels is not None:
            mapping[prompt] = _class_index(prompt_labels[i], labels, "label")
        else:
            mapping[prompt] = _label_from_prompt(prompt, labels)
            if mapping[prompt] is None and require:
                raise InputError(f"cannot tell the class of prompt {prompt!r} from its last word; "
                                 f"pass `label` (one per `prompt`) from: {', '.join(labels)}")
    for prompt in forget_prompts:
        if prompt not in mapping:
            mapping[prompt] = _label_from_prompt(prompt, labels)
    if forget_labels:
        forgotten = [_class_index(v, labels, "forget_label") for v in forget_labels]
    else:
        forgotten = []
        for prompt in forget_prompts:
            if mapping.get(prompt) is None:
                raise InputError(f"cannot tell the forgotten class of {prompt!r}; pass `forget_label` "
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
        for parameter, value in (("label", prompt_labels), ("forget_label", forget_labels)):
            if value:
                raise InputError(f"`{parameter}` has no meaning with `classifier` nudenet (it detects parts, it has no classes)")
        return {}, [], True
    if isinstance(classifier, ClipZeroShotClassifier):
        mapping, forgotten = resolve_labels(prompts, prompt_labels, forget_prompts, forget_labels,
                                            classifier.labels, require=False)
        return mapping, forgotten, True
    mapping, forgotten = resolve_labels(prompts, prompt_labels, forget_prompts, forget_labels, classifier.labels)
    return mapping, forgotten, False


def evaluate_before_after(pipe, classifier, prompts: Sequence[str], forget_prompts: Sequence[str],
                          output_dir: str | os.PathLike, *, num_per_prompt: int, seed: int, num_inference_steps: int,
                          guidance_scale: float, batch_size: int = 50, prompt_labels: Sequence[str] | None = None,
                          forget_labels: Sequence[str] | None = None, clip_model: ClipModel | None = None,
                          disable_adapter=None, enable_adapter=None, cache: dict | None = None, log=print,
                          resolution: int | None = None) -> dict:
    """Score the base model, then (if ``enable_adapter``) the adapted one, and write the report to ``output_dir``.

    ``classifier`` is what ``load_classifier`` returns (digits, CLIP or NudeNet). ``disable_adapter`` /
    ``enable_adapter`` switch the pipeline between base and adapted (e.g. ``pipe.disable_lora`` and
    ``pipe.enable_lora`` in a training script; ``None`` when the pipeline starts as the base model); the adapted
    samples are drawn with the LoRA fused (``adapters_fused``: the same images up to rounding, at the base's speed).
    ``cache`` maps ``"base"`` / ``"adapted"`` to ``(folder, settings)`` of a ``SampleCache``; leave it
    ``None`` unless the folder is specific to the model and adapter. The adapted run gets ``fd_to_base``
    against the base run. Returns ``{"before", "after", "paths"}``.
    """
    mapping, forgotten, allow_unlabeled = resolve_evaluation_labels(classifier, prompts, prompt_labels, forget_prompts,
                                                                    forget_labels)
    common = {"num_per_prompt": num_per_prompt, "seed": seed, "batch_size": batch_size,
              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "clip_model": clip_model, "allow_unlabeled": allow_unlabeled, "keep_samples": 10}
    if resolution is not None:  # else the pipeline's own size (callers that never pass it call as before)
        common["resolution"] = resolution
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
        with adapters_fused(*lora_models(pipe).values()):
            after = evaluate_pipeline(pipe, classifier, prompts, mapping, forget_prompts, forgotten, **common,
                                      base_features=before["features"], **cached("adapted"), desc="adapted samples")
        log(format_summary("with LoRA", after))
    paths = write_evaluation_report(before, after, output_dir)
    log(f"wrote {', '.join(paths.values())}")
    return {"before": before, "after": after, "paths": paths}


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
