"""A FLUX forget LoRA in kohya/ComfyUI's key layout (``lora_unet_double_blocks_0_img_attn_qkv…``), the layout
diffusers' ``_convert_kohya_flux_lora_to_diffusers`` reads.

kohya names FLUX's original (BFL) modules, several of which diffusers splits: a double block's ``img_attn_qkv`` is
diffusers' ``attn.to_q/to_k/to_v``, ``txt_attn_qkv`` its ``add_q/k/v_proj``, a single block's ``linear1`` its
``attn.to_q/to_k/to_v`` and ``proj_mlp`` stacked. A fused module's LoRA is written in the block-diagonal ("sparse")
form diffusers' reader splits exactly: ``lora_down`` the members' A stacked (rank n·r), ``lora_up`` their B on the
diagonal, zeros elsewhere; a member the adapter does not hold is a zero block. Each layer's scale is folded into
``lora_up`` and ``alpha`` is the written rank (kohya's scale alpha / rank = 1), so alpha ≠ rank, rsLoRA and
per-layer ranks survive.
"""

from __future__ import annotations

import re

import torch

from .errors import InputError

# diffusers module (under a block) → kohya name, per block kind.
_DOUBLE = {"attn.to_out.0": "img_attn_proj", "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2",
           "norm1.linear": "img_mod_lin", "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp_0",
           "ff_context.net.2": "txt_mlp_2", "norm1_context.linear": "txt_mod_lin"}
_DOUBLE_FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)$")


def _layer(module: str, factors: dict, scales: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, scale·B) of ``module``, or None when the adapter does not hold it."""
    if module not in factors:
        return None
    a, b = factors[module]
    return a, b * scales[module]


def _fused(members: list[str], factors: dict, scales: dict) -> dict[str, torch.Tensor] | None:
    """The block-diagonal kohya LoRA of a fused module from its members' (A, scale·B); None if none is adapted.

    Every member reads the block's width d (A's columns); q, k and v write d, proj_mlp 4·d (FLUX's MLP ratio), so a
    member the adapter does not hold still gets its zero block of the right height."""
    present = [m for m in members if m in factors]
    if not present:
        return None
    rank = max(factors[m][0].shape[0] for m in present)
    in_dim = factors[present[0]][0].shape[1]
    out_dims = [4 * in_dim if m.endswith("proj_mlp") else in_dim for m in members]
    down = torch.zeros(len(members) * rank, in_dim)
    up = torch.zeros(sum(out_dims), len(members) * rank)
    row = 0
    for j, (member, out_dim) in enumerate(zip(members, out_dims)):
        if member in factors:
            a, b = factors[member]
            r = a.shape[0]  # a lower rank is zero-padded: the padding's rows and columns stay 0
            down[j * rank : j * rank + r] = a.float()
            up[row : row + out_dim, j * rank : j * rank + r] = b.float() * scales[member]
        row += out_dim
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(len(members) * rank))}


def flux_kohya_state_dict(state_dict: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """kohya-keyed tensors of a FLUX LoRA. ``state_dict``: ``transformer.<module>.lora_A/B.weight``; ``scales``: each
    module's LoRA scale (keyed by module name)."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not key.startswith("transformer.") or not key.endswith(".lora_A.weight"):
            continue
        module = key[len("transformer.") : -len(".lora_A.weight")]
        factors[module] = (value, state_dict[f"transformer.{module}.lora_B.weight"])
    unmapped = []
    for module in factors:
        match = _BLOCK.match(module)
        kind, inner = (match.group(1), match.group(3)) if match else (None, None)
        single = kind == "single_transformer_blocks"
        known = (_SINGLE if single else _DOUBLE) if kind else {}
        fused = (_SINGLE_FUSED if single else _DOUBLE_FUSED) if kind else {}
        if inner not in known and not any(inner in members for members in fused.values()):
            unmapped.append(module)
    if unmapped:
        raise InputError(f"`lora`: the kohya FLUX layout has no name diffusers' reader maps back for {sorted(unmapped)} "
                         "(only the double and single blocks' layers are written); train with `lora_target` attn, "
                         "context or attn_ff, or keep the diffusers file")
    kohya: dict[str, torch.Tensor] = {}
    blocks = sorted({(m.group(1), int(m.group(2))) for m in map(_BLOCK.match, factors)})
    for kind, index in blocks:
        single = kind == "single_transformer_blocks"
        prefix = f"lora_unet_{'single' if single else 'double'}_blocks_{index}_"
        for inner, name in (_SINGLE if single else _DOUBLE).items():
            layer = _layer(f"{kind}.{index}.{inner}", factors, scales)
            if layer is not None:
                a, b = layer
                kohya.update({f"{prefix}{name}.lora_down.weight": a.float().contiguous(),
                              f"{prefix}{name}.lora_up.weight": b.float().contiguous(),
                              f"{prefix}{name}.alpha": torch.tensor(float(a.shape[0]))})
        for name, members in (_SINGLE_FUSED if single else _DOUBLE_FUSED).items():
            full = [f"{kind}.{index}.{m}" for m in members]
            fused = _fused(full, factors, scales)
            if fused is not None:
                kohya.update({f"{prefix}{name}.{k}": v for k, v in fused.items()})
    return kohya
