"""Smoke runs: every benchmark script runs end to end on the smallest settings (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(BENCH / script), *args], check=False, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_penalty_overhead_smoke():
    out = run("penalty_overhead.py", "--unets", "tiny", "--steps", "1", "--full_block_sizes", "0", "4096")
    assert "| tiny |" in out and "overhead" in out
    assert "| UNet | unblocked | 2^12 |" in out and out.count("| tiny |") == 2


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_fisher_estimators_smoke():
    out = run("fisher_estimators.py", "--model", "tiny", "--reference_samples", "2", "--fast", "2x2", "--num_inference_steps", "2")
    assert "| reference (all T) | 2 |" in out and "| fast K=2 | 2 |" in out


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_gpu_memory_smoke_on_cpu():
    out = run("gpu_memory.py", "--device", "cpu", "--unets", "tiny", "--steps", "1")
    assert out.count("| tiny |") >= 5


@pytest.mark.slow
def test_memory_smoke():
    out = run("memory.py", "--unets", "tiny", "--measure", "tiny", "--measure_steps", "1")
    assert "| tiny |" in out


@pytest.mark.parametrize("rows", [["default", "stack"]])
@pytest.mark.slow
def test_digits_forgetting_smoke(tmp_path, rows):
    out = run("digits_forgetting.py", "--rows", *rows, "--num_images_per_prompt", "2", "--durability_steps", "2",
              "--output", str(tmp_path / "table.md"), "--extra", "--max_train_steps", "2", "--num_surrogate_images", "16",
              "--num_replay_images_per_prompt", "2", "--fisher_num_samples", "4", "--generation_num_inference_steps", "5")
    table = (tmp_path / "table.md").read_text()
    for row in ("| base model |", "| default |", "plain fine-tuning", "| stacked:"):
        assert row in table and row in out


@pytest.mark.slow
def test_forgetting_every_concept_smoke(tmp_path):
    run("forgetting_every_concept.py", "--digits", "2", "--seeds", "0", "--surrogates", "digit", "noise", "--pairs", "0+1",
        "--num_images_per_prompt", "2", "--work_dir", str(tmp_path), "--output", str(tmp_path / "table.md"), "--extra",
        "--max_train_steps", "2", "--num_surrogate_images", "8", "--num_replay_images_per_prompt", "2",
        "--fisher_num_samples", "4", "--generation_num_inference_steps", "3", "--num_probe_images", "2")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["trained_steps"] == 2 for r in rows)
    # Two steps do not forget: the verdict says so, and the classifier agrees on the base model's digit.
    assert all(r["forgetting"]["reached"] is False for r in rows)
    assert rows[0]["before"]["forget"]["a handwritten digit two"]["p_forgotten"] > 0.5
    assert "Rows meeting every target" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_attacks_smoke(tmp_path):
    run("attacks.py", "--digits", "zero", "--work_dir", str(tmp_path), "--output", str(tmp_path / "table.md"),
        "--num_images_per_prompt", "2", "--train_flags",
        "--max_train_steps 2 --num_surrogate_images 16 --num_replay_images_per_prompt 2 --fisher_num_samples 4 "
        "--generation_num_inference_steps 5 --num_probe_images 2",
        "--attack_flags", "--num_images 2 --prompts_num_images 1 --num_inference_steps 3 --inversion_steps 2 "
        "--soft_prompt_steps 2 --relearn_steps 2 --relearn_images_per_prompt 1 --attack_num_train_images 4")
    table = (tmp_path / "table.md").read_text()
    for row in ("| zero | base model |", "| zero | default |", "| zero | robust |", "relearn_real"):
        assert row in table
    assert len((tmp_path / "attacks.jsonl").read_text().splitlines()) == 2


def _benchmark(name: str = "sd3_digits_forgetting"):
    import importlib.util

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:  # the benchmarks import each other, as when run as scripts
        sys.path.insert(0, str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_concept_table_shows_both_forms_of_the_sample_check():
    """With a surrogate prompt the verdict records shares (in training), without one margins (at the end)."""
    cell = _benchmark("forgetting_every_concept").sample_check_cell
    assert cell(None) == "–"
    assert cell({"sample_share": 0.0625, "surrogate_share": 0.0, "num_samples": 16, "forgotten": False}) == "0.06 > 0.00"
    assert cell({"sample_share": 0.0, "surrogate_share": 0.0, "num_samples": 16, "forgotten": True}) == "0.00 ≤ 0.00"
    new = {"sample_share": 0.0, "surrogate_share": 0.0, "sample_as_surrogate": 0.875, "surrogate_as_surrogate": 1.0,
           "num_samples": 16, "forgotten": False}
    assert cell(new) == "0.00 ≤ 0.00; as surrogate 0.88 < 0.90"
    assert cell({**new, "sample_as_surrogate": 0.9375, "forgotten": True}) == "0.00 ≤ 0.00; as surrogate 0.94 ≥ 0.90"
    assert cell({"sample_margin": 0.01, "reference_margin": 0.004, "concept_margin": -0.02, "surrogate_margin": 0.01,
                 "num_samples": 32, "forgotten": True}) == "+0.0100 ≥ +0.0040"


def test_sd3_digits_benchmark_runs_the_defaults_and_judges_like_the_unet_one(tmp_path):
    """The training command passes only the documented flags (plus ``--classifier ''`` when ``sa-peft evaluate``
    scores it), and a row is judged by the UNet benchmark's targets, misses included, per forgotten digit."""
    bench = _benchmark()
    cmds = bench.commands([3], "digit", 0, tmp_path, 50)
    assert bench.shown(cmds["train"]) == (
        "python training_scripts/train_sa_lora.py --pretrained_model_name_or_path builtin:digits-sd3 --forget_prompt "
        f"'a handwritten digit three' --surrogate_prompt 'a handwritten digit four' --output_dir {tmp_path} --seed 0 "
        "--classifier ")
    assert bench.commands([3], "digit", 0, tmp_path, 50, evaluate=False)["train"][-2:] == ["--seed", "0"]
    assert bench.shown(cmds["evaluate"]).startswith("sa-peft evaluate --pretrained_model_name_or_path builtin:digits-sd3")
    pair = bench.commands([0, 1], "digit", 0, tmp_path, 20)
    assert bench.shown(pair["train"]).count("--surrogate_prompt 'a handwritten digit two'") == 2
    assert bench.shown(pair["evaluate"]).count("--forget_prompt") == 2
    noise = bench.shown(bench.commands([3], "noise", 0, tmp_path, 20)["train"])
    assert "--surrogate_type uniform_noise" in noise and "--surrogate_prompt" not in noise

    def stage(p_three, hist_three, accuracy, fd, off, p_other=0.0):
        per_prompt = {p: {"p_forgotten_per_class": {}, "histogram": [0] * 10, "label_name": p.split()[-1]}
                      for p in bench.DIGIT_PROMPTS}
        # P of every forgotten class under "three": the row counts only three's own.
        per_prompt[bench.DIGIT_PROMPTS[3]].update(p_forgotten_per_class={"three": p_three, "zero": p_other},
                                                  histogram=hist_three)
        return {"per_prompt": per_prompt, "retained": {"mean_accuracy": accuracy}, "num_per_prompt": 20,
                "quality": {"frechet_distance": fd, "off_manifold_rate": off}, "settings": {"sampler": "s"}}

    three = bench.DIGIT_PROMPTS[3]
    before = stage(0.97, [0, 0, 0, 20, 0, 0, 0, 0, 0, 0], 1.0, 10.0, 0.04)
    good = bench.judge({"before": before, "after": stage(0.01, [0, 0, 0, 0, 20, 0, 0, 0, 0, 0], 0.996, 10.4, 0.05,
                                                         p_other=0.5)}, [3], "digit", {three: True})
    assert good["concepts"][three]["as_surrogate"] == 1.0 and all(good["checks"].values())
    bad = bench.judge({"before": before, "after": stage(0.03, [0, 0, 0, 1, 19, 0, 0, 0, 0, 0], 0.99, 10.6, 0.06)},
                      [3], "digit", {three: True})
    assert bad["concepts"][three]["as_surrogate"] == 0.95
    assert {k for k, ok in bad["checks"].items() if not ok} == {
        "three: P ≤ 0.020", "retained drop ≤ 0.005", "FD ≤ base + 5 %", "off-manifold ≤ base + 1 pt",
        "three: verdict agrees"}
    # Noise: the classifier's P(three) on pixel noise + 0.02 is the target; no surrogate share is asked.
    target = round(bench.noise_p(bench.digits_classifier(), 3) + 0.02, 4)
    noisy = bench.judge({"before": before, "after": stage(target - 0.01, [2, 9, 0, 1, 0, 0, 0, 0, 8, 0], 1.0, 10.0,
                                                          0.04)}, [3], "noise", {three: True})
    assert noisy["concepts"][three]["target"] == target and all(noisy["checks"].values())
    over = bench.judge({"before": before, "after": stage(target + 0.01, [2, 9, 0, 1, 0, 0, 0, 0, 8, 0], 1.0, 10.0,
                                                         0.04)}, [3], "noise", {three: True})
    assert {k for k, ok in over["checks"].items() if not ok} == {f"three: P ≤ {target:.3f}", "three: verdict agrees"}


@pytest.mark.slow
def test_sampling_trajectory_reads_the_base_models_digit_at_every_step():
    """The base SD3 digits model's x̂₀ is its digit from the first step on; σ falls step by step."""
    out = run("sampling_trajectory.py", "base", "--digit", "4", "--num_images", "4")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    steps, sample = rows[:-1], rows[-1]
    assert len(steps) == 24 and sample[0].strip() == "the sample"
    sigmas = [float(r[1]) for r in steps]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] > 0.9 and sigmas[-1] < 0.01
    assert all(int(r[3]) >= 3 for r in steps) and int(sample[3]) == 4  # measured at 50 samples: 50 of 50 every step
