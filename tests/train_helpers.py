"""Helpers shared by the adapter-ecosystem tests: tiny in-process training runs and sampling."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_sa_lora.py"


def load_train_module():
    spec = importlib.util.spec_from_file_location("train_sa_lora_ecosystem", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_training(train, model_dir, output_dir, replay_file, *extra):
    """One tiny, fast run of the training script in-process; returns the pipeline with the adapter."""
    from accelerate.state import AcceleratorState

    args = [
        "--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
        "--replay_prompts_file", str(replay_file), "--num_surrogate_images", "4", "--num_replay_images_per_prompt", "2",
        "--fisher_num_samples", "4", "--fisher_num_timesteps", "2", "--generation_num_inference_steps", "2",
        "--num_validation_images", "1", "--validation_steps", "1000", "--train_batch_size", "2",
        "--max_train_steps", "3", "--learning_rate", "1e-2", "--rank", "2", "--num_probe_images", "2",
        "--num_sample_check_images", "2", *extra,
    ]
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return train.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def sample(pipe, prompt="brad pitt", steps=3, **kwargs):
    """Images as a float array, with a fixed seed, so two pipelines can be compared element-wise."""
    return pipe(prompt, num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(0),
                **kwargs).images


def reload_and_compare(model_dir, out, trained_pipe, prompt="brad pitt"):
    """A fresh pipeline from ``model_dir`` with the adapter saved in ``out`` samples exactly as ``trained_pipe``
    (which training changed) and adapts as many layers; returns the fresh pipeline and the trained samples."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from sa_peft.lora import iter_adapted_layers
    from sa_peft.models import denoiser

    fresh = DiffusionPipeline.from_pretrained(str(model_dir), use_safetensors=True)
    fresh.set_progress_bar_config(disable=True)
    base = sample(fresh, prompt)
    fresh.load_lora_weights(str(out))
    trained = sample(trained_pipe, prompt)
    assert np.abs(trained - base).max() > 1e-3, "training changed nothing"
    np.testing.assert_array_equal(sample(fresh, prompt), trained)
    assert len(list(iter_adapted_layers(denoiser(fresh), "default_0"))) == \
        len(list(iter_adapted_layers(denoiser(trained_pipe))))
    return fresh, trained


def hand_flow_losses(pipe, latents, seed, scheme, predict, frozen_replay_from=None):
    """The SD3/FLUX scripts' per-sample loss written out: their draws (noise, then u), σ looked up by timestep,
    target ε − x₀ (or, from ``frozen_replay_from`` on, the transformer's own prediction with the adapter off), their
    loss weighting. ``predict(noisy, timesteps)`` is the family's transformer call."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from sa_peft.objective import adapters_disabled

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen)
    u = compute_density_for_timestep_sampling(scheme, len(latents), 0.0, 1.0, 1.29, generator=gen)
    timesteps = scheduler.timesteps[(u * 1000).long()]
    sigmas = torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in timesteps])
    sigmas = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    with torch.no_grad():
        prediction = predict(noisy, timesteps)
        target = noise - latents
        if frozen_replay_from is not None:
            with adapters_disabled(pipe.transformer):
                frozen = predict(noisy, timesteps)
            target = torch.cat([target[:frozen_replay_from], frozen[frozen_replay_from:]])
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
    return (weighting * (prediction - target) ** 2).reshape(len(latents), -1).mean(1)
