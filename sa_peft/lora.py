"""Which UNet (or SD3/FLUX transformer) modules a forget LoRA adapts, and access to the adapted layers' factors."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from .errors import InputError
from .models import is_flow_transformer, is_flux

# Presets follow the official Selective Amnesia / ESD code: "noxattn" (used for nudity) trains
# everything but cross-attention, the output layer and the time embedding; "all" (celebrities)
# trains every linear and conv layer.
LORA_TARGET_PRESETS = ("xattn", "attn", "noxattn", "all")
# Presets for an SD3 transformer (joint attention blocks: an image stream and a context, i.e. text, stream).
# "attn" is what diffusers' train_dreambooth_lora_sd3.py adapts by default: both streams' attention projections
# (and the image-only second attention of SD3.5's dual-attention blocks); "context" only the text stream's
# (what the text tokens contribute as keys and values and how they are updated: the nearest to a UNet's
# cross-attention); "attn_ff" adds the feed-forward layers of both streams; "all" every Linear/Conv2d.
TRANSFORMER_LORA_TARGET_PRESETS = ("attn", "context", "attn_ff", "all")
_JOINT_ATTENTION = re.compile(r"transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")
_CONTEXT = re.compile(r"transformer_blocks\.\d+\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)$")
_FEED_FORWARD = re.compile(r"transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)$")
# FLUX: the same names for its double-stream blocks (``transformer_blocks``: attention with add_*_proj/to_add_out and
# both feed-forwards, as above); its single-stream blocks (``single_transformer_blocks``) hold one attention over the
# joint text + image sequence (attn.to_q/to_k/to_v, no output projection) whose output proj_out shares with the
# parallel MLP's (proj_mlp). "attn" adds the single blocks' attention and proj_out (its attention output), "attn_ff"
# their proj_mlp too; "context" is the double blocks' text stream only (the single blocks share weights between
# text and image tokens).
_SINGLE_ATTENTION = re.compile(r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_out)$")
_SINGLE_MLP = re.compile(r"single_transformer_blocks\.\d+\.proj_mlp$")


def _transformer_preset(adaptable: list[str], target: str, flux: bool = False) -> list[str]:
    """The modules of a transformer preset (``TRANSFORMER_LORA_TARGET_PRESETS``); a UNet-only preset is refused."""
    if target not in TRANSFORMER_LORA_TARGET_PRESETS:
        raise InputError(f"`lora_target` {target!r} is a UNet preset; for an SD3 or FLUX transformer use one of "
                         f"{', '.join(TRANSFORMER_LORA_TARGET_PRESETS)}, or module names")
    if target == "all":
        return adaptable
    patterns = {"attn": [_JOINT_ATTENTION], "context": [_CONTEXT], "attn_ff": [_JOINT_ATTENTION, _FEED_FORWARD]}[target]
    if flux:
        patterns = patterns + {"attn": [_SINGLE_ATTENTION], "context": [],
                               "attn_ff": [_SINGLE_ATTENTION, _SINGLE_MLP]}[target]
    # match from a name's start: "transformer_blocks" must not match inside "single_transformer_blocks"
    return [n for n in adaptable if any(p.match(n) for p in patterns)]


def _adaptable_modules(unet: torch.nn.Module) -> list[str]:
    """Names of Linear/Conv2d layers, counting an already LoRA-wrapped layer once under its own name."""
    names = []
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            if isinstance(module.get_base_layer(), (torch.nn.Linear, torch.nn.Conv2d)):
                names.append(name)
        elif type(module) in (torch.nn.Linear, torch.nn.Conv2d) and not any(
            part == "base_layer" or part.startswith("lora_") for part in name.split(".")
        ):
            names.append(name)
    return names


def resolve_lora_targets(unet: torch.nn.Module, target: str | Sequence[str]) -> list[str]:
    """Turn a preset name or an explicit list of module names/regexes into full module names.

    Explicit entries match a module whose full name equals the entry, ends with ``.<entry>``, or
    fully matches it as a regular expression. Raises ``ValueError`` naming unknown entries.
    """
    adaptable = _adaptable_modules(unet)
    if isinstance(target, str) and is_flow_transformer(unet) and target in (*LORA_TARGET_PRESETS,
                                                                          *TRANSFORMER_LORA_TARGET_PRESETS):
        names = _transformer_preset(adaptable, target, flux=is_flux(unet))
        if not names:
            raise InputError(f"`lora_target` {target!r} matches no Linear/Conv2d module of this transformer")
        return names
    if isinstance(target, str) and target in LORA_TARGET_PRESETS:
        attn = re.compile(r".*\.attn([12])\.(to_q|to_k|to_v|to_out\.0)$")
        if target == "xattn":
            names = [n for n in adaptable if (m := attn.match(n)) and m.group(1) == "2"]
        elif target == "attn":
            names = [n for n in adaptable if attn.match(n)]
        elif target == "noxattn":
            names = [
                n
                for n in adaptable
                if ".attn2." not in n and not n.startswith(("time_embedding.", "conv_out", "add_embedding."))
            ]
        else:
            names = adaptable
        if not names:
            raise InputError(f"`lora_target` {target!r} matches no Linear/Conv2d module of this UNet")
        return names
    entries = [target] if isinstance(target, str) else list(target)
    entries = [e.strip() for part in entries for e in part.split(",") if e.strip()]
    if not entries:
        raise InputError(f"`lora_target` is empty; use one of {LORA_TARGET_PRESETS} or module names")
    names: list[str] = []
    for entry in entries:
        pattern = re.compile(entry) if any(c in entry for c in "*[]()|^$+?\\") else None
        hits = [
            n
            for n in adaptable
            if n == entry or n.endswith("." + entry) or (pattern is not None and pattern.fullmatch(n))
        ]
        if not hits:
            raise InputError(
                f"`lora_target` entry {entry!r} matches no Linear/Conv2d module of the UNet; presets are "
                f"{', '.join(LORA_TARGET_PRESETS)}, or give names such as 'attn2.to_k' or a regex"
            )
        names.extend(h for h in hits if h not in names)
    return names


def make_lora_config(
    target_modules: Sequence[str], rank: int, alpha: float | None = None, use_rslora: bool = False
) -> LoraConfig:
    """A peft ``LoraConfig`` for a forget adapter; ``B`` starts at zero so the adapter starts as a no-op."""
    if rank <= 0:
        raise InputError(f"`rank` must be a positive integer, got {rank}")
    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
        use_rslora=use_rslora,
    )


@dataclass
class AdaptedLayer:
    """One LoRA-adapted weight: ΔW = scale · B · A with weights flattened to matrices."""

    name: str  # base module name, as in the un-adapted UNet (Fisher keys are ``name + ".weight"``)
    module: LoraLayer
    adapter: str

    @property
    def lora_a(self) -> torch.Tensor:
        """A as an r×(n·k·k) matrix (a k×k conv n→r for Conv2d layers)."""
        w = self.module.lora_A[self.adapter].weight
        return w.reshape(w.shape[0], -1)

    @property
    def lora_b(self) -> torch.Tensor:
        """B as an m×r matrix (a 1×1 conv r→m for Conv2d layers)."""
        w = self.module.lora_B[self.adapter].weight
        return w.reshape(w.shape[0], -1)

    @property
    def scale(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def weight_shape(self) -> torch.Size:
        return self.module.get_base_layer().weight.shape

    def delta_weight(self) -> torch.Tensor:
        """Materialised ΔW as an m×(n·k·k) matrix (for the full-space penalty and tests)."""
        return self.scale * (self.lora_b @ self.lora_a)


def iter_adapted_layers(model: torch.nn.Module, adapter: str = "default") -> Iterator[AdaptedLayer]:
    """Yield every Linear/Conv2d LoRA layer of ``model`` that carries ``adapter``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            base = module.get_base_layer()
            if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
                raise TypeError(f"{name}: only Linear and Conv2d LoRA layers are supported, got {type(base)}")
            if isinstance(base, torch.nn.Conv2d) and module.lora_B[adapter].weight.shape[2:] != (1, 1):
                raise TypeError(f"{name}: conv LoRA with a non-1×1 B is not supported")
            yield AdaptedLayer(name=name, module=module, adapter=adapter)


def lora_models(pipe) -> dict[str, torch.nn.Module]:
    """{component name: model} of the pipeline's models a LoRA can live on (its denoiser and text encoders), as
    ``pipe.fuse_lora`` sees them."""
    return {name: getattr(pipe, name) for name in pipe._lora_loadable_modules if getattr(pipe, name, None) is not None}


@contextmanager
def adapters_fused(*models: torch.nn.Module):
    """Sample the adapted model at the base model's speed: each enabled LoRA layer of ``models`` has its active
    adapters' ΔW merged into the base weight (peft's ``merge``, as ``pipe.fuse_lora`` does), and on exit the base
    weights are put back bit for bit from a CPU copy (peft's ``unmerge`` subtracts ΔW again and would leave rounding in
    the frozen weights that the run returns and the judge uses). Unmerged, every adapted layer adds two small matmuls
    to each call: on ``builtin:digits`` the main job's adapted evaluation samples took 76 s against the base model's 49 s
    for the same 500 images (benchmarks/RESULTS.md, section 5). Layers with their adapters switched off
    (``adapters_disabled``) stay as they are."""
    layers = [m for model in models for m in model.modules()
              if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged]
    saved = [{name: p.detach().to("cpu", copy=True) for name, p in m.get_base_layer().named_parameters(recurse=False)}
             for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.merge()
        yield
    finally:
        with torch.no_grad():
            for m, originals in zip(layers, saved):
                for name, p in m.get_base_layer().named_parameters(recurse=False):
                    p.copy_(originals[name])
                m.merged_adapters.clear()
