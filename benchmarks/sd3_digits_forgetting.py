"""Does the default run forget a digit on the SD3-shaped builtin:digits-sd3? The UNet benchmark's table, measured.

    OMP_NUM_THREADS=1 python benchmarks/sd3_digits_forgetting.py --digits 0 3 7 --jobs 3 \\
        --output benchmarks/results/sd3_digits_forgetting.json

Each row is two real commands, run as a user would run them:

1. ``python training_scripts/train_sa_lora.py --pretrained_model_name_or_path builtin:digits-sd3 --forget_prompt P
   --surrogate_prompt NEXT --output_dir D --seed S`` (the defaults otherwise: the digits job's sets, Fisher, LoRA,
   early stop on the forgetting signal, and its final evaluation: 50 samples per prompt, base and adapted);
2. ``sa-peft inspect --json D`` for the run's own verdict (``forgetting.reached``);

and, with ``--evaluate`` (the default), 3. ``sa-peft evaluate --pretrained_model_name_or_path builtin:digits-sd3
--forget_prompt P --lora D --num_images_per_prompt N --output_dir D/sa-peft-evaluate`` (the pipeline's own Euler
sampler, 25 steps, guidance 3, seed 0). The row's numbers come from that evaluation's metrics.json (from the training
run's own evaluation/metrics.json with ``--no-evaluate``; both are ``evaluate_before_after``). With ``--evaluate`` the
training run gets ``--classifier ''``, which skips only its final evaluation (nothing it trains on), and the base
model's samples are made once (``sa-peft evaluate`` without ``--lora`` into WORK/base) and copied into each row's
sample cache, whose key is the model and the sampling settings: on one CPU thread the 256 zero T5 rows make 1,000
samples take about 13 minutes, and the base ones are the same in every row.

Targets, as benchmarks/forgetting_every_concept.py judges the UNet model: P(forgotten) ≤ 0.02, ≥ 0.95 of the forget
prompt's samples read as the surrogate digit, retained mean accuracy drop ≤ 0.5 point, Fréchet distance ≤ base + 5 %,
off-manifold ≤ base + 1 point, and the run's verdict agreeing with P(forgotten) ≤ 0.02. Rows already in --output are
kept (an interrupted benchmark resumes); ``--jobs`` runs rows side by side.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# The noise target (the classifier's P on pixel noise + 0.02) is the UNet benchmark's own, so both judge alike.
from forgetting_every_concept import noise_p

from sa_peft.defaults import DIGIT_PROMPTS, next_digit_surrogate
from sa_peft.io_utils import write_json_atomic, write_text_atomic

MODEL = "builtin:digits-sd3"
# `sa-peft …` run from this checkout (the console script may belong to another install).
SA_PEFT = [sys.executable, "-c", "import sys; from sa_peft.cli import main; sys.exit(main(sys.argv[1:]))"]


def base_evaluation(seed: int, work_dir: Path, num_images: int) -> list[str]:
    """The base model's samples, once for every row (``sa-peft evaluate`` without ``--lora``)."""
    return [*SA_PEFT, "evaluate", "--pretrained_model_name_or_path", MODEL, "--num_images_per_prompt", str(num_images),
            "--seed", str(seed), "--output_dir", str(work_dir / f"base-seed{seed}"), "--device", "cpu"]


def commands(forget_digits: list[int], kind: str, seed: int, work: Path, num_images: int,
             evaluate: bool = True) -> dict[str, list[str]]:
    """A row's commands: one or more forgotten digits, each with the next digit as surrogate (``kind`` "digit") or
    with uniform-noise surrogate images (``kind`` "noise", ``--surrogate_type uniform_noise``)."""
    skip_final_evaluation = ["--classifier", ""] if evaluate else []
    forget = [DIGIT_PROMPTS[d] for d in forget_digits]
    forget_flags = [flag for prompt in forget for flag in ("--forget_prompt", prompt)]
    if kind == "digit":
        surrogate_flags = [flag for p in forget for flag in ("--surrogate_prompt", next_digit_surrogate(p, forget))]
    else:
        surrogate_flags = ["--surrogate_type", "uniform_noise"]
    return {
        "train": [sys.executable, str(REPO / "training_scripts" / "train_sa_lora.py"), "--pretrained_model_name_or_path",
                  MODEL, *forget_flags, *surrogate_flags, "--output_dir", str(work), "--seed", str(seed),
                  *skip_final_evaluation],
        "inspect": [*SA_PEFT, "inspect", "--json", str(work)],
        "evaluate": [*SA_PEFT, "evaluate", "--pretrained_model_name_or_path", MODEL, *forget_flags,
                     "--lora", str(work), "--num_images_per_prompt", str(num_images), "--seed", str(seed),
                     "--output_dir", str(work / "sa-peft-evaluate"), "--device", "cpu"],
    }


def shown(cmd: list[str]) -> str:
    """The command as a user types it (``sa-peft …``, ``python training_scripts/…``)."""
    if cmd[:len(SA_PEFT)] == SA_PEFT:
        cmd = ["sa-peft", *cmd[len(SA_PEFT):]]
    else:
        cmd = ["python", os.path.relpath(cmd[1], REPO), *cmd[2:]]
    return " ".join(f"'{c}'" if " " in c else c for c in cmd)


def timed(cmd: list[str], log: Path) -> float:
    start = time.time()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return round(time.time() - start, 1)


def phase_seconds(work: Path) -> float:
    """A finished run's time from its timings.json: sets, Fisher, training (and its own evaluation, if it made one);
    the seconds of loading the model before them are not in it."""
    with open(work / "timings.json") as f:
        return round(sum(json.load(f).values()), 1)


@functools.cache
def digits_classifier():
    from sa_peft.classifier import load_classifier

    return load_classifier("builtin:digits-classifier")


def judge(metrics: dict, forget_digits: list[int], kind: str, verdicts: dict) -> dict:
    """The row's numbers and targets from an ``evaluate_before_after`` metrics.json. Per forgotten digit: its own
    class's P under its prompt (with two concepts, the prompt's P of the *other* forgotten digit is not counted)."""
    before, after = metrics["before"], metrics["after"]
    forget = [DIGIT_PROMPTS[d] for d in forget_digits]
    row = {"concepts": {}, "num_per_prompt": after["num_per_prompt"], "sampler": after["settings"]["sampler"],
           "retained_before": before["retained"]["mean_accuracy"], "retained_after": after["retained"]["mean_accuracy"],
           "fd_before": before["quality"]["frechet_distance"], "fd_after": after["quality"]["frechet_distance"],
           "off_before": before["quality"]["off_manifold_rate"], "off_after": after["quality"]["off_manifold_rate"]}
    checks = {}
    for digit, prompt in zip(forget_digits, forget):
        own = after["per_prompt"][prompt]["label_name"]
        hist = after["per_prompt"][prompt]["histogram"]
        concept = {"p_forgotten_before": before["per_prompt"][prompt]["p_forgotten_per_class"][own],
                   "p_forgotten_after": after["per_prompt"][prompt]["p_forgotten_per_class"][own],
                   "histogram_after": hist, "reached": verdicts.get(prompt)}
        name = prompt.split()[-1]
        if kind == "digit":
            surrogate = DIGIT_PROMPTS.index(next_digit_surrogate(prompt, forget))
            concept["as_surrogate"] = hist[surrogate] / sum(hist)
            concept["target"] = 0.02
            checks[f"{name}: ≥ 0.95 as surrogate"] = concept["as_surrogate"] >= 0.95
        else:
            concept["target"] = round(noise_p(digits_classifier(), digit) + 0.02, 4)
        checks[f"{name}: P ≤ {concept['target']:.3f}"] = concept["p_forgotten_after"] <= concept["target"]
        checks[f"{name}: verdict agrees"] = concept["reached"] == (concept["p_forgotten_after"] <= concept["target"])
        row["concepts"][prompt] = concept
    checks.update({
        "retained drop ≤ 0.005": row["retained_before"] - row["retained_after"] <= 0.005,
        "FD ≤ base + 5 %": row["fd_after"] <= row["fd_before"] * 1.05,
        "off-manifold ≤ base + 1 pt": row["off_after"] <= row["off_before"] + 0.01,
    })
    row["checks"] = checks
    return row


def row_name(forget_digits: list[int], kind: str) -> str:
    return "+".join(str(d) for d in forget_digits) + ("->noise" if kind == "noise" else "")


def run_row(spec: tuple[list[int], str], args, base_ready=None) -> dict:
    forget_digits, kind = spec
    work = Path(args.work_dir) / f"forget-{row_name(forget_digits, kind).replace('->', '-')}-seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    cmds = commands(forget_digits, kind, args.seed, work, args.num_images_per_prompt, args.evaluate)
    result = {"forget": forget_digits, "kind": kind, "seed": args.seed,
              "commands": {k: shown(v) for k, v in cmds.items()}}
    if args.reuse_runs and (work / "timings.json").exists() and (work / "pytorch_lora_weights.safetensors").exists():
        result["train_wall_s"] = phase_seconds(work)  # a finished run of the same command
        result["train_wall_from"] = "timings.json (sum of the phases)"
    else:
        result["train_wall_s"] = timed(cmds["train"], work / "train.log")
    info = json.loads(subprocess.run(cmds["inspect"], check=True, capture_output=True, text=True, cwd=REPO,
                                     env={**os.environ, "PYTHONPATH": str(REPO)}).stdout)
    forgetting = info.get("forgetting") or {}
    verdicts = {p: c.get("forgotten") for p, c in (forgetting.get("concepts") or {}).items()}
    result.update({"reached": forgetting.get("reached"), "forgetting": forgetting,
                   "trained_steps": (info.get("sa_peft") or info).get("trained_steps", info.get("trained_steps"))})
    with open(work / "timings.json") as f:
        result["train_timings"] = json.load(f)
    source = work / "evaluation" / "metrics.json"
    if args.evaluate:
        if base_ready is not None:
            base_ready.result()  # the base samples, made while the rows train
        for cached in (Path(args.work_dir) / f"base-seed{args.seed}" / "samples").glob("base-*"):
            if not (work / "sa-peft-evaluate" / "samples" / cached.name).exists():
                shutil.copytree(cached, work / "sa-peft-evaluate" / "samples" / cached.name)
        result["evaluate_wall_s"] = timed(cmds["evaluate"], work / "evaluate.log")
        source = work / "sa-peft-evaluate" / "metrics.json"
    with open(source) as f:
        result.update(judge(json.load(f), forget_digits, kind, verdicts))
    result["metrics_from"] = str(source.relative_to(work))
    return result


def upgraded(r: dict) -> dict:
    """A row written before two-concept and noise rows (one digit, its numbers at the top level), in today's form."""
    if "forget" in r:
        return r
    prompt = DIGIT_PROMPTS[r["digit"]]
    concept = {k: r[k] for k in ("p_forgotten_before", "p_forgotten_after", "histogram_after", "as_surrogate")}
    out = {k: v for k, v in r.items() if k not in (*concept, "digit")}
    return {**out, "forget": [r["digit"]], "kind": "digit",
            "concepts": {prompt: {**concept, "target": 0.02, "reached": r["reached"]}}}


def fmt(r: dict) -> str:
    missed = [k for k, ok in r["checks"].items() if not ok]
    concepts = list(r["concepts"].values())
    names = " + ".join(DIGIT_PROMPTS[d].split()[-1] for d in r["forget"])
    p_after = " / ".join(f"{c['p_forgotten_after']:.3f}" for c in concepts)
    targets = " / ".join(f"{c['target']:.3f}" for c in concepts)
    surrogate = " / ".join(f"{c['as_surrogate']:.2f}" for c in concepts) if r["kind"] == "digit" else "– (noise)"
    verdicts = " / ".join("yes" if c["reached"] else "no" for c in concepts)
    return (f"| {names}{' → noise' if r['kind'] == 'noise' else ''} (seed {r['seed']}) | {p_after} | {targets} | "
            f"{surrogate} | {r['retained_before']:.3f} → {r['retained_after']:.3f} | "
            f"{r['fd_before']:.2f} → {r['fd_after']:.2f} | {r['off_before']:.3f} → {r['off_after']:.3f} | "
            f"{verdicts} | {r['trained_steps']} | {r['train_wall_s'] / 60:.1f} | "
            f"{'all met' if not missed else 'MISSED: ' + '; '.join(missed)} |")


def write_outputs(results: list[dict], args) -> None:
    results = sorted(results, key=lambda r: (all(r["checks"].values()), r["kind"], len(r["forget"]), r["forget"]))
    write_json_atomic(args.output, {"model": MODEL, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                    "argv": sys.argv[1:], "rows": results})
    lines = [("| forgotten digit | P(forgotten) after | target P | read as the surrogate | retained accuracy | "
              "Fréchet distance | off-manifold | verdict: forgotten | steps | training min | targets |"),
             "|---|---|---|---|---|---|---|---|---|---|---|", *[fmt(r) for r in results]]
    write_text_atomic(str(Path(args.output).with_suffix(".md")), "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def key(r: dict) -> tuple[str, int]:
    return row_name(r["forget"], r["kind"]), r["seed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=int, nargs="*", default=[0, 3, 7])
    parser.add_argument("--noise_digits", type=int, nargs="*", default=[],
                        help="digits forgotten with uniform-noise surrogate images instead of the next digit")
    parser.add_argument("--pairs", nargs="*", default=[], help="two-concept rows, e.g. 0+1 4+7")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_images_per_prompt", type=int, default=50, help="sa-peft evaluate's samples per prompt")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                        help="score with `sa-peft evaluate` (else with the training run's own final evaluation)")
    parser.add_argument("--jobs", type=int, default=1, help="rows run side by side")
    parser.add_argument("--reuse_runs", action="store_true",
                        help="use a finished training run found in the row's folder (an interrupted benchmark)")
    parser.add_argument("--work_dir", default="/tmp/sa-peft-sd3-digits")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "sd3_digits_forgetting.json"))
    args = parser.parse_args()
    done = {}
    if os.path.exists(args.output):
        with open(args.output) as f:
            done = {key(r): r for r in map(upgraded, json.load(f)["rows"])}
    specs = ([([d], "digit") for d in args.digits] + [([d], "noise") for d in args.noise_digits]
             + [([int(d) for d in pair.split("+")], "digit") for pair in args.pairs])
    todo = [s for s in specs if (row_name(*s), args.seed) not in done]
    base_dir = Path(args.work_dir) / f"base-seed{args.seed}"
    with ThreadPoolExecutor(max_workers=max(1, args.jobs) + 1) as pool:
        base_ready = None
        if args.evaluate and todo and not (base_dir / "metrics.json").exists():
            base_dir.mkdir(parents=True, exist_ok=True)
            base_ready = pool.submit(timed, base_evaluation(args.seed, Path(args.work_dir), args.num_images_per_prompt),
                                     base_dir / "evaluate.log")
        for r in pool.map(lambda spec: run_row(spec, args, base_ready), todo):
            done[key(r)] = r
            write_outputs(list(done.values()), args)
    write_outputs(list(done.values()), args)


if __name__ == "__main__":
    main()
