"""Shared fixtures: every model in the suite is the seeded tiny pipeline from ``build_tiny_pipeline``."""

from __future__ import annotations

import pytest
import torch

from sa_peft.fisher import FisherInfo
from sa_peft.lora import iter_adapted_layers, make_lora_config, resolve_lora_targets
from sa_peft.tiny_pipeline import build_tiny_pipeline


@pytest.fixture
def tiny_pipe():
    """A fresh tiny pipeline (about 30 ms to build), safe to modify."""
    return build_tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """The tiny pipeline saved with ``save_pretrained`` (read-only for tests)."""
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    build_tiny_pipeline().save_pretrained(folder)
    return folder


def add_forget_lora(unet, target="all", rank=2, alpha=None, use_rslora=False, randomize=True, seed=0):
    """Add the forget adapter to ``unet``; with ``randomize`` give A and B random non-zero values."""
    names = resolve_lora_targets(unet, target)
    unet.add_adapter(make_lora_config(names, rank, alpha=alpha, use_rslora=use_rslora))
    if randomize:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in iter_adapted_layers(unet):
                for w in (layer.module.lora_A["default"].weight, layer.module.lora_B["default"].weight):
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    return names


def random_fisher(unet, module_names, seed=0, extra_modules=()):
    """A positive random diagonal Fisher over ``module_names`` (and ``extra_modules``) of ``unet``."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    diagonal = {}
    for name in [*module_names, *extra_modules]:
        module = modules[name]
        weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
        diagonal[f"{name}.weight"] = torch.rand(weight.shape, generator=gen) + 0.05
    return FisherInfo.from_diagonal(diagonal, {"source": "random"})
