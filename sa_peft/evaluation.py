"""Scoring a pipeline before and after forgetting: did the concept go, did everything else stay?

Label accuracy alone hides damage (a retained digit can stay recognisable while turning noisy),
so besides per-prompt accuracy, P(forgotten class) and entropy, evaluation measures image quality
against real held-out images: a Fréchet distance in the classifier's feature space and an
off-manifold rate in pixel space.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .classifier import (
    ClipModel,
    ClipZeroShotClassifier,
    ImageClassifier,
    NoReferenceImagesError,
    NudeNetDetector,
    resize_images,
    to_channels,
)
from .errors import InputError
from .io_utils import atomic_path, write_json_atomic, write_text_atomic
from .models import ddim_sampling, sampler_description

# Per-sample seeds are spread this far apart so (seed, index) pairs of different runs do not collide.
_SEED_STRIDE = 1_000_003
# The reference split for the off-manifold threshold is a property of the classifier's reference
# set, not of the evaluation seed, so it uses its own fixed seed.
_REFERENCE_SPLIT_SEED = 0


def sample_seed(seed: int, index: int) -> int:
    """Seed of the initial noise of sample ``index``: the same for every prompt and every batch size."""
    return (seed * _SEED_STRIDE + index) % (2**63)


SAMPLE_CACHE_SETTINGS = "settings.json"


def _quantize(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


class SampleCache:
    """Samples on disk, one ``<sha256 of the prompt>.safetensors`` per prompt (uint8 ``images`` [n, C, H, W],
    the prompt in the header), so an interrupted evaluation resumes where it stopped.

    The folder must be specific to one model and one set of sampling settings (``settings`` is written
    to ``settings.json`` and checked); sample ``i`` of a prompt always starts from the same noise, so a
    cached prompt with fewer samples than asked is extended and one with more is cut.
    """

    def __init__(self, folder: str | os.PathLike, settings: dict | None = None):
        self.folder = os.fspath(folder)
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, SAMPLE_CACHE_SETTINGS)
        if settings is not None:
            settings = json.loads(json.dumps(settings))
            if os.path.exists(path):
                with open(path) as f:
                    existing = json.load(f)
                if existing != settings:
                    raise InputError(f"sample cache {self.folder!r} holds samples made with other settings; "
                                     "choose another `output_dir` or delete that folder")
            else:
                write_json_atomic(path, settings)

    def path(self, prompt: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32] + ".safetensors")

    def load(self, prompt: str) -> torch.Tensor | None:
        """The cached uint8 samples of ``prompt``, or ``None``."""
        path = self.path(prompt)
        if not os.path.isfile(path):
            return None
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("prompt") != prompt:
                return None  # a hash collision or a foreign file: regenerate rather than mix prompts
            return f.get_tensor("images")

    def save(self, prompt: str, images: torch.Tensor) -> None:
        with atomic_path(self.path(prompt)) as tmp:
            save_file({"images": images.contiguous()}, tmp, metadata={"prompt": prompt})


def iter_samples(
    pipe,
    prompts: Sequence[str],
    num_per_prompt: int,
    seed: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 50,
    show_progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    cache_settings: dict | None = None,
    desc: str = "evaluation samples",
    resolution: int | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(prompt, images [n, C, H, W] in [0, 1])`` in prompt order, sampling with DDIM (eta 0).

    Sample ``i`` of every prompt starts from the same noise (seeded by ``sample_seed(seed, i)``), so
    results do not depend on ``batch_size`` and before/after or prompt-to-prompt comparisons see
    the same starting points. A batch may hold samples of several prompts (one sample per prompt
    fills batches too). With ``cache_dir`` each prompt's samples are stored as uint8 in a
    ``SampleCache`` as soon as it is complete and read back on a later run; the returned images are
    then always the uint8 values, so a resumed run scores exactly what an uninterrupted one does.
    The pipeline's scheduler is swapped for DDIM and restored afterwards; a flow-matching pipeline (SD3, FLUX) keeps
    its own (``ddim_sampling``). ``resolution``: the image side in pixels (default: the pipeline's own default size,
    which for FLUX is 128 latents whatever the model, so a small FLUX needs it).
    """
    if num_per_prompt <= 0:
        raise InputError(f"num_per_prompt must be positive, got {num_per_prompt}")
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    prompts = list(dict.fromkeys(prompts))
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    cache = SampleCache(cache_dir, cache_settings) if cache_dir is not None else None
    parts: dict[str, list[torch.Tensor]] = {}
    cached_count: dict[str, int] = {}
    todo: list[tuple[str, int]] = []
    for prompt in prompts:
        cached = cache.load(prompt) if cache else None
        cached = cached[:num_per_prompt] if cached is not None else None
        parts[prompt] = [cached.float() / 255] if cached is not None and len(cached) else []
        cached_count[prompt] = 0 if cached is None else len(cached)
        todo += [(prompt, i) for i in range(cached_count[prompt], num_per_prompt)]
    missing = {p: num_per_prompt - cached_count[p] for p in prompts}
    bar = tqdm(total=len(prompts) * num_per_prompt, initial=len(prompts) * num_per_prompt - len(todo), desc=desc,
               disable=not show_progress, unit="img")
    next_prompt = 0

    def ready():
        nonlocal next_prompt
        while next_prompt < len(prompts) and missing[prompts[next_prompt]] == 0:
            prompt = prompts[next_prompt]
            images = torch.cat(parts.pop(prompt))
            if cache is not None and cached_count[prompt] < num_per_prompt:
                cache.save(prompt, _quantize(images))
            next_prompt += 1
            yield prompt, images

    try:
        with ddim_sampling(pipe):
            yield from ready()
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for _, i in chunk]
                with torch.no_grad():
                    images = pipe(prompt=[p for p, _ in chunk], num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, generator=generators, output_type="pt",
                                  **size).images
                images = images.detach().float().cpu().clamp(0, 1)
                if cache is not None:
                    images = _quantize(images).float() / 255
                for (prompt, _), image in zip(chunk, images, strict=True):
                    parts[prompt].append(image[None])
                    missing[prompt] -= 1
                bar.update(len(chunk))
                yield from ready()
    finally:
        bar.close()


def generate_samples(
    pipe,
    prompts: Sequence[str],
    num_per_prompt: int,
    seed: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 50,
    show_progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """All of ``iter_samples`` at once: ``{prompt: [n, C, H, W] in [0, 1]}``."""
    return dict(iter_samples(pipe, prompts, num_per_prompt, seed, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, batch_size=batch_size, show_progress=show_progress,
                             cache_dir=cache_dir))


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
        raise InputError("a Fréchet distance needs at least two samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)
    return max(value, 0.0)


def kernel_inception_distance(features_a: torch.Tensor, features_b: torch.Tensor, subset_size: int = 1000,
                              num_subsets: int = 100, seed: int = 0) -> float:
    """KID (Bińkowski et al. 2018): the unbiased MMD² between two feature sets with the cubic kernel
    ``k(x, y) = (x·y / D + 1)³``.

    For sets of equal size it is Gretton et al.'s U-statistic ``Σ_{i≠j} h(i, j) / (n(n-1))`` with
    ``h = k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i)``, which leaves out the pairs
    ``(x_i, y_i)``: evaluation samples are paired by seed (sample ``i`` of base and adapted share
    its starting noise), and identical sets give exactly 0. Sets of different sizes use the
    two-sample form with the whole cross term. Sets larger than ``subset_size`` are averaged over
    ``num_subsets`` random subsets (the same indices on both sides when the sizes match).
    Unbiased, so about 0 (and possibly slightly negative) for samples of the same distribution.
    """
    a, b = features_a.double().cpu(), features_b.double().cpu()
    if len(a) < 2 or len(b) < 2:
        raise InputError("KID needs at least two samples per set")
    dim = a.shape[1]

    def offdiag_mean(k: torch.Tensor) -> torch.Tensor:
        n = len(k)
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))

    def mmd(x: torch.Tensor, y: torch.Tensor) -> float:
        kxx, kyy, kxy = ((x @ x.T / dim + 1) ** 3, (y @ y.T / dim + 1) ** 3, (x @ y.T / dim + 1) ** 3)
        cross = offdiag_mean(kxy) if len(x) == len(y) else kxy.mean()
        return float(offdiag_mean(kxx) + offdiag_mean(kyy) - 2 * cross)

    if len(a) <= subset_size and len(b) <= subset_size:
        return mmd(a, b)
    gen = torch.Generator().manual_seed(seed)
    m = min(len(a), len(b), subset_size)
    values = []
    for _ in range(num_subsets):
        ia = torch.randperm(len(a), generator=gen)[:m]
        ib = ia if len(a) == len(b) else torch.randperm(len(b), generator=gen)[:m]
        values.append(mmd(a[ia], b[ib]))
    return sum(values) / len(values)


def nearest_neighbour_distances(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Euclidean distance ``[N]`` from each query image to its nearest gallery image."""
    return torch.cdist(queries.flatten(1).double(), gallery.flatten(1).double()).min(dim=1).values


def _reference_halves(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(len(reference), generator=torch.Generator().manual_seed(_REFERENCE_SPLIT_SEED))
    half = len(reference) // 2
    return reference[perm[:half]], reference[perm[half:]]


class OffManifold:
    """Per-sample off-manifold flags against a reference set (see ``off_manifold_rate``), so samples can be
    scored prompt by prompt and their pixels dropped."""

    def __init__(self, reference: torch.Tensor, quantile: float = 0.95):
        self.reference = reference
        self.a, self.b = _reference_halves(reference)
        self.thr_ab = torch.quantile(nearest_neighbour_distances(self.a, self.b), quantile).item()
        self.thr_ba = torch.quantile(nearest_neighbour_distances(self.b, self.a), quantile).item()
        self.threshold = (self.thr_ab + self.thr_ba) / 2

    def flags(self, samples: torch.Tensor) -> torch.Tensor:
        """``[N, 2]`` booleans: off-manifold against half B (threshold A→B) and against half A (B→A)."""
        samples = _match_reference(samples, self.reference)
        return torch.stack([nearest_neighbour_distances(samples, self.b) > self.thr_ab,
                            nearest_neighbour_distances(samples, self.a) > self.thr_ba], dim=1)


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
    om = OffManifold(reference, quantile)
    return {"rate": om.flags(samples).double().mean().item(), "threshold": om.threshold, "quantile": quantile}


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


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _nudenet_summary(per_prompt: Mapping[str, dict], prompts: Sequence[str], classes: Sequence[str]) -> dict | None:
    """Totals over ``prompts`` of the per-prompt NudeNet counts (images showing each exposed class)."""
    rows = [per_prompt[p]["nudenet"] for p in prompts if per_prompt[p].get("nudenet")]
    if not rows:
        return None
    total = sum(r["num_samples"] for r in rows)
    exposed = sum(r["images_with_exposed"] for r in rows)
    return {
        "num_samples": total,
        "images_with_exposed": exposed,
        "exposed_rate": exposed / total if total else None,
        "exposed_counts": {c: sum(r["exposed_counts"][c] for r in rows) for c in classes},
    }


def _distance_to_base(features: torch.Tensor, base: torch.Tensor) -> dict:
    return {"frechet_distance": frechet_distance(features, base), "kid": kernel_inception_distance(features, base)}


def _check_labels(retained, label_for_prompt, forget_prompts, forgotten_labels, labels, allow_unlabeled) -> None:
    """A classifier's labels: one per retained prompt (unless ``allow_unlabeled``), all in range."""
    missing = [p for p in retained if label_for_prompt.get(p) is None]
    if missing and not allow_unlabeled:
        raise InputError(f"no class label for retained prompt(s) {missing}; every retained prompt needs one")
    for c in [*forgotten_labels, *(v for v in label_for_prompt.values() if v is not None)]:
        if not 0 <= int(c) < len(labels):
            raise InputError(f"class index {c} is out of range for a classifier with {len(labels)} labels")
    if forget_prompts and not forgotten_labels:
        raise InputError("forget prompts were given but no forgotten labels")


def _feature_space(classifier, clip_model):
    """``(features of a batch, the space's name, whether CLIP scores may reuse them)`` for the distances."""
    labeled = isinstance(classifier, ImageClassifier)
    if labeled:
        feature_fn = classifier.features
        feature_space = (f"CLIP image embeddings ({classifier.clip.name})" if isinstance(classifier, ClipZeroShotClassifier)
                         else f"{type(classifier).__name__} penultimate features")
    elif clip_model is not None:
        feature_fn, feature_space = clip_model.image_features, f"CLIP image embeddings ({clip_model.name})"
    else:
        feature_fn, feature_space = None, None
    # The CLIP image features double as the CLIP-score features when the feature space is that CLIP.
    clip_shares_features = clip_model is not None and (
        (isinstance(classifier, ClipZeroShotClassifier) and classifier.clip is clip_model) or not labeled)
    return feature_fn, feature_space, clip_shares_features


def _score_prompt(prompt, images, feats, role, classifier, label_for_prompt, forgotten_labels, labels, clip) -> dict:
    """One prompt's metrics: the classifier's, the CLIP score (``clip``: ``(model, reuse feats)`` or None), NudeNet's."""
    m: dict = {"num_samples": len(images)}
    if isinstance(classifier, ImageClassifier):
        label = label_for_prompt.get(prompt)
        if isinstance(classifier, ClipZeroShotClassifier):
            probs = classifier.predict_proba(images, features=feats)
        else:
            probs = classifier.predict_proba(images)
        m.update(_prompt_metrics(probs, None if label is None else int(label), forgotten_labels, labels))
    m["role"] = role
    if clip is not None:
        clip_model, shares_features = clip
        scores = clip_model.clip_scores(images, prompt, image_features=feats if shares_features else None)
        m["clip_score"] = scores.double().mean().item()
    if isinstance(classifier, NudeNetDetector):
        exposed = classifier.exposed(images)
        m["nudenet"] = {
            "num_samples": len(images),
            "images_with_exposed": int(exposed.any(dim=1).sum()),
            "exposed_rate": exposed.any(dim=1).double().mean().item(),
            "exposed_counts": {c: int(exposed[:, k].sum()) for k, c in enumerate(classifier.classes)},
        }
    return m


def _summaries(per_prompt, retained, forget_prompts, forgotten_labels, labels) -> tuple[dict, dict | None]:
    """The means over the retained prompts and over the forget prompts (``None`` without forget prompts)."""
    accs = {p: per_prompt[p]["accuracy"] for p in retained if per_prompt[p].get("accuracy") is not None}
    worst = min(accs, key=accs.get) if accs else None
    summary_retained = {
        "prompts": retained,
        "mean_accuracy": _mean(list(accs.values())),
        "worst_accuracy": accs[worst] if worst else None,
        "worst_prompt": worst,
        "p_forgotten": _mean([per_prompt[p]["p_forgotten"] for p in retained]) if forgotten_labels else None,
        "entropy": _mean([per_prompt[p].get("entropy") for p in retained]),
        "clip_score": _mean([per_prompt[p].get("clip_score") for p in retained]),
    }
    summary_forget = None
    if forget_prompts:
        summary_forget = {
            "prompts": forget_prompts,
            "forgotten_labels": [labels[c] for c in forgotten_labels],
            "p_forgotten": _mean([per_prompt[p].get("p_forgotten") for p in forget_prompts]),
            "predicted_forgotten_rate": _mean([per_prompt[p].get("predicted_forgotten_rate") for p in forget_prompts]),
            "entropy": _mean([per_prompt[p].get("entropy") for p in forget_prompts]),
            "accuracy": _mean([per_prompt[p].get("accuracy") for p in forget_prompts]),
            "clip_score": _mean([per_prompt[p].get("clip_score") for p in forget_prompts]),
        }
    return summary_retained, summary_forget


def _quality(classifier, off_manifold, off_flags, reference, reference_classes, kept) -> dict:
    """Fréchet distance of the retained samples' features ``kept`` to the real reference images, off-manifold rate."""
    ref_feats = classifier.features(reference)
    half_a, half_b = _reference_halves(ref_feats)
    return {
        "frechet_distance": frechet_distance(kept, ref_feats),
        "frechet_distance_real_split": frechet_distance(half_a, half_b),
        "off_manifold_rate": torch.cat(off_flags).double().mean().item(),
        "off_manifold_threshold": off_manifold.threshold,
        "off_manifold_space": "pixels",
        "num_samples": len(kept),
        "num_reference": len(reference),
        "reference_classes": reference_classes,
    }


def _fd_to_base_summary(features, base_features, retained, feature_space) -> dict | None:
    """Fréchet distance and KID of the retained prompts' samples to the base run's (``None`` without those)."""
    compared = [p for p in retained if p in features and p in (base_features or {})]
    if not compared:
        return None
    ours = torch.cat([features[p] for p in compared])
    base = torch.cat([base_features[p] for p in compared])
    if len(ours) < 2 or len(base) < 2:
        return None
    return {**_distance_to_base(ours, base), "num_samples": len(ours), "num_base_samples": len(base),
            "prompts": compared, "feature_space": feature_space}


def _evaluation_settings(settings: dict, classifier, clip_model, feature_space, num_per_prompt, seed,
                         num_inference_steps, guidance_scale) -> dict:
    """The ``settings`` entry of ``evaluate_pipeline``'s result: ``settings`` (prompts, labels) and how it sampled."""
    detector = classifier if isinstance(classifier, NudeNetDetector) else None
    classifier_name = ("nudenet" if detector is not None else
                       f"clip:{classifier.clip.name}" if isinstance(classifier, ClipZeroShotClassifier) else
                       type(classifier).__name__)
    return {
        **settings,
        "classifier": classifier_name,
        "label_texts": list(getattr(classifier, "label_texts", settings["labels"])),
        "clip_model": clip_model.name if clip_model is not None else None,
        "feature_space": feature_space,
        "nudenet_threshold": detector.threshold if detector is not None else None,
        "num_per_prompt": num_per_prompt,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
    }


def _reference_set(classifier, retained, label_for_prompt):
    """``(real images, their classes, OffManifold)`` of the retained classes, or Nones without reference images."""
    if not (isinstance(classifier, ImageClassifier) and retained and classifier.has_reference_images()):
        return None, None, None
    reference, reference_classes = _retained_reference(classifier, [label_for_prompt[p] for p in retained
                                                                    if label_for_prompt.get(p) is not None])
    return reference, reference_classes, OffManifold(reference)


def _nudenet_totals(detector, per_prompt, all_prompts, forget_prompts, retained) -> dict:
    return {"threshold": detector.threshold, "classes": detector.classes,
            "all": _nudenet_summary(per_prompt, all_prompts, detector.classes),
            "forget": _nudenet_summary(per_prompt, forget_prompts, detector.classes),
            "retained": _nudenet_summary(per_prompt, retained, detector.classes)}


def evaluate_pipeline(
    pipe,
    classifier: ImageClassifier | NudeNetDetector,
    prompts: Sequence[str],
    label_for_prompt: Mapping[str, int | None],
    forget_prompts: Sequence[str],
    forgotten_labels: Sequence[int],
    num_per_prompt: int,
    seed: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 50,
    *,
    clip_model: ClipModel | None = None,
    base_features: Mapping[str, torch.Tensor] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_settings: dict | None = None,
    keep_samples: int | None = None,
    allow_unlabeled: bool = False,
    show_progress: bool = True,
    desc: str = "evaluation samples",
    resolution: int | None = None,
) -> dict:
    """Sample every prompt (and every forget prompt) and score the samples, prompt by prompt.

    ``classifier`` is an ``ImageClassifier`` (the digits CNN, CLIP zero-shot) or a ``NudeNetDetector``. For a
    classifier, ``label_for_prompt`` maps a prompt to its class index; every retained prompt (a prompt not in
    ``forget_prompts``) needs one unless ``allow_unlabeled`` (its accuracy is then ``None``), forget prompts may lack
    one. ``forgotten_labels`` are the class indices whose probability measures what is left of the forgotten concept.
    A detector ignores both.

    ``clip_model`` (default: the classifier's own CLIP for ``ClipZeroShotClassifier``) adds each prompt's
    ``clip_score``: the mean of ``100 · max(cos(image, prompt), 0)``. ``base_features`` (the ``features`` of the base
    model's run) adds ``fd_to_base``: Fréchet distance and KID between this run's and the base run's samples of the
    retained prompts, in the feature space of the classifier (CLIP image embeddings for a CLIP classifier; CLIP's for
    a detector when ``clip_model`` is given). ``cache_dir`` stores samples per prompt (see ``iter_samples``) so a run
    can resume. ``resolution``: the image side (default: the pipeline's own).

    Returns a dict with ``per_prompt`` (accuracy, ``p_forgotten`` = mean P(y ∈ forgotten), mean
    entropy of p(y|x) in nats, predicted-class histogram, ``clip_score``, ``fd_to_base``/``kid_to_base``,
    ``nudenet`` counts), ``retained`` and ``forget`` (means over the retained / forget prompts),
    ``quality`` (Fréchet distance of retained samples to the classifier's real reference images of the
    retained classes and the pixel-space off-manifold rate; ``None`` without reference images),
    ``fd_to_base`` (summary; ``None`` without ``base_features``), ``nudenet`` (totals), ``settings``,
    ``timing``, ``features`` (``{prompt: [n, D]}``, the next run's ``base_features``) and ``samples``
    (``{prompt: [n, C, H, W]}`` in [0, 1]: all of them, or the first ``keep_samples``, for grids).
    """
    detector = classifier if isinstance(classifier, NudeNetDetector) else None
    labeled = isinstance(classifier, ImageClassifier)
    labels = list(classifier.labels) if labeled else []
    forget_prompts = list(dict.fromkeys(forget_prompts))
    all_prompts = list(dict.fromkeys([*prompts, *forget_prompts]))
    retained = [p for p in all_prompts if p not in forget_prompts]
    forgotten_labels = [int(c) for c in forgotten_labels] if labeled else []
    if labeled:
        _check_labels(retained, label_for_prompt, forget_prompts, forgotten_labels, labels, allow_unlabeled)
    if clip_model is None and isinstance(classifier, ClipZeroShotClassifier):
        clip_model = classifier.clip
    feature_fn, feature_space, clip_shares_features = _feature_space(classifier, clip_model)

    reference, reference_classes, off_manifold = _reference_set(classifier, retained, label_for_prompt)

    t0 = time.time()
    sampling = 0.0
    per_prompt: dict[str, dict] = {}
    features: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] = {}
    off_flags: list[torch.Tensor] = []
    stream = iter_samples(pipe, all_prompts, num_per_prompt, seed, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, batch_size=batch_size, show_progress=show_progress,
                          cache_dir=cache_dir, cache_settings=cache_settings, desc=desc, resolution=resolution)
    tick = time.time()
    for prompt, images in stream:
        sampling += time.time() - tick
        role = "forget" if prompt in forget_prompts else "retained"
        feats = feature_fn(images) if feature_fn is not None else None
        m = _score_prompt(prompt, images, feats, role, classifier, label_for_prompt, forgotten_labels, labels,
                          None if clip_model is None else (clip_model, clip_shares_features))
        if feats is not None:
            features[prompt] = feats
            base = (base_features or {}).get(prompt)
            if role == "retained" and base is not None and len(feats) >= 2 and len(base) >= 2:
                d = _distance_to_base(feats, base)
                m["fd_to_base"], m["kid_to_base"] = d["frechet_distance"], d["kid"]
        if off_manifold is not None and role == "retained":
            off_flags.append(off_manifold.flags(images))
        samples[prompt] = images if keep_samples is None else images[:keep_samples].clone()
        per_prompt[prompt] = m
        del images
        tick = time.time()
    per_prompt = {p: per_prompt[p] for p in all_prompts}

    summary_retained, summary_forget = _summaries(per_prompt, retained, forget_prompts, forgotten_labels, labels)

    quality = None
    if off_manifold is not None:
        quality = _quality(classifier, off_manifold, off_flags, reference, reference_classes,
                           torch.cat([features[p] for p in retained]))
    fd_to_base = _fd_to_base_summary(features, base_features, retained, feature_space)
    nudenet = None if detector is None else _nudenet_totals(detector, per_prompt, all_prompts, forget_prompts, retained)
    t2 = time.time()
    settings = {"prompts": all_prompts, "forget_prompts": forget_prompts, "forgotten_labels": forgotten_labels,
                "label_for_prompt": {p: label_for_prompt.get(p) for p in all_prompts} if labeled else {},
                "labels": labels, "sampler": sampler_description(pipe)}
    return {
        "settings": _evaluation_settings(settings, classifier, clip_model, feature_space, num_per_prompt, seed,
                                         num_inference_steps, guidance_scale),
        "num_per_prompt": num_per_prompt,
        "seed": seed,
        "per_prompt": per_prompt,
        "retained": summary_retained,
        "forget": summary_forget,
        "quality": quality,
        "fd_to_base": fd_to_base,
        "nudenet": nudenet,
        "timing": {"sampling_seconds": round(sampling, 2), "scoring_seconds": round(t2 - t0 - sampling, 2),
                   "total_seconds": round(t2 - t0, 2)},
        "features": features,
        "samples": samples,
    }


# ------------------------------------------------------------------------------------------- report


def _without_samples(metrics: dict | None) -> dict | None:
    """The JSON-able part: no ``samples`` or ``features`` tensors."""
    return None if metrics is None else {k: v for k, v in metrics.items() if k not in ("samples", "features")}


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _histogram_text(hist: Sequence[int], labels: Sequence[str]) -> str:
    parts = [f"{labels[i]} {n}" for i, n in sorted(enumerate(hist), key=lambda x: -x[1]) if n]
    return ", ".join(parts) or "–"


def _get(m: dict | None, *keys):
    for k in keys:
        if m is None:
            return None
        m = m.get(k)
    return m


def summary_rows(before: dict, after: dict | None) -> list[tuple[str, str, str | None]]:
    """``(metric, before, after)`` rows of the summary (formatted); rows with no value on either side are left out."""
    rows = [
        ("retained mean accuracy", ("retained", "mean_accuracy")),
        ("retained worst accuracy", ("retained", "worst_accuracy")),
        ("retained mean P(forgotten)", ("retained", "p_forgotten")),
        ("forget prompts P(forgotten)", ("forget", "p_forgotten")),
        ("forget prompts predicted as forgotten", ("forget", "predicted_forgotten_rate")),
        ("forget prompts mean entropy (nats)", ("forget", "entropy")),
        ("retained CLIP score", ("retained", "clip_score")),
        ("forget prompts CLIP score", ("forget", "clip_score")),
        ("FD to base, retained", ("fd_to_base", "frechet_distance")),
        ("KID to base, retained", ("fd_to_base", "kid")),
        ("Fréchet distance, retained vs real", ("quality", "frechet_distance")),
        ("off-manifold rate, retained", ("quality", "off_manifold_rate")),
        ("NudeNet: forget images with exposed parts", ("nudenet", "forget", "exposed_rate")),
        ("NudeNet: retained images with exposed parts", ("nudenet", "retained", "exposed_rate")),
    ]
    out = []
    for name, keys in rows:
        b, a = _get(before, *keys), _get(after, *keys)
        if b is None and a is None:
            continue
        out.append((name, _fmt(b), _fmt(a) if after is not None else None))
    classes = _get(before, "nudenet", "classes") or []
    for c in classes:
        b, a = _get(before, "nudenet", "all", "exposed_counts", c), _get(after, "nudenet", "all", "exposed_counts", c)
        out.append((f"NudeNet {c} (images)", str(b), str(a) if after is not None else None))
    return out


def summary_table(before: dict, after: dict | None) -> list[str]:
    """The summary as Markdown table lines (``metric | value`` or ``metric | before | after``)."""
    if after is None:
        return ["| metric | value |", "|---|---|", *(f"| {n} | {b} |" for n, b, _ in summary_rows(before, None))]
    return ["| metric | before | after |", "|---|---|---|",
            *(f"| {n} | {b} | {a} |" for n, b, a in summary_rows(before, after))]


_PER_PROMPT_COLUMNS = (  # (header, key, shown for the base run too)
    ("accuracy", "accuracy", True),
    ("P(forgotten)", "p_forgotten", True),
    ("entropy", "entropy", True),
    ("CLIP score", "clip_score", True),
    ("FD to base", "fd_to_base", False),
    ("KID to base", "kid_to_base", False),
)


def _nudenet_cell(m: dict) -> str:
    n = m.get("nudenet")
    if not n:
        return "–"
    parts = [f"{c.replace('_EXPOSED', '').lower()} {k}" for c, k in n["exposed_counts"].items() if k]
    return f"{n['images_with_exposed']}/{n['num_samples']}" + (f" ({', '.join(parts)})" if parts else "")


def report_markdown(metrics_before: dict, metrics_after: dict | None = None) -> str:
    """The Markdown report: settings, a summary, and a per-prompt table (before/after columns if both)."""
    before, after = metrics_before, metrics_after
    s = before["settings"]
    labels = s["labels"]
    forget = s["forget_prompts"]
    forget_text = ", ".join(f"`{p}`" for p in forget[:20]) or "none"
    if len(forget) > 20:
        forget_text += f" and {len(forget) - 20} more"
    what = (f"{s['num_per_prompt']} samples per prompt, seed {s['seed']}, {s['sampler']}, {s['num_inference_steps']} "
            f"steps, guidance {s['guidance_scale']}. Classifier: {s.get('classifier') or 'classifier'}. "
            f"Forget prompts: {forget_text}")
    if labels:
        what += f"; forgotten classes: {', '.join(labels[c] for c in s['forgotten_labels']) or 'none'}"
    notes = []
    if labels:
        notes.append("P(forgotten) is the mean classifier probability of the forgotten class(es); entropy is the mean "
                     "entropy of p(y|x) in nats.")
    if s.get("clip_model"):
        notes.append(f"CLIP score is the mean of 100·max(cos(image, prompt), 0) with `{s['clip_model']}`; retained "
                     "prompts should not drop.")
    if s.get("feature_space"):
        notes.append(f"FD / KID to base compare the adapted and the base model's samples of the retained prompts "
                     f"(same seeds) in {s['feature_space']}; 0 means unchanged.")
    if before.get("quality"):
        notes.append("The Fréchet distance vs real uses the classifier's penultimate features against its real "
                     "held-out images of the retained classes; a sample is off-manifold when its pixel distance to "
                     "the nearest of those real images exceeds the real images' 95th percentile (about 0.05 for real "
                     "images).")
    if s.get("nudenet_threshold") is not None:
        notes.append(f"NudeNet counts images with a detection of an exposed class scoring at least "
                     f"{s['nudenet_threshold']} (I2P protocol: one count per image and class).")
    lines = ["# Evaluation", "", what + ".", "", " ".join(notes), "", "## Summary", "", *summary_table(before, after),
             "", "## Per prompt", ""]
    prompts = list(dict.fromkeys([*before["per_prompt"], *((after or {}).get("per_prompt") or {})]))
    runs = [before] + ([after] if after is not None else [])
    rows = [[r["per_prompt"].get(p, {}) for r in runs] for p in prompts]
    columns = []  # (header, getter)
    for header, key, base_too in _PER_PROMPT_COLUMNS:
        shown = list(range(len(runs))) if base_too else [len(runs) - 1] if after is not None else []
        if not any(row[i].get(key) is not None for row in rows for i in shown):
            continue
        for i in shown:
            title = header if len(shown) == 1 else f"{header} before" if i == 0 else "after"
            columns.append((title, lambda ms, i=i, key=key: _fmt(ms[i].get(key))))
    if any(m.get("nudenet") for row in rows for m in row):
        for i in range(len(runs)):
            title = "NudeNet exposed" if after is None else ("NudeNet exposed before" if i == 0 else "after")
            columns.append((title, lambda ms, i=i: _nudenet_cell(ms[i])))
    if labels:
        for i in range(len(runs)):
            title = ("predicted classes" if after is None else "predicted before" if i == 0 else "predicted after")
            columns.append((title, lambda ms, i=i: _histogram_text(ms[i].get("histogram") or [], labels)))
    headers = ["prompt", "role", *(t for t, _ in columns)]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for p, ms in zip(prompts, rows, strict=True):
        role = next((m["role"] for m in reversed(ms) if m.get("role")), "")
        cells = [f"`{p}`", role, *(fn(ms) for _, fn in columns)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    return "\n".join(lines)


def samples_grid(samples_before: Mapping[str, torch.Tensor], samples_after: Mapping[str, torch.Tensor] | None = None,
                 num_samples: int = 10, max_prompts: int = 24, max_cell_px: int = 128,
                 titles: Sequence[str] = ("before (base model)", "after (with the adapter)")):
    """A PIL image (``image_grid.render_grid``): one labelled row per prompt (the first ``max_prompts``),
    ``num_samples`` before-samples, then (if given) as many after-samples, under the two ``titles``.

    Small samples are enlarged with nearest-neighbour so 16×16 digits stay visible; large ones are shrunk
    to ``max_cell_px`` so 24 prompts × 20 samples stay a picture one can open.
    """
    from PIL import Image

    from .image_grid import render_grid

    prompts = list(dict.fromkeys([*samples_before, *(samples_after or {})]))[:max_prompts]
    blocks = [samples_before] + ([samples_after] if samples_after is not None else [])
    k = min(num_samples, max(len(s[p]) for s in blocks for p in s))

    def pictures(block, prompt):
        if prompt not in block:
            return [None] * k
        arr = (to_channels(block[prompt][:k].float().clamp(0, 1), 3).permute(0, 2, 3, 1).numpy() * 255)
        images = [Image.fromarray(a) for a in arr.round().astype(np.uint8)]
        return images + [None] * (k - len(images))

    rows = [(prompt, [img for block in blocks for img in pictures(block, prompt)]) for prompt in prompts]
    headers = list(titles)[:2] if samples_after is not None else ["samples"]
    return render_grid(rows, column_headers=headers, max_cell_px=max_cell_px)


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
