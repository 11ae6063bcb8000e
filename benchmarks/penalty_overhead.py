"""Time per SA-LoRA training step with the EWC penalty in the full and the low-rank space, against no EWC.

    OMP_NUM_THREADS=1 python benchmarks/penalty_overhead.py --unets tiny digits sd15

Each step is the real one of train_sa_lora.py: one UNet forward/backward on a surrogate + replay batch,
the penalty, the script's AdamW. The Fisher is random (its values do not change the cost). Prints one table of ms/step
and the overhead of each space relative to the step without EWC, measured in the same process with the
variants taking turns, plus the penalty's own forward + backward timed in isolation (a low-noise
estimate of the same overhead: a step with EWC differs from one without only by it).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from unets import build_unet

from sa_peft.conditioning import PromptConditioning
from sa_peft.ewc import EWCPenalty
from sa_peft.fisher import FisherInfo
from sa_peft.lora import make_lora_config, resolve_lora_targets
from sa_peft.objective import selective_amnesia_loss
from sa_peft.training_setup import make_optimizer

# Latent side per UNet; SD's real architectures get 32×32 latents (256 px) to keep a CPU step affordable.
LATENT_SIZE = {"tiny": 16, "digits": 8, "sd15": 32, "sdxl": 32}


def build(name: str):
    """(unet, scheduler, latent_size) for a named UNet; every one uses SD's noise schedule, as digits does."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return build_unet(name), scheduler, LATENT_SIZE[name]


class _ZeroGradient(torch.autograd.Function):
    """No arithmetic: zero for the value, zeros for every LoRA tensor's gradient (the same tensors the
    penalty takes). What a step pays for this is autograd's per-tensor cost, the floor of any penalty."""

    @staticmethod
    def forward(ctx, zeros, *params):
        ctx.zeros = zeros
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_output):
        return (None, *torch._foreach_mul(ctx.zeros, grad_output))


class NoOpPenalty(torch.nn.Module):
    def __init__(self, penalty: EWCPenalty) -> None:
        super().__init__()
        self.params = penalty.lora_a_params + penalty.lora_b_params
        self.zeros = [torch.zeros_like(p) for p in self.params]

    def forward(self) -> torch.Tensor:
        return _ZeroGradient.apply(self.zeros, *self.params)


def adapt(unet, rank: int, target: str) -> tuple[list[torch.nn.Parameter], dict[str | None, torch.nn.Module | None]]:
    """Add a LoRA to every ``target`` layer (B ≠ 0 so the penalty and its gradient are not trivially zero)
    and build the penalty in both spaces from one random Fisher (its values do not change the cost)."""
    targets = resolve_lora_targets(unet, target)
    torch.manual_seed(0)
    unet.add_adapter(make_lora_config(targets, rank))
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name in targets:
            modules[name].lora_B["default"].weight.normal_(0, 1e-3)
    fisher = FisherInfo.from_diagonal({f"{n}.weight": torch.rand_like(modules[n].get_base_layer().weight) for n in targets}, {})
    penalties = {None: None, "lowrank": EWCPenalty(unet, fisher, "lowrank"), "full": EWCPenalty(unet, fisher, "full")}
    penalties["no-op"] = NoOpPenalty(penalties["full"])
    return [p for p in unet.parameters() if p.requires_grad], penalties


def time_steps(unet, scheduler, latent_size: int, penalties: dict, params, rounds: int, max_seconds: float, batch: int) -> dict:
    """Seconds per training step for each penalty variant, the variants taking turns step by step (in a
    rotating order) on the same adapter and optimizer, so drift in machine load hits all of them alike."""
    optimizer = make_optimizer(params, 1e-4, (0.9, 0.999), 1e-2, 1e-8, use_8bit_adam=False)  # the script's own
    cross = unet.config.cross_attention_dim
    cond = PromptConditioning(["f", "r"], torch.randn(2, 77, cross))
    if unet.config.addition_embed_type == "text_time":
        cond = PromptConditioning(["f", "r"], torch.randn(2, 77, cross), torch.randn(2, 1280), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2))
    x = torch.randn(batch, unet.config.in_channels, latent_size, latent_size)
    ids_f, ids_r = torch.zeros(batch, dtype=torch.long), torch.ones(batch, dtype=torch.long)
    variants = list(penalties)
    times: dict = {v: [] for v in variants}
    began = time.perf_counter()
    for i in range(rounds + 1):
        for space in variants[i % len(variants):] + variants[:i % len(variants)]:
            start = time.perf_counter()
            loss = selective_amnesia_loss(unet, scheduler, cond, x, ids_f, x, ids_r, penalties[space], 1.0, 1.0,
                                          generator=torch.Generator().manual_seed(i))
            loss.total.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i:  # the first round warms up allocators and kernels
                times[space].append(time.perf_counter() - start)
        if i >= 2 and time.perf_counter() - began > max_seconds:
            break
    return times


def time_penalty_alone(penalty: EWCPenalty, params, repeats: int) -> float:
    """Median seconds of the penalty's forward and backward, accumulating into existing gradients as in a step."""
    for p in params:
        p.grad = torch.zeros_like(p)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        penalty().backward()
        times.append(time.perf_counter() - start)
    for p in params:
        p.grad = None
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unets", nargs="+", default=["tiny", "digits", "sd15"], help="tiny, digits, sd15, sdxl")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant (fewer if --max_seconds runs out)")
    parser.add_argument("--max_seconds", type=float, default=300, help="time budget per UNet for the step timings")
    parser.add_argument("--batch", type=int, default=1, help="surrogate images per step (as many replay)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--target", default="all")
    parser.add_argument("--full_block_sizes", type=int, nargs="*", default=[],
                        help="also time the full-space penalty alone with these block sizes (values per block; "
                             "0 = one block per shape group, i.e. unblocked)")
    args = parser.parse_args()
    print(f"# Penalty overhead — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {time.strftime('%Y-%m-%d')}")
    print(f"# LoRA rank {args.rank} on '{args.target}', batch {args.batch}+{args.batch}; the variants take turns "
          "step by step; ms/step are medians, overheads the median of each round's ratio to the step without EWC; "
          "'penalty alone' is the penalty's forward + backward in isolation; 'no-op' is a penalty that does no "
          "arithmetic but takes and returns gradients for the same LoRA tensors (autograd's per-tensor floor)")
    print("| UNet | params | adapted modules | steps each | no EWC ms/step | lowrank ms/step | full ms/step | "
          "lowrank overhead | full overhead | no-op overhead | penalty alone lowrank ms (% of step) | "
          "penalty alone full ms (% of step) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    block_rows = []
    for name in args.unets:
        unet, scheduler, size = build(name)
        n_params = sum(p.numel() for p in unet.parameters())
        params, penalties = adapt(unet, args.rank, args.target)
        times = time_steps(unet, scheduler, size, penalties, params, args.steps, args.max_seconds, args.batch)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        # Overhead as the median of per-round ratios: the variants of one round ran back to back.
        over = {k: 100 * (statistics.median(t / base for t, base in zip(times[k], times[None])) - 1) for k in ("lowrank", "full", "no-op")}
        alone = {k: time_penalty_alone(penalties[k], params, max(3, args.steps)) * 1000 for k in ("lowrank", "full")}
        print(f"| {name} | {n_params / 1e6:.1f} M | {len(penalties['full'].layers)} | {len(times[None])} | {med[None]:.1f} | "
              f"{med['lowrank']:.1f} | {med['full']:.1f} | {over['lowrank']:+.1f} % | {over['full']:+.1f} % | {over['no-op']:+.1f} % | {alone['lowrank']:.2f} ({100 * alone['lowrank'] / med[None]:.1f} %) | "
              f"{alone['full']:.2f} ({100 * alone['full'] / med[None]:.1f} %) |", flush=True)
        if args.full_block_sizes:
            blocks = {}
            for size_ in args.full_block_sizes:
                penalties["full"].chunk_elements = size_ or 2**62
                blocks[size_] = time_penalty_alone(penalties["full"], params, max(3, min(args.steps, 10))) * 1000
            penalties["full"].chunk_elements = None
            block_rows.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in blocks.values()) + " |")
        del unet, params, penalties
    if block_rows:
        print("\nFull-space penalty alone (forward + backward, ms) by block size (values per block):\n")
        sizes = [f"2^{k.bit_length() - 1}" if k else "unblocked" for k in args.full_block_sizes]
        print("| UNet | " + " | ".join(sizes) + " |\n|---|" + "---|" * len(sizes))
        print("\n".join(block_rows))
    print("\nCommand: OMP_NUM_THREADS=1 python benchmarks/penalty_overhead.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()))


if __name__ == "__main__":
    main()
