"""The built-in ``builtin:digits`` pipeline: format, size, prompt embeddings and sample quality."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sa_peft.classifier import load_classifier
from sa_peft.evaluation import generate_samples
from sa_peft.models import load_pipeline, resolve_model_path

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPTS = [f"a handwritten digit {w}" for w in DIGIT_WORDS]
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "digits" / "train_digits_model.py"


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("builtin:digits")


def test_folder_is_small_and_safetensors_only():
    folder = resolve_model_path("builtin:digits")
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 20 * 1024 * 1024
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert len([f for f in files if f.endswith(".safetensors")]) == 3  # vae, text encoder, unet
    assert os.path.isfile(os.path.join(folder, "README.md"))


def test_components_and_configs(pipe):
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae.config.latent_channels == 4 and pipe.vae.config.in_channels == 1
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)  # set from the latents, not SD's default
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.sample_size == 8 and pipe.vae_scale_factor == 2
    sched = pipe.scheduler.config
    assert sched.steps_offset == 1 and sched.clip_sample is False and sched.prediction_type == "epsilon"
    # One token per prompt word; prompts are "<bos> a handwritten digit <word> <eos>".
    ids = pipe.tokenizer(PROMPTS[3]).input_ids
    assert len(ids) == 6 and ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id


def test_generates_right_shape(pipe):
    samples = generate_samples(pipe, [PROMPTS[7]], 2, seed=0, num_inference_steps=3, guidance_scale=3.0)
    images = samples[PROMPTS[7]]
    assert images.shape == (2, 1, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1


@torch.no_grad()
def test_prompt_embeddings_separate(pipe):
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    out = pipe.text_encoder(ids)
    pooled = F.normalize(out.pooler_output, dim=-1)
    cos = pooled @ pooled.T
    off = ~torch.eye(10, dtype=torch.bool)
    assert cos[off].max() < 0.5
    # The per-token states the UNet cross-attends to differ too, from the digit word (position 4) on.
    hidden = F.normalize(out.last_hidden_state[:, 4:], dim=-1)
    per_token = torch.einsum("ptd,qtd->pqt", hidden, hidden).mean(dim=2)
    assert per_token[off].max() < 0.5


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_base_model_samples_are_the_prompted_digits(pipe):
    classifier = load_classifier("builtin:digits-classifier")
    samples = generate_samples(pipe, PROMPTS, 8, seed=123, num_inference_steps=10, guidance_scale=3.0, batch_size=8)
    correct = torch.stack([(classifier.predict(samples[p]) == i) for i, p in enumerate(PROMPTS)]).float()
    # A random or untrained model scores about 0.1; the trained one is near 1.0 even at 10 steps.
    assert correct.mean() >= 0.9
    assert correct.mean(dim=1).min() >= 0.625


def _load_script():
    spec = importlib.util.spec_from_file_location("train_digits_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_script_smoke(tmp_path):
    """A few steps of each training stage, so the script keeps working (the full run takes ~20 min)."""
    pytest.importorskip("sklearn")
    from sa_peft.testing.tokenizer import write_clip_tokenizer

    script = _load_script()
    split = script.load_digit_split(seed=0)
    assert len(split.train_labels) == 1437 and len(split.test_labels) == 360
    assert split.train_images.shape[1:] == (1, 16, 16)
    assert torch.equal(torch.bincount(split.test_labels), torch.bincount(script.load_digit_split(0).test_labels))
    small = script.DigitSplit(split.train_images[:64], split.train_labels[:64], split.test_images[:8],
                              split.test_labels[:8])
    assert script.train_classifier(small, seed=0, epochs=1).predict(small.test_images).shape == (8,)
    torch.manual_seed(0)
    vae = script.build_vae()
    script.train_vae(vae, small.train_images, steps=2, seed=0, batch_size=8)
    mean, std = script.encode_stats(vae, small.train_images)
    assert mean.shape == (64, 4, 8, 8)
    tokenizer = write_clip_tokenizer(tmp_path / "tok", " ".join(script.PROMPTS).split())
    text_encoder = script.build_text_encoder(tokenizer, 32)
    unet = script.build_unet(32)
    info, ema = script.train_unet_and_text(unet, text_encoder, tokenizer, script.build_scheduler(), mean, std,
                                           small.train_labels, 1.0, steps=2, seed=0, batch_size=8)
    assert info["unet_steps"] == 2 and ema.updates == 2
    orthogonal = torch.eye(4).view(4, 1, 4).expand(4, 3, 4)
    assert script.separation_penalty(orthogonal).item() == pytest.approx(0.0)
    assert script.separation_penalty(torch.ones(4, 3, 4)).item() == pytest.approx(1.0)
