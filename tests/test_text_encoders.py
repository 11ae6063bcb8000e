"""``--train_text_encoder`` on every family: the conditioning re-encoded through the trained CLIP encoders is the
pipeline's own ``encode_prompt`` with the same LoRA, T5 never runs, and gradients reach every trained encoder."""

from __future__ import annotations

import pytest
import torch
from peft import inject_adapter_in_model

from sa_peft.conditioning import encode_prompts
from sa_peft.lora import make_lora_config
from sa_peft.testing.tiny_pipeline import (
    build_tiny_flux_pipeline,
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
)
from sa_peft.text_encoders import (
    TEXT_ENCODER_TARGETS,
    TrainedPromptEncoder,
    sampling_embeddings,
    trainable_text_encoders,
)

PROMPTS = ["brad pitt", "a photo of a cat", ""]
BUILDERS = {"sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline,
            "flux": lambda: build_tiny_flux_pipeline(guidance_embeds=True)}
TRAINED = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"),
           "sd3": ("text_encoder", "text_encoder_2"), "flux": ("text_encoder",)}


def _random_lora(encoder, seed):
    inject_adapter_in_model(make_lora_config(TEXT_ENCODER_TARGETS, 2, 2, False), encoder, "default")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def _no_t5(pipe):
    """T5 (SD3's text_encoder_3, FLUX's text_encoder_2) may not run: its states come from the frozen conditioning."""
    t5 = getattr(pipe, "text_encoder_3", None) if hasattr(pipe, "text_encoder_3") else None
    if type(pipe).__name__ == "FluxPipeline":
        t5 = pipe.text_encoder_2
    if t5 is not None:
        t5.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("T5 ran"))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_trained_conditioning_is_the_pipelines_encode_prompt_with_the_same_lora(family):
    pipe = BUILDERS[family]()
    assert trainable_text_encoders(pipe) == TRAINED[family]
    guidance = 3.5 if family == "flux" else None
    frozen = encode_prompts(pipe, PROMPTS, guidance_scale=guidance)
    for i, name in enumerate(TRAINED[family]):
        _random_lora(getattr(pipe, name), seed=i)
    expected = encode_prompts(pipe, PROMPTS, guidance_scale=guidance)  # the pipeline's encode_prompt, LoRA on
    assert not torch.allclose(expected.text_embeds if family == "flux" else expected.encoder_hidden_states,
                              frozen.text_embeds if family == "flux" else frozen.encoder_hidden_states), "LoRA is a no-op"
    _no_t5(pipe)
    encoder = TrainedPromptEncoder(pipe, frozen)
    got = encoder({name: getattr(pipe, name) for name in TRAINED[family]})
    assert got.prompts == expected.prompts
    torch.testing.assert_close(got.encoder_hidden_states, expected.encoder_hidden_states)
    for field in ("text_embeds", "time_ids", "text_ids"):
        a, b = getattr(got, field), getattr(expected, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a, b)
    assert got.guidance == expected.guidance
    # Gradients reach every trained encoder's LoRA (not all layers: SDXL's first CLIP gives only its penultimate
    # layer's states, so its last layer's LoRA is not used, as in the pipeline).
    loss = got.encoder_hidden_states.square().mean() + (0 if got.text_embeds is None else got.text_embeds.square().mean())
    loss.backward()
    for name in TRAINED[family]:
        grads = [p.grad for n, p in getattr(pipe, name).named_parameters() if "lora_B" in n]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_sampling_embeddings_are_the_rows_of_the_prompt_and_the_negative():
    pipe = build_tiny_sd3_pipeline()
    cond = encode_prompts(pipe, PROMPTS)
    embeds = sampling_embeddings(cond, ["a photo of a cat"], negative="")
    entry = embeds["a photo of a cat"]
    assert set(entry) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                          "negative_pooled_prompt_embeds"}
    torch.testing.assert_close(entry["prompt_embeds"], cond.encoder_hidden_states[1:2])
    torch.testing.assert_close(entry["negative_pooled_prompt_embeds"], cond.text_embeds[2:3])
    assert set(sampling_embeddings(cond, ["brad pitt"], negative=None)["brad pitt"]) == {"prompt_embeds",
                                                                                           "pooled_prompt_embeds"}


@pytest.mark.slow  # three whole tiny runs (~15 s each)
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_training_the_text_encoders_through_the_script_reloads_identically(family, replay_file, tmp_path, monkeypatch):
    """--train_text_encoder on SDXL, SD3 and FLUX: each CLIP encoder's LoRA is saved under its pipeline name and
    checkpointed, a fresh pipeline loads the file to the same images (without the encoders' LoRA they differ), and
    T5 never runs once training starts (validations included)."""
    import numpy as np
    from safetensors.torch import load_file
    from train_helpers import load_train_module, reload_and_compare, run_training, sample

    model_dir = tmp_path / "model"
    BUILDERS[family]().save_pretrained(model_dir)
    train = load_train_module()
    real_prepare, t5_forward = train.prepare_training, {}

    def prepare_then_forbid_t5(config, accelerator, pipe, *args):
        run = real_prepare(config, accelerator, pipe, *args)
        t5 = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}.get(family)
        if t5 is not None:
            t5_forward[t5] = getattr(pipe, t5).forward
            _no_t5(pipe)
        return run

    monkeypatch.setattr(train, "prepare_training", prepare_then_forbid_t5)
    side = ["--resolution", "32", "--generation_guidance_scale", "3.5"] if family == "flux" else []
    out = tmp_path / "run"
    pipe = run_training(train, model_dir, out, replay_file, "--forget_prompt", "brad pitt", "--surrogate_prompt",
                        "a middle aged man", "--train_text_encoder", "--checkpointing_steps", "2",
                        "--validation_steps", "2", *side)
    for name, forward in t5_forward.items():
        getattr(pipe, name).forward = forward
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    for name in TRAINED[family]:
        assert any(k.startswith(f"{name}.") for k in saved), name
        assert (out / "checkpoint-2" / f"lora_{name}.safetensors").exists()
    kw = {"height": 32, "width": 32} if family == "flux" else {}
    if family == "flux":
        reload = type(pipe).from_pretrained(str(model_dir), use_safetensors=True)
        reload.set_progress_bar_config(disable=True)
        reload.load_lora_weights(str(out))
        trained = sample(pipe, **kw)
        np.testing.assert_array_equal(sample(reload, **kw), trained)
    else:
        _, trained = reload_and_compare(model_dir, out, pipe)
    denoiser_only = type(pipe).from_pretrained(str(model_dir), use_safetensors=True)
    denoiser_only.set_progress_bar_config(disable=True)
    prefix = "unet." if family == "sdxl" else "transformer."
    denoiser_only.load_lora_weights({k: v for k, v in saved.items() if k.startswith(prefix)})
    assert np.abs(sample(denoiser_only, **kw) - trained).max() > 1e-4
