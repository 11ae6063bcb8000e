"""Set-up pieces of the training script that are not the loop: checks, optimizer, checkpoints, caching keys."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil

import torch

from .errors import InputError, MissingDependencyError


def settings_key(settings: dict) -> str:
    """A short hash naming a cached phase's output by everything that determines it."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def require_bitsandbytes(flag: str = "use_8bit_adam"):
    """Import bitsandbytes or say how to get it (``--use_8bit_adam``, or the ``flag`` that asked for it)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(f"`{flag}` needs bitsandbytes: pip install 'sa-peft[bnb]' (or drop `{flag}`)")
    import bitsandbytes

    return bitsandbytes


def require_xformers() -> None:
    """Fail early when ``--enable_xformers_memory_efficient_attention`` cannot work."""
    if importlib.util.find_spec("xformers") is None:
        raise MissingDependencyError(
            "`enable_xformers_memory_efficient_attention` needs xformers (GPU only): pip install 'sa-peft[xformers]', "
            "or drop the flag to use PyTorch's scaled-dot-product attention"
        )
    if not torch.cuda.is_available():
        raise MissingDependencyError("`enable_xformers_memory_efficient_attention` needs a CUDA GPU; drop the flag on CPU")


def check_mixed_precision(mode: str | None, device_type: str) -> None:
    """Refuse a precision the device cannot train in, before any work.

    fp16 on CPU trained and wrote the adapter, then crashed in the final validation (Float vs Half):
    CPU autocast runs in bfloat16 only.
    """
    if mode == "fp16" and device_type != "cuda":
        raise InputError(f"`mixed_precision` fp16 needs a CUDA GPU (this run is on {device_type}); use "
                         "`mixed_precision` bf16 or no on CPU (or `accelerate config` without fp16)")


def make_optimizer(params, learning_rate: float, betas: tuple[float, float], weight_decay: float, eps: float,
                   use_8bit_adam: bool) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW with every state in 8 bits.

    bitsandbytes keeps tensors smaller than ``min_8bit_size`` (4096 by default) in 32-bit state, which
    is every LoRA factor of a small model; ``min_8bit_size=0`` makes the states really 8-bit.
    torch's AdamW runs fused where torch has the kernel (float32 factors on a CPU or CUDA device): a
    LoRA has hundreds of small tensors, and for 238 of them (the digits LoRA's count) the per-tensor loop
    takes 6.3 ms per step on one CPU thread, the fused kernel 0.97 ms (benchmarks/RESULTS.md).
    """
    params = list(params)
    if use_8bit_adam:
        bnb = require_bitsandbytes()
        return bnb.optim.AdamW8bit(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps, min_8bit_size=0)
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused or None)


def list_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-<step>`` folders in step order."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def prune_checkpoints(output_dir: str, total_limit: int | None) -> None:
    """Keep room for one more checkpoint within ``--checkpoints_total_limit`` (diffusers' behaviour)."""
    if total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for name in checkpoints[: max(0, len(checkpoints) - total_limit + 1)]:
        shutil.rmtree(os.path.join(output_dir, name))
