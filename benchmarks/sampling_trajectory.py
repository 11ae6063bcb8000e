"""Where along the sampler's trajectory does a forgotten digit survive? An SD3 digits run, step by step.

    OMP_NUM_THREADS=1 python benchmarks/sampling_trajectory.py RUN_DIR --digit 4 [--num_images 50]
    OMP_NUM_THREADS=1 python benchmarks/sampling_trajectory.py base --digit 4

RUN_DIR is an adapter folder (or ``base`` for the frozen model) of ``builtin:digits-sd3`` (or
--pretrained_model_name_or_path, an SD3 pipeline). The digit's prompt is sampled with the pipeline's own
Euler sampler (25 steps, guidance 3, seed 1234); the latents are recorded after every step
(``callback_on_step_end``), the guided velocity v of step i is read off two consecutive latents, and the model's
prediction of the finished image x̂₀ = x_σ − σ·v is decoded and read by the built-in classifier. The table gives,
per step, σ, the mean P(digit) of x̂₀ and how many of the samples it reads as the digit: the layout is decided at the
first steps, the details at the last (benchmarks/RESULTS.md, section 0b).
"""

from __future__ import annotations

import argparse

import torch

from sa_peft.classifier import load_classifier
from sa_peft.data import decode_latents
from sa_peft.defaults import DIGIT_PROMPTS
from sa_peft.errors import InputError
from sa_peft.models import SD3_PIPELINE, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="an adapter folder, or 'base' for the frozen model")
    parser.add_argument("--digit", type=int, required=True)
    parser.add_argument("--num_images", type=int, default=50)
    parser.add_argument("--pretrained_model_name_or_path", default="builtin:digits-sd3")
    args = parser.parse_args()
    if not 0 <= args.digit <= 9:
        raise InputError(f"--digit must be 0-9, got {args.digit}")
    classifier = load_classifier("builtin:digits-classifier")
    pipe = load_pipeline(args.pretrained_model_name_or_path, supported=(SD3_PIPELINE,))
    pipe.set_progress_bar_config(disable=True)
    if args.run_dir != "base":
        pipe.load_lora_weights(args.run_dir)
    states = []

    def record(_pipe, _step, _timestep, kwargs):
        states.append(kwargs["latents"].clone())
        return kwargs

    prompt = DIGIT_PROMPTS[args.digit]
    with torch.no_grad():
        final = pipe(prompt, num_images_per_prompt=args.num_images, num_inference_steps=25, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(1234), output_type="latent",
                     callback_on_step_end=record).images
    sigmas = pipe.scheduler.sigmas

    def read(latents: torch.Tensor) -> tuple[float, int]:
        with torch.no_grad():
            probs = classifier.predict_proba(decode_latents(pipe, latents))
        return float(probs[:, args.digit].mean()), int((probs.argmax(1) == args.digit).sum())

    print(f"{args.run_dir}, {prompt!r}, {args.num_images} samples")
    print("| step | σ | P(digit) of x̂₀ | read as the digit |")
    print("|---|---|---|---|")
    # states[i] is the latent after step i, at σ = sigmas[i + 1]; step i's velocity is (states[i] − states[i−1]) /
    # (sigmas[i + 1] − sigmas[i]), and x̂₀ = states[i − 1] − sigmas[i] · v.
    for i in range(1, len(states)):
        velocity = (states[i] - states[i - 1]) / (sigmas[i + 1] - sigmas[i])
        p, n = read(states[i - 1] - sigmas[i] * velocity)
        print(f"| {i} | {float(sigmas[i]):.3f} | {p:.3f} | {n} |", flush=True)
    p, n = read(final)
    print(f"| the sample | 0 | {p:.3f} | {n} |")


if __name__ == "__main__":
    main()
