"""SDXL (two text encoders, pooled embeddings, add_time_ids) and SD 2.x v-prediction: fixtures, Fisher, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from train_helpers import load_train_module, reload_and_compare, run_training, sample

from sa_peft import cli
from sa_peft.adapter_io import KOHYA_WEIGHT_NAME, read_adapter_metadata
from sa_peft.conditioning import encode_prompts
from sa_peft.data import default_resolution, load_image_set
from sa_peft.diffusion_loss import noise_scheduler_for
from sa_peft.fisher import estimate_fisher, fisher_timesteps, load_fisher
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline, build_tiny_sdxl_pipeline

PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def replay_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "replay.txt"
    path.write_text("a photo of a cat\na photo of a dog\n")
    return path


def test_tiny_sdxl_pipeline_is_shaped_like_sdxl():
    pipe = build_tiny_sdxl_pipeline()
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time"
    assert config.projection_class_embeddings_input_dim == (
        6 * config.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim)
    assert config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert default_resolution(pipe) == 32 == pipe.default_sample_size * pipe.vae_scale_factor  # SDXL's 1024, tiny
    assert sample(pipe, "a photo of a cat").shape == (1, 32, 32, 3)
    same, other = build_tiny_sdxl_pipeline(), build_tiny_sdxl_pipeline(seed=1)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b, c = (getattr(p, name).state_dict() for p in (pipe, same, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a), name
    assert build_tiny_sdxl_pipeline(prediction_type="v_prediction").scheduler.config.prediction_type == "v_prediction"


def test_sdxl_conditioning_matches_the_pipeline():
    pipe = build_tiny_sdxl_pipeline()
    cond = encode_prompts(pipe, PROMPTS)
    assert cond.encoder_hidden_states.shape == (2, 77, 64) and cond.text_embeds.shape == (2, 32)
    hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.encoder_hidden_states, hidden)
    torch.testing.assert_close(cond.text_embeds, pooled)
    expected = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=hidden.dtype, text_encoder_projection_dim=32)
    torch.testing.assert_close(cond.time_ids, expected.repeat(2, 1))
    assert cond.time_ids[0].tolist() == [32, 32, 0, 0, 32, 32]
    assert encode_prompts(pipe, PROMPTS, resolution=16).time_ids[0].tolist() == [16, 16, 0, 0, 16, 16]
    kwargs = cond.unet_kwargs(torch.tensor([1, 0]))
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"][0], pooled[1])


def test_training_noise_is_ddpm_whatever_the_pipeline_samples_with():
    euler = build_tiny_sdxl_pipeline(prediction_type="v_prediction").scheduler
    noise_scheduler = noise_scheduler_for(euler)
    assert isinstance(noise_scheduler, DDPMScheduler) and noise_scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(noise_scheduler.alphas_cumprod, euler.alphas_cumprod)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    ac = euler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noise_scheduler.add_noise(x0, noise, t), ac.sqrt() * x0 + (1 - ac).sqrt() * noise)
    ddpm = build_tiny_pipeline().scheduler
    assert noise_scheduler_for(ddpm) is ddpm


def test_sdxl_fisher_uses_pooled_embeddings_and_time_ids():
    """Per-sample Fisher on SDXL, written out by hand: DDPM noising and the UNet's added conditioning."""
    pipe = build_tiny_sdxl_pipeline()
    cond = encode_prompts(pipe, PROMPTS)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    prompt_ids = torch.tensor([0, 1])
    modules = ["add_embedding.linear_1", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "conv_in"]
    scheduler = noise_scheduler_for(pipe.scheduler)
    fisher = estimate_fisher(pipe.unet, scheduler, latents, prompt_ids, cond, modules, num_timesteps=2, seed=5,
                             show_progress=False)
    named = dict(pipe.unet.named_modules())
    params = [named[m].weight for m in modules]
    sums = [torch.zeros_like(p) for p in params]
    ac_all = pipe.scheduler.alphas_cumprod
    for n in range(2):
        gen = torch.Generator().manual_seed(5 + n)
        t = fisher_timesteps("fast", 1000, 2, gen)
        x0 = latents[n : n + 1].expand(2, -1, -1, -1)
        noise = torch.randn(x0.shape, generator=gen)
        ac = ac_all[t].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        ids = prompt_ids[n : n + 1].repeat(2)
        out = pipe.unet(noisy, t, encoder_hidden_states=cond.encoder_hidden_states[ids],
                        added_cond_kwargs={"text_embeds": cond.text_embeds[ids], "time_ids": cond.time_ids[ids]}).sample
        loss = (out - noise).square().mean(dim=(1, 2, 3)).sum()
        for s, g in zip(sums, torch.autograd.grad(loss, params)):
            s += (500 * g).square()  # T / K = 1000 / 2
    for name, s in zip(modules, sums):
        got = fisher.diagonal[f"{name}.weight"]
        torch.testing.assert_close(got, s / 2, rtol=1e-4, atol=1e-6 * float(s.max()))
        assert got.sum() > 0, name  # the added-conditioning MLP gets gradient only through text_embeds/time_ids


def test_fisher_command_on_an_sdxl_folder(sdxl_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    out = tmp_path / "fisher.safetensors"
    assert cli.main(["fisher", "--pretrained_model_name_or_path", str(sdxl_dir), "--prompts_file", str(prompts),
                     "--fisher_num_samples", "2", "--fisher_num_timesteps", "2", "--num_inference_steps", "2",
                     "--lora_target", "xattn", "--output", str(out), "--device", "cpu"]) == 0
    fisher = load_fisher(out, unet=build_tiny_sdxl_pipeline().unet)
    assert fisher.modules and all(".attn2." in m for m in fisher.modules)
    assert all(v.sum() > 0 for v in fisher.diagonal.values())




@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_sdxl_training_end_to_end_reloads_identically(sdxl_dir, replay_file, tmp_path):
    out = tmp_path / "sdxl-run"
    pipe = run_training(load_train_module(), sdxl_dir, out, replay_file, "--forget_prompt", "brad pitt",
                        "--surrogate_prompt", "a middle aged man", "--output_kohya_format", "--rank", "4",
                        "--lora_alpha", "2")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    _, trained = reload_and_compare(sdxl_dir, out, pipe)
    kohya = build_tiny_sdxl_pipeline()
    kohya.load_lora_weights(str(out), weight_name=KOHYA_WEIGHT_NAME)
    np.testing.assert_allclose(sample(kohya, "brad pitt"), trained, atol=1e-5)
    info = read_adapter_metadata(out)["sa_peft"]
    assert info["base_pipeline"] == "StableDiffusionXLPipeline" and info["resolution"] == 32
    settings = json.loads(next((out / "cache").glob("surrogate-*/settings.json")).read_text())
    assert settings["resolution"] == 32  # the native size by default
    card = (out / "README.md").read_text()
    assert "- stable-diffusion-xl" in card and "load_lora_weights" in card
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(e["loss"]) for e in log) and log[-1]["ewc"] > 0
    # The run noised with DDPM (√ᾱ·x₀ + √(1−ᾱ)·ε), not with the folder's EulerDiscreteScheduler: its cached Fisher
    # is what the engine computes from the same replay samples with the DDPM noise scheduler.
    cached = load_fisher(next((out / "cache").glob("fisher-*.safetensors")))
    base = DiffusionPipeline.from_pretrained(str(sdxl_dir), use_safetensors=True)
    assert type(base.scheduler).__name__ == "EulerDiscreteScheduler"
    replay = load_image_set(next((out / "cache").glob("replay-*")))
    cond = encode_prompts(base, ["brad pitt", "a photo of a cat", "a photo of a dog"], 32)
    modules = ["add_embedding.linear_1", "conv_in"]
    again = estimate_fisher(base.unet, noise_scheduler_for(base.scheduler), replay.latents[:4],
                            replay.prompt_ids(cond.prompts)[:4], cond, modules, num_timesteps=2, seed=0, show_progress=False)
    for name in modules:
        torch.testing.assert_close(cached.diagonal[f"{name}.weight"], again.diagonal[f"{name}.weight"], rtol=1e-4, atol=0)


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_v_prediction_training_end_to_end_reloads_identically(tmp_path_factory, replay_file, tmp_path):
    model_dir = tmp_path_factory.mktemp("tiny-v")
    build_tiny_pipeline(prediction_type="v_prediction").save_pretrained(model_dir)
    out = tmp_path / "v-run"
    pipe = run_training(load_train_module(), model_dir, out, replay_file, "--forget_prompt", "brad pitt",
                        "--surrogate_type", "noise", "--snr_gamma", "5.0")
    reload_and_compare(model_dir, out, pipe)
    fisher = load_fisher(next((out / "cache").glob("fisher-*.safetensors")))
    assert fisher.metadata["prediction_type"] == "v_prediction"
    assert read_adapter_metadata(out)["sa_peft"]["base_pipeline"] == "StableDiffusionPipeline"
