"""Memory: SA-LoRA against Selective Amnesia as the original code does it, and Fisher file sizes.

    OMP_NUM_THREADS=1 python benchmarks/memory.py --unets digits sd15 sdxl

Two parts.
1. Training state, counted exactly from the architectures (random weights, nothing downloaded): the
   bytes that live through training besides activations. Original SA: fp32 UNet, a copy of θ*, fp32
   gradients, AdamW's two moments and a full fp32 Fisher of every weight. SA-LoRA (rank 4 on every
   linear/conv layer): the frozen base in fp16, fp32 LoRA factors with gradients and AdamW moments (or
   8-bit moments), and the Fisher buffers of the penalty (full: one value per adapted weight; low-rank:
   m + n per layer).
2. Measured resident-memory growth of a short CPU training run of each kind on the small UNets, each
   in its own process (RSS sampled after every forward and backward, minus RSS before training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
from unets import build_unet

MiB = 2**20


def counted(name: str, rank: int) -> dict:
    from sa_peft.lora import resolve_lora_targets

    unet = build_unet(name)
    total = sum(p.numel() for p in unet.parameters())
    modules = dict(unet.named_modules())
    targets = resolve_lora_targets(unet, "all")
    shapes = [modules[t].weight.shape for t in targets]
    adapted = sum(math.prod(s) for s in shapes)
    lora = sum(rank * (s[0] + math.prod(s[1:])) for s in shapes)
    factored = sum(s[0] + math.prod(s[1:]) for s in shapes)
    original = 4 * 4 * total + 8 * total  # fp32 weights, θ* copy, gradients, Fisher; AdamW's two moments
    lora_common = 2 * total + 4 * lora * 2  # fp16 base; fp32 LoRA and its gradient
    return {
        "params": total, "adapted": adapted, "lora": lora,
        "original_bytes": original,
        "lora_full_bytes": lora_common + 8 * lora + 4 * adapted,
        "lora_lowrank_bytes": lora_common + 8 * lora + 4 * factored,
        "lora_lowrank_8bit_bytes": lora_common + 2 * lora + 4 * factored,
        "fisher_file_full": 4 * (adapted + factored),
        "fisher_file_factored": 4 * factored,
    }


def measure_child(name: str, mode: str, steps: int) -> None:
    """Run in a child process: train ``steps`` steps the given way; print the RSS growth over training in bytes.

    RSS is read after each forward and after each backward (where activations, gradients and optimizer
    state peak); the lifetime maximum (ru_maxrss) is useless here because loading the model peaks higher.
    """
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    from diffusers import DDPMScheduler

    from sa_peft.conditioning import PromptConditioning
    from sa_peft.diffusion_loss import per_sample_diffusion_loss
    from sa_peft.ewc import EWCPenalty
    from sa_peft.fisher import FisherInfo
    from sa_peft.lora import make_lora_config, resolve_lora_targets

    unet = build_unet(name)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size)
    cond = PromptConditioning(["a"], torch.randn(1, 77, unet.config.cross_attention_dim))
    base_rss = rss()
    peak = base_rss
    targets = resolve_lora_targets(unet, "all")
    if mode == "original":
        theta_star = {n: p.detach().clone() for n, p in unet.named_parameters()}
        fisher = {n: torch.rand_like(p) for n, p in unet.named_parameters()}
        params = list(unet.parameters())

        def penalty():
            return sum((fisher[n] * (p - theta_star[n]).square()).sum() for n, p in unet.named_parameters())
    else:
        unet.requires_grad_(False)
        unet.add_adapter(make_lora_config(targets, 4))
        modules = dict(unet.named_modules())
        diag = {f"{t}.weight": torch.rand_like(modules[t].get_base_layer().weight) for t in targets}
        info = FisherInfo.from_diagonal(diag, {})
        if mode == "lowrank":
            info = FisherInfo(info.row_sums, info.col_sums, info.shapes)
        del diag
        penalty = EWCPenalty(unet, info, "full" if mode == "full" else "lowrank")
        del info
        params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for i in range(steps):
        t = torch.randint(0, 1000, (2,))
        loss = per_sample_diffusion_loss(unet, scheduler, x, t, torch.randn_like(x), cond.unet_kwargs(torch.zeros(2, dtype=torch.long))).mean()
        total = loss + penalty()
        peak = max(peak, rss())
        total.backward()
        optimizer.step()
        peak = max(peak, rss())
        optimizer.zero_grad()
    print(json.dumps({"rss_growth_bytes": peak - base_rss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unets", nargs="+", default=["digits", "sd15", "sdxl"])
    parser.add_argument("--measure", nargs="+", default=["tiny", "digits"], help="UNets small enough to train on CPU here")
    parser.add_argument("--measure_steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure_child(args.child[0], args.child[1], int(args.child[2]))
        return
    print(f"# Memory — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}; LoRA rank {args.rank} on every linear/conv layer")
    print("\n## Training state (exact counts; activations excluded)\n")
    print("| UNet | params | original SA (fp32 + θ* + grads + AdamW + Fisher) | SA-LoRA, full-space EWC | SA-LoRA, low-rank EWC | "
          "low-rank + 8-bit AdamW | ratio original / low-rank | Fisher file: full + factored | factored only |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.unets:
        c = counted(name, args.rank)
        print(f"| {name} | {c['params'] / 1e6:.1f} M | {c['original_bytes'] / MiB:,.0f} MiB | {c['lora_full_bytes'] / MiB:,.0f} MiB | "
              f"{c['lora_lowrank_bytes'] / MiB:,.0f} MiB | {c['lora_lowrank_8bit_bytes'] / MiB:,.0f} MiB | "
              f"{c['original_bytes'] / c['lora_lowrank_bytes']:.1f}× | {c['fisher_file_full'] / MiB:,.2f} MiB | "
              f"{c['fisher_file_factored'] / MiB:,.3f} MiB |")
    print(f"\n## Measured RSS growth (sampled after each forward and backward) during {args.measure_steps} CPU training steps (fp32, batch 2, own process)\n")
    print("| UNet | original SA | SA-LoRA full-space | SA-LoRA low-rank |")
    print("|---|---|---|---|")
    for name in args.measure:
        cells = []
        for mode in ("original", "full", "lowrank"):
            out = subprocess.run([sys.executable, __file__, "--child", name, mode, str(args.measure_steps)],
                                 capture_output=True, text=True, check=True).stdout
            cells.append(json.loads(out.strip().splitlines()[-1])["rss_growth_bytes"] / MiB)
        print(f"| {name} | {cells[0]:.1f} MiB | {cells[1]:.1f} MiB | {cells[2]:.1f} MiB |")
    print(f"\nCommand: OMP_NUM_THREADS=1 python benchmarks/memory.py --unets {' '.join(args.unets)} --measure {' '.join(args.measure)}")


if __name__ == "__main__":
    main()
