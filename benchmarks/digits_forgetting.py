"""Does Selective Amnesia forget "zero" on builtin:digits and keep the other nine? One table, measured.

    OMP_NUM_THREADS=1 python benchmarks/digits_forgetting.py --output benchmarks/results/digits_forgetting.md

Every row is a real run of training_scripts/train_sa_lora.py (default flags plus the row's changes),
then an evaluation with builtin:digits-classifier on --num_images_per_prompt samples per prompt (DDIM 25
steps, guidance 3, the same seeds for every row). Rows: the default; surrogate kinds; EWC space;
ablations of EWC and replay; LoRA target presets; the reference against the fast Fisher estimator; a
sweep of λ and γ; durability (the default LoRA fused, then the model fine-tuned on the retained digits
only, with the plain diffusion loss); and stacking two forget LoRAs from separate runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sa_peft.classifier import load_classifier
from sa_peft.defaults import DIGIT_PROMPTS
from sa_peft.evaluation import evaluate_pipeline
from sa_peft.io_utils import write_text_atomic
from sa_peft.models import load_pipeline

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_sa_lora.py"

# (row name, flags changed from the default). The default surrogate pairs the forget prompt with the
# frozen model's own images of the digit one; --extra flags apply to every row.
ROWS = [
    ("default", []),
    ("surrogate: uniform noise", ["--surrogate_type", "uniform_noise"]),
    ("surrogate: gaussian noise", ["--surrogate_type", "gaussian_noise"]),
    ("EWC space: full", ["--ewc_space", "full"]),
    ("no EWC (λ=0)", ["--ewc_lambda", "0"]),
    ("no replay (γ=0)", ["--replay_weight", "0"]),
    ("neither EWC nor replay", ["--ewc_lambda", "0", "--replay_weight", "0"]),
    ("targets: xattn", ["--lora_target", "xattn"]),
    ("targets: attn", ["--lora_target", "attn"]),
    ("targets: noxattn", ["--lora_target", "noxattn"]),
    ("Fisher: reference, 32 samples (32,000 passes)", ["--fisher_estimator", "reference", "--fisher_num_samples", "32"]),
    ("Fisher: fast K=8, 32 samples (256 passes)", ["--fisher_estimator", "fast", "--fisher_num_samples", "32"]),
    ("λ=1", ["--ewc_lambda", "1"]),
    ("λ=3", ["--ewc_lambda", "3"]),
    ("λ=10", ["--ewc_lambda", "10"]),
    ("λ=100", ["--ewc_lambda", "100"]),
    ("γ=0.5", ["--replay_weight", "0.5"]),
    ("γ=2", ["--replay_weight", "2"]),
]


def load_train_module():
    spec = importlib.util.spec_from_file_location("train_sa_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(module, work_dir: str, flags: list[str]):
    """Run the training script in-process; returns (pipeline with the adapter, seconds)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    start = time.perf_counter()
    pipe = module.main(["--output_dir", work_dir, "--classifier", "", "--num_validation_images", "1",
                        "--validation_steps", "1000000", *flags])
    return pipe, time.perf_counter() - start


def evaluate(pipe, classifier, n: int, forget: list[str], forgotten: list[int]) -> dict:
    labels = {p: i for i, p in enumerate(DIGIT_PROMPTS)}
    pipe.unet.eval()
    metrics = evaluate_pipeline(pipe, classifier, list(DIGIT_PROMPTS), labels, forget, forgotten, n, seed=1234)
    metrics.pop("samples")
    return metrics


def summary(metrics: dict, surrogate_label: int | None = None) -> dict:
    forget_prompt = metrics["settings"]["forget_prompts"][0]
    row = {
        "p_forgotten": metrics["forget"]["p_forgotten"],
        "predicted_forgotten": metrics["forget"]["predicted_forgotten_rate"],
        "retained_mean": metrics["retained"]["mean_accuracy"],
        "retained_worst": metrics["retained"]["worst_accuracy"],
        "frechet": metrics["quality"]["frechet_distance"],
        "off_manifold": metrics["quality"]["off_manifold_rate"],
    }
    if surrogate_label is not None:
        hist = metrics["per_prompt"][forget_prompt]["histogram"]
        row["as_surrogate"] = hist[surrogate_label] / sum(hist)
    return row


def fine_tune_on_retained(pipe, work_dir: str, steps: int, seed: int = 0) -> None:
    """Durability probe: fuse the forget LoRA, then train all UNet weights on retained-digit replay only
    (``sa-peft attack --attack relearn`` runs the same loop, ``sa_peft.attacks.fine_tune_unet``)."""
    from sa_peft.attacks import fine_tune_unet
    from sa_peft.conditioning import encode_prompts
    from sa_peft.data import load_image_set
    from sa_peft.diffusion_loss import noise_scheduler_for

    replay_dir = next(p for p in Path(work_dir, "cache").glob("replay-*") if (p / "metadata.jsonl").exists())
    data = load_image_set(replay_dir)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    cond = encode_prompts(pipe, data.prompts)
    fine_tune_unet(pipe.unet, noise_scheduler_for(pipe.scheduler), data.latents, data.prompt_ids(cond.prompts), cond,
                   steps, lr=1e-4, batch_size=32, seed=seed)


def fmt(value, digits=3):
    return "—" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=None, help="run only these rows (exact names; 'stack' for stacking)")
    parser.add_argument("--num_images_per_prompt", type=int, default=50)
    parser.add_argument("--durability_steps", type=int, default=300)
    parser.add_argument("--skip_durability", action="store_true")
    parser.add_argument("--skip_stacking", action="store_true")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags added to every run (e.g. --max_train_steps 20)")
    parser.add_argument("--work_dir", default=None, help="shared cache of sets and Fishers (default: a temp dir)")
    parser.add_argument("--output", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()

    work = args.work_dir or tempfile.mkdtemp(prefix="digits-bench-")
    module = load_train_module()
    classifier = load_classifier("builtin:digits-classifier")
    n = args.num_images_per_prompt
    zero = ["a handwritten digit zero"]
    started = time.strftime("%Y-%m-%d %H:%M")
    lines = [
        (f"# Forgetting 'zero' on builtin:digits — {started}, {platform.machine()}, torch {torch.__version__}, "
         f"{torch.get_num_threads()} thread(s)"),
        "",
        (f"{n} samples per prompt (DDIM 25, guidance 3, seed 1234) scored by builtin:digits-classifier. P(0): mean "
         "classifier probability of 'zero' on samples of the forget prompt; '→0': share classified as zero; retained: "
         "accuracy over the nine other prompts (mean / worst); FD: Fréchet distance of retained samples to real held-out "
         "digits in the classifier's feature space; off: off-manifold rate of retained samples."),
        "",
        "| run | P(0) | →0 | →surrogate | retained mean | retained worst | FD | off-manifold | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        if args.output:
            write_text_atomic(args.output, "\n".join(lines) + "\n")

    for line in lines:
        print(line)
    base = summary(evaluate(load_pipeline("builtin:digits"), classifier, n, zero, [0]))
    emit(f"| base model | {fmt(base['p_forgotten'])} | {fmt(base['predicted_forgotten'])} | — | {fmt(base['retained_mean'])} | "
         f"{fmt(base['retained_worst'])} | {fmt(base['frechet'], 2)} | {fmt(base['off_manifold'])} | — |")
    results = {}
    for name, flags in ROWS:
        if args.rows and name not in args.rows and not (name == "default" and "default" in args.rows):
            continue
        pipe, seconds = train(module, work, flags + args.extra)
        surrogate_label = None if any(f.startswith("--surrogate") for f in flags + args.extra) else 1
        row = summary(evaluate(pipe, classifier, n, zero, [0]), surrogate_label)
        results[name] = row
        emit(f"| {name} | {fmt(row['p_forgotten'])} | {fmt(row['predicted_forgotten'])} | {fmt(row.get('as_surrogate'))} | "
             f"{fmt(row['retained_mean'])} | {fmt(row['retained_worst'])} | {fmt(row['frechet'], 2)} | "
             f"{fmt(row['off_manifold'])} | {seconds:.0f} |")
        if name == "default" and not args.skip_durability:
            fine_tune_on_retained(pipe, work, args.durability_steps)
            after = summary(evaluate(pipe, classifier, n, zero, [0]))
            emit(f"| default, fused, then {args.durability_steps} steps of plain fine-tuning on retained digits | "
                 f"{fmt(after['p_forgotten'])} | {fmt(after['predicted_forgotten'])} | — | {fmt(after['retained_mean'])} | "
                 f"{fmt(after['retained_worst'])} | {fmt(after['frechet'], 2)} | {fmt(after['off_manifold'])} | — |")

    if not args.skip_stacking and (not args.rows or "stack" in args.rows):
        # Two separate runs (forget zero; forget one), stacked in one pipeline with set_adapters.
        folders = {}
        for word in ("zero", "one"):
            out = os.path.join(work, f"stack-{word}")
            train(module, out, ["--forget_prompt", f"a handwritten digit {word}", *args.extra])
            folders[word] = out
        pipe = load_pipeline("builtin:digits")
        for word, folder in folders.items():
            pipe.load_lora_weights(folder, adapter_name=f"forget_{word}")
        pipe.set_adapters(["forget_zero", "forget_one"], adapter_weights=[1.0, 1.0])
        metrics = evaluate(pipe, classifier, n, ["a handwritten digit zero", "a handwritten digit one"], [0, 1])
        pp = metrics["per_prompt"]
        p0 = pp["a handwritten digit zero"]["p_forgotten_per_class"]["zero"]
        p1 = pp["a handwritten digit one"]["p_forgotten_per_class"]["one"]
        emit(f"| stacked: forget-zero + forget-one LoRAs (P(0) on zero; P(1) on one) | {fmt(p0)}; {fmt(p1)} | — | — | "
             f"{fmt(metrics['retained']['mean_accuracy'])} | {fmt(metrics['retained']['worst_accuracy'])} | "
             f"{fmt(metrics['quality']['frechet_distance'], 2)} | {fmt(metrics['quality']['off_manifold_rate'])} | — |")

    emit("")
    emit("Command: OMP_NUM_THREADS=1 python benchmarks/digits_forgetting.py" + (f" --rows {' '.join(args.rows)}" if args.rows else "")
         + (f" --num_images_per_prompt {n}" if n != 50 else "") + (f" --extra {' '.join(args.extra)}" if args.extra else ""))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"base": base, **results}, indent=1))


if __name__ == "__main__":
    main()
