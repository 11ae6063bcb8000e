"""Time per SA-LoRA training step with the EWC penalty in the full and the low-rank space, against no EWC.

    OMP_NUM_THREADS=1 python benchmarks/penalty_overhead.py --unets tiny digits sd15

Each step is the real one of train_sa_lora.py: one UNet forward/backward on a surrogate + replay batch,
the penalty, AdamW. The Fisher is random (its values do not change the cost). Prints one table of ms/step
and the overhead of each space relative to the step without EWC, measured in the same process.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from sa_peft.conditioning import PromptConditioning
from sa_peft.ewc import EWCPenalty
from sa_peft.fisher import FisherInfo
from sa_peft.lora import make_lora_config, resolve_lora_targets
from sa_peft.objective import selective_amnesia_loss


def build(name: str):
    """(unet, scheduler, latent_size) for a named UNet size."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if name == "tiny":
        from sa_peft.tiny_pipeline import build_tiny_pipeline

        pipe = build_tiny_pipeline()
        return pipe.unet, scheduler, 16
    if name == "digits":
        from sa_peft.models import load_pipeline

        pipe = load_pipeline("builtin:digits")
        return pipe.unet, pipe.scheduler, pipe.unet.config.sample_size
    from sa_peft.unet_configs import build_unet

    # Real architecture, random weights; 32×32 latents (256 px) keep a CPU step affordable.
    return build_unet(name), scheduler, 32


def time_steps(unet, scheduler, latent_size: int, space: str | None, steps: int, batch: int, rank: int, target: str) -> list[float]:
    targets = resolve_lora_targets(unet, target)
    if "default" in getattr(unet, "peft_config", {}):
        unet.delete_adapters("default")
    torch.manual_seed(0)
    unet.add_adapter(make_lora_config(targets, rank))
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name in targets:  # B != 0 so the penalty and its gradient are not trivially zero
            modules[name].lora_B["default"].weight.normal_(0, 1e-3)
    diagonal = {f"{n}.weight": torch.rand_like(modules[n].get_base_layer().weight) for n in targets}
    ewc = EWCPenalty(unet, FisherInfo.from_diagonal(diagonal, {}), space) if space else None
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    channels = unet.config.in_channels
    cross = unet.config.cross_attention_dim
    cond = PromptConditioning(["f", "r"], torch.randn(2, 77, cross))
    if unet.config.addition_embed_type == "text_time":
        cond = PromptConditioning(["f", "r"], torch.randn(2, 77, cross), torch.randn(2, 1280), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2))
    x = torch.randn(batch, channels, latent_size, latent_size)
    ids_f, ids_r = torch.zeros(batch, dtype=torch.long), torch.ones(batch, dtype=torch.long)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = selective_amnesia_loss(unet, scheduler, cond, x, ids_f, x, ids_r, ewc, 1.0, 1.0, generator=torch.Generator().manual_seed(i))
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unets", nargs="+", default=["tiny", "digits", "sd15"], help="tiny, digits, sd15, sdxl")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="surrogate images per step (as many replay)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--target", default="all")
    args = parser.parse_args()
    print(f"# Penalty overhead — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {time.strftime('%Y-%m-%d')}")
    print(f"# LoRA rank {args.rank} on '{args.target}', batch {args.batch}+{args.batch}, {args.steps} timed steps (median)")
    print("| UNet | params | adapted modules | no EWC ms/step | lowrank ms/step | full ms/step | lowrank overhead | full overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.unets:
        unet, scheduler, size = build(name)
        n_params = sum(p.numel() for p in unet.parameters())
        # Interleave the variants so drift in machine load hits all of them alike.
        results = {None: [], "lowrank": [], "full": []}
        for _ in range(2):
            for space in results:
                results[space] += time_steps(unet, scheduler, size, space, args.steps, args.batch, args.rank, args.target)
        med = {k: statistics.median(v) * 1000 for k, v in results.items()}
        n_mod = len(resolve_lora_targets(unet, args.target))
        print(f"| {name} | {n_params / 1e6:.1f} M | {n_mod} | {med[None]:.1f} | {med['lowrank']:.1f} | {med['full']:.1f} | "
              f"{100 * (med['lowrank'] / med[None] - 1):+.1f} % | {100 * (med['full'] / med[None] - 1):+.1f} % |")
    print("\nCommand: OMP_NUM_THREADS=1 python benchmarks/penalty_overhead.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()))


if __name__ == "__main__":
    main()
