"""Key names of the original SD3 (Stability AI, MMDiT) and FLUX (Black Forest Labs) transformer checkpoints.

diffusers 0.42 reads these layouts (``from_single_file``: ``convert_sd3_transformer_checkpoint_to_diffusers`` and
``convert_flux_transformer_checkpoint_to_diffusers`` in ``diffusers.loaders.single_file_utils``) but cannot write
them; the functions here are their inverses, and ComfyUI's "Load Checkpoint" (SD3) and "Load Diffusion Model"
(FLUX) read the same names. What the readers split, the writers fuse:

* SD3 joint block ``i``: ``joint_blocks.{i}.x_block`` is the image stream (``attn.qkv`` = ``to_q/to_k/to_v``
  stacked, ``attn.proj`` = ``to_out.0``, ``attn.ln_q/ln_k`` = ``norm_q/norm_k``, ``mlp.fc1/fc2`` = ``ff.net.0.proj``/
  ``ff.net.2``, ``adaLN_modulation.1`` = ``norm1.linear``), ``context_block`` the text stream (``add_q/k/v_proj``,
  ``to_add_out``, ``norm_added_q/k``, ``ff_context``, ``norm1_context``). SD3.5's dual-attention blocks add
  ``x_block.attn2``. The last block's text stream has only its modulation, whose (shift, scale) halves are stored
  in the other order, as are the final layer's.
* FLUX double block ``i``: ``double_blocks.{i}.img_attn.qkv`` / ``txt_attn.qkv`` (q, k, v stacked),
  ``img_attn.norm.query_norm.scale`` …, ``img_mlp.0/2``, ``img_mod.lin``; single block ``i``:
  ``single_blocks.{i}.linear1`` = ``attn.to_q/to_k/to_v`` and ``proj_mlp`` stacked, ``linear2`` = ``proj_out``,
  ``modulation.lin`` = ``norm.linear``. The embedders are ``img_in``, ``txt_in``, ``time_in``, ``vector_in``,
  ``guidance_in``; the output ``final_layer`` (shift/scale swapped as in SD3).

Every weight of the diffusers model must find its original name; one that does not (a model these layouts do not
describe) is an error, never a silently dropped tensor.
"""

from __future__ import annotations

import torch

from .errors import InputError

SD3_PREFIX = "model.diffusion_model."
# SD3's single files hold the text encoders too (ComfyUI and diffusers read them from these prefixes).
SD3_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
SD3_CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
SD3_T5_PREFIX = "text_encoders.t5xxl.transformer."

_SD3_TOP = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
            "context_embedder": "context_embedder", "proj_out": "final_layer.linear"}
_SD3_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
              "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
              "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
              "attn2.norm_k": "x_block.attn2.ln_k", "norm1.linear": "x_block.adaLN_modulation.1",
              "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
              "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
_SD3_FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
              "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}

_FLUX_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
_FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
                "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
                "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
_FLUX_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                      "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
                "proj_out": "linear2"}
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
# FLUX's RMSNorm weights are called ``scale`` in the original layout.
_FLUX_NORMS = ("query_norm", "key_norm")


def swap_shift_scale(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous stores (scale, shift), the original layouts (shift, scale): the same swap
    both ways."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class _Writer:
    """Moves tensors from a diffusers state dict to original names; what is left at the end was not described."""

    def __init__(self, state_dict: dict[str, torch.Tensor], family: str):
        self.todo = dict(state_dict)
        self.out: dict[str, torch.Tensor] = {}
        self.family = family

    def rename(self, source: str, target: str, transform=None) -> None:
        for suffix in ("weight", "bias"):
            if f"{source}.{suffix}" in self.todo:
                value = self.todo.pop(f"{source}.{suffix}")
                self.out[f"{target}.{suffix}"] = transform(value) if transform else value
        if source in self.todo:  # a bare parameter (SD3's pos_embed buffer)
            self.out[target] = self.todo.pop(source)

    def fuse(self, members: tuple[str, ...], target: str) -> None:
        for suffix in ("weight", "bias"):
            parts = [self.todo.pop(f"{m}.{suffix}", None) for m in members]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                raise InputError(f"{self.family} {target}.{suffix}: the original layout stacks {', '.join(members)}, "
                                 "and this model has only some of them")
            self.out[f"{target}.{suffix}"] = torch.cat(parts, dim=0)

    def done(self) -> dict[str, torch.Tensor]:
        if self.todo:
            raise InputError(f"the {self.family} transformer has weights the original checkpoint layout has no name "
                             f"for ({', '.join(sorted(self.todo)[:5])}); save it as a diffusers pipeline folder "
                             "(save_pretrained) instead")
        return self.out


def _block_count(state_dict: dict, prefix: str) -> int:
    return len({k.split(".")[1] for k in state_dict if k.startswith(prefix)})


def sd3_transformer_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``SD3Transformer2DModel`` state dict in Stability AI's layout, under ``model.diffusion_model.``."""
    w = _Writer(state_dict, "SD3")
    for source, target in _SD3_TOP.items():
        w.rename(source, target)
    w.rename("norm_out.linear", "final_layer.adaLN_modulation.1", swap_shift_scale)
    count = _block_count(state_dict, "transformer_blocks.")
    for i in range(count):
        block = f"transformer_blocks.{i}."
        for source, target in _SD3_BLOCK.items():
            w.rename(block + source, f"joint_blocks.{i}.{target}")
        for target, members in _SD3_FUSED.items():
            w.fuse(tuple(block + m for m in members), f"joint_blocks.{i}.{target}")
        # The last block's text stream is an AdaLayerNormContinuous (context_pre_only): its halves swap.
        last = swap_shift_scale if i == count - 1 else None
        w.rename(block + "norm1_context.linear", f"joint_blocks.{i}.context_block.adaLN_modulation.1", last)
    return {SD3_PREFIX + k: v for k, v in w.done().items()}


def flux_transformer_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel`` state dict in Black Forest Labs' layout (no prefix, as their files are)."""
    w = _Writer(state_dict, "FLUX")
    for source, target in _FLUX_TOP.items():
        w.rename(source, target)
    w.rename("norm_out.linear", "final_layer.adaLN_modulation.1", swap_shift_scale)
    for blocks, original, renamed, fused in (("transformer_blocks", "double_blocks", _FLUX_DOUBLE, _FLUX_DOUBLE_FUSED),
                                             ("single_transformer_blocks", "single_blocks", _FLUX_SINGLE,
                                              _FLUX_SINGLE_FUSED)):
        for i in range(_block_count(state_dict, f"{blocks}.")):
            block = f"{blocks}.{i}."
            for source, target in renamed.items():
                w.rename(block + source, f"{original}.{i}.{target}")
            for target, members in fused.items():
                w.fuse(tuple(block + m for m in members), f"{original}.{i}.{target}")
    out = w.done()
    return {(k[: -len("weight")] + "scale" if k.split(".")[-2] in _FLUX_NORMS else k): v for k, v in out.items()}
