"""Key names of the original Stable Diffusion (ldm/sgm) layout, derived from diffusers model configs.

diffusers 0.42 reads this layout (``from_single_file``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint`` in
``diffusers.loaders.single_file_utils``) but cannot write it. The functions here are the inverse of those
readers, written from their block arithmetic, so that they hold for any ``layers_per_block`` and block count
(SD 1.x/2.x, SDXL and the project's tiny models), not only for SD 1.5's shape:

* UNet down block ``b``, layer ``j`` is ``input_blocks.{1 + b·(L+1) + j}`` (resnet ``.0``, attention ``.1``), its
  downsampler ``input_blocks.{1 + b·(L+1) + L}.0.op``; up block ``b``, layer ``j`` is ``output_blocks.{b·(L+1) + j}``
  (resnet ``.0``, attention ``.1``), its upsampler ``output_blocks.{b·(L+1) + L}.{2 if attention else 1}.conv``;
  the mid block is ``middle_block.0/1/2`` (resnet, attention, resnet). ``L`` is ``layers_per_block``.
* VAE encoder ``down.{i}.block.{j}``/``down.{i}.downsample``, decoder ``up.{n-1-i}`` (ldm counts decoder blocks
  from the lowest resolution up), mid ``block_1``/``attn_1``/``block_2``; attention weights are 1×1 convolutions.
* CLIP (SD 1.x, SDXL's first encoder): the transformers keys under ``…transformer.text_model.``. OpenCLIP (SD 2.x,
  SDXL's second encoder): ``resblocks.{i}`` with q/k/v fused into ``attn.in_proj_weight``/``in_proj_bias``,
  ``positional_embedding``, ``ln_final`` and ``text_projection`` stored transposed.
"""

from __future__ import annotations

import re

import torch

from .errors import InputError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


class UnetLayout:
    """What of a UNet config decides ldm names: ``layers_per_block`` and which up blocks have attention."""

    def __init__(self, config):
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        layers = get("layers_per_block")
        if not isinstance(layers, int):
            if len(set(layers)) != 1:
                raise InputError(f"layers_per_block {layers}: the original layout needs the same count in every block")
            layers = int(layers[0])
        self.layers = layers
        self.up_has_attention = ["CrossAttn" in t for t in get("up_block_types")]
        for key in ("class_embed_type", "encoder_hid_dim_type"):
            if get(key) is not None:
                raise InputError(f"UNet {key}={get(key)!r} has no original-layout mapping here")
        mid = get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid not in (None, "UNetMidBlock2DCrossAttn"):
            raise InputError(f"UNet mid_block_type {mid!r} has no original-layout mapping here")

    @classmethod
    def of(cls, unet_or_config):
        return cls(getattr(unet_or_config, "config", unet_or_config))


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET:
        raise KeyError(rest)
    return _RESNET[head] + ("." + tail if tail else "")


def unet_module_to_ldm(module: str, layout: UnetLayout) -> str:
    """The ldm path (without ``model.diffusion_model.``) of a diffusers UNet module or parameter path."""
    for old, new in _UNET_TOP.items():
        if module == old or module.startswith(old + "."):
            return new + module[len(old):]
    L = layout.layers
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", module)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{1 + b * (L + 1) + L}.0.{rest.replace('conv', 'op', 1)}"
        index = 1 + b * (L + 1) + j
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", module)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            return f"output_blocks.{b * (L + 1) + L}.{2 if layout.up_has_attention[b] else 1}.{rest}"
        index = b * (L + 1) + j
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    raise KeyError(f"UNet module {module!r} has no original-layout name")


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in the ldm layout (keys under ``model.diffusion_model.``)."""
    layout = UnetLayout.of(config)
    return {UNET_PREFIX + unet_module_to_ldm(k, layout): v for k, v in state_dict.items()}


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key(key: str, num_up: int) -> str:
    for part in ("encoder", "decoder"):
        for old, new in (("conv_norm_out", "norm_out"),):
            if key.startswith(f"{part}.{old}."):
                return key.replace(old, new, 1)
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        part, direction, i, kind, j, rest = m[1], m[2], int(m[3]), m[4], int(m[5]), m[6]
        block = i if direction == "down" else num_up - 1 - i
        if kind == "resnets":
            return f"{part}.{direction}.{block}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{direction}.{block}.{'downsample' if direction == 'down' else 'upsample'}.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        part, kind, j, rest = m[1], m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"{part}.mid.block_{j + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        name, _, param = rest.rpartition(".")
        if j != 0 or name not in _VAE_ATTENTION:
            raise KeyError(key)
        return f"{part}.mid.attn_1.{_VAE_ATTENTION[name]}.{param}"
    if key.split(".")[0] in ("quant_conv", "post_quant_conv") or re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\..+", key):
        return key
    raise KeyError(f"VAE key {key!r} has no original-layout name")


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the ldm layout (under ``first_stage_model.``); the mid-block
    attention's linear weights become 1×1 convolutions, as in the original checkpoints."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    num_up = len(get("up_block_types"))
    out = {}
    for key, value in state_dict.items():
        new = _vae_key(key, num_up)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def _with_text_model(key: str) -> str:
    """transformers ≥ 5.6 dropped ``CLIPTextModel``'s ``text_model.`` level; the original layout keeps it."""
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's state dict under ``prefix`` (``cond_stage_model.transformer.`` or SDXL's
    ``conditioner.embedders.0.transformer.``), keys as ``text_model.…`` whatever transformers' nesting."""
    return {prefix + _with_text_model(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}


_OPENCLIP_TOP = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def openclip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model (SD 2.x's, or SDXL's second with its projection) in OpenCLIP's layout under
    ``prefix`` (``cond_stage_model.model.`` or ``conditioner.embedders.1.model.``)."""
    sd = {_with_text_model(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[key]] = value
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m:
            raise KeyError(f"text encoder key {key!r} has no OpenCLIP-layout name")
        layer, module, param = int(m[1]), m[2], m[3]
        base = f"{prefix}transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault(f"{base}attn.in_proj_{param}", {})[module[-6]] = value
        elif module in _OPENCLIP_LAYER:
            out[f"{base}{_OPENCLIP_LAYER[module]}.{param}"] = value
        else:
            raise KeyError(f"text encoder key {key!r} has no OpenCLIP-layout name")
    for key, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{key}: q, k and v projections are needed to fuse it, got {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def is_openclip(text_encoder) -> bool:
    """SD 2.x's and SDXL's second encoder are OpenCLIP models (``gelu``); SD 1.x's CLIP-L uses ``quick_gelu``."""
    return getattr(text_encoder.config, "hidden_act", "quick_gelu") == "gelu"
