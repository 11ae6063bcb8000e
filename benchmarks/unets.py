"""The UNets the benchmarks compare, by name: the test model, the embedded digits model, and real SD
architectures with random weights (nothing is downloaded)."""

from __future__ import annotations


def build_unet(name: str):
    """``tiny`` (the test pipeline's UNet), ``digits`` (builtin:digits) or ``sd15``/``sdxl`` (random weights)."""
    if name == "tiny":
        from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

        return build_tiny_pipeline().unet
    if name == "digits":
        from sa_peft.models import load_pipeline

        return load_pipeline("builtin:digits").unet
    from sa_peft.testing.unet_configs import build_unet as build_released

    return build_released(name)
