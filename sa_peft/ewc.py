"""Elastic-weight-consolidation penalties on LoRA layers, in the full-weight and the low-rank space.

With frozen base weights θ*, a LoRA layer moves its weight by ΔW = s·B·A, so the EWC term
Σ F ⊙ (θ − θ*)² becomes Σ F ⊙ ΔW² (full space, exact). The low-rank space replaces F by the rank-one
F̂ = u vᵀ / S built from F's row sums u, column sums v and total S, which gives
    Σ F̂ ⊙ ΔW² = (s²/S) · Σ (Bᵀ diag(u) B) ⊙ (A diag(v) Aᵀ)
at O(r²(m+n)) cost without ever forming ΔW (see shared/reference/lowrank-fisher-penalty.md).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .fisher import FisherInfo
from .lora import iter_adapted_layers

EwcSpace = Literal["full", "lowrank"]


def full_space_penalty(fisher: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Σ_ij F_ij (s·(B A))_ij² for ``F`` of shape m×n, ``A`` r×n, ``B`` m×r."""
    delta = scale * (lora_b @ lora_a)
    return (fisher * delta.square()).sum()


def lowrank_space_penalty(
    row_sums: torch.Tensor, col_sums: torch.Tensor, total: torch.Tensor | float,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
) -> torch.Tensor:
    """(s²/S) · Σ (Bᵀ diag(u) B) ⊙ (A diag(v) Aᵀ): the penalty under the rank-one Fisher u vᵀ / S."""
    left = lora_b.t() @ (row_sums[:, None] * lora_b)  # r×r
    right = (lora_a * col_sums[None, :]) @ lora_a.t()  # r×r
    return (scale * scale) * (left * right).sum() / total


class EWCPenalty(torch.nn.Module):
    """Σ over a model's LoRA layers of the EWC penalty, with the Fisher held as buffers on the model's device.

    The Fisher is divided by its mean over the adapted weights (``normalization="mean"``, the default)
    so that λ means the same for any model size and estimator scaling; ``"none"`` keeps raw values
    (the official code's λ = 50 for SD assumes its own raw scaling). Penalties are computed in
    float32 outside autocast, whatever the training precision.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        fisher: FisherInfo,
        space: EwcSpace = "full",
        adapter: str = "default",
        normalization: Literal["mean", "none"] = "mean",
    ) -> None:
        super().__init__()
        if space not in ("full", "lowrank"):
            raise ValueError(f"--ewc_space must be 'full' or 'lowrank', got {space!r}")
        self.space = space
        self.layers = list(iter_adapted_layers(model, adapter))
        if not self.layers:
            raise ValueError("the model has no LoRA layers for the EWC penalty; add the forget adapter first")
        keys = [layer.name + ".weight" for layer in self.layers]
        missing = [k for k in keys if k not in fisher.shapes]
        if missing:
            raise ValueError(
                f"the Fisher file does not cover {len(missing)} adapted module(s), e.g. {missing[:3]}; recompute it "
                "with the same --lora_target (or delete --fisher_path so it is recomputed)"
            )
        if space == "full" and not fisher.diagonal:
            raise ValueError("this Fisher file is factored-only; use --ewc_space lowrank or recompute it in full")
        if normalization == "mean":
            total = sum(float(fisher.row_sums[k].double().sum()) for k in keys)
            mean = total / sum(math.prod(fisher.shapes[k]) for k in keys)
            if not mean > 0:
                raise ValueError("the Fisher is zero on every adapted weight; it cannot weight the penalty")
            self.normalizer = 1.0 / mean
        elif normalization == "none":
            self.normalizer = 1.0
        else:
            raise ValueError(f"normalization must be 'mean' or 'none', got {normalization!r}")
        device = self.layers[0].lora_a.device
        # Layers with the same (m, n, r) are stacked and computed together with batched matmuls: a few
        # kernels per distinct shape instead of several per layer (hundreds of layers in SD).
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, layer in enumerate(self.layers):
            m, n, r = layer.lora_b.shape[0], layer.lora_a.shape[1], layer.lora_a.shape[0]
            groups.setdefault((m, n, r), []).append(i)
        self.groups = list(groups.values())
        stack = lambda tensors: torch.stack([t.reshape(t.shape[0], -1) if t.dim() > 1 else t for t in tensors]).to(
            device=device, dtype=torch.float32) * self.normalizer
        self.group_buffers: list[tuple[torch.Tensor, ...]] = []
        for members in self.groups:
            member_keys = [keys[i] for i in members]
            scale_sq = torch.tensor([self.layers[i].scale for i in members], dtype=torch.float32, device=device).square()
            if space == "full":
                self.group_buffers.append((scale_sq, stack([fisher.diagonal[k] for k in member_keys])))
            else:
                rows = stack([fisher.row_sums[k] for k in member_keys])
                # A layer whose Fisher is all zero has u = v = 0: keep its penalty 0 rather than 0/0 = NaN.
                total = rows.sum(1).clamp_min(torch.finfo(torch.float32).tiny)
                self.group_buffers.append((scale_sq / total, rows, stack([fisher.col_sums[k] for k in member_keys])))

    def _apply(self, fn, recurse=True):
        # Keep the group buffers on the module's device and dtype rules, like registered buffers.
        result = super()._apply(fn, recurse)
        self.group_buffers = [tuple(fn(t) for t in group) for group in self.group_buffers]
        return result

    def forward(self) -> torch.Tensor:
        params = [p for layer in self.layers for p in (layer.module.lora_A[layer.adapter].weight, layer.module.lora_B[layer.adapter].weight)]
        return _EWCFunction.apply(self, *params)


class _EWCFunction(torch.autograd.Function):
    """The penalty and its analytic gradient in one pass, without an autograd graph per layer.

    Full space, per layer with D = s·B·A:  P = Σ F ⊙ D²,  ∂P/∂B = 2s (F ⊙ D) Aᵀ,  ∂P/∂A = 2s Bᵀ (F ⊙ D).
    Low-rank space, with L = Bᵀ diag(u) B and R = A diag(v) Aᵀ (both symmetric) and c = s²/S:
    P = c Σ L ⊙ R,  ∂P/∂B = 2c diag(u) B R,  ∂P/∂A = 2c L A diag(v).
    The small UNets' steps are so short that an autograd graph of a dozen kernels per shape group
    costs more than the UNet's own backward; computing gradients alongside the value halves that.
    """

    @staticmethod
    def forward(ctx, penalty: EWCPenalty, *params: torch.Tensor) -> torch.Tensor:
        layers = penalty.layers
        grads: list[torch.Tensor | None] = [None] * len(params)
        total = torch.zeros((), dtype=torch.float32, device=params[0].device)
        with torch.autocast(device_type=params[0].device.type, enabled=False):
            for members, buffers in zip(penalty.groups, penalty.group_buffers):
                a = torch.stack([layers[i].lora_a for i in members]).float()  # G×r×n
                b = torch.stack([layers[i].lora_b for i in members]).float()  # G×m×r
                if penalty.space == "full":
                    scale_sq, fisher = buffers
                    scale = scale_sq.sqrt()[:, None, None]
                    delta = scale * torch.bmm(b, a)  # D = s·B·A
                    weighted = fisher * delta  # F ⊙ D
                    total = total + (weighted * delta).sum()
                    grad_b = 2 * scale * torch.bmm(weighted, a.transpose(1, 2))
                    grad_a = 2 * scale * torch.bmm(b.transpose(1, 2), weighted)
                else:
                    coef, rows, cols = buffers
                    ub = rows[:, :, None] * b
                    av = a * cols[:, None, :]
                    left = torch.bmm(b.transpose(1, 2), ub)  # G×r×r
                    right = torch.bmm(av, a.transpose(1, 2))  # G×r×r
                    total = total + (coef * (left * right).sum((1, 2))).sum()
                    c2 = 2 * coef[:, None, None]
                    grad_b = c2 * torch.bmm(ub, right)
                    grad_a = c2 * torch.bmm(left, av)
                for i, ga, gb in zip(members, grad_a.unbind(0), grad_b.unbind(0)):
                    grads[2 * i] = ga.view(params[2 * i].shape)
                    grads[2 * i + 1] = gb.view(params[2 * i + 1].shape)
        ctx.grads = grads
        ctx.param_dtypes = [p.dtype for p in params]
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = torch._foreach_mul(ctx.grads, grad_output)
        ctx.grads = None
        # LoRA factors train in fp32; a half-precision factor gets its gradient in its own dtype.
        return (None, *(g if g.dtype == dtype else g.to(dtype) for g, dtype in zip(grads, ctx.param_dtypes)))
