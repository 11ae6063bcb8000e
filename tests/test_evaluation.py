"""Sampling, metrics, the evaluation report and the ``evaluate`` subcommand."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from sa_peft import before_after
from sa_peft.classifier import ImageClassifier, load_classifier
from sa_peft.commands import evaluate as evaluate_command
from sa_peft.evaluation import (
    evaluate_pipeline,
    frechet_distance,
    generate_samples,
    off_manifold_rate,
    write_evaluation_report,
)
from sa_peft.merge import stack_forget_loras
from sa_peft.models import load_pipeline

PROMPTS = ["a handwritten digit zero", "a handwritten digit one", "a handwritten digit seven"]
FAST = {"num_inference_steps": 5, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("builtin:digits")


@pytest.fixture(scope="module")
def classifier():
    return load_classifier("builtin:digits-classifier")


def test_frechet_distance_real_vs_real_small_noise_vs_real_large(classifier):
    ref = classifier.reference_images()
    half = len(ref) // 2
    real = frechet_distance(classifier.features(ref[:half]), classifier.features(ref[half:]))
    noise = frechet_distance(classifier.features(torch.rand(half, 1, 16, 16)), classifier.features(ref[half:]))
    assert frechet_distance(classifier.features(ref), classifier.features(ref)) == pytest.approx(0.0, abs=1e-6)
    assert noise > 10 * real
    assert real < 0.2 * noise


def test_frechet_distance_matches_closed_form_for_gaussians():
    torch.manual_seed(0)
    a = torch.randn(4000, 3)
    b = torch.randn(4000, 3) * 2 + 1  # mean shift 1 per dim, std 2: FD = 3 + 3 * (1 + 4 - 2 * 2) = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.1)


def _closed_form_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID's formula on the sample statistics, with tr sqrt(S_a S_b) from the (real, non-negative)
    eigenvalues of the non-symmetric product S_a S_b: an independent route to the same number."""
    a, b = a.double().numpy(), b.double().numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(cov_a @ cov_b)
    assert np.abs(eig.imag).max() < 1e-8 and eig.real.min() > 0
    tr_covmean = np.sqrt(eig.real).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def test_frechet_distance_with_non_identity_non_commuting_covariances():
    gen = torch.Generator().manual_seed(1)
    mix_a = torch.tensor([[2.0, 0.3, 0.0], [0.0, 0.5, 0.0], [0.4, 0.0, 1.5]])
    mix_b = torch.tensor([[1.0, 0.0, 0.8], [0.6, 1.2, 0.0], [0.0, 0.0, 0.7]])
    a = torch.randn(500, 3, generator=gen) @ mix_a
    b = torch.randn(500, 3, generator=gen) @ mix_b + torch.tensor([0.5, -0.2, 0.1])
    cov_a, cov_b = np.cov(a.double().numpy(), rowvar=False), np.cov(b.double().numpy(), rowvar=False)
    assert np.abs(cov_a @ cov_b - cov_b @ cov_a).max() > 0.5  # the covariances do not commute
    expected = _closed_form_frechet(a, b)
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)  # symmetric in its arguments
    # Scaling both sets by 2 scales every term of the distance by 4.
    assert frechet_distance(2 * a, 2 * b) == pytest.approx(4 * expected, rel=1e-9)


def test_frechet_distance_of_isotropic_gaussians_with_different_scales():
    # N(0, 4I) vs N(0, I) in 3 dims: 3 * (4 + 1 - 2 * 2) = 3 (with cov_a = I a lost square root would not show)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(20000, 3, generator=gen) * 2
    b = torch.randn(20000, 3, generator=gen)
    assert frechet_distance(a, b) == pytest.approx(3.0, rel=0.05)
    assert frechet_distance(b, a) == pytest.approx(3.0, rel=0.05)


def test_off_manifold_rate_real_about_five_percent_noise_all(classifier):
    ref = classifier.reference_images()
    real = off_manifold_rate(ref[:120], ref)
    assert real["rate"] <= 0.2
    assert off_manifold_rate(torch.rand(50, 1, 16, 16), ref)["rate"] == 1.0
    # Colour and size are matched to the reference before measuring.
    assert off_manifold_rate(torch.rand(5, 3, 32, 32), ref)["rate"] == 1.0


def test_generate_samples_deterministic_and_batch_size_free(pipe):
    scheduler = pipe.scheduler
    a = generate_samples(pipe, PROMPTS[:2], 3, seed=1, batch_size=3, **FAST)
    b = generate_samples(pipe, PROMPTS[:2], 3, seed=1, batch_size=2, **FAST)
    c = generate_samples(pipe, PROMPTS[:1], 3, seed=2, batch_size=3, **FAST)
    assert pipe.scheduler is scheduler  # restored
    assert list(a) == PROMPTS[:2]
    assert a[PROMPTS[0]].shape == (3, 1, 16, 16)
    assert 0 <= a[PROMPTS[0]].min() and a[PROMPTS[0]].max() <= 1
    for p in a:
        assert torch.allclose(a[p], b[p], atol=1e-5)
    assert not torch.allclose(a[PROMPTS[0]], c[PROMPTS[0]])


@pytest.fixture(scope="module")
def metrics(pipe, classifier):
    labels = {p: classifier.labels.index(p.split()[-1]) for p in PROMPTS}
    return evaluate_pipeline(pipe, classifier, PROMPTS[1:], labels, [PROMPTS[0]], [0], num_per_prompt=4, seed=0,
                             batch_size=4, **FAST)


def test_evaluate_pipeline_metrics(metrics):
    assert list(metrics["per_prompt"]) == [*PROMPTS[1:], PROMPTS[0]]
    zero = metrics["per_prompt"][PROMPTS[0]]
    assert zero["role"] == "forget" and zero["label"] == 0
    assert len(zero["histogram"]) == 10 and sum(zero["histogram"]) == 4
    for m in metrics["per_prompt"].values():
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["p_forgotten"] <= 1
        assert 0 <= m["entropy"] <= torch.log(torch.tensor(10.0)).item() + 1e-6
    assert metrics["retained"]["prompts"] == PROMPTS[1:]
    assert metrics["retained"]["worst_accuracy"] <= metrics["retained"]["mean_accuracy"]
    assert metrics["forget"]["forgotten_labels"] == ["zero"]
    q = metrics["quality"]
    assert q["num_samples"] == 8 and q["frechet_distance"] >= 0 and 0 <= q["off_manifold_rate"] <= 1
    # Retained samples are compared with real images of the retained classes only.
    assert q["reference_classes"] == ["one", "seven"] and q["num_reference"] < 100
    assert set(metrics["samples"]) == set(PROMPTS)
    assert metrics["samples"][PROMPTS[1]].shape == (4, 1, 16, 16)


def test_evaluate_pipeline_requires_labels_for_retained_prompts(pipe, classifier):
    with pytest.raises(ValueError, match="no class label"):
        evaluate_pipeline(pipe, classifier, PROMPTS, {}, [], [], num_per_prompt=1, seed=0, **FAST)


def test_write_evaluation_report(metrics, tmp_path):
    paths = write_evaluation_report(metrics, metrics, tmp_path)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert set(data) == {"before", "after"} and "samples" not in data["before"]
    report = (tmp_path / "report.md").read_text()
    assert "accuracy before" in report and "a handwritten digit seven" in report
    from PIL import Image

    grid = Image.open(paths["grid"])
    assert grid.size[1] >= 3 * 16 and grid.size[0] > 2 * 4 * 16
    only = write_evaluation_report(metrics, None, tmp_path / "single")
    with open(only["report"]) as f:
        assert "| prompt | role | accuracy |" in f.read()
    assert not list(tmp_path.glob(".tmp-*"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    evaluate_command.register(parser.add_subparsers(dest="command"))
    return parser


def _save_random_lora(folder) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    lora_pipe = load_pipeline("builtin:digits")
    torch.manual_seed(0)
    lora_pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                          target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(lora_pipe.unet),
                                              safe_serialization=True)


def test_evaluate_command_with_lora(tmp_path):
    lora = tmp_path / "lora"
    _save_random_lora(lora)
    out = tmp_path / "eval"
    args = _parser().parse_args([
        "evaluate", "--prompt", PROMPTS[1], "--prompt", PROMPTS[2], "--forget_prompt", PROMPTS[0],
        "--lora", str(lora), "--lora_weight", "1.0", "--num_images_per_prompt", "2", "--num_inference_steps", "3",
        "--output_dir", str(out), "--device", "cpu",
    ])
    result = args.func(args)
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file() and (out / "samples_grid.png").is_file()
    before, after = result["before"], result["after"]
    assert before["settings"]["forgotten_labels"] == [0]
    assert not torch.allclose(before["samples"][PROMPTS[1]], after["samples"][PROMPTS[1]])
    assert "| before | after |" in (out / "report.md").read_text()


def test_evaluate_command_label_resolution_and_errors(tmp_path):
    labels = [f"c{i}" for i in range(3)]
    mapping, forgotten = before_after.resolve_labels(["x c1", "y"], ["c1", "2"], ["z c0"], None, labels)
    assert mapping == {"x c1": 1, "y": 2, "z c0": 0} and forgotten == [0]
    with pytest.raises(ValueError, match="`label`"):
        before_after.resolve_labels(["a photo of a cat"], None, [], None, labels)
    with pytest.raises(ValueError, match="one per prompt"):
        before_after.resolve_labels(["x c1", "y c2"], ["c1"], [], None, labels)
    with pytest.raises(ValueError, match="`forget_label`"):
        before_after.resolve_labels(["x c1"], None, ["brad pitt"], None, labels)
    _, forgotten = before_after.resolve_labels(["x c1"], None, ["brad pitt"], ["c2"], labels)
    assert forgotten == [2]
    bad = tmp_path / "lora.bin"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors"):
        stack_forget_loras(None, [str(bad)], [])
    with pytest.raises(FileNotFoundError):
        stack_forget_loras(None, [str(tmp_path / "missing")], [])
    with pytest.raises(ValueError, match="`lora_weight`"):
        stack_forget_loras(None, [str(bad)], [1.0, 2.0])


class ScriptedClassifier(ImageClassifier):
    """Returns the given probabilities, one tensor per ``predict_proba`` call, in call order."""

    def __init__(self, scripted):
        self.labels = ["zero", "one", "two"]
        self.scripted = list(scripted)
        self.seen = []

    def predict_proba(self, images):
        self.seen.append(images.shape)
        return self.scripted.pop(0)

    def features(self, images):
        # Only fd_to_base needs features (not asked for here); a fixed embedding keeps that path alive.
        return images.flatten(1)[:, :4].float()


def _one_hot_probs(preds, num_classes=3, confidence=0.8):
    probs = torch.full((len(preds), num_classes), (1 - confidence) / (num_classes - 1))
    probs[torch.arange(len(preds)), torch.tensor(preds)] = confidence
    return probs


def test_per_prompt_accuracy_and_summaries_match_hand_counts():
    from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

    cat, car, dog = "a photo of a cat", "a red car", "a dog"
    # cat is class one: 3 of 4 right; car is class two: 1 of 4 right; dog (forgotten, class zero): 3 of 4 predicted zero
    preds = {cat: [1, 1, 1, 0], car: [2, 0, 0, 1], dog: [0, 0, 2, 0]}
    classifier = ScriptedClassifier(_one_hot_probs(preds[p]) for p in (cat, car, dog))
    metrics = evaluate_pipeline(build_tiny_pipeline(), classifier, [cat, car], {cat: 1, car: 2, dog: 0}, [dog], [0],
                                num_per_prompt=4, seed=0, num_inference_steps=2, batch_size=4)
    assert len(classifier.seen) == 3 and all(shape[0] == 4 for shape in classifier.seen)
    per = metrics["per_prompt"]
    assert per[cat]["accuracy"] == pytest.approx(0.75)
    assert per[car]["accuracy"] == pytest.approx(0.25)
    assert per[dog]["accuracy"] == pytest.approx(0.75)
    assert per[cat]["histogram"] == [1, 3, 0] and per[car]["histogram"] == [2, 1, 1] and per[dog]["histogram"] == [3, 0, 1]
    assert per[dog]["predicted_forgotten_rate"] == pytest.approx(0.75)
    # P(zero): 0.8 where zero is predicted, 0.1 elsewhere
    assert per[cat]["p_forgotten"] == pytest.approx((0.8 + 3 * 0.1) / 4)
    assert per[dog]["p_forgotten"] == pytest.approx((3 * 0.8 + 0.1) / 4)
    assert metrics["retained"]["mean_accuracy"] == pytest.approx(0.5)
    assert metrics["retained"]["worst_accuracy"] == pytest.approx(0.25) and metrics["retained"]["worst_prompt"] == car
    assert metrics["forget"]["accuracy"] == pytest.approx(0.75)
    assert metrics["forget"]["predicted_forgotten_rate"] == pytest.approx(0.75)
    assert metrics["quality"] is None  # the classifier has no reference images


def test_quantize_clamps_to_zero_one_and_rounds_to_uint8():
    from sa_peft.evaluation import _quantize

    images = torch.tensor([-0.5, 0.0, 0.2, 0.3, 0.5, 1.0, 1.7])
    out = _quantize(images)
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 0, 51, 76, 128, 255, 255]  # 76.5 and 127.5 round half to even


def test_generate_samples_hands_its_defaults_to_iter_samples(monkeypatch):
    import sa_peft.evaluation as evaluation_module

    calls = []

    def fake(pipe, prompts, num_per_prompt, seed, **kwargs):
        calls.append((pipe, prompts, num_per_prompt, seed, kwargs))
        return iter([(p, torch.zeros(num_per_prompt)) for p in prompts])

    monkeypatch.setattr(evaluation_module, "iter_samples", fake)
    out = evaluation_module.generate_samples("pipe", ["a", "b"], 2, 7)
    assert list(out) == ["a", "b"]
    assert calls.pop() == ("pipe", ["a", "b"], 2, 7, {"num_inference_steps": 25, "guidance_scale": 3.0, "batch_size": 50,
                                                      "show_progress": True, "cache_dir": None})
    evaluation_module.generate_samples("pipe", ["a"], 1, 0, num_inference_steps=3, guidance_scale=1.5, batch_size=4,
                                       show_progress=False, cache_dir="c")
    assert calls.pop()[4] == {"num_inference_steps": 3, "guidance_scale": 1.5, "batch_size": 4, "show_progress": False,
                              "cache_dir": "c"}


def test_off_manifold_rate_reports_rate_threshold_and_quantile():
    from sa_peft.evaluation import OffManifold, off_manifold_rate

    gen = torch.Generator().manual_seed(0)
    reference = torch.rand(40, 1, 4, 4, generator=gen)
    samples = torch.cat([reference[:5], torch.rand(5, 1, 4, 4, generator=gen) * 3])
    om = OffManifold(reference, 0.8)
    out = off_manifold_rate(samples, reference, quantile=0.8)
    assert out == {"rate": om.flags(samples).double().mean().item(), "threshold": om.threshold, "quantile": 0.8}
    assert om.threshold != OffManifold(reference).threshold  # the quantile is used, not the default 0.95


def test_sample_cache_reopens_its_folder(tmp_path):
    from sa_peft.evaluation import SampleCache

    SampleCache(tmp_path / "cache", {"steps": 2})
    SampleCache(tmp_path / "cache", {"steps": 2})  # the folder exists: reused
    SampleCache(tmp_path / "cache")
    with pytest.raises(ValueError, match="holds samples made with other settings"):
        SampleCache(tmp_path / "cache", {"steps": 3})


def test_nudenet_totals_and_report_cell():
    from sa_peft.evaluation import _nudenet_cell, _nudenet_summary

    classes = ["FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED"]
    per_prompt = {
        "a": {"nudenet": {"num_samples": 4, "images_with_exposed": 1,
                          "exposed_counts": {"FEMALE_BREAST_EXPOSED": 1, "BUTTOCKS_EXPOSED": 0}}},
        "b": {"nudenet": {"num_samples": 6, "images_with_exposed": 2,
                          "exposed_counts": {"FEMALE_BREAST_EXPOSED": 0, "BUTTOCKS_EXPOSED": 3}}},
        "c": {},
    }
    summary = _nudenet_summary(per_prompt, ["a", "b", "c"], classes)
    assert summary == {"num_samples": 10, "images_with_exposed": 3, "exposed_rate": 0.3,
                       "exposed_counts": {"FEMALE_BREAST_EXPOSED": 1, "BUTTOCKS_EXPOSED": 3}}
    assert _nudenet_summary(per_prompt, ["a"], classes)["exposed_rate"] == 0.25
    assert _nudenet_summary(per_prompt, ["c"], classes) is None
    empty = {"x": {"nudenet": {"num_samples": 0, "images_with_exposed": 0, "exposed_counts": {c: 0 for c in classes}}}}
    assert _nudenet_summary(empty, ["x"], classes)["exposed_rate"] is None
    assert _nudenet_cell({"nudenet": summary}) == "3/10 (female_breast 1, buttocks 3)"
    assert _nudenet_cell({"nudenet": empty["x"]["nudenet"]}) == "0/0"
    assert _nudenet_cell({}) == "–"


def _kid_by_hand(x, y):
    """Unbiased MMD² with k(u, v) = (u·v / D + 1)³, pair by pair; the cross term skips (x_i, y_i) for equal sizes."""
    d = x.shape[1]

    def k(u, v):
        return (float(u @ v) / d + 1) ** 3

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    if n == m:
        xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m) if i != j) / (n * (n - 1))
    else:
        xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kernel_inception_distance_equals_the_pairwise_u_statistic():
    from sa_peft.evaluation import kernel_inception_distance

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(9, 3, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    assert kernel_inception_distance(a[:5], b[:5]) == pytest.approx(_kid_by_hand(a[:5], b[:5]), rel=1e-12)
    assert kernel_inception_distance(a[:4], b[:6]) == pytest.approx(_kid_by_hand(a[:4], b[:6]), rel=1e-12)
    assert kernel_inception_distance(a.float(), a.float()) == 0.0
    # Larger than subset_size: the mean over num_subsets subsets drawn from the seed, shared when sizes match.
    g = torch.Generator().manual_seed(5)
    shared = [torch.randperm(7, generator=g)[:4] for _ in range(3)]
    expected = sum(_kid_by_hand(a[i], b[:7][i]) for i in shared) / 3
    assert kernel_inception_distance(a, b[:7], subset_size=4, num_subsets=3, seed=5) == pytest.approx(expected, rel=1e-12)
    g = torch.Generator().manual_seed(2)
    pairs = [(torch.randperm(7, generator=g)[:4], torch.randperm(9, generator=g)[:4]) for _ in range(2)]
    expected = sum(_kid_by_hand(a[i], b[j]) for i, j in pairs) / 2
    assert kernel_inception_distance(a, b, subset_size=4, num_subsets=2, seed=2) == pytest.approx(expected, rel=1e-12)
    assert kernel_inception_distance(a[:4], b, subset_size=4, num_subsets=2, seed=2) != pytest.approx(
        kernel_inception_distance(a[:4], b[:4]))  # b alone is larger than the subset size: subsets are drawn
    with pytest.raises(ValueError, match="^KID needs at least two samples per set$"):
        kernel_inception_distance(a[:1], b)
    with pytest.raises(ValueError, match="^KID needs at least two samples per set$"):
        kernel_inception_distance(a, b[:1])



def test_kid_subsets_at_the_size_boundaries():
    """Whole sets while both are at most ``subset_size`` (one equal to it); otherwise subsets of
    ``min(len(a), len(b), subset_size)``, drawn for each side from the seed."""
    import inspect

    from sa_peft.evaluation import kernel_inception_distance

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(9, 3, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    for na, nb in ((4, 3), (3, 4), (4, 4)):
        assert kernel_inception_distance(a[:na], b[:nb], subset_size=4) == pytest.approx(
            _kid_by_hand(a[:na], b[:nb]), rel=1e-12)
    for na, nb in ((4, 9), (3, 9), (9, 3)):
        g = torch.Generator().manual_seed(1)
        m = min(na, nb, 5)
        pairs = [(torch.randperm(na, generator=g)[:m], torch.randperm(nb, generator=g)[:m]) for _ in range(2)]
        expected = sum(_kid_by_hand(a[:na][i], b[:nb][j]) for i, j in pairs) / 2
        assert kernel_inception_distance(a[:na], b[:nb], subset_size=5, num_subsets=2, seed=1) == pytest.approx(
            expected, rel=1e-12)
    # The defaults are the KID protocol's: 100 subsets of 1000, seed 0.
    defaults = {k: p.default for k, p in inspect.signature(kernel_inception_distance).parameters.items()}
    assert (defaults["subset_size"], defaults["num_subsets"], defaults["seed"]) == (1000, 100, 0)


def test_nearest_neighbour_distances_are_euclidean_over_all_channels_and_pixels():
    from sa_peft.evaluation import nearest_neighbour_distances

    gen = torch.Generator().manual_seed(0)
    queries, gallery = torch.rand(5, 3, 4, 4, generator=gen), torch.rand(6, 3, 4, 4, generator=gen)
    by_hand = torch.tensor([min(float((q - g).double().square().sum().sqrt()) for g in gallery) for q in queries],
                           dtype=torch.float64)
    torch.testing.assert_close(nearest_neighbour_distances(queries, gallery), by_hand)


def test_off_manifold_halves_thresholds_and_strict_flags():
    from sa_peft.evaluation import OffManifold, nearest_neighbour_distances

    gen = torch.Generator().manual_seed(1)
    reference = torch.rand(11, 1, 4, 4, generator=gen)
    om = OffManifold(reference, 1.0)  # quantile 1: each threshold is one real image's distance, exactly
    assert (len(om.a), len(om.b)) == (5, 6)
    assert sorted(map(tuple, torch.cat([om.a, om.b]).flatten(1).tolist())) == sorted(map(tuple, reference.flatten(1).tolist()))
    ab, ba = nearest_neighbour_distances(om.a, om.b), nearest_neighbour_distances(om.b, om.a)
    assert (om.thr_ab, om.thr_ba) == (float(ab.max()), float(ba.max()))
    assert om.threshold == pytest.approx((float(ab.max()) + float(ba.max())) / 2, rel=1e-12)
    # The real images farthest from the other half sit exactly on the threshold: not off-manifold (">").
    on_threshold = torch.cat([om.a[ab.argmax()][None], om.b[ba.argmax()][None]])
    far = torch.full((1, 1, 4, 4), 5.0)
    flags = om.flags(torch.cat([on_threshold, far]))
    assert flags.shape == (3, 2)
    assert flags[0, 0].item() is False and flags[1, 1].item() is False and flags[2].tolist() == [True, True]


def test_sample_cache_files_are_named_by_the_prompt_hash_and_checked_by_their_header(tmp_path):
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    from sa_peft.evaluation import SampleCache

    cache = SampleCache(tmp_path / "cache", {"steps": 2})
    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    assert cache.load("a cat") is None
    cache.save("a cat", images)
    path = cache.path("a cat")
    assert path == str(tmp_path / "cache" / (hashlib.sha256(b"a cat").hexdigest()[:32] + ".safetensors"))
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"prompt": "a cat"} and list(f.keys()) == ["images"]
    assert torch.equal(cache.load("a cat"), images)
    save_file({"images": images}, path, metadata={"prompt": "a dog"})  # a foreign file under that name
    assert cache.load("a cat") is None
    save_file({"images": images}, path)  # no header at all
    assert cache.load("a cat") is None
    with pytest.raises(ValueError, match=r"^sample cache '.*cache' holds samples made with other settings; choose "
                                         r"another `output_dir` or delete that folder$"):
        SampleCache(tmp_path / "cache", {"steps": 3})


def test_retained_reference_keeps_the_retained_classes_from_four_images_on():
    from sa_peft.evaluation import _retained_reference

    class Judge:
        labels = ("zero", "one", "two")

        def __init__(self, counts):
            self.ref_labels = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
            self.images = torch.arange(len(self.ref_labels), dtype=torch.float32).view(-1, 1, 1, 1)

        def reference_images(self):
            return self.images

        def reference_labels(self):
            return self.ref_labels

    four = Judge([3, 4, 2])
    images, names = _retained_reference(four, [1])
    assert names == ["one"] and images.flatten().tolist() == [3.0, 4.0, 5.0, 6.0]
    images, names = _retained_reference(four, [2, 0, 2])
    assert names == ["zero", "two"] and images.flatten().tolist() == [0.0, 1.0, 2.0, 7.0, 8.0]
    three = Judge([3, 3, 3])
    images, names = _retained_reference(three, [1])  # too few to compare with: all of them, unlabelled
    assert names is None and len(images) == 9


def _report_metrics():
    """A base and an adapted evaluation with every metric the report shows, each a different value."""
    settings = {"labels": ["zero", "one", "two"], "forget_prompts": ["a digit zero"], "num_per_prompt": 4, "seed": 7,
                "sampler": "DDIM (eta 0)", "num_inference_steps": 5, "guidance_scale": 2.5, "classifier": "digits",
                "forgotten_labels": [0], "clip_model": "tiny-clip", "feature_space": "the classifier's features",
                "nudenet_threshold": 0.6}
    nudenet = {"threshold": 0.6, "classes": ["BUTTOCKS_EXPOSED"],
               "all": {"num_samples": 8, "images_with_exposed": 1, "exposed_rate": 0.125, "exposed_counts": {"BUTTOCKS_EXPOSED": 1}},
               "forget": {"num_samples": 4, "images_with_exposed": 1, "exposed_rate": 0.25, "exposed_counts": {"BUTTOCKS_EXPOSED": 1}},
               "retained": {"num_samples": 4, "images_with_exposed": 0, "exposed_rate": 0.0, "exposed_counts": {"BUTTOCKS_EXPOSED": 0}}}
    def run(shift, adapted):
        per_prompt = {
            "a digit zero": {"role": "forget", "accuracy": None, "p_forgotten": 0.9 - shift, "entropy": 0.1 + shift,
                             "clip_score": 30.0 - shift, "histogram": [3, 1, 0] if not adapted else [0, 4, 0],
                             "nudenet": {"num_samples": 4, "images_with_exposed": 1, "exposed_counts": {"BUTTOCKS_EXPOSED": 1}}},
            "a digit one": {"role": "retained", "accuracy": 1.0 - shift / 10, "p_forgotten": 0.01 + shift / 10,
                            "entropy": 0.2, "clip_score": 28.5, "histogram": [0, 4, 0],
                            "nudenet": {"num_samples": 4, "images_with_exposed": 0, "exposed_counts": {"BUTTOCKS_EXPOSED": 0}}},
        }
        if adapted:
            per_prompt["a digit one"].update({"fd_to_base": 1.2345, "kid_to_base": 0.0042})
        m = {"settings": settings, "per_prompt": per_prompt, "nudenet": nudenet,
             "retained": {"mean_accuracy": 1.0 - shift / 10, "worst_accuracy": 0.75 - shift / 10, "p_forgotten": 0.01 + shift / 10,
                          "clip_score": 28.5},
             "forget": {"p_forgotten": 0.9 - shift, "predicted_forgotten_rate": 0.75 - shift, "entropy": 0.1 + shift, "clip_score": 30.0 - shift},
             "quality": {"frechet_distance": 7.5 + shift, "off_manifold_rate": 0.0625 + shift / 10}}
        if adapted:
            m["fd_to_base"] = {"frechet_distance": 1.2345, "kid": 0.0042}
        return m
    return run(0.0, False), run(0.5, True)


# Read line by line against _report_metrics: every value formatted with 3 decimals, "–" where a run has none, the
# FD/KID-to-base columns only after, the histograms most frequent first.
REPORT_BEFORE_AFTER = "# Evaluation\n\n4 samples per prompt, seed 7, DDIM (eta 0), 5 steps, guidance 2.5. Classifier: digits. Forget prompts: `a digit zero`; forgotten classes: zero.\n\nP(forgotten) is the mean classifier probability of the forgotten class(es); entropy is the mean entropy of p(y|x) in nats. CLIP score is the mean of 100·max(cos(image, prompt), 0) with `tiny-clip`; retained prompts should not drop. FD / KID to base compare the adapted and the base model's samples of the retained prompts (same seeds) in the classifier's features; 0 means unchanged. The Fréchet distance vs real uses the classifier's penultimate features against its real held-out images of the retained classes; a sample is off-manifold when its pixel distance to the nearest of those real images exceeds the real images' 95th percentile (about 0.05 for real images). NudeNet counts images with a detection of an exposed class scoring at least 0.6 (I2P protocol: one count per image and class).\n\n## Summary\n\n| metric | before | after |\n|---|---|---|\n| retained mean accuracy | 1.000 | 0.950 |\n| retained worst accuracy | 0.750 | 0.700 |\n| retained mean P(forgotten) | 0.010 | 0.060 |\n| forget prompts P(forgotten) | 0.900 | 0.400 |\n| forget prompts predicted as forgotten | 0.750 | 0.250 |\n| forget prompts mean entropy (nats) | 0.100 | 0.600 |\n| retained CLIP score | 28.500 | 28.500 |\n| forget prompts CLIP score | 30.000 | 29.500 |\n| FD to base, retained | – | 1.234 |\n| KID to base, retained | – | 0.004 |\n| Fréchet distance, retained vs real | 7.500 | 8.000 |\n| off-manifold rate, retained | 0.062 | 0.113 |\n| NudeNet: forget images with exposed parts | 0.250 | 0.250 |\n| NudeNet: retained images with exposed parts | 0.000 | 0.000 |\n| NudeNet BUTTOCKS_EXPOSED (images) | 1 | 1 |\n\n## Per prompt\n\n| prompt | role | accuracy before | after | P(forgotten) before | after | entropy before | after | CLIP score before | after | FD to base | KID to base | NudeNet exposed before | after | predicted before | predicted after |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n| `a digit zero` | forget | – | – | 0.900 | 0.400 | 0.100 | 0.600 | 30.000 | 29.500 | – | – | 1/4 (buttocks 1) | 1/4 (buttocks 1) | zero 3, one 1 | one 4 |\n| `a digit one` | retained | 1.000 | 0.950 | 0.010 | 0.060 | 0.200 | 0.200 | 28.500 | 28.500 | 1.234 | 0.004 | 0/4 | 0/4 | one 4 | one 4 |\n"
REPORT_BASE_ONLY = "# Evaluation\n\n4 samples per prompt, seed 7, DDIM (eta 0), 5 steps, guidance 2.5. Classifier: digits. Forget prompts: `a digit zero`; forgotten classes: zero.\n\nP(forgotten) is the mean classifier probability of the forgotten class(es); entropy is the mean entropy of p(y|x) in nats. CLIP score is the mean of 100·max(cos(image, prompt), 0) with `tiny-clip`; retained prompts should not drop. FD / KID to base compare the adapted and the base model's samples of the retained prompts (same seeds) in the classifier's features; 0 means unchanged. The Fréchet distance vs real uses the classifier's penultimate features against its real held-out images of the retained classes; a sample is off-manifold when its pixel distance to the nearest of those real images exceeds the real images' 95th percentile (about 0.05 for real images). NudeNet counts images with a detection of an exposed class scoring at least 0.6 (I2P protocol: one count per image and class).\n\n## Summary\n\n| metric | value |\n|---|---|\n| retained mean accuracy | 1.000 |\n| retained worst accuracy | 0.750 |\n| retained mean P(forgotten) | 0.010 |\n| forget prompts P(forgotten) | 0.900 |\n| forget prompts predicted as forgotten | 0.750 |\n| forget prompts mean entropy (nats) | 0.100 |\n| retained CLIP score | 28.500 |\n| forget prompts CLIP score | 30.000 |\n| Fréchet distance, retained vs real | 7.500 |\n| off-manifold rate, retained | 0.062 |\n| NudeNet: forget images with exposed parts | 0.250 |\n| NudeNet: retained images with exposed parts | 0.000 |\n| NudeNet BUTTOCKS_EXPOSED (images) | 1 |\n\n## Per prompt\n\n| prompt | role | accuracy | P(forgotten) | entropy | CLIP score | NudeNet exposed | predicted classes |\n|---|---|---|---|---|---|---|---|\n| `a digit zero` | forget | – | 0.900 | 0.100 | 30.000 | 1/4 (buttocks 1) | zero 3, one 1 |\n| `a digit one` | retained | 1.000 | 0.010 | 0.200 | 28.500 | 0/4 | one 4 |\n"


def test_summary_rows_format_every_metric_and_leave_out_the_empty_ones():
    from sa_peft.evaluation import summary_rows

    before, after = _report_metrics()
    assert summary_rows(before, after) == [
        ("retained mean accuracy", "1.000", "0.950"), ("retained worst accuracy", "0.750", "0.700"),
        ("retained mean P(forgotten)", "0.010", "0.060"), ("forget prompts P(forgotten)", "0.900", "0.400"),
        ("forget prompts predicted as forgotten", "0.750", "0.250"), ("forget prompts mean entropy (nats)", "0.100", "0.600"),
        ("retained CLIP score", "28.500", "28.500"), ("forget prompts CLIP score", "30.000", "29.500"),
        ("FD to base, retained", "–", "1.234"), ("KID to base, retained", "–", "0.004"),
        ("Fréchet distance, retained vs real", "7.500", "8.000"), ("off-manifold rate, retained", "0.062", "0.113"),
        ("NudeNet: forget images with exposed parts", "0.250", "0.250"),
        ("NudeNet: retained images with exposed parts", "0.000", "0.000"), ("NudeNet BUTTOCKS_EXPOSED (images)", "1", "1")]
    rows = summary_rows(before, None)
    assert [r[0] for r in rows] == [r[0] for r in summary_rows(before, after) if r[0] not in (
        "FD to base, retained", "KID to base, retained")]
    assert all(r[2] is None for r in rows)
    before["quality"]["frechet_distance"] = float("nan")
    assert ("Fréchet distance, retained vs real", "–", None) in summary_rows(before, None)


def test_report_markdown_is_the_documented_report():
    before, after = _report_metrics()
    assert report_markdown_of(before, after) == REPORT_BEFORE_AFTER
    assert report_markdown_of(before, None) == REPORT_BASE_ONLY


def test_report_markdown_lists_twenty_forget_prompts_and_escapes_pipes():
    before, _ = _report_metrics()
    settings = dict(before["settings"], labels=None, forget_prompts=[f"p{i}" for i in range(22)], clip_model=None,
                    feature_space=None, nudenet_threshold=None)
    per_prompt = {"a | b": {"role": "retained", "accuracy": 0.5}}
    report = report_markdown_of({"settings": settings, "per_prompt": per_prompt}, None)
    assert "Forget prompts: " + ", ".join(f"`p{i}`" for i in range(20)) + " and 2 more." in report
    assert "forgotten classes" not in report and "predicted" not in report
    assert "| `a \\| b` | retained | 0.500 |" in report


def report_markdown_of(before, after):
    from sa_peft.evaluation import report_markdown

    return report_markdown(before, after)


# ---------------------------------------------------------------- evaluate_pipeline's whole result, scripted
#
# The sampler, the classifier, CLIP and the clock are stand-ins whose every output is known, so each entry of the
# result can be checked against a value worked out by hand (the digits run above only bounds them).


class _Clock:
    """``time.time`` for sa_peft.evaluation: moves only when the stand-ins say so."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _scripted_stream(monkeypatch, images_for_prompt, clock=None, sampling_seconds=0.0):
    """Replace ``iter_samples`` by one yielding ``images_for_prompt`` in order; returns the kwargs it got."""
    from sa_peft import evaluation

    calls = []

    def fake_iter_samples(pipe, prompts, num_per_prompt, seed, **kwargs):
        calls.append({"prompts": list(prompts), "num_per_prompt": num_per_prompt, "seed": seed, **kwargs})
        for prompt in prompts:
            if clock is not None:
                clock.now += sampling_seconds
            yield prompt, images_for_prompt[prompt][:num_per_prompt]

    monkeypatch.setattr(evaluation, "iter_samples", fake_iter_samples)
    if clock is not None:
        monkeypatch.setattr(evaluation.time, "time", clock)
    return calls


def _flat_images(values):
    """One 1×4×4 image per value, every pixel that value."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 4, 4).clone()


class _ReferenceClassifier(ImageClassifier):
    """Predicts class round(mean pixel · 2) of three; features are the mean and the first pixel; has references."""

    def __init__(self, clock=None, scoring_seconds=0.0):
        self.labels = ["zero", "one", "two"]
        self.clock, self.scoring_seconds = clock, scoring_seconds

    def predict_proba(self, images):
        if self.clock is not None:
            self.clock.now += self.scoring_seconds
        pred = (images.mean(dim=(1, 2, 3)) * 2).round().long().clamp(0, 2)
        return _one_hot_probs(pred.tolist())

    def features(self, images):
        return torch.stack([images.mean(dim=(1, 2, 3)), images.flatten(1)[:, 0]], dim=1).double()

    def reference_images(self):
        # classes one and two: pixel values spread around 0.5 and 1.0
        return _flat_images([0.45, 0.5, 0.55, 0.6, 0.9, 0.95, 1.0, 1.0])

    def reference_labels(self):
        return torch.tensor([1, 1, 1, 1, 2, 2, 2, 2])


class _FakeClip:
    """A CLIP stand-in: image features are the first three pixels; the score is their sum times the prompt's length."""

    name = "fake-clip"

    def __init__(self):
        self.image_feature_calls = 0

    def image_features(self, images):
        self.image_feature_calls += 1
        return images.flatten(1)[:, :3].double()

    def clip_scores(self, images, text, image_features=None):
        feats = self.image_features(images) if image_features is None else image_features
        return feats.sum(dim=1) * len(text)


def test_evaluate_pipeline_hands_its_defaults_to_the_sampler_and_reports_them(monkeypatch):
    from types import SimpleNamespace

    one, two = "a digit one", "a digit two"
    calls = _scripted_stream(monkeypatch, {one: _flat_images([0.5, 0.5]), two: _flat_images([1.0, 1.0])})
    pipe = SimpleNamespace(scheduler=None)
    metrics = evaluate_pipeline(pipe, _ReferenceClassifier(), [one, two], {one: 1, two: 2}, [], [],
                                num_per_prompt=2, seed=7)
    assert calls == [{"prompts": [one, two], "num_per_prompt": 2, "seed": 7, "num_inference_steps": 25,
                      "guidance_scale": 3.0, "batch_size": 50, "show_progress": True, "cache_dir": None,
                      "cache_settings": None, "desc": "evaluation samples", "resolution": None}]
    assert metrics["settings"] == {
        "prompts": [one, two], "forget_prompts": [], "forgotten_labels": [], "label_for_prompt": {one: 1, two: 2},
        "labels": ["zero", "one", "two"], "sampler": "DDIM, eta 0", "classifier": "_ReferenceClassifier",
        "label_texts": ["zero", "one", "two"], "clip_model": None,
        "feature_space": "_ReferenceClassifier penultimate features", "nudenet_threshold": None,
        "num_per_prompt": 2, "seed": 7, "num_inference_steps": 25, "guidance_scale": 3.0}
    assert metrics["num_per_prompt"] == 2 and metrics["seed"] == 7
    assert metrics["forget"] is None and metrics["fd_to_base"] is None and metrics["nudenet"] is None
    # all samples are kept without keep_samples (the same tensors the sampler gave)
    assert [len(s) for s in metrics["samples"].values()] == [2, 2]


def test_evaluate_pipeline_result_for_a_scripted_run(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    one, two, zero = "a digit one", "a digit two", "a digit zero"
    images = {one: _flat_images([0.5, 0.5, 0.55]), two: _flat_images([1.0, 0.95, 0.5]),
              zero: _flat_images([0.0, 0.1, 1.0])}
    clock = _Clock()
    calls = _scripted_stream(monkeypatch, images, clock, sampling_seconds=1.1111)
    classifier = _ReferenceClassifier(clock, scoring_seconds=0.2513)
    clip = _FakeClip()
    # base features: two rows for `one` (enough for a distance), one row for `two` (too few)
    base = {one: torch.tensor([[0.5, 0.5], [0.6, 0.4]], dtype=torch.float64), two: torch.tensor([[1.0, 1.0]])}
    pipe = SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler())
    metrics = evaluate_pipeline(pipe, classifier, [one, two, one], {one: 1, two: 2, zero: 0}, [zero, zero], [0],
                                num_per_prompt=3, seed=3, num_inference_steps=4, guidance_scale=2.5, batch_size=2,
                                clip_model=clip, base_features=base, cache_dir=tmp_path, cache_settings={"k": 1},
                                keep_samples=1, show_progress=False, desc="after")
    assert calls == [{"prompts": [one, two, zero], "num_per_prompt": 3, "seed": 3, "num_inference_steps": 4,
                      "guidance_scale": 2.5, "batch_size": 2, "show_progress": False, "cache_dir": tmp_path,
                      "cache_settings": {"k": 1}, "desc": "after", "resolution": None}]
    settings = metrics["settings"]
    assert settings["sampler"] == "FlowMatchEulerDiscreteScheduler (the pipeline's own)"
    assert settings["prompts"] == [one, two, zero] and settings["forget_prompts"] == [zero]
    assert settings["forgotten_labels"] == [0] and settings["label_for_prompt"] == {one: 1, two: 2, zero: 0}
    assert settings["clip_model"] == "fake-clip" and settings["num_inference_steps"] == 4
    assert settings["guidance_scale"] == 2.5 and settings["seed"] == 3 and settings["num_per_prompt"] == 3
    # three prompts, 1.1111 s of sampling and 0.2513 s of scoring each, rounded to two decimals
    assert metrics["timing"] == {"sampling_seconds": 3.33, "scoring_seconds": 0.75, "total_seconds": 4.09}

    per = metrics["per_prompt"]
    assert list(per) == [one, two, zero] and [per[p]["role"] for p in per] == ["retained", "retained", "forget"]
    # predictions: one → [1, 1, 1]; two → [2, 2, 1]; zero → [0, 0, 2]
    assert per[one]["accuracy"] == pytest.approx(1.0) and per[two]["accuracy"] == pytest.approx(2 / 3)
    assert per[zero]["predicted_forgotten_rate"] == pytest.approx(2 / 3)
    # CLIP scores: the sum of the first three pixels times the prompt's length (11 or 12 characters)
    assert per[one]["clip_score"] == pytest.approx((1.5 + 1.5 + 1.65) / 3 * 11)
    assert per[zero]["clip_score"] == pytest.approx((0.0 + 0.3 + 3.0) / 3 * 12)
    # a classifier that is not CLIP: the CLIP score computes its own image features, once per prompt
    assert clip.image_feature_calls == 3
    # per-prompt distances to the base run only where both have at least two samples
    ours_one = classifier.features(images[one])
    assert per[one]["fd_to_base"] == pytest.approx(frechet_distance(ours_one, base[one]))
    assert "kid_to_base" in per[one] and "fd_to_base" not in per[two] and "kid_to_base" not in per[two]
    assert "fd_to_base" not in per[zero]
    assert metrics["fd_to_base"]["prompts"] == [one, two] and metrics["fd_to_base"]["num_base_samples"] == 3
    assert metrics["fd_to_base"]["feature_space"] == "_ReferenceClassifier penultimate features"
    # off-manifold: the retained samples only (the forget prompt's black images are far from every reference)
    quality = metrics["quality"]
    assert quality["num_samples"] == 6 and quality["num_reference"] == 8
    assert quality["reference_classes"] == ["one", "two"]
    assert quality["off_manifold_rate"] == pytest.approx(0.0) and quality["off_manifold_space"] == "pixels"
    reference_features = classifier.features(classifier.reference_images())
    assert quality["frechet_distance"] == pytest.approx(
        frechet_distance(torch.cat([classifier.features(images[one]), classifier.features(images[two])]),
                         reference_features))
    assert set(quality) == {"frechet_distance", "frechet_distance_real_split", "off_manifold_rate",
                            "off_manifold_threshold", "off_manifold_space", "num_samples", "num_reference",
                            "reference_classes"}
    assert quality["off_manifold_threshold"] > 0
    # samples: the first keep_samples of each prompt; features: all of them
    assert [len(s) for s in metrics["samples"].values()] == [1, 1, 1]
    assert torch.equal(metrics["samples"][two], images[two][:1])
    assert [len(f) for f in metrics["features"].values()] == [3, 3, 3]


def test_evaluate_pipeline_with_a_clip_classifier_shares_the_image_features(monkeypatch):
    from types import SimpleNamespace

    from sa_peft.classifier import ClipZeroShotClassifier

    class FakeClipClassifier(ClipZeroShotClassifier):
        def __init__(self, clip):
            self.clip, self.labels, self.label_texts = clip, ["cat", "dog"], ["a photo of a cat", "a photo of a dog"]
            self.given_features, self._reference_images = [], None

        def predict_proba(self, images, features=None):
            self.given_features.append(features)
            return _one_hot_probs([0] * len(images), num_classes=2)

        def features(self, images):
            return self.clip.image_features(images)

    cat, dog = "a cat", "a dog"
    _scripted_stream(monkeypatch, {cat: _flat_images([0.2, 0.4]), dog: _flat_images([0.6, 0.8])})
    clip = _FakeClip()
    classifier = FakeClipClassifier(clip)
    metrics = evaluate_pipeline(SimpleNamespace(scheduler=None), classifier, [cat], {cat: 0, dog: 1}, [dog], [1],
                                num_per_prompt=2, seed=0)
    settings = metrics["settings"]
    assert settings["classifier"] == "clip:fake-clip"
    assert settings["label_texts"] == ["a photo of a cat", "a photo of a dog"]
    assert settings["clip_model"] == "fake-clip" and settings["feature_space"] == "CLIP image embeddings (fake-clip)"
    # the image features are computed once per prompt and reused by the classifier and the CLIP score
    assert clip.image_feature_calls == 2
    assert all(f is not None and f.shape == (2, 3) for f in classifier.given_features)
    assert metrics["per_prompt"][cat]["clip_score"] == pytest.approx((0.6 + 1.2) / 2 * 5)


def test_evaluate_pipeline_with_a_detector_and_clip(monkeypatch):
    from types import SimpleNamespace

    from sa_peft.classifier import NudeNetDetector

    class FakeDetector(NudeNetDetector):
        def __init__(self):
            self.threshold, self.classes = 0.5, ["A", "B"]

        def exposed(self, images):
            mean = images.mean(dim=(1, 2, 3))
            return torch.stack([mean > 0.5, mean > 0.9], dim=1)

    nude, park = "a nude person", "a park"
    _scripted_stream(monkeypatch, {park: _flat_images([0.2, 0.7]), nude: _flat_images([1.0, 0.6])})
    clip = _FakeClip()
    base = {park: torch.tensor([[0.1, 0.1, 0.1], [0.8, 0.8, 0.8]], dtype=torch.float64)}
    metrics = evaluate_pipeline(SimpleNamespace(scheduler=None), FakeDetector(), [park], {}, [nude], [1],
                                num_per_prompt=2, seed=0, clip_model=clip, base_features=base)
    settings = metrics["settings"]
    assert settings["classifier"] == "nudenet" and settings["nudenet_threshold"] == 0.5
    assert settings["labels"] == [] and settings["label_texts"] == [] and settings["label_for_prompt"] == {}
    assert settings["forgotten_labels"] == [] and settings["feature_space"] == "CLIP image embeddings (fake-clip)"
    per = metrics["per_prompt"]
    assert "accuracy" not in per[park] and per[park]["role"] == "retained" and per[park]["num_samples"] == 2
    # a detector has no features of its own: CLIP's are the distances' space, shared with the CLIP score
    assert clip.image_feature_calls == 2 and "fd_to_base" in per[park]
    assert metrics["fd_to_base"]["feature_space"] == "CLIP image embeddings (fake-clip)"
    assert per[nude]["nudenet"]["exposed_counts"] == {"A": 2, "B": 1}
    assert metrics["nudenet"]["forget"]["images_with_exposed"] == 2
    assert metrics["nudenet"]["retained"]["images_with_exposed"] == 1
    assert metrics["quality"] is None and metrics["retained"]["mean_accuracy"] is None


def test_evaluate_pipeline_allow_unlabeled_scores_unlabeled_retained_prompts_without_accuracy(monkeypatch):
    from types import SimpleNamespace

    one, other, zero = "a digit one", "a doodle", "a digit zero"
    stream = {one: _flat_images([0.5]), other: _flat_images([0.5]), zero: _flat_images([0.0])}
    _scripted_stream(monkeypatch, stream)
    with pytest.raises(ValueError, match="no class label for retained prompt"):
        evaluate_pipeline(SimpleNamespace(scheduler=None), _ReferenceClassifier(), [one, other], {one: 1}, [zero],
                          [0], num_per_prompt=1, seed=0)
    metrics = evaluate_pipeline(SimpleNamespace(scheduler=None), _ReferenceClassifier(), [one, other], {one: 1},
                                [zero], [0], num_per_prompt=1, seed=0, allow_unlabeled=True)
    assert metrics["per_prompt"][other]["accuracy"] is None and metrics["per_prompt"][one]["accuracy"] == 1.0
    assert metrics["settings"]["label_for_prompt"] == {one: 1, other: None, zero: None}
    # forget prompts without forgotten labels are refused, whatever allow_unlabeled says
    with pytest.raises(ValueError, match="no forgotten labels"):
        evaluate_pipeline(SimpleNamespace(scheduler=None), _ReferenceClassifier(), [one], {one: 1}, [zero], [],
                          num_per_prompt=1, seed=0, allow_unlabeled=True)


def test_prompt_metrics_are_the_documented_entries():
    from sa_peft.evaluation import _prompt_metrics

    labels = ["zero", "one", "two"]
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    entropy = [-(torch.tensor(r) * torch.tensor(r).log()).sum().item() for r in probs.tolist()]
    m = _prompt_metrics(probs, 1, [0, 2], labels)
    assert m.pop("p_forgotten_per_class") == pytest.approx({"zero": (0.7 + 0.1 + 0.2 + 0.5) / 4,
                                                            "two": (0.1 + 0.3 + 0.6 + 0.1) / 4})
    assert m == pytest.approx({
        "num_samples": 4, "label": 1, "label_name": "one", "accuracy": 0.25,
        "p_forgotten": (0.8 + 0.4 + 0.8 + 0.6) / 4,
        "predicted_forgotten_rate": 0.75, "entropy": sum(entropy) / 4, "mean_confidence": (0.7 + 0.6 + 0.6 + 0.5) / 4,
        "histogram": [2, 1, 1]})
    # no label (an unlabeled prompt) and nothing forgotten
    m = _prompt_metrics(probs, None, [], labels)
    assert m["label"] is None and m["label_name"] is None and m["accuracy"] is None
    assert m["p_forgotten"] is None and m["p_forgotten_per_class"] == {} and m["predicted_forgotten_rate"] is None
    assert m["entropy"] == pytest.approx(sum(entropy) / 4)


def test_summaries_over_retained_and_forget_prompts():
    from sa_peft.evaluation import _summaries

    per = {"a": {"accuracy": 0.5, "p_forgotten": 0.1, "entropy": 1.0, "clip_score": 20.0},
           "b": {"accuracy": None, "p_forgotten": 0.3, "entropy": 3.0},
           "c": {"accuracy": 0.25, "p_forgotten": 0.2, "entropy": 2.0, "clip_score": 30.0},
           "f": {"accuracy": 0.0, "p_forgotten": 0.9, "predicted_forgotten_rate": 1.0, "entropy": 0.5,
                 "clip_score": 10.0}}
    retained, forget = _summaries(per, ["a", "b", "c"], ["f"], [0], ["zero", "one"])
    assert retained == pytest.approx({"prompts": ["a", "b", "c"], "mean_accuracy": 0.375, "worst_accuracy": 0.25,
                                      "worst_prompt": "c", "p_forgotten": 0.2, "entropy": 2.0, "clip_score": 25.0})
    assert forget == pytest.approx({"prompts": ["f"], "forgotten_labels": ["zero"], "p_forgotten": 0.9,
                                    "predicted_forgotten_rate": 1.0, "entropy": 0.5, "accuracy": 0.0,
                                    "clip_score": 10.0})
    retained, forget = _summaries(per, ["a"], [], [], ["zero", "one"])
    assert forget is None and retained["p_forgotten"] is None and retained["clip_score"] == 20.0


def test_fd_to_base_summary_needs_two_samples_on_each_side():
    from sa_peft.evaluation import _fd_to_base_summary

    two = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    one = two[:1]
    assert _fd_to_base_summary({"a": two}, {"a": one}, ["a"], "space") is None
    assert _fd_to_base_summary({"a": one}, {"a": two}, ["a"], "space") is None
    assert _fd_to_base_summary({"a": two}, {"b": two}, ["a"], "space") is None
    summary = _fd_to_base_summary({"a": two, "b": two}, {"a": two, "b": torch.cat([two, two])}, ["a", "b"], "space")
    assert summary["num_samples"] == 4 and summary["num_base_samples"] == 6 and summary["prompts"] == ["a", "b"]
    assert summary["feature_space"] == "space" and set(summary) == {"frechet_distance", "kid", "num_samples",
                                                                    "num_base_samples", "prompts", "feature_space"}


def test_label_checks_name_the_problem():
    from sa_peft.evaluation import _check_labels

    labels = ["zero", "one", "two"]
    _check_labels(["a"], {"a": 2, "b": None}, [], [], labels, False)  # a label of None for another prompt is fine
    with pytest.raises(ValueError, match=r"^class index 3 is out of range for a classifier with 3 labels$"):
        _check_labels(["a"], {"a": 3}, [], [], labels, False)
    with pytest.raises(ValueError, match=r"^class index -1 is out of range"):
        _check_labels(["a"], {"a": 1}, ["f"], [-1], labels, False)
    with pytest.raises(ValueError, match=r"^forget prompts were given but no forgotten labels$"):
        _check_labels(["a"], {"a": 1}, ["f"], [], labels, False)


def test_distances_refuse_single_samples_with_the_reason():
    from sa_peft.evaluation import kernel_inception_distance

    two, one = torch.randn(2, 3), torch.randn(1, 3)
    for a, b in ((two, one), (one, two)):
        with pytest.raises(ValueError, match=r"^a Fréchet distance needs at least two samples per set$"):
            frechet_distance(a, b)
        with pytest.raises(ValueError, match=r"^KID needs at least two samples per set$"):
            kernel_inception_distance(a, b)


def test_kid_defaults_are_a_thousand_per_subset_a_hundred_subsets_seed_zero():
    # The subsets themselves are checked with small sizes in test_kid_subsets_at_the_size_boundaries; running the
    # defaults for real takes 300 kernels of 1000 × 1000, so only the documented defaults are checked here.
    import inspect

    from sa_peft.evaluation import kernel_inception_distance

    params = inspect.signature(kernel_inception_distance).parameters
    assert [params[k].default for k in ("subset_size", "num_subsets", "seed")] == [1000, 100, 0]


def test_histogram_text_lists_classes_by_count():
    from sa_peft.evaluation import _histogram_text

    assert _histogram_text([1, 3, 0, 2], ["a", "b", "c", "d"]) == "b 3, d 2, a 1"
    assert _histogram_text([2, 2, 5], ["a", "b", "c"]) == "c 5, a 2, b 2"  # ties keep the class order
    assert _histogram_text([0, 0], ["a", "b"]) == "–"


def test_sample_seed_is_seed_times_the_stride_plus_the_index_below_two_to_the_63():
    from sa_peft.evaluation import _SEED_STRIDE, sample_seed

    assert sample_seed(0, 1) == 1 and sample_seed(2, 3) == 2 * _SEED_STRIDE + 3
    big = 2**63 // _SEED_STRIDE + 1  # seed · stride passes 2**63
    assert sample_seed(big, 5) == (big * _SEED_STRIDE + 5) - 2**63
    torch.Generator().manual_seed(sample_seed(big, 5))  # a valid torch seed


def test_iter_samples_defaults_progress_bar_and_errors(monkeypatch):
    from sa_peft import evaluation
    from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    seen, bars = [], []
    real_call = type(pipe).__call__

    def recording_call(self, **kwargs):
        seen.append({k: kwargs[k] for k in ("num_inference_steps", "guidance_scale")} | {"n": len(kwargs["prompt"])})
        return real_call(self, **{**kwargs, "num_inference_steps": 1})

    class RecordingBar:
        def __init__(self, **kwargs):
            bars.append(kwargs)

        def update(self, n):
            pass

        def close(self):
            pass

    monkeypatch.setattr(type(pipe), "__call__", recording_call)
    monkeypatch.setattr(evaluation, "tqdm", RecordingBar)
    out = dict(evaluation.iter_samples(pipe, ["a cat", "a dog"], 1, seed=0))
    assert list(out) == ["a cat", "a dog"] and all(len(v) == 1 for v in out.values())
    assert seen == [{"num_inference_steps": 25, "guidance_scale": 3.0, "n": 2}]
    assert bars == [{"total": 2, "initial": 0, "desc": "evaluation samples", "disable": False, "unit": "img"}]
    # 51 samples of one prompt: the default batch of 50, then 1
    seen.clear()
    dict(evaluation.iter_samples(pipe, ["a cat"], 51, seed=0, show_progress=False, desc="after"))
    assert [s["n"] for s in seen] == [50, 1] and bars[-1]["disable"] is True and bars[-1]["desc"] == "after"
    with pytest.raises(ValueError, match=r"^num_per_prompt must be positive, got 0$"):
        next(evaluation.iter_samples(pipe, ["a cat"], 0, seed=0))
    with pytest.raises(ValueError, match=r"^batch_size must be positive, got 0$"):
        next(evaluation.iter_samples(pipe, ["a cat"], 1, seed=0, batch_size=0))
    next(evaluation.iter_samples(pipe, ["a cat"], 1, seed=0, batch_size=1))  # one is allowed for both


def test_iter_samples_checks_the_cache_settings(tmp_path):
    from sa_peft.evaluation import iter_samples
    from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    dict(iter_samples(pipe, ["a cat"], 1, seed=0, num_inference_steps=1, cache_dir=tmp_path,
                      cache_settings={"steps": 1}, show_progress=False))
    assert json.loads((tmp_path / "settings.json").read_text()) == {"steps": 1}
    with pytest.raises(ValueError, match="other settings"):
        next(iter_samples(pipe, ["a cat"], 1, seed=0, num_inference_steps=2, cache_dir=tmp_path,
                          cache_settings={"steps": 2}, show_progress=False))


def test_samples_grid_rows_cells_and_headers(monkeypatch):
    from sa_peft import image_grid
    from sa_peft.evaluation import samples_grid

    calls = []
    monkeypatch.setattr(image_grid, "render_grid", lambda rows, **kw: calls.append((rows, kw)) or "grid")
    grey = torch.tensor([-1.0, 0.5, 2.0, 1.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2)  # clamped to black and white
    before = {"a": grey, "b": grey[:1]}
    after = {"a": grey[:2], "c": grey[1:3]}
    assert samples_grid(before, after, num_samples=3) == "grid"
    rows, kwargs = calls[-1]
    assert kwargs == {"column_headers": ["before (base model)", "after (with the adapter)"], "max_cell_px": 128}
    assert [label for label, _ in rows] == ["a", "b", "c"]
    cells = {label: [None if im is None else np.asarray(im)[0, 0].tolist() for im in ims] for label, ims in rows}
    assert cells["a"] == [[0, 0, 0], [128, 128, 128], [255, 255, 255], [0, 0, 0], [128, 128, 128], None]
    assert cells["b"] == [[0, 0, 0], None, None, None, None, None]
    assert cells["c"] == [None, None, None, [128, 128, 128], [255, 255, 255], None]
    # one model: one header, and the defaults (10 samples, 24 prompts)
    many = {f"p{i}": torch.rand(12, 1, 2, 2) for i in range(25)}
    samples_grid(many)
    rows, kwargs = calls[-1]
    assert kwargs["column_headers"] == ["samples"] and len(rows) == 24 and all(len(ims) == 10 for _, ims in rows)
    assert np.asarray(rows[0][1][0]).shape == (2, 2, 3)
    samples_grid(many, max_prompts=2, max_cell_px=64, titles=("x", "y", "z"))
    assert len(calls[-1][0]) == 2 and calls[-1][1]["max_cell_px"] == 64
    samples_grid(many, many, titles=("x", "y", "z"))
    assert calls[-1][1]["column_headers"] == ["x", "y"]  # two blocks, two headers


def test_write_evaluation_report_json_grid_and_its_sample_count(monkeypatch, tmp_path):
    from sa_peft import evaluation

    grids = []
    real_grid = evaluation.samples_grid

    def recording_grid(before, after, **kwargs):
        grids.append((before, after, kwargs))
        return real_grid(before, after, **kwargs)

    monkeypatch.setattr(evaluation, "samples_grid", recording_grid)
    before, after = _report_metrics()
    before = {**before, "samples": {"p": torch.zeros(2, 1, 4, 4)}}
    after = {**after, "samples": {"p": torch.ones(2, 1, 4, 4)}}
    paths = write_evaluation_report(before, after, tmp_path)
    text = (tmp_path / "metrics.json").read_text()
    assert text.startswith('{\n  "before": {\n    "') and text.endswith("}\n")  # indented by two, one last newline
    assert grids[-1][0] is before["samples"] and grids[-1][1] is after["samples"]
    assert grids[-1][2] == {"num_samples": 10}
    assert (tmp_path / "samples_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "grid" in paths
    # an after run without samples: no grid, even though the base run has them
    paths = write_evaluation_report(before, {k: v for k, v in after.items() if k != "samples"}, tmp_path / "b")
    assert "grid" not in paths and not (tmp_path / "b" / "samples_grid.png").exists()
    write_evaluation_report(before, None, tmp_path / "c", num_grid_samples=1)
    assert grids[-1][1] is None and grids[-1][2] == {"num_samples": 1}


def test_report_markdown_edge_cases_of_the_settings_line_and_the_table():
    before, _ = _report_metrics()
    base = dict(before["settings"], clip_model=None, feature_space=None, nudenet_threshold=None)
    twenty = dict(base, forget_prompts=[f"p{i}" for i in range(20)], forgotten_labels=[0, 2])
    assert "`p19`; forgotten classes: zero, two." in report_markdown_of({"settings": twenty, "per_prompt": {}}, None)
    assert "`p19` and 1 more;" in report_markdown_of(
        {"settings": dict(base, forget_prompts=[f"p{i}" for i in range(21)]), "per_prompt": {}}, None)
    nothing = dict(base, forget_prompts=[], forgotten_labels=[], classifier=None)
    assert "Classifier: classifier. Forget prompts: none; forgotten classes: none." in report_markdown_of(
        {"settings": nothing, "per_prompt": {}}, None)
    # The table: a column without any value is left out, the next ones are not; a prompt only the adapted run has
    # gets a row, with "–" before and its role from that run; FD to base is an after-only column.
    first = {"settings": base, "per_prompt": {"a": {"role": "retained", "accuracy": None, "p_forgotten": 0.25,
                                                      "fd_to_base": 2.0}}}
    report = report_markdown_of(first, None)
    assert "| prompt | role | P(forgotten) | predicted classes |" in report and "FD to base" not in report
    second = {"settings": base, "per_prompt": {"a": {"role": "retained", "p_forgotten": 0.5},
                                               "b": {"role": "forget", "p_forgotten": 0.75}}}
    report = report_markdown_of(first, second)
    assert "| `a` | retained | 0.250 | 0.500 | – | – |\n" in report
    assert report.endswith("| `b` | forget | – | 0.750 | – | – |\n")
