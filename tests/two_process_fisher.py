"""Estimate a Fisher under ``accelerate launch`` and save it: ``python two_process_fisher.py OUT.safetensors``.

``fisher_inputs`` is shared with tests/test_fisher.py, so the launched processes and the one-process
reference see the same model, prompts, latents and settings.
"""

from __future__ import annotations

import sys

import torch

MODULES = ["conv_in", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "down_blocks.1.resnets.0.conv_shortcut"]
PROMPTS = ["a photo of a cat", "a red car"]
SETTINGS = {"estimator": "fast", "num_timesteps": 3, "seed": 5, "show_progress": False}


def fisher_inputs(num_samples: int = 3):
    from sa_peft.conditioning import encode_prompts
    from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    conditioning = encode_prompts(pipe, PROMPTS)
    latents = torch.randn(num_samples, 4, 16, 16, generator=torch.Generator().manual_seed(123))
    prompt_ids = torch.arange(num_samples) % len(PROMPTS)
    return pipe, conditioning, latents, prompt_ids


def main(path: str) -> None:
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from sa_peft.fisher import estimate_fisher

    accelerator = Accelerator(cpu=True)
    pipe, conditioning, latents, prompt_ids = fisher_inputs()
    fisher = estimate_fisher(pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, MODULES,
                             accelerator=accelerator, **SETTINGS)
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in fisher.diagonal.items()}, path,
                  metadata={"num_processes": str(accelerator.num_processes)})
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
