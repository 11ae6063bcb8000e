"""Scoring a pipeline before and after forgetting: did the concept go, did everything else stay?

Label accuracy alone hides damage (a retained digit can stay recognisable while turning noisy),
so besides per-prompt accuracy, P(forgotten class) and entropy, evaluation measures image quality
against real held-out images: a Fréchet distance in the classifier's feature space and an
off-manifold rate in pixel space.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .classifier import ImageClassifier, NoReferenceImagesError, resize_images, to_channels
from .io_utils import atomic_path, write_text_atomic

# Per-sample seeds are spread this far apart so (seed, index) pairs of different runs do not collide.
_SEED_STRIDE = 1_000_003
# The reference split for the off-manifold threshold is a property of the classifier's reference
# set, not of the evaluation seed, so it uses its own fixed seed.
_REFERENCE_SPLIT_SEED = 0


def sample_seed(seed: int, index: int) -> int:
    """Seed of the initial noise of sample ``index``: the same for every prompt and every batch size."""
    return (seed * _SEED_STRIDE + index) % (2**63)


def generate_samples(
    pipe,
    prompts: Sequence[str],
    num_per_prompt: int,
    seed: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 50,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Sample ``num_per_prompt`` images per prompt with DDIM (eta 0); returns ``{prompt: [n, C, H, W] in [0, 1]}``.

    Sample ``i`` of every prompt starts from the same noise (seeded by ``sample_seed(seed, i)``), so
    results do not depend on ``batch_size`` and before/after or prompt-to-prompt comparisons see
    the same starting points. The pipeline's scheduler is swapped for DDIM and restored afterwards.
    """
    from diffusers import DDIMScheduler

    if num_per_prompt <= 0:
        raise ValueError(f"num_per_prompt must be positive, got {num_per_prompt}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        out: dict[str, torch.Tensor] = {}
        for prompt in tqdm(list(dict.fromkeys(prompts)), desc="evaluation samples", disable=not show_progress):
            chunks = []
            for start in range(0, num_per_prompt, batch_size):
                n = min(batch_size, num_per_prompt - start)
                generators = [torch.Generator().manual_seed(sample_seed(seed, start + i)) for i in range(n)]
                with torch.no_grad():
                    images = pipe(prompt=[prompt] * n, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, generator=generators, output_type="pt").images
                chunks.append(images.detach().float().cpu().clamp(0, 1))
            out[prompt] = torch.cat(chunks)
        return out
    finally:
        pipe.scheduler = original


# ------------------------------------------------------------------------------------------ metrics


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (FID's formula).

    ``tr sqrt(S_a S_b)`` is computed as ``Σ sqrt(eig(S_a^½ S_b S_a^½))`` with symmetric
    eigendecompositions, which stays real and finite for the rank-deficient covariances of small
    sample sets. Biased upwards for small N, like FID: compare numbers at equal sample sizes.
    """
    a = features_a.double().cpu().numpy()
    b = features_b.double().cpu().numpy()
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Fréchet distance needs at least two samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)
    return max(value, 0.0)


def nearest_neighbour_distances(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Euclidean distance ``[N]`` from each query image to its nearest gallery image."""
    return torch.cdist(queries.flatten(1).double(), gallery.flatten(1).double()).min(dim=1).values


def _reference_halves(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(len(reference), generator=torch.Generator().manual_seed(_REFERENCE_SPLIT_SEED))
    half = len(reference) // 2
    return reference[perm[:half]], reference[perm[half:]]


def off_manifold_rate(samples: torch.Tensor, reference: torch.Tensor, quantile: float = 0.95) -> dict:
    """Share of samples farther (in pixel space) from the real images than real images are from each other.

    The reference set is split into halves A and B. The threshold is the ``quantile`` of the
    nearest-neighbour distance from A's images to B (so about 5 % of real images exceed it); a
    sample is off-manifold when its distance to B exceeds that threshold. The same is done with the
    roles swapped and the two rates are averaged, so every reference image is used and the gallery
    size (which sets nearest-neighbour distances) is the same for samples and for real images.
    Pixel space, not classifier features, because it also sees texture and noise that leave the
    predicted label unchanged.
    """
    samples = _match_reference(samples, reference)
    a, b = _reference_halves(reference)
    thr_ab = torch.quantile(nearest_neighbour_distances(a, b), quantile).item()
    thr_ba = torch.quantile(nearest_neighbour_distances(b, a), quantile).item()
    rate_b = (nearest_neighbour_distances(samples, b) > thr_ab).double().mean().item()
    rate_a = (nearest_neighbour_distances(samples, a) > thr_ba).double().mean().item()
    return {"rate": (rate_a + rate_b) / 2, "threshold": (thr_ab + thr_ba) / 2, "quantile": quantile}


def _match_reference(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Samples in the reference images' channels and size, so pixel distances compare like with like."""
    images = to_channels(images.float(), reference.shape[1])
    return resize_images(images, reference.shape[-1])


def _retained_reference(classifier: ImageClassifier, retained_labels: Sequence[int]) -> tuple[torch.Tensor, list[str] | None]:
    """The reference images of the retained prompts' classes (all of them if the labels are unknown).

    Comparing samples of nine digits with real images of ten would count the missing class as
    damage, so the Fréchet distance only sees the classes the samples are meant to show.
    """
    reference = classifier.reference_images()
    try:
        ref_labels = classifier.reference_labels()
    except NoReferenceImagesError:
        return reference, None
    classes = sorted({int(c) for c in retained_labels})
    mask = torch.isin(ref_labels, torch.tensor(classes, dtype=ref_labels.dtype))
    if int(mask.sum()) < 4:
        return reference, None
    return reference[mask], [classifier.labels[c] for c in classes]


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)


def _prompt_metrics(probs: torch.Tensor, label: int | None, forgotten_labels: Sequence[int],
                    labels: Sequence[str]) -> dict:
    pred = probs.argmax(dim=1)
    hist = torch.bincount(pred, minlength=len(labels)).tolist()
    forgotten = list(forgotten_labels)
    return {
        "num_samples": len(probs),
        "label": label,
        "label_name": labels[label] if label is not None else None,
        "accuracy": (pred == label).double().mean().item() if label is not None else None,
        "p_forgotten": probs[:, forgotten].sum(dim=1).double().mean().item() if forgotten else None,
        "p_forgotten_per_class": {labels[c]: probs[:, c].double().mean().item() for c in forgotten},
        "predicted_forgotten_rate": torch.isin(pred, torch.tensor(forgotten, dtype=pred.dtype)).double().mean().item()
        if forgotten else None,
        "entropy": _entropy(probs.double()).mean().item(),
        "mean_confidence": probs.max(dim=1).values.double().mean().item(),
        "histogram": hist,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_pipeline(
    pipe,
    classifier: ImageClassifier,
    prompts: Sequence[str],
    label_for_prompt: Mapping[str, int],
    forget_prompts: Sequence[str],
    forgotten_labels: Sequence[int],
    num_per_prompt: int,
    seed: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 50,
) -> dict:
    """Sample every prompt (and every forget prompt) and score the samples with ``classifier``.

    ``label_for_prompt`` maps a prompt to its class index; every retained prompt (a prompt not in
    ``forget_prompts``) needs one, forget prompts may lack one. ``forgotten_labels`` are the
    class indices whose probability measures what is left of the forgotten concept.

    Returns a dict with ``per_prompt`` (accuracy, ``p_forgotten`` = mean P(y ∈ forgotten), mean
    entropy of p(y|x) in nats, predicted-class histogram), ``retained`` (mean / worst accuracy
    over retained prompts), ``forget`` (means over forget prompts), ``quality`` (Fréchet distance
    of retained samples to the classifier's real reference images of the retained classes in its
    feature space, and the pixel-space off-manifold rate against the same images; ``None`` when the
    classifier has no reference images),
    ``settings``, ``timing`` and ``samples`` (``{prompt: [n, C, H, W]}`` in [0, 1], for grids).
    """
    labels = list(classifier.labels)
    forget_prompts = list(dict.fromkeys(forget_prompts))
    all_prompts = list(dict.fromkeys([*prompts, *forget_prompts]))
    retained = [p for p in all_prompts if p not in forget_prompts]
    missing = [p for p in retained if label_for_prompt.get(p) is None]
    if missing:
        raise ValueError(f"no class label for retained prompt(s) {missing}; every retained prompt needs one")
    for c in [*forgotten_labels, *(v for v in label_for_prompt.values() if v is not None)]:
        if not 0 <= int(c) < len(labels):
            raise ValueError(f"class index {c} is out of range for a classifier with {len(labels)} labels")
    if forget_prompts and not forgotten_labels:
        raise ValueError("forget prompts were given but no forgotten labels")

    t0 = time.time()
    samples = generate_samples(pipe, all_prompts, num_per_prompt, seed, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, batch_size=batch_size)
    t1 = time.time()
    per_prompt = {}
    for prompt in all_prompts:
        label = label_for_prompt.get(prompt)
        probs = classifier.predict_proba(samples[prompt])
        per_prompt[prompt] = _prompt_metrics(probs, None if label is None else int(label), forgotten_labels, labels)
        per_prompt[prompt]["role"] = "forget" if prompt in forget_prompts else "retained"

    accs = {p: per_prompt[p]["accuracy"] for p in retained}
    worst = min(accs, key=accs.get) if accs else None
    summary_retained = {
        "prompts": retained,
        "mean_accuracy": _mean(list(accs.values())),
        "worst_accuracy": accs[worst] if worst else None,
        "worst_prompt": worst,
        "p_forgotten": _mean([per_prompt[p]["p_forgotten"] for p in retained]) if forgotten_labels else None,
        "entropy": _mean([per_prompt[p]["entropy"] for p in retained]),
    }
    summary_forget = None
    if forget_prompts:
        f_acc = [per_prompt[p]["accuracy"] for p in forget_prompts if per_prompt[p]["accuracy"] is not None]
        summary_forget = {
            "prompts": forget_prompts,
            "forgotten_labels": [labels[c] for c in forgotten_labels],
            "p_forgotten": _mean([per_prompt[p]["p_forgotten"] for p in forget_prompts]),
            "predicted_forgotten_rate": _mean([per_prompt[p]["predicted_forgotten_rate"] for p in forget_prompts]),
            "entropy": _mean([per_prompt[p]["entropy"] for p in forget_prompts]),
            "accuracy": _mean(f_acc),
        }

    quality = None
    if retained and classifier.has_reference_images():
        reference, reference_classes = _retained_reference(classifier, [label_for_prompt[p] for p in retained])
        kept = torch.cat([samples[p] for p in retained])
        ref_feats = classifier.features(reference)
        half_a, half_b = _reference_halves(ref_feats)
        off = off_manifold_rate(kept, reference)
        quality = {
            "frechet_distance": frechet_distance(classifier.features(kept), ref_feats),
            "frechet_distance_real_split": frechet_distance(half_a, half_b),
            "off_manifold_rate": off["rate"],
            "off_manifold_threshold": off["threshold"],
            "off_manifold_space": "pixels",
            "num_samples": len(kept),
            "num_reference": len(reference),
            "reference_classes": reference_classes,
        }
    t2 = time.time()
    return {
        "settings": {
            "prompts": all_prompts,
            "forget_prompts": forget_prompts,
            "forgotten_labels": [int(c) for c in forgotten_labels],
            "label_for_prompt": {p: label_for_prompt.get(p) for p in all_prompts},
            "labels": labels,
            "num_per_prompt": num_per_prompt,
            "seed": seed,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "sampler": "DDIM, eta 0",
        },
        "num_per_prompt": num_per_prompt,
        "seed": seed,
        "per_prompt": per_prompt,
        "retained": summary_retained,
        "forget": summary_forget,
        "quality": quality,
        "timing": {"sampling_seconds": round(t1 - t0, 2), "scoring_seconds": round(t2 - t1, 2),
                   "total_seconds": round(t2 - t0, 2)},
        "samples": samples,
    }


# ------------------------------------------------------------------------------------------- report


def _without_samples(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: v for k, v in metrics.items() if k != "samples"}


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _histogram_text(hist: Sequence[int], labels: Sequence[str]) -> str:
    parts = [f"{labels[i]} {n}" for i, n in sorted(enumerate(hist), key=lambda x: -x[1]) if n]
    return ", ".join(parts) or "–"


def _summary_rows(before: dict, after: dict | None) -> list[tuple[str, str, str | None]]:
    def get(m, *keys):
        for k in keys:
            if m is None:
                return None
            m = m.get(k)
        return m

    rows = [
        ("retained mean accuracy", ("retained", "mean_accuracy")),
        ("retained worst accuracy", ("retained", "worst_accuracy")),
        ("retained mean P(forgotten)", ("retained", "p_forgotten")),
        ("forget prompts P(forgotten)", ("forget", "p_forgotten")),
        ("forget prompts predicted as forgotten", ("forget", "predicted_forgotten_rate")),
        ("forget prompts mean entropy (nats)", ("forget", "entropy")),
        ("Fréchet distance, retained vs real", ("quality", "frechet_distance")),
        ("off-manifold rate, retained", ("quality", "off_manifold_rate")),
    ]
    return [(name, _fmt(get(before, *keys)), _fmt(get(after, *keys)) if after is not None else None)
            for name, keys in rows]


def report_markdown(metrics_before: dict, metrics_after: dict | None = None) -> str:
    """The Markdown report: settings, a summary, and a per-prompt table (before/after columns if both)."""
    before, after = metrics_before, metrics_after
    s = before["settings"]
    labels = s["labels"]
    lines = [
        "# Evaluation",
        "",
        (
            f"{s['num_per_prompt']} samples per prompt, seed {s['seed']}, {s['sampler']}, {s['num_inference_steps']} "
            f"steps, guidance {s['guidance_scale']}. Forget prompts: "
            f"{', '.join(f'`{p}`' for p in s['forget_prompts']) or 'none'}; "
            f"forgotten classes: {', '.join(labels[c] for c in s['forgotten_labels']) or 'none'}."
        ),
        "",
        (
            "P(forgotten) is the mean classifier probability of the forgotten class(es); entropy is the mean entropy "
            "of p(y|x) in nats. The Fréchet distance uses the classifier's penultimate features against its real "
            "held-out images of the retained classes; a sample is off-manifold when its pixel distance to the "
            "nearest of those real images exceeds the real images' 95th percentile (about 0.05 for real images)."
        ),
        "",
        "## Summary",
        "",
    ]
    if after is None:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {b} |" for name, b, _ in _summary_rows(before, None)]
    else:
        lines += ["| metric | before | after |", "|---|---|---|"]
        lines += [f"| {name} | {b} | {a} |" for name, b, a in _summary_rows(before, after)]
    lines += ["", "## Per prompt", ""]
    prompts = list(dict.fromkeys([*before["per_prompt"], *((after or {}).get("per_prompt") or {})]))
    if after is None:
        lines += ["| prompt | role | accuracy | P(forgotten) | entropy | predicted classes |", "|---|---|---|---|---|---|"]
        for p in prompts:
            m = before["per_prompt"][p]
            lines.append(f"| `{p}` | {m['role']} | {_fmt(m['accuracy'])} | {_fmt(m['p_forgotten'])} | "
                         f"{_fmt(m['entropy'])} | {_histogram_text(m['histogram'], labels)} |")
    else:
        lines += [
            (
                "| prompt | role | accuracy before | after | P(forgotten) before | after | entropy before | after "
                "| predicted before | predicted after |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        empty = {"role": "", "accuracy": None, "p_forgotten": None, "entropy": None, "histogram": []}
        for p in prompts:
            b = before["per_prompt"].get(p, empty)
            a = after["per_prompt"].get(p, empty)
            lines.append(f"| `{p}` | {a['role'] or b['role']} | {_fmt(b['accuracy'])} | {_fmt(a['accuracy'])} | "
                         f"{_fmt(b['p_forgotten'])} | {_fmt(a['p_forgotten'])} | {_fmt(b['entropy'])} | "
                         f"{_fmt(a['entropy'])} | {_histogram_text(b['histogram'], labels)} | "
                         f"{_histogram_text(a['histogram'], labels)} |")
    lines.append("")
    return "\n".join(lines)


def samples_grid(samples_before: Mapping[str, torch.Tensor], samples_after: Mapping[str, torch.Tensor] | None = None,
                 num_samples: int = 10, cell: int = 48, pad: int = 2):
    """A PIL image: one row per prompt, ``num_samples`` before-samples, then (if given) after-samples.

    Cells are upscaled with nearest-neighbour so 16×16 samples stay visible; a left column names
    the prompt (its last word, which is the class for the digit prompts).
    """
    from PIL import Image, ImageDraw

    prompts = list(dict.fromkeys([*samples_before, *(samples_after or {})]))
    blocks = [samples_before] + ([samples_after] if samples_after is not None else [])
    k = min(num_samples, max(len(s[p]) for s in blocks for p in s))
    label_w, header_h, gap = 72, 14, 12
    block_w = k * (cell + pad)
    width = label_w + len(blocks) * block_w + (len(blocks) - 1) * gap
    height = header_h + len(prompts) * (cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(["before", "after"][: len(blocks)] if len(blocks) == 2 else ["samples"]):
        draw.text((label_w + j * (block_w + gap), 1), title, fill=(0, 0, 0))
    for i, prompt in enumerate(prompts):
        y = header_h + i * (cell + pad)
        draw.text((2, y + cell // 2 - 5), prompt.split()[-1][:11] if prompt.split() else "''", fill=(0, 0, 0))
        for j, block in enumerate(blocks):
            if prompt not in block:
                continue
            images = to_channels(block[prompt][:k].float().clamp(0, 1), 3)
            images = torch.nn.functional.interpolate(images, size=(cell, cell), mode="nearest")
            arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            for n, img in enumerate(arr):
                canvas.paste(Image.fromarray(img), (label_w + j * (block_w + gap) + n * (cell + pad), y))
    return canvas


def write_evaluation_report(metrics_before: dict, metrics_after: dict | None, output_dir: str | os.PathLike,
                            num_grid_samples: int = 10) -> dict[str, str]:
    """Write ``metrics.json``, ``report.md`` and ``samples_grid.png`` to ``output_dir`` (each atomically).

    The grid needs the ``samples`` that ``evaluate_pipeline`` returns; without them it is skipped.
    Returns the written paths by name.
    """
    os.makedirs(output_dir, exist_ok=True)
    paths = {"metrics": os.path.join(output_dir, "metrics.json"), "report": os.path.join(output_dir, "report.md")}
    payload = {"before": _without_samples(metrics_before), "after": _without_samples(metrics_after)}
    with atomic_path(paths["metrics"]) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    write_text_atomic(paths["report"], report_markdown(metrics_before, metrics_after))
    if "samples" in metrics_before and (metrics_after is None or "samples" in metrics_after):
        grid = samples_grid(metrics_before["samples"], metrics_after["samples"] if metrics_after else None,
                            num_samples=num_grid_samples)
        paths["grid"] = os.path.join(output_dir, "samples_grid.png")
        with atomic_path(paths["grid"]) as tmp:
            grid.save(tmp, format="PNG")
    return paths
