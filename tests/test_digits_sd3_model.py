"""The built-in ``builtin:digits-sd3`` (SD3-shaped flow-matching digits): its training shortcut, folder and job."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from sa_peft.defaults import DIGIT_PROMPTS
from sa_peft.models import SD3_PIPELINE, TRAINING_PIPELINES, load_pipeline, resolve_model_path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "digits" / "train_digits_sd3_model.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_digits_sd3_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("builtin:digits-sd3", supported=TRAINING_PIPELINES)


def test_counted_zero_rows_are_the_full_context(script):
    """Training's 8 + 1 context (the zero row's logit + log 256) is the pipeline's 8 + 256 zero rows, and without the
    + log 256 it is not (what the check guards against)."""
    torch.manual_seed(0)
    transformer = script.build_transformer(num_layers=2, width=32)
    assert script.counted_context_error(transformer, torch.Generator().manual_seed(0)) < 1e-5
    counted, script.T5_ZERO_TOKENS = script.T5_ZERO_TOKENS, 1  # the shortcut without the count: a plain zero row
    try:
        with torch.no_grad():
            x = torch.randn(2, 4, 8, 8)
            context = torch.randn(2, script.TOKENS, 64)
            pooled, t = torch.randn(2, 64), torch.tensor([300.0, 800.0])
            full = transformer(x, encoder_hidden_states=script.with_zero_tokens(context, counted),
                               pooled_projections=pooled, timestep=t).sample
            one = transformer(x, encoder_hidden_states=script.with_zero_tokens(context, 1), pooled_projections=pooled,
                              timestep=t).sample
    finally:
        script.T5_ZERO_TOKENS = counted
    assert (full - one).abs().max() > 1e-3


def test_folder_is_small_safetensors_and_t5_free():
    folder = resolve_model_path("builtin:digits-sd3")
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 10 * 1024 * 1024
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert len([f for f in files if f.endswith(".safetensors")]) == 4  # vae, two text encoders, transformer
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == SD3_PIPELINE and index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    with open(os.path.join(folder, "training_facts.json")) as f:
        facts = json.load(f)
    assert facts["timings"]["training_seconds"] <= 45 * 60  # ≤ 30 min alone on a thread; the rest: a busy machine
    assert facts["evaluation"]["num_per_prompt"] >= 50
    assert min(m["accuracy"] for m in facts["evaluation"]["per_prompt"].values()) >= 0.9


def test_components_are_sd3_shaped(pipe):
    assert type(pipe).__name__ == SD3_PIPELINE and pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.transformer.config.patch_size == 2 and pipe.transformer.config.sample_size == 8
    assert pipe.vae.config.shift_factor is not None
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.tokenizer.model_max_length == 8
    assert pipe.transformer.config.joint_attention_dim == 2 * pipe.text_encoder.config.hidden_size
    assert 0.3e6 <= sum(p.numel() for p in pipe.transformer.parameters()) <= 1.5e6
    # The VAE is builtin:digits' (same weights), only its config's shift and scale are the SD3 model's.
    unet_vae = load_pipeline("builtin:digits").vae
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), unet_vae.state_dict().values()))


def test_the_digits_job_is_the_default_on_digits_sd3(tmp_path):
    from train_helpers import load_train_module

    train = load_train_module()
    config = train.resolve_defaults(train.parse_args(["--pretrained_model_name_or_path", "builtin:digits-sd3",
                                                      "--forget_prompt", DIGIT_PROMPTS[3],
                                                      "--output_dir", str(tmp_path / "out")]))
    assert config.surrogate_prompt == [DIGIT_PROMPTS[4]]
    assert config.replay_prompts == [p for p in DIGIT_PROMPTS if p != DIGIT_PROMPTS[3]]
    assert (config.resolution, config.classifier) == (16, "builtin:digits-classifier")


@pytest.mark.slow  # 30 samples through the stock pipeline (its 256 zero rows make each step ~10 s of work per 50)
def test_samples_read_as_their_digits(pipe):
    from sa_peft.classifier import load_classifier
    from sa_peft.evaluation import generate_samples

    classifier = load_classifier("builtin:digits-classifier")
    prompts = [DIGIT_PROMPTS[i] for i in (0, 3, 7)]
    samples = generate_samples(pipe, prompts, 10, seed=5, show_progress=False)
    for label, p in zip((0, 3, 7), prompts):
        assert samples[p].shape == (10, 1, 16, 16)
        assert (classifier.predict(samples[p]) == label).float().mean() >= 0.8
