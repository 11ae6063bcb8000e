"""Offline fixtures for tests, smoke runs and benchmarks (not used by a training run).

``tiny_pipeline``: seeded tiny SD 1.x/2.x-style, SDXL, SD3 and FLUX pipelines; ``tokenizer``: a CLIP tokenizer written
from a word list (the built-in digits model's is made this way) and a T5 tokenizer over one (for SD3 and FLUX); ``unet_configs``: the UNet configurations
of released Stable Diffusion models, for benchmarks with random weights.
"""
