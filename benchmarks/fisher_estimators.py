"""Fisher cost and quality: the reference estimator (all T timesteps per sample) against fast ones.

    OMP_NUM_THREADS=1 python benchmarks/fisher_estimators.py --model builtin:digits --reference_samples 32

For each estimator: UNet passes, wall time, and the Spearman rank correlation of its diagonal with the
reference estimate over every covered weight (and of the per-layer totals, which set how strongly each
layer is held). The reference's own split-half correlation (two disjoint halves of its samples) is the
noise ceiling: a fast estimator cannot be expected to agree with the reference better than the
reference agrees with itself.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from sa_peft.conditioning import encode_prompts
from sa_peft.data import generate_replay_set
from sa_peft.defaults import DIGIT_PROMPTS
from sa_peft.fisher import estimate_fisher
from sa_peft.lora import resolve_lora_targets
from sa_peft.models import load_pipeline


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation (ties broken by order, fine for continuous Fisher values)."""
    def ranks(v):
        r = torch.empty_like(v, dtype=torch.float64)
        r[v.argsort()] = torch.arange(len(v), dtype=torch.float64)
        return r
    rx, ry = ranks(x.double()), ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def flat(fisher) -> torch.Tensor:
    return torch.cat([fisher.diagonal[k].flatten() for k in sorted(fisher.diagonal)])


def layer_totals(fisher) -> torch.Tensor:
    return torch.stack([fisher.diagonal[k].sum() for k in sorted(fisher.diagonal)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:digits", help="pipeline path/alias, or tiny for a smoke run")
    parser.add_argument("--lora_target", default="all")
    parser.add_argument("--reference_samples", type=int, default=32)
    parser.add_argument("--fast", nargs="+", default=["1x128", "4x128", "8x128", "8x32", "16x32"],
                        help="fast estimators as KxN: K timesteps per sample, N samples")
    parser.add_argument("--work_dir", default=None, help="where the samples are cached (default: a temp dir)")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    args = parser.parse_args()

    if args.model == "tiny":  # smoke runs: the tiny pipeline with a short schedule keeps the reference cheap
        from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

        pipe = build_tiny_pipeline(num_train_timesteps=50)
    else:
        pipe = load_pipeline(args.model)
    prompts = list(DIGIT_PROMPTS) if args.model == "builtin:digits" else ["a photo of a cat", "a photo of a dog"]
    fast = [tuple(int(v) for v in spec.split("x")) for spec in args.fast]
    n_max = max([args.reference_samples] + [n for _, n in fast])
    work = args.work_dir or tempfile.mkdtemp(prefix="fisher-bench-")
    data = generate_replay_set(pipe, os.path.join(work, "samples"), prompts, -(-n_max // len(prompts)), seed=0,
                               guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps, show_progress=False)
    cond = encode_prompts(pipe, prompts)
    ids = data.prompt_ids(cond.prompts)
    targets = resolve_lora_targets(pipe.unet, args.lora_target)
    T = pipe.scheduler.config.num_train_timesteps

    def run(estimator, n, k=8, offset=0):
        start = time.perf_counter()
        f = estimate_fisher(pipe.unet, pipe.scheduler, data.latents[offset:offset + n], ids[offset:offset + n], cond, targets,
                            estimator=estimator, num_timesteps=k, seed=offset, show_progress=False)
        return f, time.perf_counter() - start

    n_ref = args.reference_samples
    ref, ref_time = run("reference", n_ref)
    half_a, _ = run("reference", n_ref // 2)
    half_b, _ = run("reference", n_ref // 2, offset=n_ref // 2)
    ref_flat, ref_layers = flat(ref), layer_totals(ref)
    print(f"# Fisher estimators — model {args.model}, {len(targets)} modules ({ref_flat.numel():,} weights), T = {T}, "
          f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("| estimator | samples | UNet passes | passes vs reference | wall s | s/sample | Spearman vs ref (weights) | Spearman vs ref (layer totals) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| reference (all T) | {n_ref} | {n_ref * T:,} | 1× | {ref_time:.1f} | {ref_time / n_ref:.2f} | 1 | 1 |")
    print(f"| reference split-half (noise ceiling) | {n_ref // 2} vs {n_ref // 2} | — | — | — | — | "
          f"{spearman(flat(half_a), flat(half_b)):.3f} | {spearman(layer_totals(half_a), layer_totals(half_b)):.3f} |")
    for k, n in fast:
        f, t = run("fast", n, k)
        print(f"| fast K={k} | {n} | {n * k:,} | {n_ref * T / (n * k):.0f}× fewer | {t:.1f} | {t / n:.3f} | "
              f"{spearman(flat(f), ref_flat):.3f} | {spearman(layer_totals(f), ref_layers):.3f} |")
    print(f"\nCommand: OMP_NUM_THREADS=1 python benchmarks/fisher_estimators.py --model {args.model} "
          f"--reference_samples {n_ref} --fast {' '.join(args.fast)}")


if __name__ == "__main__":
    main()
