"""Evaluation on real-model classifiers (issue 12): CLIP zero-shot and CLIP score, FD/KID to the base,
NudeNet, prompt files and CSVs, the sample cache, and bad input caught before any sampling.

Everything runs offline: CLIP is a tiny random model built here and saved as a folder; NudeNet's ONNX
model ships in its wheel (the NudeNet tests are skipped when the package is not installed).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_clip

from sa_peft import before_after, cli
from sa_peft.classifier import (
    NUDENET_EXPOSED_CLASSES,
    ClipModel,
    ClipZeroShotClassifier,
    load_classifier,
    parse_classifier_spec,
)
from sa_peft.commands import evaluate as evaluate_command
from sa_peft.evaluation import evaluate_pipeline, frechet_distance, kernel_inception_distance, report_markdown

ZERO, ONE, SEVEN = "a handwritten digit zero", "a handwritten digit one", "a handwritten digit seven"
WORDS = ["a", "photo", "of", "cat", "dog", "handwritten", "digit", "zero", "one", "seven"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip")
    build_tiny_clip(folder, WORDS)
    return folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    evaluate_command.register(parser.add_subparsers(dest="command"))
    return parser


# ------------------------------------------------------------------------------------ metric code


def test_frechet_distance_of_two_known_gaussians_is_exact():
    # Samples whose sample mean and covariance are exactly mu and sigma: the FD must equal the closed form
    # |mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a^½ S_b S_a^½)^½), here with S_a = diag(1, 4), S_b = diag(9, 1):
    # 2² + 1² + (1 + 4 + 9 + 1) - 2 (3 + 2) = 10.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(500, 2, generator=gen, dtype=torch.float64)
    z = z - z.mean(0)
    # Whiten so that the (N-1)-normalised sample covariance is exactly the identity.
    cov = z.T @ z / (len(z) - 1)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(cov)).T
    a = z * torch.tensor([1.0, 2.0], dtype=torch.float64) + torch.tensor([0.0, 0.0], dtype=torch.float64)
    b = z * torch.tensor([3.0, 1.0], dtype=torch.float64) + torch.tensor([2.0, 1.0], dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(10.0, abs=1e-8)
    # A rotated covariance (non-diagonal) against the identity: FD = tr(S) + 2 - 2 tr(S^½), S eigenvalues 4 and 1.
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    c = z @ torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64)) @ rot.T
    assert frechet_distance(c, z) == pytest.approx((4 + 1) + 2 - 2 * (2 + 1), abs=1e-8)


def _kid_by_hand(x: torch.Tensor, y: torch.Tensor) -> float:
    d = x.shape[1]

    def k(u, v):
        return (float(u @ v) / d + 1) ** 3

    n = len(x)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total += k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i])
    return total / (n * (n - 1))


def test_kid_identical_sets_zero_and_matches_hand_computation():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 3, generator=gen, dtype=torch.float64) + 0.5
    assert kernel_inception_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert kernel_inception_distance(x, y) == pytest.approx(_kid_by_hand(x, y), rel=1e-10)
    big = torch.randn(400, 4, generator=gen)
    assert abs(kernel_inception_distance(big[:200], big[200:])) < 0.05
    assert kernel_inception_distance(big[:200], big[200:] + 1.0) > 0.5
    # Subsets on both sides when the sets exceed subset_size; the paired form still gives 0 for identical sets.
    assert kernel_inception_distance(big, big, subset_size=50, num_subsets=5) == pytest.approx(0.0, abs=1e-9)


def test_clip_score_equals_cosine_of_features_computed_directly(clip_dir):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    clip = ClipModel(clip_dir)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=gen).float() / 255  # exact uint8 values, crop size
    text = "a photo of a cat"
    scores = clip.clip_scores(images, text)
    model = CLIPModel.from_pretrained(clip_dir, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]
    with torch.no_grad():
        inputs = processor(text=[text], images=pil, return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    cos = F.cosine_similarity(img, txt, dim=-1)
    assert torch.allclose(scores, 100 * cos.clamp_min(0), atol=1e-3)
    assert (scores >= 0).all() and (scores <= 100).all()
    # 100·max(cos, 0): aligned features score 100, opposite ones 0 (not -100).
    assert clip.clip_scores(images[:1], text, image_features=txt * 3).item() == pytest.approx(100.0, abs=1e-3)
    assert clip.clip_scores(images[:1], text, image_features=-txt).item() == 0.0


# ------------------------------------------------------------------------------------ CLIP end to end


def test_load_classifier_clip_spec(clip_dir):
    clf = load_classifier(f"clip:{clip_dir}", ["a photo of a cat", "a photo of a dog"])
    assert isinstance(clf, ClipZeroShotClassifier) and clf.labels == ["a photo of a cat", "a photo of a dog"]
    probs = clf.predict_proba(torch.rand(3, 3, 20, 20))
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    assert parse_classifier_spec("nudenet") == ("nudenet", None)
    assert parse_classifier_spec("builtin:digits-classifier") == ("folder", "builtin:digits-classifier")


@pytest.fixture(scope="module")
def clip_run(clip_dir, tmp_path_factory):
    from tests.test_evaluation import _save_random_lora

    root = tmp_path_factory.mktemp("clip-eval")
    _save_random_lora(root / "lora")
    prompts = root / "prompts.txt"
    prompts.write_text(f"{ONE}\n\n{SEVEN}\n{ONE}\n")
    argv = ["evaluate", "--classifier", f"clip:{clip_dir}", "--class_text", ZERO, "--class_text", ONE,
            "--class_text", SEVEN, "--prompts_file", str(prompts), "--forget_prompt", ZERO, "--lora", str(root / "lora"),
            "--num_images_per_prompt", "3", "--batch_size", "2", "--num_inference_steps", "3",
            "--output_dir", str(root / "eval"), "--device", "cpu"]
    args = _parser().parse_args(argv)
    return root, argv, args.func(args), clip_dir


def test_clip_evaluation_metrics_match_direct_computation(clip_run):
    root, _, result, clip_dir = clip_run
    before, after = result["before"], result["after"]
    assert before["settings"]["prompts"] == [ONE, SEVEN, ZERO]  # file read, blank line and duplicate dropped
    assert before["settings"]["forgotten_labels"] == [0]  # the forget prompt is a class text
    assert before["settings"]["label_for_prompt"] == {ONE: 1, SEVEN: 2, ZERO: 0}
    clip = ClipModel(clip_dir)
    for run in (before, after):
        for p in (ONE, SEVEN, ZERO):
            m = run["per_prompt"][p]
            assert m["clip_score"] == pytest.approx(clip.clip_scores(run["samples"][p], p).mean().item(), abs=1e-4)
            assert 0 <= m["accuracy"] <= 1 and len(m["histogram"]) == 3
        assert run["retained"]["clip_score"] == pytest.approx(
            (run["per_prompt"][ONE]["clip_score"] + run["per_prompt"][SEVEN]["clip_score"]) / 2)
    assert before["fd_to_base"] is None
    ours = torch.cat([clip.image_features(after["samples"][p]) for p in (ONE, SEVEN)])
    base = torch.cat([clip.image_features(before["samples"][p]) for p in (ONE, SEVEN)])
    fd = after["fd_to_base"]
    assert fd["frechet_distance"] == pytest.approx(frechet_distance(ours, base), rel=1e-4, abs=1e-6)
    assert fd["kid"] == pytest.approx(kernel_inception_distance(ours, base), rel=1e-4, abs=1e-8)
    assert fd["frechet_distance"] > 0 and fd["num_samples"] == 6 and fd["prompts"] == [ONE, SEVEN]
    assert "CLIP image embeddings" in fd["feature_space"]
    assert "fd_to_base" in after["per_prompt"][ONE] and "fd_to_base" not in after["per_prompt"][ZERO]
    data = json.loads((root / "eval" / "metrics.json").read_text())
    assert data["after"]["fd_to_base"]["frechet_distance"] == pytest.approx(fd["frechet_distance"])
    assert "features" not in data["after"] and "samples" not in data["after"]
    report = (root / "eval" / "report.md").read_text()
    assert "| retained CLIP score |" in report and "| FD to base, retained | – |" in report
    assert "CLIP score before" in report


def test_clip_evaluation_resumes_from_the_sample_cache(clip_run, monkeypatch):
    from diffusers import StableDiffusionPipeline

    root, argv, result, _ = clip_run
    caches = sorted(p.name.split("-")[0] for p in (root / "eval" / "samples").iterdir())
    assert caches == ["adapted", "base"]
    assert len(list((root / "eval" / "samples").glob("base-*/*.safetensors"))) == 3

    calls = []
    original = StableDiffusionPipeline.__call__

    def counting(self, *a, **k):
        calls.append(len(k["prompt"]))
        return original(self, *a, **k)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting)
    args = _parser().parse_args(argv)
    again = args.func(args)
    assert calls == []  # everything came from the cache
    for stage in ("before", "after"):
        for p, m in result[stage]["per_prompt"].items():
            assert again[stage]["per_prompt"][p]["clip_score"] == pytest.approx(m["clip_score"], abs=1e-6)
    assert again["after"]["fd_to_base"]["frechet_distance"] == pytest.approx(result["after"]["fd_to_base"]["frechet_distance"])
    # One more sample per prompt: only the new ones are generated, in cross-prompt batches of --batch_size.
    more = _parser().parse_args([*argv, "--num_images_per_prompt", "4"])
    more.func(more)
    assert sum(calls) == 2 * 3 and max(calls) <= 2


# ------------------------------------------------------------------------------------ prompts and bad input


def test_prompts_csv_and_max_prompts(tmp_path):
    csv_file = tmp_path / "i2p.csv"
    csv_file.write_text('\ufeffprompt,categories,evaluation_seed\n"a photo of a cat, oil painting",sexual,1\n'
                        '  a  dog  ,violence,2\n,x,3\n"line one\nline two",y,4\n')
    args = _parser().parse_args(["evaluate", "--forget_prompts_csv", str(csv_file), "--prompt", "a", "--prompt", "b",
                                 "--prompt", "c", "--max_prompts", "2", "--output_dir", str(tmp_path)])
    retained, forget, default_used = evaluate_command.collect_prompts(args)
    assert forget == ["a photo of a cat, oil painting", "a dog"] and retained == ["a", "b"] and not default_used
    cap = tmp_path / "captions.csv"
    cap.write_text("id,caption\n1,a cat\n2,a dog\n")
    args = _parser().parse_args(["evaluate", "--prompts_csv", str(cap), "--prompt_column", "caption",
                                 "--output_dir", str(tmp_path)])
    assert evaluate_command.collect_prompts(args)[0] == ["a cat", "a dog"]


@pytest.fixture
def no_pipeline(monkeypatch):
    """Records any attempt to load (and so sample from) a pipeline."""
    loaded = []

    def fail(args, supported=None):
        loaded.append(args)
        raise AssertionError("the pipeline must not be loaded")

    monkeypatch.setattr(evaluate_command, "load_pipeline_from_args", fail)
    return loaded


@pytest.mark.parametrize("extra, flag", [
    (["--classifier", "bogus:thing", "--prompt", ONE], "--classifier 'bogus:thing': unknown classifier"),
    (["--classifier", "CLIP_DIR", "--class_text", ZERO, "--prompt", ONE], "two or more --class_text"),
    (["--classifier", "CLIP_DIR", "--class_text", ZERO, "--class_text", ONE, "--prompt", ONE,
      "--forget_prompt", "a photo of a cat", "--forget_label", "a photo of a dog"],
     "--forget_label 'a photo of a dog' is neither"),
    (["--classifier", "CLIP_DIR", "--class_text", ZERO, "--class_text", ONE, "--prompt", ONE,
      "--label", "a handwritten digit nine"], "--label 'a handwritten digit nine' is neither"),
    (["--prompt", ONE, "--label", "eleven"], "--label 'eleven' is neither"),
    (["--classifier", "CLIP_DIR", "--class_text", ZERO, "--class_text", ONE, "--prompts_csv", "CSV"],
     "--prompts_csv .* has no column 'prompt' \\(columns: text, category\\); pass --prompt_column"),
    (["--class_text", ZERO, "--class_text", ONE, "--prompt", ONE], "--class_text is only used with"),
    (["--classifier", "nudenet", "--forget_prompt", ZERO, "--nudenet_threshold", "1.5"], "--nudenet_threshold"),
])
def test_bad_input_fails_before_sampling(extra, flag, clip_dir, tmp_path, no_pipeline, capsys):
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("text,category\na cat,x\n")
    extra = [f"clip:{clip_dir}" if v == "CLIP_DIR" else str(csv_file) if v == "CSV" else v for v in extra]
    args = _parser().parse_args(["evaluate", *extra, "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    with pytest.raises(ValueError, match=flag) as err:
        args.func(args)
    assert no_pipeline == []
    assert not (tmp_path / "out").exists()
    # The command line turns it into a one-line error, not a traceback.
    assert cli.main(["evaluate", *extra, "--output_dir", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert str(err.value) in capsys.readouterr().err
    assert no_pipeline == []


# ------------------------------------------------------------------------------------ NudeNet


@pytest.fixture(scope="module")
def nudenet():
    return pytest.importorskip("nudenet", reason="nudenet is not installed (pip install 'sa-peft[nudenet]')")


def _pngs(tmp_path):
    """A few generated PNGs: noise, a skin-coloured oval on grey, stripes."""
    from PIL import Image, ImageDraw

    gen = np.random.default_rng(0)
    images = [gen.integers(0, 256, (96, 96, 3), dtype=np.uint8)]
    oval = Image.new("RGB", (128, 96), (90, 90, 90))
    ImageDraw.Draw(oval).ellipse((20, 10, 100, 90), fill=(224, 172, 140))
    images.append(np.asarray(oval))
    stripes = np.zeros((64, 64, 3), dtype=np.uint8)
    stripes[::4] = 255
    images.append(stripes)
    paths = []
    for i, arr in enumerate(images):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    return paths, images


def test_nudenet_on_generated_pngs_matches_the_package(nudenet, tmp_path):
    from nudenet import NudeDetector
    from nudenet.nudenet import _read_image

    paths, arrays = _pngs(tmp_path)
    detector = load_classifier("nudenet", nudenet_threshold=0.6)
    reference = NudeDetector()
    for path, arr in zip(paths, arrays, strict=True):
        tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255
        # What the detector sees is what it sees for the PNG file: the same input blob.
        assert np.array_equal(_read_image(detector.to_bgr_arrays(tensor)[0])[0], _read_image(path)[0])
        ours = detector.detect(tensor)[0]
        theirs = reference.detect(path)  # the package's own PNG path (cv2.imread)
        assert [(d["class"], d["box"]) for d in ours] == [(d["class"], d["box"]) for d in theirs]
        assert [d["score"] for d in ours] == pytest.approx([d["score"] for d in theirs], abs=1e-5)
    assert any(reference.detect(p) for p in paths)  # the comparison is not vacuous
    assert detector.exposed(torch.rand(2, 3, 64, 64)).shape == (2, len(NUDENET_EXPOSED_CLASSES))


def test_nudenet_counts_exposed_classes_per_image_at_the_threshold(nudenet, monkeypatch):
    from sa_peft.models import load_pipeline

    detector = load_classifier("nudenet", nudenet_threshold=0.6)
    canned = [
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]},
         {"class": "FEMALE_BREAST_EXPOSED", "score": 0.8, "box": [1, 1, 1, 1]},  # same image, same class: once
         {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]}],          # not an exposed class
        [{"class": "BELLY_EXPOSED", "score": 0.59, "box": [0, 0, 1, 1]}],        # below the threshold
        [{"class": "BELLY_EXPOSED", "score": 0.6, "box": [0, 0, 1, 1]},
         {"class": "MALE_GENITALIA_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]}],
    ]
    monkeypatch.setattr(detector.detector, "detect_batch", lambda arrays, batch_size=4: canned[: len(arrays)])
    pipe = load_pipeline("builtin:digits")
    m = evaluate_pipeline(pipe, detector, [], {}, [ZERO], [], num_per_prompt=3, seed=0, num_inference_steps=2,
                          show_progress=False)
    n = m["per_prompt"][ZERO]["nudenet"]
    assert n["images_with_exposed"] == 2 and n["exposed_rate"] == pytest.approx(2 / 3)
    assert n["exposed_counts"]["FEMALE_BREAST_EXPOSED"] == 1 and n["exposed_counts"]["BELLY_EXPOSED"] == 1
    assert n["exposed_counts"]["MALE_GENITALIA_EXPOSED"] == 1 and sum(n["exposed_counts"].values()) == 3
    assert m["nudenet"]["forget"]["exposed_counts"] == n["exposed_counts"] and m["nudenet"]["retained"] is None
    report = report_markdown(m, m)
    assert "| NudeNet FEMALE_BREAST_EXPOSED (images) | 1 | 1 |" in report and "2/3" in report


def test_nudenet_command_on_the_digits_model(nudenet, tmp_path):
    prompts = tmp_path / "nudity.txt"
    prompts.write_text(f"{ZERO}\n{ONE}\n")
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--classifier", "nudenet", "--forget_prompts_file", str(prompts),
                     "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--output_dir", str(out),
                     "--device", "cpu"]) == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["before"]["nudenet"]["threshold"] == 0.6
    assert data["before"]["nudenet"]["forget"]["num_samples"] == 4
    assert set(data["before"]["nudenet"]["all"]["exposed_counts"]) == set(NUDENET_EXPOSED_CLASSES)


# ------------------------------------------------------------------------------------ card and inspect


def _card_info() -> dict:
    return {"base_model": "builtin:digits", "forget_prompts": [ZERO], "surrogate": "uniform noise",
            "num_surrogate_images": 8, "num_replay_prompts": 2, "num_replay_images_per_prompt": 4, "ewc_lambda": 1.0,
            "ewc_space": "lowrank", "fisher_estimator": "empirical", "fisher_num_samples": 8, "replay_weight": 1.0,
            "rank": 4, "lora_alpha": 4, "lora_target": "attn", "num_adapted_modules": 8, "max_train_steps": 3,
            "train_batch_size": 2, "learning_rate": 1e-4, "sa_peft_version": "0.1.0"}


def test_model_card_and_inspect_show_the_evaluation(clip_run, tmp_path, capsys):
    import shutil

    from sa_peft.evaluation import write_evaluation_report
    from sa_peft.model_card import evaluation_section, write_model_card

    root, _, result, _ = clip_run
    before, after = result["before"], result["after"]
    section = evaluation_section(before, after)
    assert section.startswith("## Evaluation") and "| metric | before | after |" in section
    fd = f"{after['fd_to_base']['frechet_distance']:.3f}"
    assert f"| FD to base, retained | – | {fd} |" in section
    assert f"| retained CLIP score | {before['retained']['clip_score']:.3f} | {after['retained']['clip_score']:.3f} |" \
        in section
    folder = tmp_path / "adapter"
    shutil.copytree(root / "lora", folder)
    write_model_card(folder, _card_info())
    assert "## Evaluation" not in (folder / "README.md").read_text()
    write_evaluation_report(before, after, folder / "evaluation")
    write_model_card(folder, _card_info())
    card = (folder / "README.md").read_text()
    assert "## Evaluation" in card and f"| FD to base, retained | – | {fd} |" in card
    assert card.index("## Evaluation") < card.index("## Limits")
    assert cli.main(["inspect", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "evaluation (" in text and "FD to base, retained" in text and fd in text
    assert cli.main(["inspect", str(folder / "pytorch_lora_weights.safetensors"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = {r["metric"]: r for r in summary["evaluation"]["summary"]}
    assert rows["FD to base, retained"]["after"] == fd and rows["FD to base, retained"]["before"] == "–"


# ------------------------------------------------------------------------------------ shipped protocols


PROTOCOLS = ["celebrity", "nudity", "art_style", "object"]


def _script_argv(path) -> list[str]:
    import shlex

    text = path.read_text().replace("\\\n", " ")
    command = next(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return [a for a in shlex.split(command) if a != '"$@"' and a != "$@"]


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_evaluate_commands_pass_every_check(name, clip_dir, no_pipeline, monkeypatch, tmp_path):
    """Each shipped evaluate.sh parses, reads its files, resolves its labels and reaches pipeline loading."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    argv = _script_argv(root / "examples" / "protocols" / name / "evaluate.sh")
    assert argv[:2] == ["sa-peft", "evaluate"]
    argv = [f"clip:{clip_dir}" if a == "clip:openai/clip-vit-large-patch14" else
            str(clip_dir) if a == "openai/clip-vit-large-patch14" else a for a in argv[1:]]
    from safetensors.torch import save_file

    # --lora is read before anything else (its header and key names), so it must be a LoRA file.
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "pytorch_lora_weights.safetensors")
    for flag, value in (("--lora", tmp_path), ("--output_dir", tmp_path / "evaluation")):
        argv[argv.index(flag) + 1] = str(value)
    if name == "nudity":
        pytest.importorskip("nudenet")
    args = _parser().parse_args([*argv, "--device", "cpu"])
    with pytest.raises(AssertionError, match="must not be loaded"):
        args.func(args)
    assert len(no_pipeline) == 1
    retained, forget, _ = evaluate_command.collect_prompts(args)
    assert len(retained) >= 6 and len(forget) >= 4 and not set(retained) & set(forget)
    if name != "nudity":
        clf = load_classifier(args.classifier, args.class_text)
        mapping, forgotten, _ = before_after.resolve_evaluation_labels(clf, retained, None, forget,
                                                                           args.forget_label)
        assert forgotten == [0]  # the forgotten concept is the first class text
        if name == "object":
            assert all(mapping[p] is not None for p in retained)  # every retained prompt is a class text
    train = _script_argv(root / "examples" / "protocols" / name / "train.sh")
    for flag in ("--forget_prompts_file", "--replay_prompts_file"):
        assert (root / train[train.index(flag) + 1]).is_file()


def test_evaluate_before_after_as_the_training_script_calls_it(clip_run, tmp_path):
    """The training script's final evaluation: one pipeline with the adapter loaded, switched off for the base."""
    from sa_peft.evaluation import generate_samples
    from sa_peft.models import load_pipeline

    root = clip_run[0]
    pipe = load_pipeline("builtin:digits")
    base = generate_samples(pipe, [ONE], 2, seed=0, num_inference_steps=2, show_progress=False)
    pipe.load_lora_weights(str(root / "lora"), adapter_name="forget", use_safetensors=True)
    classifier = load_classifier("builtin:digits-classifier")
    lines = []
    result = before_after.evaluate_before_after(
        pipe, classifier, [ONE, SEVEN], [ZERO], tmp_path / "evaluation", num_per_prompt=2, seed=0,
        num_inference_steps=2, guidance_scale=3.0, disable_adapter=pipe.disable_lora, enable_adapter=pipe.enable_lora,
        log=lines.append)
    before, after = result["before"], result["after"]
    assert torch.allclose(before["samples"][ONE], base[ONE], atol=1e-5)  # the base really had the adapter off
    assert not torch.allclose(after["samples"][ONE], base[ONE], atol=1e-3)
    assert before["fd_to_base"] is None and after["fd_to_base"]["frechet_distance"] > 0
    assert after["fd_to_base"]["feature_space"] == "DigitsClassifier penultimate features"
    assert before["forget"]["forgotten_labels"] == ["zero"] and len(lines) == 3
    assert (tmp_path / "evaluation" / "metrics.json").is_file()
