"""FLUX (flow-matching transformer on packed latents): tiny pipeline, loss and Fisher, conditioning, presets, sets,
training through the script and the reload round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import add_forget_lora
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from train_helpers import hand_flow_losses, load_train_module, run_training, sample

from sa_peft import robust as robust_module
from sa_peft.adapter_io import read_adapter_metadata
from sa_peft.conditioning import encode_prompts
from sa_peft.data import _decode_to_pil, check_resolution, default_resolution, generate_replay_set
from sa_peft.diffusion_loss import FLOW_MATCHING, FlowMatchingNoise, noise_scheduler_for
from sa_peft.fisher import estimate_fisher, load_fisher
from sa_peft.forgetting import ForgettingProbe
from sa_peft.lora import iter_adapted_layers, make_lora_config, resolve_lora_targets
from sa_peft.model_card import card_tags
from sa_peft.models import TRAINING_PIPELINES, is_flux, load_pipeline
from sa_peft.objective import selective_amnesia_loss
from sa_peft.testing.tiny_pipeline import FLUX_SCHEDULER_CONFIG, build_tiny_flux_pipeline

PROMPTS = ["brad pitt", "a photo of a cat", "a red car"]
SIDE = 32  # the tiny pipeline's image side (FluxPipeline's own default would be 128 · 2 = 256)


@pytest.fixture(scope="module")
def flux_pipe():
    """A guidance-distilled tiny FLUX pipeline (FLUX.1-dev-like) for the tests that only read it."""
    return build_tiny_flux_pipeline(guidance_embeds=True)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux")
    build_tiny_flux_pipeline(guidance_embeds=True).save_pretrained(folder)
    return folder


def latents_like(n, seed=0):
    return torch.randn(n, 16, SIDE // 2, SIDE // 2, generator=torch.Generator().manual_seed(seed))


def flux_sample(pipe, prompt="brad pitt", **kwargs):
    return sample(pipe, prompt, height=SIDE, width=SIDE, **kwargs)


def test_tiny_flux_pipeline_is_shaped_like_flux_and_reloads_offline(flux_pipe, flux_dir):
    pipe = flux_pipe
    assert [type(getattr(pipe, n)).__name__ for n in ("transformer", "text_encoder", "text_encoder_2")] == \
        ["FluxTransformer2DModel", "CLIPTextModel", "T5EncoderModel"]
    config = pipe.transformer.config
    assert len(pipe.transformer.transformer_blocks) == 1 and len(pipe.transformer.single_transformer_blocks) == 1
    assert config.in_channels == 64 and config.guidance_embeds and is_flux(pipe) and is_flux(pipe.transformer)
    assert not build_tiny_flux_pipeline().transformer.config.guidance_embeds  # schnell-like by default
    vae = pipe.vae.config
    assert vae.latent_channels == 16 and (vae.shift_factor, vae.scaling_factor) == (0.1159, 0.3611)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.use_dynamic_shifting
    hidden, pooled, text_ids = pipe.encode_prompt("a photo of a cat", None, device="cpu")
    assert hidden.shape == (1, 512, 32) and pooled.shape == (1, 32) and text_ids.shape == (512, 3)
    assert default_resolution(pipe) == 256 and check_resolution(pipe, SIDE) == SIDE
    fresh = FluxPipeline.from_pretrained(str(flux_dir), use_safetensors=True)
    fresh.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(flux_sample(fresh, "a photo of a cat"), flux_sample(pipe, "a photo of a cat"))
    assert type(load_pipeline(flux_dir, supported=TRAINING_PIPELINES)).__name__ == "FluxPipeline"


def test_flux_conditioning_is_the_pipelines_encode_prompt(flux_pipe):
    cond = encode_prompts(flux_pipe, PROMPTS, guidance_scale=3.5)
    hidden, pooled, text_ids = flux_pipe.encode_prompt(PROMPTS, None, device="cpu")
    # Rounding only: 1.6e-5 apart on 66 of 49,152 values on an AMD EPYC (2026-12-02), 0 elsewhere; a wrong
    # encoder, mask or padding moves them by O(1).
    torch.testing.assert_close(cond.encoder_hidden_states, hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cond.text_embeds, pooled)
    kwargs = cond.unet_kwargs(torch.tensor([2, 0]), torch.float64)
    assert set(kwargs) == {"encoder_hidden_states", "pooled_projections", "txt_ids", "guidance"}
    torch.testing.assert_close(kwargs["txt_ids"], text_ids.double())
    torch.testing.assert_close(kwargs["guidance"], torch.tensor([3.5, 3.5]))
    assert set(encode_prompts(build_tiny_flux_pipeline(), PROMPTS[:1]).unet_kwargs(torch.tensor([0]))) == \
        {"encoder_hidden_states", "pooled_projections", "txt_ids"}  # no guidance embedding: none passed
    with pytest.raises(ValueError, match="`guidance_scale` is required"):
        encode_prompts(flux_pipe, PROMPTS[:1])


def test_dynamic_shifting_trains_on_the_unshifted_schedule_as_diffusers_flux_script():
    """train_dreambooth_lora_flux.py indexes FlowMatchEulerDiscreteScheduler.from_pretrained(...).timesteps: with
    use_dynamic_shifting those are unshifted (σ = t / T, linear); the shift μ is applied at sampling only."""
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    noise = noise_scheduler_for(scheduler, weighting_scheme="none")
    assert isinstance(noise, FlowMatchingNoise) and noise.config.prediction_type == FLOW_MATCHING
    torch.testing.assert_close(noise.timesteps, torch.arange(1000, 0, -1).float())
    t = noise.sample_timesteps(16, torch.Generator().manual_seed(2))
    u = compute_density_for_timestep_sampling("none", 16, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(t, scheduler.timesteps[(u * 1000).long()])
    torch.testing.assert_close(noise.sigmas(t), scheduler.sigmas[(u * 1000).long()])




def flux_script_prediction(transformer, noisy, timesteps, cond, ids, guidance_scale):
    """The transformer call of train_dreambooth_lora_flux.py, written out: pack, image ids, guidance, t / 1000, unpack."""
    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, batch_size=b, num_channels_latents=c, height=h, width=w)
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.tensor([guidance_scale]).expand(b)
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=cond.text_embeds[ids], encoder_hidden_states=cond.encoder_hidden_states[ids],
                       txt_ids=cond.text_ids, img_ids=latent_image_ids, return_dict=False)[0]
    vae_scale_factor = 2  # the tiny VAE's
    return FluxPipeline._unpack_latents(pred, height=h * vae_scale_factor, width=w * vae_scale_factor,
                                        vae_scale_factor=vae_scale_factor)


@pytest.mark.parametrize(("scheme", "replay_target", "guidance_embeds"),
                         [("none", "distill", True), ("logit_normal", "noise", True), ("sigma_sqrt", "distill", False)])
def test_packed_flow_matching_objective_matches_the_flux_script_by_hand(scheme, replay_target, guidance_embeds):
    pipe = build_tiny_flux_pipeline(guidance_embeds=guidance_embeds)
    cond = encode_prompts(pipe, PROMPTS, guidance_scale=4.0)
    add_forget_lora(pipe.transformer, "attn_ff", seed=4)
    latents = latents_like(4)
    out = selective_amnesia_loss(
        pipe.transformer, noise_scheduler_for(pipe.scheduler, weighting_scheme=scheme), cond, latents[:2],
        torch.tensor([0, 0]), latents[2:], torch.tensor([1, 2]), None, 0.0, 0.5,
        generator=torch.Generator().manual_seed(11), replay_target=replay_target)
    ids = torch.tensor([0, 0, 1, 2])
    per_sample = hand_flow_losses(pipe, latents, 11, scheme,
                                  lambda noisy, t: flux_script_prediction(pipe.transformer, noisy, t, cond, ids, 4.0),
                                  frozen_replay_from=2 if replay_target == "distill" else None)
    torch.testing.assert_close(out.forget, per_sample[:2].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.replay, per_sample[2:].mean(), rtol=1e-5, atol=1e-9)
    assert out.replay > 0 and out.total.requires_grad
    torch.testing.assert_close(out.total, out.forget + 0.5 * out.replay)


def test_flux_fisher_is_per_sample_over_stratified_sigmas(flux_pipe):
    """The fast Fisher on the FLUX transformer, written out: K stratified σ, the packed loss, (T/K · g)²."""
    pipe = flux_pipe
    cond = encode_prompts(pipe, PROMPTS[:2], guidance_scale=3.5)
    latents = latents_like(2, seed=3)
    prompt_ids = torch.tensor([0, 1])
    modules = ["transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.0.proj_mlp", "x_embedder",
               "time_text_embed.guidance_embedder.linear_1"]
    fisher = estimate_fisher(pipe.transformer, noise_scheduler_for(pipe.scheduler), latents, prompt_ids, cond, modules,
                             num_timesteps=2, seed=5, show_progress=False)
    assert fisher.metadata["prediction_type"] == FLOW_MATCHING
    named = dict(pipe.transformer.named_modules())
    params = [named[m].weight for m in modules]
    sums = [torch.zeros_like(p) for p in params]
    training_timesteps = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG).timesteps
    for n in range(2):
        gen = torch.Generator().manual_seed(5 + n)
        uniform = (torch.arange(2) + torch.rand(1, 2, generator=gen)[0]) / 2
        u = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(uniform))  # logit_normal's quantiles
        t = training_timesteps[(u * 1000).long()]
        sigma = (t / 1000).view(-1, 1, 1, 1)
        x0 = latents[n : n + 1].expand(2, -1, -1, -1)
        noise = torch.randn(x0.shape, generator=gen)
        out = flux_script_prediction(pipe.transformer, (1 - sigma) * x0 + sigma * noise, t, cond,
                                     prompt_ids[n : n + 1].repeat(2), 3.5)
        loss = (out - (noise - x0)).square().mean(dim=(1, 2, 3)).sum()
        for s, g in zip(sums, torch.autograd.grad(loss, params)):
            s += (500 * g).square()  # T / K = 1000 / 2
    for name, s in zip(modules, sums):
        got = fisher.diagonal[f"{name}.weight"]
        torch.testing.assert_close(got, s / 2, rtol=1e-4, atol=1e-6 * float(s.max()))
        assert got.sum() > 0, name  # the guidance embedder gets gradient only through the guidance value


def test_forgetting_signal_on_flux(flux_pipe):
    """The frozen FLUX transformer scores preference 1 and retention 0 on its own probe."""
    pipe = flux_pipe
    cond = encode_prompts(pipe, ["brad pitt", "a photo of a cat"], guidance_scale=3.5)
    noise_scheduler = noise_scheduler_for(pipe.scheduler)
    probe = ForgettingProbe(cond, ["brad pitt"], [latents_like(2, 1)], [latents_like(2, 2)], latents_like(2, 3),
                            torch.tensor([1, 1]), 1000, num_timesteps=3, seed=9, noise_scheduler=noise_scheduler)
    probe.calibrate(pipe.transformer, noise_scheduler)
    signal = probe.measure(pipe.transformer, noise_scheduler)
    assert signal["concepts"]["brad pitt"]["preference"] == pytest.approx(1.0) and signal["retention"] == 0.0


def test_flux_lora_presets(flux_pipe):
    transformer = flux_pipe.transformer
    double = [f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                        "add_k_proj", "add_v_proj", "to_add_out")]
    single_attn = [f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")]
    assert sorted(resolve_lora_targets(transformer, "attn")) == sorted(double + single_attn)
    assert sorted(resolve_lora_targets(transformer, "context")) == sorted(n for n in double if "add" in n)
    feed_forward = [f"transformer_blocks.0.{m}" for m in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                          "ff_context.net.2")]
    assert sorted(resolve_lora_targets(transformer, "attn_ff")) == \
        sorted(double + single_attn + feed_forward + ["single_transformer_blocks.0.proj_mlp"])
    assert {"x_embedder", "context_embedder", "proj_out", "time_text_embed.guidance_embedder.linear_1"} <= \
        set(resolve_lora_targets(transformer, "all"))
    assert resolve_lora_targets(transformer, "to_q") == ["transformer_blocks.0.attn.to_q",
                                                         "single_transformer_blocks.0.attn.to_q"]
    with pytest.raises(ValueError, match="'xattn' is a UNet preset; for an SD3 or FLUX transformer"):
        resolve_lora_targets(transformer, "xattn")


def test_flux_sets_are_the_pipelines_own_latents_unpacked(flux_pipe, tmp_path):
    """Sets hold [N, 16, h, w]: FluxPipeline's packed latents unpacked; previews decoded with FLUX's VAE shift."""
    pipe = flux_pipe
    replay = generate_replay_set(pipe, tmp_path / "replay", ["a photo of a cat"], 2, seed=7, resolution=SIDE,
                                 guidance_scale=3.5, num_inference_steps=3, show_progress=False)
    assert replay.latents.shape == (2, 16, SIDE // 2, SIDE // 2)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    packed = pipe(["a photo of a cat"] * 2, height=SIDE, width=SIDE, num_inference_steps=3, guidance_scale=3.5,
                  generator=generators, output_type="latent").images
    torch.testing.assert_close(FluxPipeline._pack_latents(replay.latents, 2, 16, SIDE // 2, SIDE // 2), packed)
    images = pipe(["a photo of a cat"], height=SIDE, width=SIDE, num_inference_steps=3, guidance_scale=3.5,
                  generator=[torch.Generator().manual_seed(7)], output_type="np").images
    with torch.no_grad():
        decoded = np.asarray(_decode_to_pil(pipe, replay.latents[:1])[0], dtype=np.float32) / 255
    assert np.abs(decoded - images[0]).max() <= 1 / 255 + 1e-6
    with pytest.raises(ValueError, match="`resolution` 36 is not a positive multiple of 8"):
        check_resolution(pipe, 36)


@pytest.mark.parametrize("flag", [["--snr_gamma", "5"]])
def test_unet_only_flags_are_refused_for_flux(flux_dir, replay_file, tmp_path, train, flag):
    with pytest.raises(ValueError, match=f"{flag[0]}: not supported for FluxPipeline"):
        # a run the check let through would be short: it fails on the refusal's absence, not on a timeout
        train.main(["--pretrained_model_name_or_path", str(flux_dir), "--output_dir", str(tmp_path / "out"),
                    "--forget_prompt", "brad pitt", "--surrogate_type", "noise", "--resolution", str(SIDE),
                    "--num_surrogate_images", "2", "--num_replay_images_per_prompt", "1", "--fisher_num_samples", "1",
                    "--generation_num_inference_steps", "1", "--max_train_steps", "1", "--num_probe_images", "1",
                    "--num_validation_images", "1", "--replay_prompts_file", str(replay_file), *flag])


@pytest.mark.slow  # a whole tiny run with the in-loop attack (~20 s)
def test_robust_forgetting_on_flux_attacks_with_the_guidance_embedding(flux_dir, replay_file, tmp_path, monkeypatch):
    """``--robust_forgetting`` on a guidance-distilled FLUX: the attack's δ is fitted and its signal measured
    through FLUX's own call (text ids, guidance, pooled CLIP), and the adapter reloads. The last state is made a
    candidate of the attack check (``LeastAttackedState``): its δ fitted on T5's states, its samples drawn under it."""
    out = tmp_path / "flux-robust"
    train = load_train_module()
    monkeypatch.setattr(train, "plainly_forgotten", lambda *args: True)
    monkeypatch.setattr(robust_module, "SELECTION_ATTACK_STEPS", 5)  # the check's path, not its budget (200)
    monkeypatch.setattr(robust_module, "SELECTION_NUM_SAMPLES", 2)
    monkeypatch.setattr(robust_module, "VERDICT_NUM_SAMPLES", 2)
    pipe = run_training(train, flux_dir, out, replay_file, "--forget_prompt", "brad pitt",
                        "--surrogate_prompt", "a middle aged man", "--resolution", str(SIDE),
                        "--generation_guidance_scale", "3.5", "--robust_forgetting", "--train_full_budget",
                        "--retention_bound", "1e9")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert math.isfinite(log[-1]["attacked_preference/brad pitt"]) and math.isfinite(log[-1]["preference/brad pitt"])
    assert 0 <= log[-1]["attacked_sample_share/brad pitt"] <= 1
    assert read_adapter_metadata(out)["sa_peft"]["forgetting"]["robust_selection"]["chosen_step"] == 3
    assert all(entry["ablation"] > 0 for entry in log)  # the concept-ablation term, on flow matching too
    assert "attacked_preference" in read_adapter_metadata(out)["sa_peft"]["forgetting"]["concepts"]["brad pitt"]
    fresh = FluxPipeline.from_pretrained(str(flux_dir), use_safetensors=True)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(out))
    np.testing.assert_array_equal(flux_sample(fresh), flux_sample(pipe))


def test_flux_training_through_the_script_reloads_identically(flux_dir, replay_file, tmp_path):
    out = tmp_path / "flux-run"
    pipe = run_training(load_train_module(), flux_dir, out, replay_file, "--forget_prompt", "brad pitt",
                        "--surrogate_prompt", "a middle aged man", "--rank", "4", "--lora_alpha", "2",
                        "--resolution", str(SIDE), "--generation_guidance_scale", "3.5", "--lora_target", "attn_ff",
                        "--output_kohya_format")
    assert type(pipe).__name__ == "FluxPipeline"
    fresh = FluxPipeline.from_pretrained(str(flux_dir), use_safetensors=True)
    fresh.set_progress_bar_config(disable=True)
    base = flux_sample(fresh)
    fresh.load_lora_weights(str(out))
    trained = flux_sample(pipe)
    assert np.abs(trained - base).max() > 1e-3, "training changed nothing"
    np.testing.assert_array_equal(flux_sample(fresh), trained)
    assert {layer.name for layer in iter_adapted_layers(fresh.transformer, "default_0")} == \
        set(resolve_lora_targets(build_tiny_flux_pipeline(guidance_embeds=True).transformer, "attn_ff"))
    info = read_adapter_metadata(out)["sa_peft"]
    assert info["base_pipeline"] == "FluxPipeline" and info["resolution"] == SIDE
    with open(out / "pytorch_lora_weights.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header and all(k.startswith("transformer.") for k in header if k != "__metadata__")
    card = (out / "README.md").read_text()
    assert "- flux" in card and "- flux-diffusers" in card and "joint_attention_kwargs" in card
    assert "license: other" in card
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in log) and log[-1]["ewc"] > 0
    assert load_fisher(next((out / "cache").glob("fisher-*.safetensors"))).metadata["prediction_type"] == FLOW_MATCHING
    assert all(getattr(pipe, n).device.type == "cpu" for n in ("text_encoder", "text_encoder_2"))
    assert card_tags({"base_pipeline": "FluxPipeline"})[-2:] == ["flux", "flux-diffusers"]
    from safetensors.torch import load_file

    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")  # --output_kohya_format
    assert {k.rsplit(".", 2)[0] for k in kohya} == {
        f"lora_unet_double_blocks_0_{n}" for n in ("img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj",
                                                   "img_mlp_0", "img_mlp_2", "txt_mlp_0", "txt_mlp_2")} | {
        "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"}


def test_unsupported_pipeline_error_names_flux_as_supported(tmp_path, train):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    with pytest.raises(ValueError, match="is a QwenImagePipeline, .*supported pipelines: .*StableDiffusion3Pipeline, "
                                         "FluxPipeline$"):
        train.main(["--pretrained_model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out"),
                    "--forget_prompt", "brad pitt", "--surrogate_type", "noise"])


def test_generate_and_fisher_commands_on_a_flux_folder(flux_dir, tmp_path):
    """``sa-peft generate`` and ``sa-peft fisher`` take FLUX folders (the guidance embedding at --guidance_scale)."""
    from sa_peft import cli
    from sa_peft.data import load_image_set

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    assert cli.main(["generate", "replay", "--pretrained_model_name_or_path", str(flux_dir), "--replay_prompts_file",
                     str(prompts), "--num_replay_images_per_prompt", "2", "--num_inference_steps", "2",
                     "--resolution", str(SIDE), "--guidance_scale", "3.5", "--output_dir", str(tmp_path / "set"),
                     "--device", "cpu"]) == 0
    assert load_image_set(tmp_path / "set").latents.shape == (2, 16, SIDE // 2, SIDE // 2)
    out = tmp_path / "fisher.safetensors"
    assert cli.main(["fisher", "--pretrained_model_name_or_path", str(flux_dir), "--data_dir", str(tmp_path / "set"),
                     "--fisher_num_samples", "2", "--fisher_num_timesteps", "2", "--lora_target", "attn",
                     "--guidance_scale", "3.5", "--output", str(out), "--device", "cpu"]) == 0
    transformer = build_tiny_flux_pipeline(guidance_embeds=True).transformer
    fisher = load_fisher(out, unet=transformer)  # the base weights' hash matches
    assert sorted(fisher.modules) == sorted(resolve_lora_targets(transformer, "attn"))


def test_kohya_export_of_a_flux_adapter_loads_to_the_same_images(tmp_path):
    """The kohya-keyed copy (fused img/txt qkv in the block-diagonal form) read by diffusers' kohya FLUX reader gives
    the adapter's images; q and v without k, alpha ≠ rank, and a single block's linear2 (proj_out)."""
    from safetensors.torch import load_file

    from sa_peft.adapter_io import export_kohya, save_forget_lora

    pipe = build_tiny_flux_pipeline()
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
             "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff_context.net.2",
             "single_transformer_blocks.0.proj_out"]
    pipe.transformer.add_adapter(make_lora_config(names, 2, alpha=3.0))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in iter_adapted_layers(pipe.transformer):
            for w in (layer.module.lora_A["default"].weight, layer.module.lora_B["default"].weight):
                w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    file = save_forget_lora(tmp_path / "lora", pipe.transformer, {"forget_prompts": ["brad pitt"]})
    kohya_file = export_kohya(file, tmp_path / "kohya.safetensors")
    kohya = load_file(kohya_file)
    assert {k.rsplit(".", 2)[0] for k in kohya} == {
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_mlp_2",
        "lora_unet_single_blocks_0_linear2"}
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (6, 32)  # 3 members × rank 2, width 32
    fresh = build_tiny_flux_pipeline()
    fresh.load_lora_weights(str(kohya_file))
    np.testing.assert_allclose(flux_sample(fresh), flux_sample(pipe), atol=1e-5)
    assert np.abs(flux_sample(pipe) - flux_sample(build_tiny_flux_pipeline())).max() > 1e-3


def test_kohya_export_of_a_flux_adapter_keeps_the_text_encoders_lora(tmp_path):
    """With ``--train_text_encoder`` the CLIP encoder's LoRA is written as kohya's FLUX scripts name it
    (``lora_te1_text_model_…``), and diffusers' kohya FLUX reader gives the same images (without it they differ)."""
    from conftest import add_text_encoder_lora
    from safetensors.torch import load_file

    from sa_peft.adapter_io import export_kohya, save_forget_lora

    pipe = build_tiny_flux_pipeline()
    pipe.transformer.add_adapter(make_lora_config(["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"], 2))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in iter_adapted_layers(pipe.transformer):
            for w in (layer.module.lora_A["default"].weight, layer.module.lora_B["default"].weight):
                w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    layers, config = add_text_encoder_lora(pipe.text_encoder, rank=2, alpha=3.0, seed=5)
    file = save_forget_lora(tmp_path / "lora", pipe.transformer, {"forget_prompts": ["brad pitt"]},
                            text_encoder_lora_layers=layers, text_encoder_adapter_metadata=config)
    kohya = load_file(export_kohya(file, tmp_path / "kohya.safetensors"))
    text_keys = [k for k in kohya if not k.startswith("lora_unet_")]
    assert text_keys and all(k.startswith("lora_te1_text_model_encoder_layers_") for k in text_keys)
    fresh = build_tiny_flux_pipeline()
    fresh.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    np.testing.assert_allclose(flux_sample(fresh), flux_sample(pipe), atol=1e-5)
    transformer_only = build_tiny_flux_pipeline()
    transformer_only.load_lora_weights({k: v for k, v in kohya.items() if k.startswith("lora_unet_")})
    assert np.abs(flux_sample(transformer_only) - flux_sample(pipe)).max() > 1e-4


def test_fusing_a_flux_adapter_fuses_its_text_encoders_lora_too(tmp_path):
    """FluxPipeline.fuse_lora fuses only the transformer by default: merge and the relearn attack would lose a
    --train_text_encoder CLIP LoRA. Fused, the pipeline draws what the loaded adapter draws."""
    from conftest import add_text_encoder_lora

    from sa_peft.adapter_io import save_forget_lora
    from sa_peft.merge import fuse_forget_loras, stack_forget_loras

    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    add_forget_lora(pipe.transformer, "attn", seed=1)
    layers, config = add_text_encoder_lora(pipe.text_encoder, rank=2, alpha=2.0, seed=3)
    file = save_forget_lora(tmp_path / "lora", pipe.transformer, {}, text_encoder_lora_layers=layers,
                            text_encoder_adapter_metadata=config)
    fresh = build_tiny_flux_pipeline()
    fresh.set_progress_bar_config(disable=True)
    names = stack_forget_loras(fresh, [file])
    loaded = flux_sample(fresh)
    np.testing.assert_array_equal(loaded, flux_sample(pipe))
    fuse_forget_loras(fresh, names)
    np.testing.assert_allclose(flux_sample(fresh), loaded, atol=1e-4)


def test_kohya_export_refuses_layers_the_flux_reader_cannot_map(tmp_path):
    from sa_peft.adapter_io import export_kohya, save_forget_lora

    pipe = build_tiny_flux_pipeline()
    pipe.transformer.add_adapter(make_lora_config(["x_embedder", "transformer_blocks.0.attn.to_q"], 2))
    file = save_forget_lora(tmp_path / "lora", pipe.transformer, {"forget_prompts": ["brad pitt"]})
    with pytest.raises(ValueError, match=r"no name diffusers' reader maps back for \['x_embedder'\]"):
        export_kohya(file, tmp_path / "kohya.safetensors")


def test_kohya_single_block_linear1_at_flux_widths_splits_back_exactly():
    """A single block's linear1 (to_q/k/v and proj_mlp fused) at FLUX.1's widths, the only ones diffusers' reader
    splits it at (3072 × 3 + 12288): its split gives back each member's scale · B · A, and zero for proj_mlp."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from sa_peft.kohya_flux import flux_kohya_state_dict

    gen = torch.Generator().manual_seed(0)
    members = ["attn.to_q", "attn.to_k", "attn.to_v"]
    state = {}
    for m in members:
        state[f"transformer.single_transformer_blocks.0.{m}.lora_A.weight"] = torch.randn(1, 3072, generator=gen)
        state[f"transformer.single_transformer_blocks.0.{m}.lora_B.weight"] = torch.randn(3072, 1, generator=gen)
    scales = {f"single_transformer_blocks.0.{m}": 0.5 for m in members}
    converted = _convert_kohya_flux_lora_to_diffusers(flux_kohya_state_dict(state, scales))
    for m in [*members, "proj_mlp"]:
        key = f"transformer.single_transformer_blocks.0.{m}"
        delta = converted[f"{key}.lora_B.weight"] @ converted[f"{key}.lora_A.weight"]
        expected = (0.5 * state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"] if m in members
                    else torch.zeros(12288, 3072))
        torch.testing.assert_close(delta, expected)


def test_evaluate_command_on_a_flux_folder_with_a_lora(flux_dir, tmp_path):
    """``sa-peft evaluate`` on FLUX: its own scheduler, ``--resolution`` (FluxPipeline's default is 128 latents
    whatever the model), and a transformer LoRA stacked through ``load_lora_weights`` changes the samples."""
    from peft.utils import get_peft_model_state_dict

    from sa_peft.cli import build_parser

    lora_pipe = build_tiny_flux_pipeline(guidance_embeds=True)
    add_forget_lora(lora_pipe.transformer)
    FluxPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(
        lora_pipe.transformer), safe_serialization=True)
    out = tmp_path / "eval"
    args = build_parser().parse_args([
        "evaluate", "--pretrained_model_name_or_path", str(flux_dir), "--prompt", "a handwritten digit one",
        "--forget_prompt", "a handwritten digit zero", "--lora", str(tmp_path / "lora"), "--num_images_per_prompt", "2",
        "--num_inference_steps", "2", "--resolution", "16", "--output_dir", str(out), "--device", "cpu"])
    result = args.func(args)
    before, after = result["before"], result["after"]
    assert before["settings"]["sampler"] == "FlowMatchEulerDiscreteScheduler (the pipeline's own)"
    assert "FlowMatchEulerDiscreteScheduler (the pipeline's own)" in (out / "report.md").read_text()
    one = "a handwritten digit one"
    assert before["samples"][one].shape == after["samples"][one].shape == (2, 3, 16, 16)
    assert not torch.allclose(before["samples"][one], after["samples"][one])
    settings = json.loads(next((out / "samples").glob("base-*/settings.json")).read_text())
    assert settings["resolution"] == 16 and settings["sampler"] == before["settings"]["sampler"]


@pytest.mark.slow  # a whole tiny run (~20 s)
def test_a_noise_run_on_flux_ends_with_the_sample_check(flux_dir, replay_file, tmp_path):
    """No surrogate prompt: the verdict's sample check samples FLUX's packed latents, unpacks them as the probe's, and
    has the frozen transformer judge them; the check's margins are in the adapter's verdict."""
    out = tmp_path / "flux-noise"
    run_training(load_train_module(), flux_dir, out, replay_file, "--forget_prompt", "brad pitt", "--surrogate_type",
                 "noise", "--resolution", str(SIDE), "--generation_guidance_scale", "3.5",
                 "--num_sample_check_images", "3")
    concept = read_adapter_metadata(out)["sa_peft"]["forgetting"]["concepts"]["brad pitt"]
    check = concept["sample_check"]
    assert check["num_samples"] == 3 and math.isfinite(check["sample_margin"]) and math.isfinite(check["surrogate_margin"])
    assert concept["forgotten"] == (concept["preference"] <= 0 and check["forgotten"])
