"""Peak GPU memory and speed of one SA-LoRA training step on real SD architectures (random weights).

    python benchmarks/gpu_memory.py                 # on a CUDA machine, < 5 minutes
    python benchmarks/gpu_memory.py --device cpu --unets tiny --steps 2   # smoke run anywhere

Rows: SD1.5 UNet at 512 px and SDXL UNet at 1024 px, batch 1 surrogate + 1 replay, LoRA rank 4 on every
linear/conv layer ('all'), EWC in the low-rank space, with every saving on (fp16 base weights with fp32
LoRA, gradient checkpointing, 8-bit AdamW, SDPA attention; xformers when installed), then the same
without each saving in turn, and with the full-space EWC penalty. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import time

import torch
from unets import build_unet

from sa_peft.conditioning import PromptConditioning
from sa_peft.ewc import EWCPenalty
from sa_peft.fisher import FisherInfo
from sa_peft.lora import make_lora_config, resolve_lora_targets
from sa_peft.objective import selective_amnesia_loss
from sa_peft.training_setup import make_optimizer

RESOLUTION = {"tiny": 32, "sd15": 512, "sdxl": 1024}


def run_config(name: str, device: str, steps: int, fp16: bool, checkpointing: bool, adam8: bool, space: str,
               xformers: bool) -> dict:
    from diffusers import DDPMScheduler

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.float16 if fp16 else torch.float32
    unet = build_unet(name).to(device, dtype)
    targets = resolve_lora_targets(unet, "all")
    unet.requires_grad_(False)
    unet.add_adapter(make_lora_config(targets, 4))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if xformers:
        unet.enable_xformers_memory_efficient_attention()
    modules = dict(unet.named_modules())
    shapes = {f"{n}.weight": modules[n].get_base_layer().weight.shape for n in targets}
    if space == "full":
        fisher = FisherInfo.from_diagonal({k: torch.rand(s) for k, s in shapes.items()}, {})
    else:  # factored only, as a low-rank run stores it: m + n numbers per layer
        flat = {k: (s[0], int(torch.tensor(s[1:]).prod())) for k, s in shapes.items()}
        fisher = FisherInfo({k: torch.rand(m) for k, (m, n) in flat.items()}, {k: torch.rand(n) for k, (m, n) in flat.items()},
                            {k: tuple(s) for k, s in shapes.items()})
    ewc = EWCPenalty(unet, fisher, space)
    del fisher
    optimizer = make_optimizer([p for p in unet.parameters() if p.requires_grad], 1e-4, (0.9, 0.999), 1e-2, 1e-8, adam8)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latent = RESOLUTION[name] // 8 if name != "tiny" else 16
    cfg = unet.config
    hidden = torch.randn(2, 77, cfg.cross_attention_dim, device=device)
    if cfg.addition_embed_type == "text_time":
        size = float(RESOLUTION[name])
        cond = PromptConditioning(["f", "r"], hidden, torch.randn(2, 1280, device=device),
                                  torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device))
    else:
        cond = PromptConditioning(["f", "r"], hidden)
    x = torch.randn(1, cfg.in_channels, latent, latent, device=device, dtype=dtype)
    f_ids, r_ids = torch.zeros(1, dtype=torch.long, device=device), torch.ones(1, dtype=torch.long, device=device)
    times = []
    for i in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=fp16):
            loss = selective_amnesia_loss(unet, scheduler, cond, x, f_ids, x, r_ids, ewc, 1.0, 1.0)
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del unet, optimizer, ewc
    return {"peak_gib": peak, "steps_per_s": len(times) / sum(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--unets", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; run with --device cpu --unets tiny for a smoke run")
    has_xformers = importlib.util.find_spec("xformers") is not None and args.device == "cuda"
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# SA-LoRA step memory — {gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| UNet | px | config | peak GiB | steps/s |")
    print("|---|---|---|---|---|")
    full = {"fp16": True, "checkpointing": True, "adam8": args.device == "cuda", "space": "lowrank", "xformers": False}
    variants = [("all savings (fp16, ckpt, 8-bit AdamW, SDPA, lowrank EWC)", {})]
    if has_xformers:
        variants.append(("all savings + xformers", {"xformers": True}))
    variants += [("without gradient checkpointing", {"checkpointing": False}), ("without 8-bit AdamW", {"adam8": False}),
                 ("fp32 instead of fp16", {"fp16": False}), ("full-space EWC", {"space": "full"})]
    if args.device != "cuda":
        full["fp16"] = False  # fp16 matmuls are not supported on every CPU; the smoke run checks the code path
    for name in args.unets:
        for label, change in variants:
            try:
                r = run_config(name, args.device, args.steps, **{**full, **change})
                print(f"| {name} | {RESOLUTION[name]} | {label} | {r['peak_gib']:.2f} | {r['steps_per_s']:.2f} |", flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"| {name} | {RESOLUTION[name]} | {label} | OOM | — |", flush=True)
    print("\nCommand: python benchmarks/gpu_memory.py " + " ".join(f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()))


if __name__ == "__main__":
    main()
