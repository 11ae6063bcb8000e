"""The frozen model as a zero-shot classifier of a forget adapter's samples (an experiment, not a default).

    OMP_NUM_THREADS=1 python benchmarks/experiments/frozen_model_classifier.py ADAPTER_FOLDER DIGIT

Samples 50 images of the forgotten digit's prompt from builtin:digits with the adapter (seed 1234, as the
forgetting benchmark does) and assigns each the prompt under which the frozen model denoises it best (16
stratified timesteps, the same noise for every prompt), over the ten digit prompts and, separately, with the
empty prompt as an eleventh class. Prints those rates beside the built-in classifier's. RESULTS.md section 0,
"Noise surrogate: two diagnoses", has what it measured.
"""

from __future__ import annotations

import sys

import torch

from sa_peft.classifier import load_classifier
from sa_peft.conditioning import encode_prompts
from sa_peft.data import _encode_images
from sa_peft.defaults import DIGIT_PROMPTS
from sa_peft.diffusion_loss import model_prediction
from sa_peft.evaluation import generate_samples
from sa_peft.forgetting import _probe_batch
from sa_peft.models import load_pipeline

PROMPTS = [*DIGIT_PROMPTS, ""]


@torch.no_grad()
def denoising_losses(unet, scheduler, conditioning, latents: torch.Tensor, num_timesteps: int = 16) -> torch.Tensor:
    """[n, len(PROMPTS)]: each latent's mean ε loss under each prompt, on shared stratified timesteps and noise."""
    # The forgetting probe's own draw: timestep j of every image in bin j of num_timesteps, one noise per pair.
    n = len(latents)
    batch = _probe_batch(latents, torch.zeros(n, dtype=torch.long), num_timesteps,
                         scheduler.config.num_train_timesteps, torch.Generator().manual_seed(0))
    timesteps, noise = batch.timesteps, batch.noise
    noisy = scheduler.add_noise(batch.latents, noise, timesteps)
    out = torch.zeros(n, len(PROMPTS))
    for index in range(len(PROMPTS)):
        kwargs = conditioning.unet_kwargs(torch.full((n * num_timesteps,), index))
        prediction = model_prediction(unet, noisy, timesteps, kwargs)
        out[:, index] = (prediction - noise).square().flatten(1).mean(1).view(n, num_timesteps).mean(1)
    return out


def main() -> None:
    adapter, label = sys.argv[1], int(sys.argv[2])
    pipe = load_pipeline("builtin:digits")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(adapter)
    base = load_pipeline("builtin:digits")
    conditioning = encode_prompts(base, PROMPTS)
    prompt = DIGIT_PROMPTS[label]
    images = generate_samples(pipe, [prompt], 50, 1234, show_progress=False)[prompt]
    losses = denoising_losses(base.unet.eval(), base.scheduler, conditioning, _encode_images(pipe, images * 2 - 1))
    judged = load_classifier("builtin:digits-classifier").predict_proba(images)
    print(f"built-in classifier: P {judged[:, label].mean():.3f}, read as the digit {(judged.argmax(1) == label).float().mean():.2f}")
    print(f"frozen model, ten digit prompts: {(losses[:, :10].argmin(1) == label).float().mean():.2f} read as the digit")
    print(f"frozen model, with the empty prompt: {(losses.argmin(1) == label).float().mean():.2f} read as the digit")


if __name__ == "__main__":
    main()
