"""SD3 (flow-matching transformer): tiny pipeline, flow-matching loss and Fisher, conditioning, presets, sets, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import add_forget_lora
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from train_helpers import hand_flow_losses, load_train_module, reload_and_compare, run_training, sample

from sa_peft import robust as robust_module
from sa_peft.adapter_io import read_adapter_metadata
from sa_peft.conditioning import check_prompt_clash, encode_prompts
from sa_peft.data import _decode_to_pil, _encode_images, default_resolution, generate_replay_set
from sa_peft.diffusion_loss import FLOW_MATCHING, FlowMatchingNoise, noise_scheduler_for
from sa_peft.fisher import estimate_fisher, fisher_timesteps, load_fisher
from sa_peft.forgetting import ForgettingProbe
from sa_peft.lora import TRANSFORMER_LORA_TARGET_PRESETS, iter_adapted_layers, resolve_lora_targets
from sa_peft.models import TRAINING_PIPELINES, load_pipeline
from sa_peft.objective import selective_amnesia_loss
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline, build_tiny_sd3_pipeline

PROMPTS = ["brad pitt", "a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def sd3_pipe():
    """One tiny SD3 pipeline for the tests that only read it (building one takes about a second)."""
    return build_tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_sd3_pipeline().save_pretrained(folder)
    return folder


def latents_like(pipe, n, seed=0):
    side = pipe.transformer.config.sample_size
    return torch.randn(n, 16, side, side, generator=torch.Generator().manual_seed(seed))


def test_tiny_sd3_pipeline_is_shaped_like_sd3_and_reloads_offline(sd3_pipe, sd3_dir):
    pipe = sd3_pipe
    assert [type(getattr(pipe, n)).__name__ for n in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")] \
        == ["SD3Transformer2DModel", "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert type(pipe.tokenizer_3).__name__ in ("T5TokenizerFast", "T5Tokenizer")  # transformers 5: one class, two names
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    vae = pipe.vae.config
    assert vae.latent_channels == 16 == pipe.transformer.config.in_channels and vae.shift_factor == 0.0609
    assert default_resolution(pipe) == 32
    hidden, _, pooled, _ = pipe.encode_prompt("a photo of a cat", None, None, device="cpu", do_classifier_free_guidance=False)
    assert hidden.shape == (1, 77 + 256, 64) and pooled.shape == (1, 64)  # CLIP (zero-padded) + T5 tokens; two pools
    fresh = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), use_safetensors=True)
    fresh.set_progress_bar_config(disable=True)
    # Not bit-equal on every CPU: reloaded CLIP weights gave outputs 1e-7 apart (AMD EPYC, 2026-12-02), images 1e-6.
    np.testing.assert_allclose(sample(fresh, "a photo of a cat"), sample(pipe, "a photo of a cat"), atol=1e-5)
    assert fresh.tokenizer_3("a photo of a cat").input_ids == pipe.tokenizer_3("a photo of a cat").input_ids


def test_sd3_conditioning_is_the_pipelines_encode_prompt(sd3_pipe):
    cond = encode_prompts(sd3_pipe, PROMPTS)
    hidden, _, pooled, _ = sd3_pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.encoder_hidden_states, hidden)
    torch.testing.assert_close(cond.text_embeds, pooled)
    assert cond.time_ids is None
    kwargs = cond.unet_kwargs(torch.tensor([2, 0]), torch.float64)
    assert set(kwargs) == {"encoder_hidden_states", "pooled_projections"}
    torch.testing.assert_close(kwargs["pooled_projections"], pooled[[2, 0]].double())


def test_flow_matching_noise_draws_as_diffusers_sd3_script():
    """Timesteps as train_dreambooth_lora_sd3.py draws them, σ = t / T, and the weights of each scheme."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for scheme in ("logit_normal", "mode", "sigma_sqrt", "cosmap"):
        noise = noise_scheduler_for(scheduler, weighting_scheme=scheme)
        assert isinstance(noise, FlowMatchingNoise) and noise.config.prediction_type == FLOW_MATCHING
        t = noise.sample_timesteps(64, torch.Generator().manual_seed(1))
        u = compute_density_for_timestep_sampling(scheme, 64, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(1))
        indices = (u * 1000).long()
        torch.testing.assert_close(t, scheduler.timesteps[indices])
        torch.testing.assert_close(noise.sigmas(t), scheduler.sigmas[indices])
        torch.testing.assert_close(noise.loss_weights(t), compute_loss_weighting_for_sd3(scheme, scheduler.sigmas[indices]))
    # The pipeline's scheduler after sampling holds inference timesteps; training uses the training schedule.
    scheduler.set_timesteps(3)
    torch.testing.assert_close(noise_scheduler_for(scheduler).timesteps, FlowMatchEulerDiscreteScheduler(shift=3.0).timesteps)
    with pytest.raises(ValueError, match="`weighting_scheme` must be one of"):
        noise_scheduler_for(scheduler, weighting_scheme="uniform")


def test_stratified_timesteps_stratify_the_density():
    noise = FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(shift=3.0))
    # logit_normal's quantile function: sigmoid of the normal's inverse CDF
    uniform = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(noise.density_quantile(uniform), torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(uniform)))
    t = noise.stratified_timesteps(500, 4, torch.Generator().manual_seed(0))
    u = (torch.arange(1000) + 0.5) / 1000  # index j of the training schedule ↔ density value u ∈ [j/T, (j+1)/T)
    edges = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.25, 0.5, 0.75])))
    for j in range(4):  # column j lies in the j-th quartile of the density: between its edges, as indices
        index = (noise.timesteps[None, :] == t[:, j, None]).float().argmax(1)
        low = 0 if j == 0 else int(edges[j - 1] * 1000)
        high = 999 if j == 3 else int(edges[j] * 1000)
        assert low <= index.min() and index.max() <= high, j
    assert u.numel() == noise.grid_timesteps().numel()
    grid_sigmas = noise.sigmas(noise.grid_timesteps())
    assert (grid_sigmas.diff() <= 0).all() and 0 < grid_sigmas.min() and grid_sigmas.max() <= 1
    gen = torch.Generator().manual_seed(3)
    ref = torch.Generator().manual_seed(3)
    torch.testing.assert_close(fisher_timesteps("fast", 1000, 2, gen, noise), noise.stratified_timesteps(1, 2, ref)[0])


@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt"])
@pytest.mark.parametrize("replay_target", ["noise", "distill"])
def test_flow_matching_objective_matches_the_sd3_script_by_hand(scheme, replay_target):
    pipe = build_tiny_sd3_pipeline()
    cond = encode_prompts(pipe, PROMPTS)
    add_forget_lora(pipe.transformer, "attn", seed=4)
    latents = latents_like(pipe, 4)
    out = selective_amnesia_loss(
        pipe.transformer, noise_scheduler_for(pipe.scheduler, weighting_scheme=scheme), cond, latents[:2],
        torch.tensor([0, 0]), latents[2:], torch.tensor([1, 2]), None, 0.0, 0.5,
        generator=torch.Generator().manual_seed(11), replay_target=replay_target)
    ids = torch.tensor([0, 0, 1, 2])
    kwargs = {"encoder_hidden_states": cond.encoder_hidden_states[ids], "pooled_projections": cond.text_embeds[ids]}

    def sd3_script_prediction(noisy, timesteps):
        return pipe.transformer(hidden_states=noisy, timestep=timesteps, **kwargs, return_dict=False)[0]

    per_sample = hand_flow_losses(pipe, latents, 11, scheme, sd3_script_prediction,
                                  frozen_replay_from=2 if replay_target == "distill" else None)
    torch.testing.assert_close(out.forget, per_sample[:2].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.replay, per_sample[2:].mean(), rtol=1e-5, atol=1e-9)
    assert out.replay > 0 and out.total.requires_grad
    torch.testing.assert_close(out.total, out.forget + 0.5 * out.replay)


def test_snr_gamma_is_refused_for_flow_matching(sd3_pipe):
    with pytest.raises(ValueError, match="`snr_gamma`"):
        selective_amnesia_loss(sd3_pipe.transformer, noise_scheduler_for(sd3_pipe.scheduler),
                               encode_prompts(sd3_pipe, PROMPTS[:1]), latents_like(sd3_pipe, 1), torch.tensor([0]),
                               None, None, None, 0.0, 1.0, snr_gamma=5.0)


def test_sd3_fisher_is_per_sample_over_stratified_sigmas(sd3_pipe):
    """The fast Fisher on the SD3 transformer, written out: K stratified σ, flow-matching loss, (T/K · g)²."""
    pipe = sd3_pipe
    cond = encode_prompts(pipe, PROMPTS[:2])
    latents = latents_like(pipe, 2, seed=3)
    prompt_ids = torch.tensor([0, 1])
    modules = ["transformer_blocks.0.attn.add_k_proj", "transformer_blocks.1.attn.to_q", "pos_embed.proj",
               "time_text_embed.text_embedder.linear_1"]
    noise_scheduler = noise_scheduler_for(pipe.scheduler)
    fisher = estimate_fisher(pipe.transformer, noise_scheduler, latents, prompt_ids, cond, modules, num_timesteps=2,
                             seed=5, show_progress=False)
    assert fisher.metadata["prediction_type"] == FLOW_MATCHING and fisher.metadata["weighting_scheme"] == "logit_normal"
    named = dict(pipe.transformer.named_modules())
    params = [named[m].weight for m in modules]
    sums = [torch.zeros_like(p) for p in params]
    training_timesteps = FlowMatchEulerDiscreteScheduler(shift=3.0).timesteps
    for n in range(2):
        gen = torch.Generator().manual_seed(5 + n)
        uniform = (torch.arange(2) + torch.rand(1, 2, generator=gen)[0]) / 2
        u = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(uniform))  # logit_normal's quantiles
        t = training_timesteps[(u * 1000).long()]
        sigma = (t / 1000).view(-1, 1, 1, 1)
        x0 = latents[n : n + 1].expand(2, -1, -1, -1)
        noise = torch.randn(x0.shape, generator=gen)
        ids = prompt_ids[n : n + 1].repeat(2)
        out = pipe.transformer(hidden_states=(1 - sigma) * x0 + sigma * noise, timestep=t,
                               encoder_hidden_states=cond.encoder_hidden_states[ids],
                               pooled_projections=cond.text_embeds[ids]).sample
        loss = (out - (noise - x0)).square().mean(dim=(1, 2, 3)).sum()
        for s, g in zip(sums, torch.autograd.grad(loss, params)):
            s += (500 * g).square()  # T / K = 1000 / 2
    for name, s in zip(modules, sums):
        got = fisher.diagonal[f"{name}.weight"]
        torch.testing.assert_close(got, s / 2, rtol=1e-4, atol=1e-6 * float(s.max()))
        assert got.sum() > 0, name  # the pooled-text MLP gets gradient only through pooled_projections


def test_forgetting_signal_on_sd3_uses_stratified_sigmas(sd3_pipe):
    """The probe's fixed timesteps are the density's stratified σ; the frozen transformer scores preference 1."""
    pipe = sd3_pipe
    cond = encode_prompts(pipe, ["brad pitt", "a photo of a cat"])
    noise_scheduler = noise_scheduler_for(pipe.scheduler)
    probe = ForgettingProbe(cond, ["brad pitt"], [latents_like(pipe, 2, 1)], [latents_like(pipe, 2, 2)],
                            latents_like(pipe, 2, 3), torch.tensor([1, 1]), 1000, num_timesteps=3, seed=9,
                            noise_scheduler=noise_scheduler)
    expected = noise_scheduler.stratified_timesteps(2, 3, torch.Generator().manual_seed(9)).flatten()
    torch.testing.assert_close(probe.concepts[0][0].timesteps, expected)
    probe.calibrate(pipe.transformer, noise_scheduler)
    signal = probe.measure(pipe.transformer, noise_scheduler)
    assert signal["concepts"]["brad pitt"]["preference"] == pytest.approx(1.0) and signal["retention"] == 0.0


def test_prompt_clash_check_sees_the_t5_tokens(sd3_pipe):
    """Past CLIP's 77 tokens SD3 still tells prompts apart by T5's 256: not a clash there, but one on CLIP-only SD."""
    forget, replay = "a " * 80 + "cat", "a " * 80 + "dog"
    check_prompt_clash(sd3_pipe, [forget], [replay])
    with pytest.raises(ValueError, match="give the model the same tokens"):
        check_prompt_clash(build_tiny_pipeline(), [forget], [replay])
    with pytest.raises(ValueError, match="give the model the same tokens"):
        check_prompt_clash(sd3_pipe, ["a cat"], ["a  cat"])


def test_transformer_lora_presets(sd3_pipe):
    transformer = sd3_pipe.transformer
    attn = resolve_lora_targets(transformer, "attn")
    # diffusers' SD3 LoRA script's default targets; the last block is context_pre_only (no to_add_out)
    default = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
               "attn.to_q", "attn.to_v"]
    expected = [f"transformer_blocks.{b}.{m}" for b in range(2) for m in default if (b, m) != (1, "attn.to_add_out")]
    assert sorted(attn) == sorted(expected)
    context = resolve_lora_targets(transformer, "context")
    assert sorted(context) == sorted(n for n in expected if ".add_" in n or "to_add_out" in n)
    attn_ff = resolve_lora_targets(transformer, "attn_ff")
    assert set(attn_ff) - set(attn) == {"transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                                        "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.0.ff_context.net.2",
                                        "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff.net.2"}
    assert {"pos_embed.proj", "context_embedder", "proj_out"} <= set(resolve_lora_targets(transformer, "all"))
    assert resolve_lora_targets(transformer, "to_q") == ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q"]
    for unet_only in ("xattn", "noxattn"):
        with pytest.raises(ValueError, match=f"'{unet_only}' is a UNet preset.*{', '.join(TRANSFORMER_LORA_TARGET_PRESETS)}"):
            resolve_lora_targets(transformer, unet_only)


def test_sd3_sets_are_sampled_by_the_pipelines_own_scheduler_and_vae(sd3_pipe, tmp_path):
    """Latents as the pipeline makes them (flow-matching Euler, not DDIM), previews decoded with the VAE's shift."""
    pipe = sd3_pipe
    replay = generate_replay_set(pipe, tmp_path / "replay", ["a photo of a cat"], 2, seed=7, guidance_scale=2.0,
                                 num_inference_steps=3, show_progress=False)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    direct = pipe(["a photo of a cat"] * 2, num_inference_steps=3, guidance_scale=2.0, generator=generators,
                  output_type="latent").images
    torch.testing.assert_close(replay.latents, direct)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    images = pipe(["a photo of a cat"], num_inference_steps=3, guidance_scale=2.0,
                  generator=[torch.Generator().manual_seed(7)], output_type="np").images
    with torch.no_grad():
        decoded = np.asarray(_decode_to_pil(pipe, replay.latents[:1])[0], dtype=np.float32) / 255
    assert np.abs(decoded - images[0]).max() <= 1 / 255 + 1e-6  # the pipeline's decoding, up to 8-bit rounding
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = pipe.vae
    with torch.no_grad():
        expected = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(_encode_images(pipe, pixels), expected)


def test_unsupported_pipeline_class_is_refused_before_loading(tmp_path, train):
    folder = tmp_path / "img2img"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Img2ImgPipeline",
                                                         "transformer": ["diffusers", "X"]}))
    supported = ", ".join(TRAINING_PIPELINES)
    with pytest.raises(ValueError, match=f"is a StableDiffusion3Img2ImgPipeline, .*supported pipelines: {supported}$"):
        train.main(["--pretrained_model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out"),
                    "--forget_prompt", "brad pitt", "--surrogate_type", "noise"])
    assert "StableDiffusion3Pipeline" in supported


def test_load_pipeline_takes_sd3_only_when_asked(sd3_dir):
    with pytest.raises(ValueError, match="is a StableDiffusion3Pipeline, .*supported pipelines: StableDiffusionPipeline, "
                                         "StableDiffusionXLPipeline$"):
        load_pipeline(sd3_dir)
    assert type(load_pipeline(sd3_dir, supported=TRAINING_PIPELINES)).__name__ == "StableDiffusion3Pipeline"


FLOW_SAMPLER = "FlowMatchEulerDiscreteScheduler (the pipeline's own)"


def save_transformer_lora(pipe, folder, seed=0):
    """A random forget LoRA on ``pipe``'s transformer, saved as the training script saves it."""
    from peft.utils import get_peft_model_state_dict

    add_forget_lora(pipe.transformer, seed=seed)
    type(pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                 safe_serialization=True)


def test_evaluate_command_on_an_sd3_folder_with_a_lora(sd3_dir, tmp_path):
    """``sa-peft evaluate`` on SD3: the pipeline's own scheduler (named in the report and the cache key), and a
    transformer LoRA stacked through ``load_lora_weights`` changes the samples."""
    from sa_peft.cli import build_parser

    save_transformer_lora(build_tiny_sd3_pipeline(), tmp_path / "lora")
    out = tmp_path / "eval"
    args = build_parser().parse_args([
        "evaluate", "--pretrained_model_name_or_path", str(sd3_dir), "--prompt", "a handwritten digit one",
        "--forget_prompt", "a handwritten digit zero", "--lora", str(tmp_path / "lora"), "--num_images_per_prompt", "2",
        "--num_inference_steps", "2", "--output_dir", str(out), "--device", "cpu"])
    result = args.func(args)
    before, after = result["before"], result["after"]
    assert before["settings"]["sampler"] == after["settings"]["sampler"] == FLOW_SAMPLER
    assert FLOW_SAMPLER in (out / "report.md").read_text()
    assert before["samples"]["a handwritten digit one"].shape == (2, 3, 32, 32)
    assert not torch.allclose(before["samples"]["a handwritten digit one"], after["samples"]["a handwritten digit one"])
    caches = {p.parent.name.split("-")[0]: json.loads(p.read_text()) for p in (out / "samples").glob("*/settings.json")}
    assert sorted(caches) == ["adapted", "base"] and caches["base"]["sampler"] == FLOW_SAMPLER


def test_a_lora_of_another_base_is_refused_on_sd3(tmp_path):
    from peft.utils import get_peft_model_state_dict

    from sa_peft.merge import stack_forget_loras

    unet_pipe = build_tiny_pipeline()
    add_forget_lora(unet_pipe.unet)
    type(unet_pipe).save_lora_weights(tmp_path / "unet-lora", unet_lora_layers=get_peft_model_state_dict(unet_pipe.unet),
                                      safe_serialization=True)
    with pytest.raises(ValueError, match="lora.* LoRA layers match this StableDiffusion3Pipeline|does not fit this "
                                         "StableDiffusion3Pipeline"):
        stack_forget_loras(build_tiny_sd3_pipeline(), [tmp_path / "unet-lora"])
    save_transformer_lora(build_tiny_sd3_pipeline(), tmp_path / "sd3-lora")
    assert stack_forget_loras(build_tiny_sd3_pipeline(), [tmp_path / "sd3-lora"]) == ["forget_000_"]


def test_generate_and_fisher_commands_on_an_sd3_folder(sd3_dir, tmp_path, capsys):
    """``sa-peft generate`` and ``sa-peft fisher`` take SD3 (the Fisher's flow-matching σ density named in the file)."""
    from sa_peft import cli
    from sa_peft.data import load_image_set

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    assert cli.main(["generate", "replay", "--pretrained_model_name_or_path", str(sd3_dir), "--replay_prompts_file",
                     str(prompts), "--num_replay_images_per_prompt", "2", "--num_inference_steps", "2",
                     "--output_dir", str(tmp_path / "set"), "--device", "cpu"]) == 0
    assert load_image_set(tmp_path / "set").latents.shape == (2, 16, 16, 16)
    out = tmp_path / "fisher.safetensors"
    assert cli.main(["fisher", "--pretrained_model_name_or_path", str(sd3_dir), "--data_dir", str(tmp_path / "set"),
                     "--fisher_num_samples", "2", "--fisher_num_timesteps", "2", "--lora_target", "context",
                     "--weighting_scheme", "mode", "--output", str(out), "--device", "cpu"]) == 0
    fisher = load_fisher(out, unet=build_tiny_sd3_pipeline().transformer)  # the base weights' hash matches
    assert sorted(fisher.modules) == sorted(resolve_lora_targets(build_tiny_sd3_pipeline().transformer, "context"))
    assert fisher.metadata["prediction_type"] == FLOW_MATCHING and fisher.metadata["weighting_scheme"] == "mode"


@pytest.mark.parametrize("flag", [["--snr_gamma", "5"], ["--output_kohya_format"]])
def test_unet_only_flags_are_refused_for_sd3(sd3_dir, tmp_path, train, flag):
    with pytest.raises(ValueError, match=f"{flag[0]}: not supported for StableDiffusion3Pipeline"):
        train.main(["--pretrained_model_name_or_path", str(sd3_dir), "--output_dir", str(tmp_path / "out"),
                    "--forget_prompt", "brad pitt", "--surrogate_type", "noise", *flag])




def test_sd3_training_through_the_script_reloads_identically(sd3_dir, replay_file, tmp_path, monkeypatch):
    out = tmp_path / "sd3-run"
    train = load_train_module()
    validations = []
    real_validation = train.generate_validation_images

    def recording_validation(pipe, prompts, *args):
        validations.append(args[-1])  # the precomputed embeddings
        return real_validation(pipe, prompts, *args)

    monkeypatch.setattr(train, "generate_validation_images", recording_validation)
    pipe = run_training(train, sd3_dir, out, replay_file, "--forget_prompt", "brad pitt",
                        "--surrogate_prompt", "a middle aged man", "--rank", "4", "--lora_alpha", "2",
                        "--validation_steps", "2")
    # before, at step 2 and after: every validation sampled from embeddings encoded once, T5 off the device
    assert len(validations) == 3 and all(v is not None and "brad pitt" in v for v in validations)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    reload_and_compare(sd3_dir, out, pipe)
    info = read_adapter_metadata(out)["sa_peft"]
    assert info["base_pipeline"] == "StableDiffusion3Pipeline" and info["resolution"] == 32
    assert info["config"]["weighting_scheme"] == "logit_normal"
    with open(out / "pytorch_lora_weights.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header and all(k.startswith("transformer.") for k in header if k != "__metadata__")
    card = (out / "README.md").read_text()
    assert "- sd3" in card and "- sd3-diffusers" in card and "joint_attention_kwargs" in card
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in log) and log[-1]["ewc"] > 0
    cached = load_fisher(next((out / "cache").glob("fisher-*.safetensors")))
    assert cached.metadata["prediction_type"] == FLOW_MATCHING and cached.metadata["estimator"] == "fast"
    # The frozen text encoders, T5 included, were off the training device after the prompts were encoded.
    assert all(getattr(pipe, n).device.type == "cpu" for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))


@pytest.mark.slow  # a whole tiny run with the in-loop attack (~15 s)
def test_robust_forgetting_on_sd3_reloads_and_reports_the_attacked_signal(sd3_dir, replay_file, tmp_path, monkeypatch):
    """The last state made a candidate of the attack check (``LeastAttackedState``), so its δ is fitted on SD3's joint
    context and its samples drawn under it."""
    out = tmp_path / "sd3-robust"
    train = load_train_module()
    monkeypatch.setattr(train, "plainly_forgotten", lambda *args: True)
    monkeypatch.setattr(robust_module, "SELECTION_ATTACK_STEPS", 5)  # the check's path, not its budget (200)
    monkeypatch.setattr(robust_module, "SELECTION_NUM_SAMPLES", 2)
    monkeypatch.setattr(robust_module, "VERDICT_NUM_SAMPLES", 2)
    pipe = run_training(train, sd3_dir, out, replay_file, "--forget_prompt", "brad pitt",
                        "--surrogate_prompt", "a middle aged man", "--robust_forgetting", "--train_full_budget",
                        "--retention_bound", "1e9")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert math.isfinite(log[-1]["attacked_preference/brad pitt"])
    assert 0 <= log[-1]["attacked_sample_share/brad pitt"] <= 1
    assert read_adapter_metadata(out)["sa_peft"]["forgetting"]["robust_selection"]["chosen_step"] == 3
    assert all(entry["ablation"] > 0 for entry in log)  # the concept-ablation term, on flow matching too
    assert "attacked_preference" in read_adapter_metadata(out)["sa_peft"]["forgetting"]["concepts"]["brad pitt"]
    reload_and_compare(sd3_dir, out, pipe)


@pytest.mark.slow  # a second whole run: diffusers' SD3 preset, another scheme, replay target and forget timesteps
def test_sd3_attention_preset_with_cosmap_weighting_reloads_identically(sd3_dir, tmp_path):
    """The attn preset holds the last block's attn.add_q_proj, whose Fisher is 0 (its context output is discarded):
    the low-rank EWC penalty was NaN from step 1."""
    from sa_peft.classifier import DigitsClassifier, DigitsCNN

    torch.manual_seed(0)
    classifier = tmp_path / "classifier"
    labels = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    DigitsClassifier(DigitsCNN(), labels, reference_images=torch.rand(20, 1, 16, 16),
                     reference_labels=torch.arange(20) % 10).save(classifier)
    digits = tmp_path / "digits.txt"  # prompts the classifier can label by their last word
    digits.write_text("a handwritten digit one\na handwritten digit two\n")
    out = tmp_path / "sd3-attn"
    pipe = run_training(load_train_module(), sd3_dir, out, digits, "--forget_prompt", "a handwritten digit zero",
                        "--surrogate_type", "noise", "--lora_target", "attn", "--weighting_scheme", "cosmap",
                        "--replay_target", "noise", "--classifier", str(classifier),
                        "--num_evaluation_images_per_prompt", "2", "--forget_min_timestep", "500")
    fresh, _ = reload_and_compare(sd3_dir, out, pipe, prompt="a handwritten digit zero")
    assert {layer.name for layer in iter_adapted_layers(fresh.transformer, "default_0")} == \
        set(resolve_lora_targets(build_tiny_sd3_pipeline().transformer, "attn"))
    fisher = load_fisher(next((out / "cache").glob("fisher-*.safetensors")))
    assert fisher.metadata["weighting_scheme"] == "cosmap"
    assert fisher.diagonal["transformer_blocks.1.attn.add_q_proj.weight"].sum() == 0
    # A noise surrogate: the verdict's sample check ran through SD3's own sampler, judged by the frozen transformer.
    # The forget term on σ ≥ 0.5 only (the density restricted there), recorded in the header.
    assert read_adapter_metadata(out)["sa_peft"]["forget_min_timestep"] == 500
    check = read_adapter_metadata(out)["sa_peft"]["forgetting"]["concepts"]["a handwritten digit zero"]["sample_check"]
    assert check["num_samples"] == 2 and math.isfinite(check["sample_margin"] - check["surrogate_margin"])
    # The final evaluation sampled with the pipeline's own flow-matching scheduler, and says so.
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["before"]["settings"]["sampler"] == "FlowMatchEulerDiscreteScheduler (the pipeline's own)"
    assert "Evaluation" in (out / "README.md").read_text()
    assert isinstance(DiffusionPipeline.from_pretrained(str(sd3_dir)), StableDiffusion3Pipeline)


@pytest.mark.slow  # three short runs
def test_sd3_resumed_run_equals_the_uninterrupted_one(sd3_dir, replay_file, tmp_path):
    import os
    import shutil

    from safetensors.torch import load_file

    train = load_train_module()
    common = ["--forget_prompt", "brad pitt", "--surrogate_prompt", "a middle aged man", "--max_train_steps", "4",
              "--checkpointing_steps", "2", "--train_full_budget"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_training(train, sd3_dir, whole, replay_file, *common)
    resumed.mkdir()
    shutil.copytree(whole / "cache", resumed / "cache")
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    assert sorted(os.listdir(whole / "checkpoint-2")) == ["lora_transformer.safetensors", "optimizer.safetensors",
                                                          "pytorch_lora_weights.safetensors", "training_state.json"]
    run_training(train, sd3_dir, resumed, replay_file, *common, "--resume_from_checkpoint", "latest")
    a, b = (load_file(f / "pytorch_lora_weights.safetensors") for f in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), use_safetensors=True)
    fresh.load_lora_weights(str(whole / "checkpoint-2"))  # checkpoints load like the final adapter
    with pytest.raises(ValueError, match="weighting_scheme: checkpoint None, now 'cosmap'"):
        run_training(train, sd3_dir, resumed, replay_file, *common, "--resume_from_checkpoint", "checkpoint-2",
                     "--weighting_scheme", "cosmap")


def test_checkpoints_record_the_flow_matching_flags_only_when_set(tmp_path):
    """Checkpoints written before the SD3 flags existed still resume; a changed density is still a changed setting."""
    from sa_peft.config import SelectiveAmnesiaConfig

    common = {"forget_prompt": ["brad pitt"], "surrogate_type": "noise", "output_dir": str(tmp_path / "out")}
    default = SelectiveAmnesiaConfig(**common).training_settings("key")
    assert not {"weighting_scheme", "logit_mean", "logit_std", "mode_scale"} & set(default)
    changed = SelectiveAmnesiaConfig(**common, weighting_scheme="mode", mode_scale=1.0).training_settings("key")
    assert changed["weighting_scheme"] == "mode" and changed["mode_scale"] == 1.0 and "logit_std" not in changed


def test_density_quantile_is_diffusers_draw_of_the_same_uniform():
    """"mode" transforms the uniform draw itself (diffusers draws u ~ U(0, 1) and maps it); logit_normal's quantile
    at Φ(z) is sigmoid(mean + std·z); "none" and the others keep the draw."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    uniform = torch.rand(64, generator=torch.Generator().manual_seed(0))
    mode = FlowMatchingNoise(scheduler, "mode", mode_scale=1.29)
    expected = compute_density_for_timestep_sampling("mode", 64, mode_scale=1.29,
                                                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mode.density_quantile(uniform), expected)
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)
    normal = FlowMatchingNoise(scheduler, "logit_normal", logit_mean=0.3, logit_std=0.7)
    phi = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    torch.testing.assert_close(normal.density_quantile(phi), torch.sigmoid(0.3 + 0.7 * z))
    torch.testing.assert_close(FlowMatchingNoise(scheduler, "none").density_quantile(uniform), uniform)


def test_density_values_index_the_training_timesteps_and_the_grid_covers_them():
    noise = FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), "none")
    T = 1000
    at = noise._timesteps_at(torch.tensor([0.0, 0.0004, 0.5, 0.9995, 1.0]))
    assert at.tolist() == [noise.timesteps[i].item() for i in (0, 0, 500, 999, 999)]  # u = 1 clamps to the last
    torch.testing.assert_close(noise.grid_timesteps(), noise.timesteps[:T])  # T midpoints: every timestep once


def test_mode_density_outside_zero_one_takes_the_end_timesteps():
    """A large ``mode_scale`` maps part of the uniform draw below 0 and above 1 (diffusers' own formula); those
    density values take the first and the last training timestep, never timesteps counted from the other end."""
    noise = FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), "mode", mode_scale=20.0)
    u = noise.density_quantile((torch.arange(1000) + 0.5) / 1000)
    below, above = u <= -1e-3, u >= 1
    assert below.sum() > 100 and above.sum() > 100
    grid = noise.grid_timesteps()
    assert (grid[below] == noise.timesteps[0]).all() and (grid[above] == noise.timesteps[-1]).all()
    t = noise.sample_timesteps(64, torch.Generator().manual_seed(0))
    drawn = compute_density_for_timestep_sampling("mode", 64, mode_scale=20.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, noise.timesteps[(drawn * 1000).long().clamp(0, 999)])
    assert (t[drawn <= -1e-3] == noise.timesteps[0]).all()


def test_only_a_flow_matching_training_scheduler_is_flow_matching():
    """The pipeline's own FlowMatchEulerDiscreteScheduler has no prediction_type in its config: it is not the training
    noise (``noise_scheduler_for`` makes that), and asking does not fail; DDPM's epsilon or v is not flow matching."""
    from sa_peft.diffusion_loss import is_flow_matching

    pipeline_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert not hasattr(pipeline_scheduler.config, "prediction_type")
    assert is_flow_matching(pipeline_scheduler) is False
    assert is_flow_matching(noise_scheduler_for(pipeline_scheduler)) is True
    ddpm = build_tiny_pipeline(prediction_type="v_prediction").scheduler
    assert is_flow_matching(ddpm) is False and is_flow_matching(noise_scheduler_for(ddpm)) is False


def test_flow_matching_noise_keeps_the_latents_dtype():
    noise = FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    latents = torch.randn(2, 16, 4, 4).to(torch.bfloat16)
    eps = torch.randn(2, 16, 4, 4).to(torch.bfloat16)
    t = noise.timesteps[[100, 900]]
    noisy = noise.add_noise(latents, eps, t)
    assert noisy.dtype == torch.bfloat16
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy.float(), ((1 - sigma) * latents.float() + sigma * eps.float()), rtol=2e-2, atol=2e-2)


def test_snr_gamma_refusal_is_a_whole_sentence(sd3_pipe):
    from sa_peft.diffusion_loss import snr_weights

    with pytest.raises(ValueError, match=r"^`snr_gamma` \(Min-SNR weighting\) is for DDPM-trained UNets; flow-matching "
                                         r"models \(SD3, FLUX\) weight the loss by `weighting_scheme` instead: drop "
                                         r"`snr_gamma`$"):
        snr_weights(noise_scheduler_for(sd3_pipe.scheduler), torch.tensor([10]), 5.0)


def test_merge_command_fuses_an_sd3_lora_into_a_pipeline_folder(sd3_dir, tmp_path):
    from sa_peft.cli import build_parser
    from sa_peft.merge import stack_forget_loras

    lora_pipe = build_tiny_sd3_pipeline()
    save_transformer_lora(lora_pipe, tmp_path / "lora", seed=3)
    args = build_parser().parse_args(["merge", "--pretrained_model_name_or_path", str(sd3_dir), "--lora",
                                      str(tmp_path / "lora"), "--lora_weight", "0.5", "--output_dir",
                                      str(tmp_path / "merged")])
    args.func(args)
    merged = load_pipeline(str(tmp_path / "merged"), supported=TRAINING_PIPELINES)
    stacked = load_pipeline(str(sd3_dir), supported=TRAINING_PIPELINES)
    stack_forget_loras(stacked, [tmp_path / "lora"], [0.5])
    plain = load_pipeline(str(sd3_dir), supported=TRAINING_PIPELINES)
    a, b, c = (sample(p, steps=2) for p in (merged, stacked, plain))
    assert np.abs(a - b).max() < 1e-4 and np.abs(a - c).max() > 1e-3  # the LoRA at weight 0.5, fused
