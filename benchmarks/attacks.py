"""Red-teaming the forget adapter on builtin:digits: every attack × {default, --robust_forgetting} × base.

    OMP_NUM_THREADS=1 python benchmarks/attacks.py --work_dir /tmp/attacks --output benchmarks/results/attacks.md

For each forgotten digit and each kind of adapter, one real run of training_scripts/train_sa_lora.py
(default flags; ``robust`` adds --robust_forgetting), then:
- ``sa-peft attack`` with its default budgets (every attack; relearn on the base model's samples of the nine
  retained digits, 300 steps);
- ``sa-peft attack --attack relearn --relearn_data_dir`` on *real* digits: the classifier's held-out
  scikit-learn digits of the nine retained classes (the independent check of issue 13), 300 steps;
- ``sa-peft evaluate`` (50 samples per digit prompt, seed 0) for the retained-quality targets of issue
  "Forgetting that works on every concept" (mean accuracy drop ≤ 0.5 point, Fréchet distance ≤ base + 5 %,
  off-manifold ≤ base + 1 point).
Each finished row is appended to --jsonl (default WORK_DIR/attacks.jsonl), so an interrupted run resumes; every
command's output folder is kept under --work_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from sa_peft import cli
from sa_peft.classifier import load_classifier
from sa_peft.defaults import DIGIT_PROMPTS, DIGIT_WORDS
from sa_peft.io_utils import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training_scripts" / "train_sa_lora.py"
KINDS = {"default": [], "robust": ["--robust_forgetting"]}
ATTACKS = ("prompts", "inversion", "soft_prompt", "relearn", "relearn_real")


def train(folder: Path, digit: str, kind: str, flags: list[str]) -> float:
    """Train (or reuse) the adapter; returns the run's training seconds (generation + Fisher + loop)."""
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        cmd = [sys.executable, str(SCRIPT), "--output_dir", str(folder), "--forget_prompt", f"a handwritten digit {digit}",
               "--classifier", "", "--num_validation_images", "1", "--validation_steps", "1000000", *KINDS[kind], *flags]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    timings = json.loads((folder / "timings.json").read_text())
    return sum(timings.values())


def real_digits_folder(work: Path, forgotten: int) -> Path:
    """PNGs (with captions) of the classifier's held-out real digits of every class but ``forgotten``."""
    folder = work / f"real-digits-without-{DIGIT_WORDS[forgotten]}"
    if folder.is_dir():
        return folder
    tmp = folder.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier("builtin:digits-classifier")
    images, labels = classifier.reference_images(), classifier.reference_labels()
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        if label == forgotten:
            continue
        array = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array).save(tmp / f"{i:04d}.png")
        (tmp / f"{i:04d}.txt").write_text(DIGIT_PROMPTS[label])
    tmp.rename(folder)
    return folder


def attack(adapter: Path, out: Path, digit: str, extra: list[str]) -> dict:
    if not (out / "attack.json").is_file():
        argv = ["attack", "--lora", str(adapter), "--forget_prompt", f"a handwritten digit {digit}",
                "--output_dir", str(out), *extra]
        print("sa-peft " + " ".join(argv), flush=True)
        if cli.main(argv) != 0:
            raise SystemExit(f"sa-peft attack failed for {adapter}")
    return json.loads((out / "attack.json").read_text())


def evaluate(adapter: Path, out: Path, digit: str, num_images: int) -> dict:
    if not (out / "metrics.json").is_file():
        argv = ["evaluate", "--lora", str(adapter), "--forget_prompt", f"a handwritten digit {digit}",
                "--num_images_per_prompt", str(num_images), "--output_dir", str(out)]
        print("sa-peft " + " ".join(argv), flush=True)
        if cli.main(argv) != 0:
            raise SystemExit(f"sa-peft evaluate failed for {adapter}")
    metrics = json.loads((out / "metrics.json").read_text())
    b, a = metrics["before"], metrics["after"]
    return {"base_accuracy": b["retained"]["mean_accuracy"], "accuracy": a["retained"]["mean_accuracy"],
            "base_fd": b["quality"]["frechet_distance"], "fd": a["quality"]["frechet_distance"],
            "base_off": b["quality"]["off_manifold_rate"], "off": a["quality"]["off_manifold_rate"]}


def run_row(work: Path, digit: str, kind: str, args) -> dict:
    label = DIGIT_WORDS.index(digit)
    adapter = work / f"{kind}-{digit}"
    seconds = train(adapter, digit, kind, shlex.split(args.train_flags))
    flags = shlex.split(args.attack_flags)
    result = attack(adapter, work / f"attack-{kind}-{digit}", digit, flags)
    real = attack(adapter, work / f"attack-real-{kind}-{digit}", digit,
                  [*flags, "--attack", "relearn", "--relearn_data_dir", str(real_digits_folder(work, label))])
    rates = {name: r["attack_success_rate"] for name, r in result["attacks"].items()}
    base = {name: r["base_rate"] for name, r in result["attacks"].items()}
    rates["relearn_real"] = real["attacks"]["relearn"]["attack_success_rate"]
    base["relearn_real"] = real["attacks"]["relearn"]["base_rate"]
    curves = {"relearn": result["attacks"]["relearn"]["recovery_curve"],
              "relearn_real": real["attacks"]["relearn"]["recovery_curve"]}
    return {"digit": digit, "kind": kind, "train_seconds": round(seconds, 1), "no_attack": result["no_attack"],
            "rates": rates, "base_rates": base, "curves": curves,
            "attack_seconds": {n: r["seconds"] for n, r in result["attacks"].items()},
            "retained": evaluate(adapter, work / f"evaluate-{kind}-{digit}", digit, args.num_images_per_prompt)}


def retained_ok(r: dict) -> bool:
    return (r["base_accuracy"] - r["accuracy"] <= 0.005 and r["fd"] <= 1.05 * r["base_fd"]
            and r["off"] <= r["base_off"] + 0.01)


def table(rows: list[dict]) -> list[str]:
    head = ["digit", "adapter", "no attack", *ATTACKS, "retained acc", "FD", "off-manifold", "retained targets",
            "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        r = row["retained"]
        if row["kind"] == "default":
            lines.append("| " + " | ".join([row["digit"], "base model", f"{row['no_attack']['base']:.3f}",
                                            *(f"{row['base_rates'][a]:.3f}" for a in ATTACKS),
                                            f"{r['base_accuracy']:.3f}", f"{r['base_fd']:.2f}", f"{r['base_off']:.3f}",
                                            "—", "—"]) + " |")
        lines.append("| " + " | ".join([row["digit"], row["kind"], f"{row['no_attack']['adapted']:.3f}",
                                        *(f"{row['rates'][a]:.3f}" for a in ATTACKS), f"{r['accuracy']:.3f}",
                                        f"{r['fd']:.2f}", f"{r['off']:.3f}", "met" if retained_ok(r) else "MISSED",
                                        f"{row['train_seconds']:.0f}"]) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", nargs="+", default=["zero", "three"], choices=DIGIT_WORDS)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--work_dir", required=True, help="adapters, attack and evaluation outputs (kept)")
    parser.add_argument("--jsonl", default=None, help="finished rows (default: WORK_DIR/attacks.jsonl)")
    parser.add_argument("--output", default=None, help="also write the table to this Markdown file")
    parser.add_argument("--num_images_per_prompt", type=int, default=50, help="sa-peft evaluate samples per digit")
    parser.add_argument("--train_flags", default="", help="extra training-script flags (one string), for smoke runs")
    parser.add_argument("--attack_flags", default="", help="extra sa-peft attack flags (one string), for smoke runs")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    jsonl = Path(args.jsonl or work / "attacks.jsonl")
    done = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    for digit in args.digits:
        for kind in args.kinds:
            if any(r["digit"] == digit and r["kind"] == kind for r in done):
                continue
            start = time.perf_counter()
            row = run_row(work, digit, kind, args)
            row["wall_seconds"] = round(time.perf_counter() - start, 1)
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
    rows = sorted((r for r in done if r["digit"] in args.digits and r["kind"] in args.kinds),
                  key=lambda r: (DIGIT_WORDS.index(r["digit"]), list(KINDS).index(r["kind"])))
    lines = [(f"# Attacks on forget adapters, builtin:digits — {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
             f"torch {torch.__version__}"), "", *table(rows), "",
             "Recovery curves (step: share of forget-prompt samples read as the digit):", ""]
    for row in rows:
        for name, curve in row["curves"].items():
            lines.append(f"- {row['digit']}, {row['kind']}, {name}: "
                         + ", ".join(f"{c['step']}: {c['success_rate']:.2f}" for c in curve))
    lines += ["", (f"Command: OMP_NUM_THREADS=1 python benchmarks/attacks.py --work_dir WORK --digits {' '.join(args.digits)} "
              f"--kinds {' '.join(args.kinds)}")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        write_text_atomic(args.output, text)


if __name__ == "__main__":
    main()
