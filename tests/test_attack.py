"""`sa-peft attack`: the four attacks on the tiny pipeline, their scoring, and bad input that fails first."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import add_forget_lora

from sa_peft import cli
from sa_peft.adapter_io import save_forget_lora
from sa_peft.attacks import AttackContext, prompt_variants, run_attacks, write_attack_report
from sa_peft.attacks.inversion import add_token, learn_token
from sa_peft.attacks.soft_prompt import project
from sa_peft.classifier import ImageClassifier
from sa_peft.commands import attack as attack_command
from sa_peft.evaluation import iter_samples
from sa_peft.merge import stack_forget_loras
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

PROMPT = "a photo of a cat"
FAST = {"num_images": 4, "num_inference_steps": 2, "guidance_scale": 3.0, "batch_size": 8}


class BrightnessClassifier(ImageClassifier):
    """Two classes read off the mean pixel value: P(bright) = sigmoid(40 · (mean − threshold))."""

    def __init__(self, threshold: float):
        self.labels = ["dark", "bright"]
        self.threshold = threshold

    def predict_proba(self, images):
        p = torch.sigmoid(40 * (images.float().mean(dim=(1, 2, 3)) - self.threshold))
        return torch.stack([1 - p, p], dim=1)

    def features(self, images):
        return images.flatten(1)[:, :4].float()


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, "all", seed=3)
    folder = tmp_path_factory.mktemp("attack-lora")
    save_forget_lora(folder, pipe.unet, {"base_model": "tiny", "forget_prompts": [PROMPT]})
    return folder


@pytest.fixture(scope="module")
def threshold():
    """The median brightness of the tiny base model's samples, so both classes occur."""
    images = next(iter(iter_samples(build_tiny_pipeline(), [PROMPT], 8, 0, 2, 3.0, show_progress=False)))[1]
    return images.float().mean(dim=(1, 2, 3)).median().item()


def make_context(lora_file, threshold, **overrides):
    pipe = build_tiny_pipeline()
    names = stack_forget_loras(pipe, [lora_file])
    ctx = AttackContext(pipe, BrightnessClassifier(threshold), [PROMPT], [1], enable_adapter=pipe.enable_lora,
                        disable_adapter=pipe.disable_lora, log=lambda _: None, **{**FAST, **overrides})
    return ctx, names


OPTIONS = {
    "prompts": {"num_images": 2},
    "inversion": {"steps": 3, "num_train_images": 4, "train_batch_size": 2},
    "soft_prompt": {"steps": 3, "num_train_images": 4, "train_batch_size": 2},
    "relearn": {"prompts": ["a photo of a dog"], "images_per_prompt": 4, "steps": 2, "batch_size": 2},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_attack_runs_on_the_tiny_pipeline(name, lora_file, threshold, tmp_path):
    ctx, names = make_context(lora_file, threshold)
    options = {name: {**OPTIONS[name], **({"adapter_names": names} if name == "relearn" else {})}}
    payload, grids = run_attacks(ctx, [name], options, {"forget_prompts": [PROMPT], "classifier": "brightness",
                                                        "num_images": 4, "seed": 0, "num_inference_steps": 2,
                                                        "guidance_scale": 3.0})
    result = payload["attacks"][name]
    assert 0 <= result["attack_success_rate"] <= 1 and 0 <= result["base_rate"] <= 1
    assert {"base", "adapted"} <= set(payload["no_attack"])
    paths = write_attack_report(payload, grids, tmp_path)
    saved = json.loads((tmp_path / "attack.json").read_text())
    assert saved["attacks"][name]["attack_success_rate"] == result["attack_success_rate"]
    assert f"| {name} |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "attack_grid.png").stat().st_size > 0 and set(paths) == {"attack", "report", "grid"}


def test_prompts_attack_base_rate_is_the_base_models(lora_file, threshold):
    """The base rate comes from the model without the adapter: a fresh base pipeline gives the same numbers."""
    ctx, _ = make_context(lora_file, threshold)
    result = run_attacks(ctx, ["prompts"], {"prompts": {"num_images": 2}}, {})[0]["attacks"]["prompts"]
    base, scorer = build_tiny_pipeline(), BrightnessClassifier(threshold)
    variants = list(result["per_prompt"])
    samples = dict(iter_samples(base, variants, 2, 0, 2, 3.0, batch_size=8, show_progress=False))
    for variant in variants:
        expected = (scorer.predict_proba(samples[variant]).argmax(1) == 1).double().mean().item()
        assert result["per_prompt"][variant]["base"]["success_rate"] == pytest.approx(expected)
    adapted = [m["adapted"]["success_rate"] for m in result["per_prompt"].values()]
    assert result["attack_success_rate"] == pytest.approx(sum(adapted) / len(adapted))


def test_prompt_variants_reword_without_the_prompt_itself():
    variants = prompt_variants("a handwritten digit zero", ["{word} in {prompt}"])
    assert "a handwritten digit zero" not in variants
    assert {"a handwritten digit cero", "a handwritten digit 0", "a handwritten digit zeo", "a handwritten digit zreo", "a handwritten digit zerro"} <= set(variants)
    assert "a handwritten digit zero on white paper" in variants
    assert variants[-1] == "zero in a handwritten digit zero"


def test_inversion_moves_only_the_new_token_and_fits_the_images(lora_file, threshold):
    ctx, _ = make_context(lora_file, threshold)
    embedding = ctx.pipe.text_encoder.get_input_embeddings()
    before = embedding.weight.detach().clone()
    rows = add_token(ctx.pipe, "<concept>")
    row = rows[0][1]
    assert row == before.shape[0]
    assert torch.allclose(embedding.weight[row], before.mean(0))
    latents = ctx.concept_latents(PROMPT, 4)
    history = learn_token(ctx, latents, "<concept>", rows, steps=30, lr=0.1, batch_size=4, seed=0)
    after = ctx.pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[:row], before)  # every old row untouched
    assert not torch.allclose(after[row], before.mean(0))
    assert not after.requires_grad
    assert sum(history[-2:]) < sum(history[:2])


def test_soft_prompt_perturbation_stays_inside_its_bound(lora_file, threshold):
    reference = torch.randn(1, 5, 8)
    delta = project(torch.randn(1, 5, 8) * 10, reference, 0.1)
    assert (delta.norm(dim=-1) <= 0.1 * reference.norm(dim=-1) + 1e-6).all()
    small = torch.randn(1, 5, 8) * 1e-4
    assert torch.equal(project(small, reference, 0.1), small)
    ctx, _ = make_context(lora_file, threshold)
    options = {"soft_prompt": {"steps": 5, "lr": 1.0, "epsilon": 0.05, "num_train_images": 4, "train_batch_size": 2}}
    result = run_attacks(ctx, ["soft_prompt"], options, {})[0]["attacks"]["soft_prompt"]
    assert 0.04 < result["per_concept"][PROMPT]["max_relative_norm"] <= 0.05 + 1e-5


def test_relearn_on_an_adapter_that_forgot_nothing_reports_the_base_rate(tmp_path):
    """A LoRA whose B is zero changes nothing: before fine-tuning the relearned model is the base model, and a few
    benign steps leave P(zero) where the base model has it."""
    from sa_peft.models import load_pipeline

    digits = load_pipeline("builtin:digits")
    add_forget_lora(digits.unet, "all", randomize=False)
    save_forget_lora(tmp_path / "noop", digits.unet, {"base_model": "builtin:digits"})
    out = tmp_path / "out"
    assert cli.main(["attack", "--lora", str(tmp_path / "noop"), "--forget_prompt", "a handwritten digit zero",
                     "--attack", "relearn", "--relearn_steps", "4", "--relearn_eval_steps", "0",
                     "--relearn_eval_steps", "4", "--relearn_prompt", "a handwritten digit one",
                     "--relearn_images_per_prompt", "8", "--relearn_batch_size", "8", "--num_images", "10",
                     "--num_inference_steps", "5", "--output_dir", str(out), "--device", "cpu"]) == 0
    payload = json.loads((out / "attack.json").read_text())
    result = payload["attacks"]["relearn"]
    assert payload["no_attack"]["adapted"] == payload["no_attack"]["base"] == result["base_rate"]
    assert result["base_rate"] >= 0.8  # the digits model draws zeros for the zero prompt
    start = result["recovery_curve"][0]
    assert start["step"] == 0 and start["success_rate"] == result["base_rate"]
    # The same weights and the same seeds: the very same samples as the base model's.
    assert start["mean_concept_score"] == pytest.approx(payload["no_attack"]["base_mean_concept_score"], abs=1e-6)
    assert abs(result["attack_success_rate"] - result["base_rate"]) <= 0.1


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the command loads the classifier or the pipeline."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise AssertionError("no model may be loaded before the flags are checked")

    monkeypatch.setattr(attack_command, "load_pipeline_from_args", fail)
    monkeypatch.setattr(attack_command, "load_classifier", fail)
    return calls


@pytest.mark.parametrize("extra, message", [
    ([], "--forget_prompt"),
    (["--forget_prompt", "a handwritten digit zero", "--attack", "jailbreak"], "--attack 'jailbreak'"),
    (["--forget_prompt", "a handwritten digit zero", "--attack", "prompts", "--num_images", "0"], "--num_images"),
    (["--forget_prompt", "a handwritten digit zero", "--relearn_eval_steps", "400"], "--relearn_eval_steps"),
    (["--forget_prompt", "x", "--classifier", "nudenet", "--attack", "relearn"], "benign data"),
    (["--forget_prompt", "a handwritten digit zero", "--inversion_template", "a photo"], "--inversion_template"),
])
def test_bad_input_fails_before_any_work(extra, message, lora_file, tmp_path, no_work, capsys):
    argv = ["attack", "--lora", str(lora_file), *extra, "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert no_work == [] and not (tmp_path / "out").exists()


def test_missing_lora_fails_before_any_work(tmp_path, no_work, capsys):
    argv = ["attack", "--lora", str(tmp_path / "missing"), "--forget_prompt", "a handwritten digit zero",
            "--output_dir", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert "--lora" in capsys.readouterr().err and no_work == []
