"""Elastic-weight-consolidation penalties on LoRA layers, in the full-weight and the low-rank space.

With frozen base weights θ*, a LoRA layer moves its weight by ΔW = s·B·A, so the EWC term
Σ F ⊙ (θ − θ*)² becomes Σ F ⊙ ΔW² (full space, exact). The low-rank space replaces F by the rank-one
F̂ = u vᵀ / S built from F's row sums u, column sums v and total S, which gives
    Σ F̂ ⊙ ΔW² = (s²/S) · Σ (Bᵀ diag(u) B) ⊙ (A diag(v) Aᵀ)
at O(r²(m+n)) cost without ever forming ΔW (derivation: docs/lowrank-ewc.md).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .errors import InputError
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
    float32 outside autocast, whatever the training precision. ``chunk_elements`` bounds the m×n
    temporaries of the full-space penalty (values per block; the low-rank space has none); by default
    2¹⁸ on a CPU, where 1 MiB blocks stay in L2 (SD 1.5 on one thread: 1.0 s per step instead of 5.9 s unblocked),
    and 2²⁴ on a GPU, where fewer, larger kernels matter more than cache.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        fisher: FisherInfo,
        space: EwcSpace = "full",
        adapter: str = "default",
        normalization: Literal["mean", "none"] = "mean",
        chunk_elements: int | None = None,
    ) -> None:
        super().__init__()
        if space not in ("full", "lowrank"):
            raise InputError(f"`ewc_space` must be 'full' or 'lowrank', got {space!r}")
        self.space = space
        self.layers = list(iter_adapted_layers(model, adapter))
        if not self.layers:
            raise InputError("the model has no LoRA layers for the EWC penalty; add the forget adapter first")
        keys = [layer.name + ".weight" for layer in self.layers]
        missing = [k for k in keys if k not in fisher.shapes]
        if missing:
            raise InputError(
                f"the Fisher file does not cover {len(missing)} adapted module(s), e.g. {missing[:3]}; recompute it "
                "with the same `lora_target` (or delete `fisher_path` so it is recomputed)"
            )
        if space == "full" and not fisher.diagonal:
            raise InputError("this Fisher file is factored-only; use `ewc_space` lowrank or recompute it in full")
        if normalization == "mean":
            total = sum(float(fisher.row_sums[k].double().sum()) for k in keys)
            mean = total / sum(math.prod(fisher.shapes[k]) for k in keys)
            if not mean > 0:
                raise InputError("the Fisher is zero on every adapted weight; it cannot weight the penalty")
            self.normalizer = 1.0 / mean
        elif normalization == "none":
            self.normalizer = 1.0
        else:
            raise InputError(f"normalization must be 'mean' or 'none', got {normalization!r}")
        device = self.layers[0].lora_a.device
        if chunk_elements is not None and chunk_elements < 1:
            raise InputError(f"chunk_elements must be positive, got {chunk_elements}")
        self.chunk_elements = chunk_elements
        # The Parameter objects themselves: peft keeps them for the adapter's life (dtype casts and
        # state-dict loads change their data in place), and looking them up through ModuleDicts every
        # step cost more than the low-rank penalty's arithmetic on small UNets.
        self.lora_a_params = [layer.module.lora_A[layer.adapter].weight for layer in self.layers]
        self.lora_b_params = [layer.module.lora_B[layer.adapter].weight for layer in self.layers]
        two_scale_sq = [2 * layer.scale**2 for layer in self.layers]

        def stack(tensors: list[torch.Tensor], factors: list[float]) -> torch.Tensor:
            rows = torch.stack([t.reshape(t.shape[0], -1) if t.dim() > 1 else t for t in tensors]).to(device, torch.float32)
            scale = torch.tensor(factors, dtype=torch.float32, device=device) * self.normalizer
            # In place: a scaled copy would briefly hold a full-space group twice on the device.
            return rows.mul_(scale.view(-1, *[1] * (rows.dim() - 1)))

        # Layers whose factors have the same shapes are stacked and computed with batched matmuls: a few
        # kernels per distinct shape instead of several per layer (hundreds of layers in SD). Constants
        # are folded into the stored Fisher, so a step makes no scalar passes: the full space stores
        # 2s²F (P = ½ Σ (2s²F ⊙ BA) ⊙ BA), the low-rank space u' = 2(s²/S)u (P = ½ Σ L' ⊙ R).
        self.full_groups: list[list[int]] = []
        self.full_buffers: list[torch.Tensor] = []
        self.a_groups: list[list[int]] = []
        self.a_buffers: list[torch.Tensor] = []
        self.b_groups: list[list[int]] = []
        self.b_buffers: list[torch.Tensor] = []
        self.gather_index: list[torch.Tensor] = []
        if space == "full":
            # A layer's two factors meet in ΔW, so a group is layers with the same (A, B) shapes.
            self.full_groups = _group_by_shape(list(zip(self.lora_a_params, self.lora_b_params)))
            for members in self.full_groups:
                self.full_buffers.append(stack([fisher.diagonal[keys[i]] for i in members], [two_scale_sq[i] for i in members]))
        else:
            # R = A diag(v) Aᵀ needs only A and L' = Bᵀ diag(u') B only B, so A's are grouped by A's shape
            # and B's by B's shape (fewer, larger groups than pairs of shapes); the r×r products meet
            # through one gather each way.
            totals = [float(fisher.row_sums[k].double().sum()) * self.normalizer for k in keys]
            # A layer whose Fisher is all zero has u = v = 0: keep its penalty 0 rather than 0/0 = NaN. (Dividing by
            # float32's tiny instead gave 2s²/tiny ≈ 1.7e38, which times a normaliser above 2 is inf, and 0 · inf is
            # NaN: SD3's last joint block has such a layer, attn.add_q_proj, whose context output is discarded.)
            self.a_groups = _group_by_shape(self.lora_a_params)
            self.b_groups = _group_by_shape(self.lora_b_params)
            for members in self.a_groups:
                self.a_buffers.append(stack([fisher.col_sums[keys[i]] for i in members], [1.0] * len(members))[:, None, :])
            for members in self.b_groups:
                factors = [two_scale_sq[i] / totals[i] if totals[i] > 0 else 0.0 for i in members]
                self.b_buffers.append(stack([fisher.row_sums[keys[i]] for i in members], factors)[:, :, None])
            a_order = [i for members in self.a_groups for i in members]
            b_order = [i for members in self.b_groups for i in members]
            position_in_a = {layer: pos for pos, layer in enumerate(a_order)}
            position_in_b = {layer: pos for pos, layer in enumerate(b_order)}
            self.gather_index = [
                torch.tensor([position_in_b[i] for i in a_order], device=device),  # B order → A order
                torch.tensor([position_in_a[i] for i in b_order], device=device),  # A order → B order
            ]

    def _apply(self, fn, recurse=True):
        # Keep the Fisher buffers on the module's device and dtype rules, like registered buffers.
        result = super()._apply(fn, recurse)
        for name in ("full_buffers", "a_buffers", "b_buffers", "gather_index"):
            setattr(self, name, [fn(t) for t in getattr(self, name)])
        return result

    def forward(self) -> torch.Tensor:
        for i in (0, -1):  # a cheap guard against an adapter re-added or re-created under the penalty
            layer = self.layers[i]
            if (layer.module.lora_A[layer.adapter].weight is not self.lora_a_params[i]
                    or layer.module.lora_B[layer.adapter].weight is not self.lora_b_params[i]):
                raise RuntimeError("the LoRA parameters were replaced after the EWC penalty was built; "
                                   "build EWCPenalty after the adapter is added and loaded")
        return _EWCFunction.apply(self, *self.lora_a_params, *self.lora_b_params)


def _group_by_shape(items: list) -> list[list[int]]:
    """Indices of ``items`` (tensors, or tuples of them) grouped by their shapes, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        key = tuple(t.shape for t in item) if isinstance(item, tuple) else item.shape
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _stacked(params: tuple[torch.Tensor, ...], members: list[int]) -> torch.Tensor:
    """The members' factors as one G×rows×cols float32 tensor (a view, not a copy, for a lone layer)."""
    first = params[members[0]]
    stacked = first.unsqueeze(0) if len(members) == 1 else torch.stack([params[i] for i in members])
    stacked = stacked.view(len(members), first.shape[0], -1)
    return stacked if stacked.dtype == torch.float32 else stacked.float()


def _full_space_group(
    fisher2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, chunk_elements: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2·P, ∂P/∂A and ∂P/∂B for G stacked layers, with ``fisher2`` = 2s²F (G×m×n), ``a`` G×r×n, ``b`` G×m×r.

    E = B·A and 2s²F ⊙ E are formed a block of layers and rows at a time, at most ``chunk_elements``
    values each, so the m×n temporaries stay in cache on a CPU and bounded in memory on a GPU (SD 1.5's
    adapted weights are 860 M values); the gradients are ∂P/∂B = (2s²F ⊙ E) Aᵀ and ∂P/∂A = Bᵀ (2s²F ⊙ E).
    """
    g, m, n = fisher2.shape
    layers_per_chunk = max(1, min(g, chunk_elements // (m * n)))
    rows_per_chunk = m if layers_per_chunk > 1 else max(1, min(m, chunk_elements // n))
    grad_a = torch.empty_like(a) if rows_per_chunk == m else torch.zeros_like(a)
    grad_b = torch.empty_like(b)
    values = []
    for g0 in range(0, g, layers_per_chunk):
        g1 = min(g, g0 + layers_per_chunk)
        a_blk = a[g0:g1]
        for r0 in range(0, m, rows_per_chunk):
            r1 = min(m, r0 + rows_per_chunk)
            b_blk = b[g0:g1, r0:r1]
            product = torch.bmm(b_blk, a_blk)  # E
            weighted = fisher2[g0:g1, r0:r1] * product  # 2s²F ⊙ E
            values.append(torch.dot(weighted.view(-1), product.view(-1)))
            torch.bmm(weighted, a_blk.transpose(1, 2), out=grad_b[g0:g1, r0:r1])
            if rows_per_chunk == m:
                torch.bmm(b_blk.transpose(1, 2), weighted, out=grad_a[g0:g1])
            else:
                grad_a[g0:g1].baddbmm_(b_blk.transpose(1, 2), weighted)
    return torch.stack(values).sum(), grad_a, grad_b


def _lowrank_space(penalty: EWCPenalty, a_params: tuple[torch.Tensor, ...], b_params: tuple[torch.Tensor, ...]):
    """2·P and the stacked gradients per A-group and per B-group under the rank-one Fisher.

    With L' = Bᵀ diag(u') B and R = A diag(v) Aᵀ (both r×r and symmetric): 2P = Σ L' ⊙ R,
    ∂P/∂B = diag(u') B R and ∂P/∂A = L' A diag(v).
    """
    avs, rights = [], []
    for members, cols in zip(penalty.a_groups, penalty.a_buffers):
        a = _stacked(a_params, members)
        av = a * cols
        avs.append(av)
        rights.append(torch.bmm(av, a.transpose(1, 2)))
    ubs, lefts = [], []
    for members, rows2 in zip(penalty.b_groups, penalty.b_buffers):
        b = _stacked(b_params, members)
        ub = rows2 * b
        ubs.append(ub)
        lefts.append(torch.bmm(b.transpose(1, 2), ub))
    right = torch.cat(rights) if len(rights) > 1 else rights[0]  # layers in A-group order
    left = torch.cat(lefts) if len(lefts) > 1 else lefts[0]  # layers in B-group order
    b_to_a, a_to_b = penalty.gather_index
    left_by_a, right_by_b = left.index_select(0, b_to_a), right.index_select(0, a_to_b)
    doubled = torch.dot(left_by_a.view(-1), right.view(-1))
    grads_a, grads_b, start = [], [], 0
    for av in avs:
        grads_a.append(torch.bmm(left_by_a[start:start + len(av)], av))
        start += len(av)
    start = 0
    for ub in ubs:
        grads_b.append(torch.bmm(ub, right_by_b[start:start + len(ub)]))
        start += len(ub)
    return doubled, grads_a, grads_b


class _EWCFunction(torch.autograd.Function):
    """The penalty and its analytic gradient in one pass, without an autograd graph per layer.

    The small UNets' steps are so short that an autograd graph of a dozen kernels per shape group
    costs more than the UNet's own backward; computing gradients alongside the value halves that.
    Tests compare both against autograd through a materialised ΔW.
    """

    @staticmethod
    def forward(ctx, penalty: EWCPenalty, *params: torch.Tensor) -> torch.Tensor:
        count = len(penalty.layers)
        a_params, b_params = params[:count], params[count:]
        device_type = params[0].device.type
        # (parameter indices, their gradients stacked G×param shape), one entry per stacked group
        stacked_grads: list[tuple[list[int], torch.Tensor]] = []
        with torch.autocast(device_type=device_type, enabled=False):
            if penalty.space == "full":
                chunk_elements = penalty.chunk_elements or (1 << 18 if device_type == "cpu" else 1 << 24)
                doubled = []
                for members, fisher2 in zip(penalty.full_groups, penalty.full_buffers):
                    value, grad_a, grad_b = _full_space_group(fisher2, _stacked(a_params, members), _stacked(b_params, members),
                                                              chunk_elements)
                    doubled.append(value)
                    stacked_grads += [(members, grad_a), ([count + i for i in members], grad_b)]
                total = torch.stack(doubled).sum() if len(doubled) > 1 else doubled[0]
            else:
                total, grads_a, grads_b = _lowrank_space(penalty, a_params, b_params)
                stacked_grads += list(zip(penalty.a_groups, grads_a))
                stacked_grads += [([count + i for i in members], g) for members, g in zip(penalty.b_groups, grads_b)]
        # Gradients stay stacked per group until backward: one multiply per group, not per layer.
        ctx.indices = [indices for indices, _ in stacked_grads]
        ctx.stacked = [g.view(len(indices), *params[indices[0]].shape) for indices, g in stacked_grads]
        ctx.param_dtypes = [p.dtype for p in params]
        return total * 0.5

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads: list[torch.Tensor | None] = [None] * len(ctx.param_dtypes)
        scaled = torch._foreach_mul(ctx.stacked, grad_output)
        ctx.stacked = None
        for indices, group in zip(ctx.indices, scaled):
            for i, g in zip(indices, group.unbind(0)):
                grads[i] = g
        # LoRA factors train in fp32; a half-precision factor gets its gradient in its own dtype.
        return (None, *(g if g.dtype == dtype else g.to(dtype) for g, dtype in zip(grads, ctx.param_dtypes)))


class Rank1FisherPenalty(torch.nn.Module):
    """c · (μᵀ Δθ)², the Fisher's curvature along the mean per-sample gradient μ.

    Per-sample gradients of a diffusion model are nearly collinear, so most of the Fisher's mass lies
    along one direction that the diagonal cannot represent. With LoRA, μᵀ vec(ΔW) = Σ_layers s·⟨M_μ, B A⟩
    = Σ s·⟨M_μ Aᵀ, B⟩: an m×r product per layer, ΔW is never formed. c makes the rank-1 term carry the
    same total curvature (trace) as the diagonal one in the same normalised units (Fisher divided by its
    mean over the adapted weights): c·‖μ‖² = Σ F_ii / mean(F) = the number of adapted weights.
    """

    def __init__(self, model: torch.nn.Module, fisher: FisherInfo, adapter: str = "default") -> None:
        super().__init__()
        self.layers = list(iter_adapted_layers(model, adapter))
        if not self.layers:
            raise InputError("the model has no LoRA layers for the rank-1 Fisher penalty; add the forget adapter first")
        keys = [layer.name + ".weight" for layer in self.layers]
        missing = [k for k in keys if k not in fisher.mean_gradient]
        if missing:
            raise InputError(
                f"the Fisher file has no mean gradient for {len(missing)} adapted module(s), e.g. {missing[:3]} (it was "
                "written by an older sa-peft or factored-only); recompute it (delete `fisher_path`) for `fisher_rank1_weight`"
            )
        device = self.layers[0].lora_a.device
        self.directions = [fisher.mean_gradient[k].reshape(fisher.mean_gradient[k].shape[0], -1).to(device, torch.float32)
                           for k in keys]
        norm_sq = sum(float(d.double().square().sum()) for d in self.directions)
        if not norm_sq > 0:
            raise InputError("the Fisher's mean gradient is zero on every adapted weight; it cannot weight the penalty")
        self.coefficient = sum(math.prod(fisher.shapes[k]) for k in keys) / norm_sq
        self.scales = [layer.scale for layer in self.layers]
        self.lora_a_params = [layer.module.lora_A[layer.adapter].weight for layer in self.layers]
        self.lora_b_params = [layer.module.lora_B[layer.adapter].weight for layer in self.layers]

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.directions = [fn(t) for t in self.directions]
        return result

    def projection(self) -> torch.Tensor:
        """μᵀ vec(ΔW) over every adapted layer."""
        total = torch.zeros((), device=self.directions[0].device)
        for mu, a, b, s in zip(self.directions, self.lora_a_params, self.lora_b_params, self.scales):
            a = a.float().reshape(a.shape[0], -1)
            b = b.float().reshape(b.shape[0], -1)
            total = total + s * ((mu @ a.t()) * b).sum()
        return total

    def forward(self) -> torch.Tensor:
        return self.coefficient * self.projection().square()


class SumOfPenalties(torch.nn.Module):
    """Σ wᵢ · penaltyᵢ(): the diagonal EWC term together with the rank-1 one under one λ."""

    def __init__(self, penalties: list[torch.nn.Module], weights: list[float]) -> None:
        super().__init__()
        self.penalties = torch.nn.ModuleList(penalties)
        self.weights = list(weights)

    def forward(self) -> torch.Tensor:
        return sum(w * p() for p, w in zip(self.penalties, self.weights))
