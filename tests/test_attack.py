"""`sa-peft attack`: the four attacks on the tiny pipeline, their scoring, and bad input that fails first."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import add_forget_lora

from sa_peft import cli
from sa_peft.adapter_io import save_forget_lora
from sa_peft.attacks import AttackContext, prompt_variants, run_attacks, write_attack_report
from sa_peft.attacks.inversion import add_token, learn_token
from sa_peft.attacks.relearn import fine_tune_unet
from sa_peft.attacks.sampling import sample
from sa_peft.attacks.soft_prompt import optimise_soft_prompt, perturbed, project, run_soft_prompt_attack
from sa_peft.classifier import ImageClassifier
from sa_peft.commands import attack as attack_command
from sa_peft.conditioning import encode_prompts
from sa_peft.diffusion_loss import FlowMatchingNoise, noise_scheduler_for, per_sample_diffusion_loss
from sa_peft.evaluation import iter_samples
from sa_peft.merge import stack_forget_loras
from sa_peft.testing.tiny_pipeline import build_tiny_flux_pipeline, build_tiny_pipeline, build_tiny_sd3_pipeline

PROMPT = "a photo of a cat"
FAST = {"num_images": 4, "num_inference_steps": 2, "guidance_scale": 3.0, "batch_size": 8}


class BrightnessClassifier(ImageClassifier):
    """Two classes read off the mean pixel value: P(bright) = sigmoid(40 · (mean − threshold))."""

    def __init__(self, threshold: float):
        self.labels = ["dark", "bright"]
        self.threshold = threshold

    def predict_proba(self, images):
        p = torch.sigmoid(40 * (images.float().mean(dim=(1, 2, 3)) - self.threshold))
        return torch.stack([1 - p, p], dim=1)

    def features(self, images):
        return images.flatten(1)[:, :4].float()


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, "all", seed=3)
    folder = tmp_path_factory.mktemp("attack-lora")
    save_forget_lora(folder, pipe.unet, {"base_model": "tiny", "forget_prompts": [PROMPT]})
    return folder


@pytest.fixture(scope="module")
def threshold():
    """The median brightness of the tiny base model's samples, so both classes occur."""
    images = next(iter(iter_samples(build_tiny_pipeline(), [PROMPT], 8, 0, 2, 3.0, show_progress=False)))[1]
    return images.float().mean(dim=(1, 2, 3)).median().item()


def make_context(lora_file, threshold, **overrides):
    pipe = build_tiny_pipeline()
    names = stack_forget_loras(pipe, [lora_file])
    ctx = AttackContext(pipe, BrightnessClassifier(threshold), [PROMPT], [1], enable_adapter=pipe.enable_lora,
                        disable_adapter=pipe.disable_lora, log=lambda _: None, **{**FAST, **overrides})
    return ctx, names


OPTIONS = {
    "prompts": {"num_images": 2},
    "inversion": {"steps": 3, "num_train_images": 4, "train_batch_size": 2},
    "soft_prompt": {"steps": 3, "num_train_images": 4, "train_batch_size": 2},
    "relearn": {"prompts": ["a photo of a dog"], "images_per_prompt": 4, "steps": 2, "batch_size": 2},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_attack_runs_on_the_tiny_pipeline(name, lora_file, threshold, tmp_path):
    ctx, names = make_context(lora_file, threshold)
    options = {name: {**OPTIONS[name], **({"adapter_names": names} if name == "relearn" else {})}}
    payload, grids = run_attacks(ctx, [name], options, {"forget_prompts": [PROMPT], "classifier": "brightness",
                                                        "num_images": 4, "seed": 0, "num_inference_steps": 2,
                                                        "guidance_scale": 3.0})
    result = payload["attacks"][name]
    assert 0 <= result["attack_success_rate"] <= 1 and 0 <= result["base_rate"] <= 1
    assert {"base", "adapted"} <= set(payload["no_attack"])
    paths = write_attack_report(payload, grids, tmp_path)
    saved = json.loads((tmp_path / "attack.json").read_text())
    assert saved["attacks"][name]["attack_success_rate"] == result["attack_success_rate"]
    assert f"| {name} |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "attack_grid.png").stat().st_size > 0 and set(paths) == {"attack", "report", "grid"}


def test_prompts_attack_base_rate_is_the_base_models(lora_file, threshold):
    """The base rate comes from the model without the adapter: a fresh base pipeline gives the same numbers."""
    ctx, _ = make_context(lora_file, threshold)
    result = run_attacks(ctx, ["prompts"], {"prompts": {"num_images": 2}}, {})[0]["attacks"]["prompts"]
    base, scorer = build_tiny_pipeline(), BrightnessClassifier(threshold)
    variants = list(result["per_prompt"])
    samples = dict(iter_samples(base, variants, 2, 0, 2, 3.0, batch_size=8, show_progress=False))
    for variant in variants:
        expected = (scorer.predict_proba(samples[variant]).argmax(1) == 1).double().mean().item()
        assert result["per_prompt"][variant]["base"]["success_rate"] == pytest.approx(expected)
    adapted = [m["adapted"]["success_rate"] for m in result["per_prompt"].values()]
    assert result["attack_success_rate"] == pytest.approx(sum(adapted) / len(adapted))


def test_prompt_variants_reword_without_the_prompt_itself():
    variants = prompt_variants("a handwritten digit zero", ["{word} in {prompt}"])
    assert "a handwritten digit zero" not in variants
    assert {"a handwritten digit cero", "a handwritten digit 0", "a handwritten digit zeo", "a handwritten digit zreo", "a handwritten digit zerro"} <= set(variants)
    assert "a handwritten digit zero on white paper" in variants
    assert variants[-1] == "zero in a handwritten digit zero"


def test_inversion_moves_only_the_new_token_and_fits_the_images(lora_file, threshold):
    ctx, _ = make_context(lora_file, threshold)
    embedding = ctx.pipe.text_encoder.get_input_embeddings()
    before = embedding.weight.detach().clone()
    rows = add_token(ctx.pipe, "<concept>")
    row = rows[0][1]
    assert row == before.shape[0]
    assert torch.allclose(embedding.weight[row], before.mean(0))
    latents = ctx.concept_latents(PROMPT, 4)
    history = learn_token(ctx, latents, "<concept>", rows, steps=30, lr=0.1, batch_size=4, seed=0)
    after = ctx.pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[:row], before)  # every old row untouched
    assert not torch.allclose(after[row], before.mean(0))
    assert not after.requires_grad
    assert sum(history[-2:]) < sum(history[:2])


def test_soft_prompt_perturbation_stays_inside_its_bound(lora_file, threshold):
    reference = torch.randn(1, 5, 8)
    delta = project(torch.randn(1, 5, 8) * 10, reference, 0.1)
    assert (delta.norm(dim=-1) <= 0.1 * reference.norm(dim=-1) + 1e-6).all()
    small = torch.randn(1, 5, 8) * 1e-4
    assert torch.equal(project(small, reference, 0.1), small)
    ctx, _ = make_context(lora_file, threshold)
    options = {"soft_prompt": {"steps": 5, "lr": 1.0, "epsilon": 0.05, "num_train_images": 4, "train_batch_size": 2}}
    result = run_attacks(ctx, ["soft_prompt"], options, {})[0]["attacks"]["soft_prompt"]
    assert 0.04 < result["per_concept"][PROMPT]["max_relative_norm"] <= 0.05 + 1e-5
    # The control: the adapted model under δ's norms in random directions, reported beside the attack.
    assert 0 <= result["random_direction_rate"] <= 1 and "random_direction" in result["per_concept"][PROMPT]


def test_the_soft_prompt_control_keeps_each_tokens_norm_in_a_random_direction():
    from sa_peft.attacks.soft_prompt import random_direction_like

    delta = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 6, 32)
    mask[:, :, 16:] = 0  # SD3's zero padding stays unperturbed
    delta = delta * mask
    control = random_direction_like(delta, mask, seed=3)
    torch.testing.assert_close(control.norm(dim=-1), delta.norm(dim=-1))
    assert torch.equal(control[:, :, 16:], torch.zeros(1, 6, 16))
    cosine = torch.nn.functional.cosine_similarity(control, delta, dim=-1)
    assert cosine.abs().max() < 0.9  # not δ, nor δ's direction
    assert torch.equal(random_direction_like(delta, mask, seed=3), control)


def test_relearn_on_an_adapter_that_forgot_nothing_reports_the_base_rate(tmp_path, monkeypatch):
    """A LoRA whose B is zero changes nothing: before fine-tuning the relearned model is the base model, and a few
    benign steps leave P(zero) where the base model has it. The memory flags reach the fine-tuning."""
    from sa_peft.attacks import relearn as relearn_module
    from sa_peft.models import load_pipeline

    pytest.importorskip("bitsandbytes")
    calls = []
    real_fine_tune = relearn_module.fine_tune_unet
    monkeypatch.setattr(relearn_module, "fine_tune_unet",
                        lambda *a: calls.append(a[-2:]) or real_fine_tune(*a))

    digits = load_pipeline("builtin:digits")
    add_forget_lora(digits.unet, "all", randomize=False)
    save_forget_lora(tmp_path / "noop", digits.unet, {"base_model": "builtin:digits"})
    out = tmp_path / "out"
    assert cli.main(["attack", "--lora", str(tmp_path / "noop"), "--forget_prompt", "a handwritten digit zero",
                     "--attack", "relearn", "--relearn_steps", "4", "--relearn_eval_steps", "0",
                     "--relearn_eval_steps", "4", "--relearn_prompt", "a handwritten digit one",
                     "--relearn_images_per_prompt", "8", "--relearn_batch_size", "8", "--num_images", "10",
                     "--num_inference_steps", "5", "--output_dir", str(out), "--device", "cpu",
                     "--relearn_gradient_checkpointing", "--relearn_use_8bit_adam"]) == 0
    payload = json.loads((out / "attack.json").read_text())
    result = payload["attacks"]["relearn"]
    assert result["gradient_checkpointing"] and result["use_8bit_adam"] and calls == [(True, True)]
    assert payload["no_attack"]["adapted"] == payload["no_attack"]["base"] == result["base_rate"]
    assert result["base_rate"] >= 0.8  # the digits model draws zeros for the zero prompt
    start = result["recovery_curve"][0]
    assert start["step"] == 0 and start["success_rate"] == result["base_rate"]
    # The same weights and the same seeds: the very same samples as the base model's.
    assert start["mean_concept_score"] == pytest.approx(payload["no_attack"]["base_mean_concept_score"], abs=1e-6)
    assert abs(result["attack_success_rate"] - result["base_rate"]) <= 0.1


def test_relearn_memory_features_keep_the_losses_and_use_8bit_adam(monkeypatch):
    """Gradient checkpointing recomputes, so relearning's losses are those without it (and it is on only while
    fine-tuning); 8-bit Adam is bitsandbytes' AdamW8bit, and it trains."""
    from sa_peft.attacks import relearn as relearn_module
    from sa_peft.diffusion_loss import noise_scheduler_for

    pipe = build_tiny_pipeline()
    cond = encode_prompts(pipe, ["brad pitt"])
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(4, dtype=torch.long)
    scheduler = noise_scheduler_for(pipe.scheduler)
    start = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = fine_tune_unet(pipe.unet, scheduler, latents, ids, cond, 3, lr=1e-3, batch_size=2)
    pipe.unet.load_state_dict(start)
    seen = []
    checkpointed = fine_tune_unet(pipe.unet, scheduler, latents, ids, cond, 3, lr=1e-3, batch_size=2,
                                  callback=lambda step: seen.append(pipe.unet.is_gradient_checkpointing),
                                  gradient_checkpointing=True)
    assert checkpointed == plain and seen == [True] * 4 and not pipe.unet.is_gradient_checkpointing
    pytest.importorskip("bitsandbytes")
    optimizers = []
    real = relearn_module.make_optimizer
    monkeypatch.setattr(relearn_module, "make_optimizer", lambda *a: optimizers.append(real(*a)) or optimizers[-1])
    pipe.unet.load_state_dict(start)
    fine_tune_unet(pipe.unet, scheduler, latents, ids, cond, 2, lr=1e-3, batch_size=2, use_8bit_adam=True)
    assert type(optimizers[0]).__name__ == "AdamW8bit"
    assert any(not torch.equal(start[k], v) for k, v in pipe.unet.state_dict().items())


def test_relearn_8bit_adam_without_bitsandbytes_fails_before_any_work(lora_file, tmp_path, no_work, capsys,
                                                                     monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    argv = ["attack", "--lora", str(lora_file), "--forget_prompt", "a handwritten digit zero", "--attack", "relearn",
            "--relearn_use_8bit_adam", "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    assert cli.main(argv) != 0
    assert "needs bitsandbytes: pip install 'sa-peft[bnb]'" in capsys.readouterr().err
    assert no_work == [] and not (tmp_path / "out").exists()


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the command loads the classifier or the pipeline."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise AssertionError("no model may be loaded before the flags are checked")

    monkeypatch.setattr(attack_command, "load_pipeline_from_args", fail)
    monkeypatch.setattr(attack_command, "load_classifier", fail)
    return calls


@pytest.mark.parametrize("extra, message", [
    ([], "--forget_prompt"),
    (["--forget_prompt", "a handwritten digit zero", "--attack", "jailbreak"], "--attack 'jailbreak'"),
    (["--forget_prompt", "a handwritten digit zero", "--attack", "prompts", "--num_images", "0"], "--num_images"),
    (["--forget_prompt", "a handwritten digit zero", "--relearn_eval_steps", "400"], "--relearn_eval_steps"),
    (["--forget_prompt", "x", "--classifier", "nudenet", "--attack", "relearn"], "benign data"),
    (["--forget_prompt", "a handwritten digit zero", "--inversion_template", "a photo"], "--inversion_template"),
])
def test_bad_input_fails_before_any_work(extra, message, lora_file, tmp_path, no_work, capsys):
    argv = ["attack", "--lora", str(lora_file), *extra, "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert no_work == [] and not (tmp_path / "out").exists()


def test_missing_lora_fails_before_any_work(tmp_path, no_work, capsys):
    argv = ["attack", "--lora", str(tmp_path / "missing"), "--forget_prompt", "a handwritten digit zero",
            "--output_dir", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert "--lora" in capsys.readouterr().err and no_work == []


# ------------------------------------------------------------------ SD3 and FLUX (flow-matching transformers)

SIDE = 32  # the tiny transformers' native size (FluxPipeline would sample 256 px on its tiny one unless told)
DIGIT = "a handwritten digit zero"
# FLUX.1-dev-like (guidance-distilled: the guidance embedding is the sampling guidance) and SD3 with real CFG.
FAMILIES = {"sd3": lambda: build_tiny_sd3_pipeline(), "flux": lambda: build_tiny_flux_pipeline(guidance_embeds=True)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def flow_family(request, tmp_path_factory):
    """``(name, build, saved pipeline folder, forget LoRA folder)`` of a tiny SD3 / FLUX model."""
    build = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build().save_pretrained(folder)
    pipe = build()
    add_forget_lora(pipe.transformer, "all", seed=3)
    lora = tmp_path_factory.mktemp(f"{request.param}-lora")
    save_forget_lora(lora, pipe.transformer, {"base_model": str(folder), "forget_prompts": [DIGIT]})
    return request.param, build, folder, lora


def flow_context(flow_family, **overrides):
    _, build, _, lora = flow_family
    pipe = build()
    names = stack_forget_loras(pipe, [lora])
    pipe.set_progress_bar_config(disable=True)
    ctx = AttackContext(pipe, BrightnessClassifier(0.5), [DIGIT], [1], enable_adapter=pipe.enable_lora,
                        disable_adapter=pipe.disable_lora, log=lambda _: None,
                        **{**FAST, "num_images": 2, "resolution": SIDE, **overrides})
    return ctx, names


def test_every_attack_runs_through_the_command_on_sd3_and_flux(flow_family, tmp_path):
    _, _, folder, lora = flow_family
    out = tmp_path / "out"
    assert cli.main(["attack", "--pretrained_model_name_or_path", str(folder), "--lora", str(lora),
                     "--forget_prompt", DIGIT, "--num_images", "2", "--prompts_num_images", "1",
                     "--num_inference_steps", "2", "--resolution", str(SIDE), "--inversion_steps", "2",
                     "--attack_num_train_images", "2", "--soft_prompt_steps", "2", "--soft_prompt_epsilon", "0.5",
                     "--soft_prompt_learning_rate", "1.0", "--relearn_steps", "2", "--relearn_prompt",
                     "a handwritten digit one", "--relearn_images_per_prompt", "2", "--relearn_batch_size", "2",
                     "--output_dir", str(out), "--device", "cpu"]) == 0
    payload = json.loads((out / "attack.json").read_text())
    settings = payload["settings"]
    assert settings["sampler"] == "FlowMatchEulerDiscreteScheduler (the pipeline's own)"
    assert settings["resolution"] == SIDE
    assert set(payload["attacks"]) == {"prompts", "inversion", "soft_prompt", "relearn"}
    for result in payload["attacks"].values():
        assert 0 <= result["attack_success_rate"] <= 1 and 0 <= result["base_rate"] <= 1
    assert 0.4 < payload["attacks"]["soft_prompt"]["per_concept"][DIGIT]["max_relative_norm"] <= 0.5 + 1e-5
    assert [c["step"] for c in payload["attacks"]["relearn"]["recovery_curve"]] == [0, 1, 2]
    assert "FlowMatchEulerDiscreteScheduler" in (out / "report.md").read_text()
    assert (out / "attack_grid.png").stat().st_size > 0


def test_sampling_from_embeddings_is_sampling_from_the_prompt_on_sd3_and_flux(flow_family):
    """The soft-prompt attack samples from embeddings: with δ = 0 they must give the prompt's own images (SD3: the
    pooled embedding and the pipeline's own empty negative for CFG; FLUX-dev: the guidance embedding), latents too."""
    ctx, _ = flow_context(flow_family)
    cond = encode_prompts(ctx.pipe, [DIGIT], guidance_scale=ctx.guidance_scale)
    from_prompt = sample(ctx, 2, prompt=DIGIT)
    assert from_prompt.shape == (2, 3, SIDE, SIDE)
    torch.testing.assert_close(sample(ctx, 2, conditioning=cond), from_prompt, atol=1e-5, rtol=0)
    latents = sample(ctx, 2, conditioning=cond, output_type="latent")
    assert latents.shape == (2, 16, SIDE // 2, SIDE // 2)  # FLUX's packed latents unpacked, as the losses take them
    torch.testing.assert_close(latents, sample(ctx, 2, prompt=DIGIT, output_type="latent"), atol=1e-5, rtol=0)
    other = encode_prompts(ctx.pipe, ["a red car"], guidance_scale=ctx.guidance_scale)
    assert (sample(ctx, 2, conditioning=other) - from_prompt).abs().max() > 1e-3


def hand_flow_loss(model, pipe, cond, latents, batch_size, seed):
    """The first step's loss of the soft prompt / inversion loops, written out: diffusers' SD3/FLUX training noise
    (logit-normal σ density over the pipeline's own training timesteps) drawn from the loop's generator."""
    noise_fn = FlowMatchingNoise(pipe.scheduler)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(latents), (batch_size,), generator=gen)
    t = noise_fn.sample_timesteps(batch_size, gen)
    noise = torch.randn(latents[idx].shape, generator=gen)
    kwargs = cond.unet_kwargs(torch.zeros(batch_size, dtype=torch.long))
    with torch.no_grad():
        return per_sample_diffusion_loss(model, noise_fn, latents[idx], t, noise, kwargs).mean().item()


def test_soft_prompt_on_sd3_and_flux_perturbs_the_context_inside_its_bound(flow_family):
    """δ lies on the context the transformer attends to (SD3's joint CLIP + T5 states, FLUX's T5 states), within ε per
    token, zero on SD3's zero padding; the pooled embedding, FLUX's text ids and guidance stay the prompt's; the loss
    is the family's flow-matching loss (its first value, at δ = 0, equals the one written out by hand)."""
    ctx, _ = flow_context(flow_family)
    pipe = ctx.pipe
    latents = ctx.concept_latents(DIGIT, 2)
    cond = encode_prompts(pipe, [DIGIT], guidance_scale=ctx.guidance_scale)
    if flow_family[0] == "sd3":  # real SD3 zero-pads its CLIP states (768 + 1280 wide) to T5's 4096; the tiny one's fit
        hidden = cond.encoder_hidden_states.clone()
        hidden[:, :77, 48:] = 0
        cond = replace(cond, encoder_hidden_states=hidden)
    delta, history = optimise_soft_prompt(pipe.transformer, noise_scheduler_for(pipe.scheduler), cond, latents,
                                          steps=3, lr=1.0, epsilon=0.2, batch_size=2, seed=7)
    assert history[0] == pytest.approx(hand_flow_loss(pipe.transformer, pipe, cond, latents, 2, 7), rel=1e-4)
    hidden = cond.encoder_hidden_states
    assert delta.shape == hidden.shape
    relative = delta.norm(dim=-1) / hidden.norm(dim=-1)
    assert (relative <= 0.2 + 1e-5).all() and relative.max() > 0.19
    assert torch.equal(delta[hidden == 0], torch.zeros_like(delta[hidden == 0]))
    assert (delta[hidden != 0] != 0).float().mean() > 0.9
    attacked = perturbed(cond, delta)
    torch.testing.assert_close(attacked.encoder_hidden_states, hidden + delta)
    assert attacked.text_embeds is not None and torch.equal(attacked.text_embeds, cond.text_embeds)
    assert attacked.guidance == cond.guidance and (attacked.text_ids is None) == (flow_family[0] == "sd3")
    # The attack itself: the adapted model's loss under the prompt encoded at the sampling guidance (FLUX-dev's
    # guidance embedding), on the base model's concept samples.
    run = run_soft_prompt_attack(ctx, steps=1, num_train_images=2, train_batch_size=2)
    plain = encode_prompts(pipe, [DIGIT], guidance_scale=ctx.guidance_scale)
    expected = hand_flow_loss(pipe.transformer, pipe, plain, latents, 2, ctx.seed + 3)
    assert run["per_concept"][DIGIT]["loss_history"][0] == pytest.approx(expected, rel=1e-4)


def test_inversion_on_sd3_and_flux_adds_the_token_to_every_text_encoder_t5_too(flow_family):
    ctx, _ = flow_context(flow_family)
    pipe = ctx.pipe
    encoders = [e for e in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if e is not None]
    assert type(encoders[-1]).__name__ == "T5EncoderModel"
    before = [e.get_input_embeddings().weight.detach().clone() for e in encoders]
    rows = add_token(pipe, "<concept>")
    assert len(rows) == len(encoders)
    latents = ctx.concept_latents(DIGIT, 2)
    ctx.disable_adapter()  # the token is learned on the base model
    expected = hand_flow_loss(pipe.transformer, pipe, encode_prompts(pipe, ["a photo of <concept>"],
                                                                     guidance_scale=ctx.guidance_scale), latents, 2, 5)
    ctx.enable_adapter()
    history = learn_token(ctx, latents, "a photo of <concept>", rows, steps=3, lr=0.1, batch_size=2, seed=5)
    assert history[0] == pytest.approx(expected, rel=1e-4)
    assert all(math.isfinite(h) for h in history)
    for encoder, old, (embedding, row) in zip(encoders, before, rows):
        after = encoder.get_input_embeddings().weight.detach()
        assert embedding is encoder.get_input_embeddings()
        assert torch.equal(after[:row], old[:row]) and not torch.allclose(after[row], old[:row].mean(0))
    t5_tokenizer = pipe.tokenizer_3 if flow_family[0] == "sd3" else pipe.tokenizer_2
    assert t5_tokenizer.convert_tokens_to_ids("<concept>") == rows[-1][1]
    assert rows[-1][1] in t5_tokenizer("a photo of <concept>").input_ids


def test_relearn_on_sd3_and_flux_fine_tunes_the_fused_transformer(flow_family):
    """Relearn fuses the adapter (step 0 is the adapted model's samples, no LoRA layer is left) and fine-tunes the
    transformer with the family's flow-matching loss (its first loss is the one written out by hand on the fused
    model and the benign samples); the transformer's output moves."""
    from peft.tuners.lora import LoraLayer

    from sa_peft.attacks.relearn import benign_data
    from sa_peft.merge import fuse_forget_loras

    reference, reference_names = flow_context(flow_family)
    latents, captions = benign_data(reference, ["a red car"], 2, None, "")
    fused = fuse_forget_loras(reference.pipe, reference_names)
    cond = encode_prompts(fused, captions, guidance_scale=reference.guidance_scale)
    expected = hand_flow_loss(fused.transformer, fused, cond, latents, 2, reference.seed + 5)
    probe_noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    probe = {"latents": latents, "timesteps": torch.full((2,), 500.0), "noise": probe_noise,
             "unet_kwargs": cond.unet_kwargs(torch.zeros(2, dtype=torch.long))}
    noise_fn = noise_scheduler_for(fused.scheduler)
    with torch.no_grad():
        before = per_sample_diffusion_loss(fused.transformer, noise_fn, **probe)

    ctx, names = flow_context(flow_family)
    adapted = sample(ctx, 2, prompt=DIGIT)
    result = run_attacks(ctx, ["relearn"], {"relearn": {"adapter_names": names, "prompts": ["a red car"],
                                                        "images_per_prompt": 2, "steps": 2, "lr": 1e-3,
                                                        "batch_size": 2}}, {})[0]["attacks"]["relearn"]
    _, adapted_score = ctx.concept_scores(adapted)
    curve = result["recovery_curve"]
    assert [c["step"] for c in curve] == [0, 1, 2]
    assert curve[0]["mean_concept_score"] == pytest.approx(adapted_score.double().mean().item(), abs=1e-5)
    assert result["loss_history"][0] == pytest.approx(expected, abs=1e-4, rel=1e-4)
    transformer = ctx.pipe.transformer
    assert not any(isinstance(m, LoraLayer) for m in transformer.modules())
    with torch.no_grad():
        after = per_sample_diffusion_loss(transformer, noise_fn, **probe)
    assert (after - before).abs().max() > 1e-4


def test_attack_refuses_an_unsupported_pipeline_naming_the_supported_ones(lora_file, tmp_path, capsys):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    assert cli.main(["attack", "--pretrained_model_name_or_path", str(folder), "--lora", str(lora_file),
                     "--forget_prompt", DIGIT, "--attack", "prompts", "--output_dir", str(tmp_path / "out"),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is a KandinskyPipeline" in err
    assert ("supported pipelines: StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, "
            "FluxPipeline") in err


def test_a_resolution_the_transformer_cannot_take_is_refused_by_flag(flow_family, tmp_path, capsys):
    _, _, folder, lora = flow_family
    assert cli.main(["attack", "--pretrained_model_name_or_path", str(folder), "--lora", str(lora), "--forget_prompt",
                     DIGIT, "--attack", "prompts", "--resolution", "20", "--output_dir", str(tmp_path / "out"),
                     "--device", "cpu"]) == 2
    assert "--resolution 20 is not a positive multiple of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
