"""`sa-peft merge --single_file` on SD3 and FLUX: the original (Stability AI / Black Forest Labs) checkpoint layouts,
checked against diffusers' own readers, never a reader of ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import add_forget_lora, add_text_encoder_lora
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import sample

from sa_peft import cli
from sa_peft.adapter_io import save_forget_lora
from sa_peft.commands.inspect import describe
from sa_peft.errors import InputError
from sa_peft.merge import (
    SINGLE_FILE_KEY,
    original_layout_state_dict,
    save_single_file_checkpoint,
    single_file_caveats,
    stack_forget_loras,
)
from sa_peft.testing.tiny_pipeline import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from sa_peft.transformer_layout import SD3_T5_PREFIX, flux_transformer_to_original, sd3_transformer_to_original


def random_state(model) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dual_attention_layers", [(), (0,)])
def test_sd3_layout_is_what_diffusers_reads(dual_attention_layers):
    """Random weights written in SD3's layout and read by diffusers' converter come back exactly, key for key:
    the q/k/v stacking, the last block's text-stream modulation and the final layer's (shift, scale) order,
    and SD3.5's dual-attention block (``attn2``)."""
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8,
                                  dual_attention_layers=dual_attention_layers, qk_norm="rms_norm")
    state = random_state(model)
    original = sd3_transformer_to_original(state)
    assert all(k.startswith("model.diffusion_model.") for k in original)
    assert ("model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in original) == bool(dual_attention_layers)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_flux_layout_is_what_diffusers_reads_at_flux1_width():
    """diffusers' FLUX reader assumes FLUX.1's width (3072, MLP 12288) when it splits a single block's ``linear1``,
    so the check is at that width: the model is built on the meta device and each weight is a random tensor of its
    real first dimension (what the stacking and the swaps act on) and two columns."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, in_channels=4, joint_attention_dim=8,
                                       pooled_projection_dim=8, guidance_embeds=True)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn((v.shape[0], 2) if v.ndim > 1 else v.shape, generator=gen)
             for k, v in model.state_dict().items()}
    original = flux_transformer_to_original(state)
    assert "double_blocks.1.img_attn.norm.query_norm.scale" in original and "single_blocks.1.linear1.weight" in original
    assert "guidance_in.in_layer.weight" in original
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_a_weight_the_layout_has_no_name_for_is_an_error_not_dropped():
    state = random_state(build_tiny_flux_pipeline().transformer)
    flux_transformer_to_original(state)
    extra = {f"extra_{i}.weight": torch.zeros(1) for i in range(6)}
    with pytest.raises(InputError) as info:
        flux_transformer_to_original({**state, **extra})
    # The first five, sorted, so that a model with thousands of unknown weights still gets a readable sentence.
    assert str(info.value) == ("the FLUX transformer has weights the original checkpoint layout has no name for "
                               "(extra_0.weight, extra_1.weight, extra_2.weight, extra_3.weight, extra_4.weight); save "
                               "it as a diffusers pipeline folder (save_pretrained) instead")
    del state["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(InputError) as info:
        flux_transformer_to_original(state)
    assert str(info.value) == ("FLUX double_blocks.0.img_attn.qkv.weight: the original layout stacks "
                               "transformer_blocks.0.attn.to_q, transformer_blocks.0.attn.to_k, "
                               "transformer_blocks.0.attn.to_v, and this model has only some of them")
    sd3 = random_state(build_tiny_sd3_pipeline().transformer)
    with pytest.raises(InputError, match=r"^the SD3 transformer has weights the original checkpoint layout has no "
                                         r"name for \(extra_0.weight\)"):
        sd3_transformer_to_original({**sd3, "extra_0.weight": torch.zeros(1)})


def tiny_sd3():
    """CLIP-G narrower than CLIP-L (diffusers tells them apart by width), CLIP-L's projection the identity (what
    diffusers and ComfyUI read it as: the original layout has none)."""
    pipe = build_tiny_sd3_pipeline(text_encoder_2_hidden_size=24)
    with torch.no_grad():
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(pipe.text_encoder.config.hidden_size))
    return pipe


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3-base")
    tiny_sd3().save_pretrained(folder)
    return folder


def sd3_sample(pipe):
    return sample(pipe, "a photo of a cat", steps=2, height=32, width=32)


def test_sd3_merge_single_file_reads_back_as_the_stacked_lora(sd3_base, tmp_path, capsys):
    """A transformer + CLIP-L forget LoRA at weight 0.7, merged into one SD3 file: diffusers' ``from_single_file``
    draws what the base with the LoRA stacked draws, and not what the base draws."""
    pipe = tiny_sd3()
    add_forget_lora(pipe.transformer, seed=2)
    layers, config = add_text_encoder_lora(pipe.text_encoder, rank=2, alpha=2.0, seed=4)
    lora = save_forget_lora(tmp_path / "lora", pipe.transformer, {"base_model": str(sd3_base)},
                            text_encoder_lora_layers=layers, text_encoder_adapter_metadata=config)
    single = tmp_path / "sd3.safetensors"
    assert cli.main(["merge", "--lora", str(lora), "--lora_weight", "0.7", "--single_file", str(single),
                     "--device", "cpu"]) == 0
    assert "NOTE" not in capsys.readouterr().out  # nothing the file cannot carry
    with safe_open(str(single), framework="pt") as f:
        assert f.metadata()[SINGLE_FILE_KEY] == "original-sd3"
        prefixes = {".".join(k.split(".")[:2]) for k in f.keys()}  # noqa: SIM118
    assert prefixes == {"model.diffusion_model", "first_stage_model.encoder", "first_stage_model.decoder",
                        "text_encoders.clip_l", "text_encoders.clip_g", "text_encoders.t5xxl"}
    assert describe(single)["format"] == "merged pipeline checkpoint (original SD3 layout)"
    loaded = StableDiffusion3Pipeline.from_single_file(str(single), config=str(sd3_base), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    stacked = StableDiffusion3Pipeline.from_pretrained(sd3_base)
    stacked.set_progress_bar_config(disable=True)
    plain = sd3_sample(stacked)
    stack_forget_loras(stacked, [lora], [0.7])
    expected = sd3_sample(stacked)
    np.testing.assert_allclose(sd3_sample(loaded), expected, atol=1e-4)
    assert np.abs(expected - plain).max() > 1e-3


def test_sd3_single_file_carries_its_own_t5(sd3_base, tmp_path):
    """The T5 in the file is the one read (the base folder's differs), and its tied embedding is written."""
    pipe = tiny_sd3()
    with torch.no_grad():
        pipe.text_encoder_3.shared.weight.add_(1.0)
    path = save_single_file_checkpoint(pipe, tmp_path / "t5.safetensors")
    assert torch.equal(load_file(path)[SD3_T5_PREFIX + "encoder.embed_tokens.weight"], pipe.text_encoder_3.shared.weight)
    loaded = StableDiffusion3Pipeline.from_single_file(path, config=str(sd3_base), local_files_only=True)
    assert torch.equal(loaded.text_encoder_3.shared.weight, pipe.text_encoder_3.shared.weight)


def test_flux_merge_single_file_is_the_merged_transformer_alone(tmp_path):
    """FLUX's file is the transformer in Black Forest Labs' layout (what ComfyUI's Load Diffusion Model reads), made
    from the merged weights; a LoRA on the text encoder, which that file cannot hold, is refused before any merge."""
    base = tmp_path / "flux"
    build_tiny_flux_pipeline(guidance_embeds=True).save_pretrained(base)
    pipe = build_tiny_flux_pipeline(guidance_embeds=True)
    add_forget_lora(pipe.transformer, seed=1)
    lora = save_forget_lora(tmp_path / "lora", pipe.transformer, {"base_model": str(base)})
    single = tmp_path / "flux.safetensors"
    assert cli.main(["merge", "--lora", str(lora), "--output_dir", str(tmp_path / "merged"), "--single_file",
                     str(single), "--device", "cpu"]) == 0
    written = load_file(single)
    merged = FluxTransformer2DModel.from_pretrained(tmp_path / "merged", subfolder="transformer")
    expected = flux_transformer_to_original(merged.state_dict())
    assert sorted(written) == sorted(expected) and all(torch.equal(written[k], expected[k]) for k in expected)
    unmerged = flux_transformer_to_original(build_tiny_flux_pipeline(guidance_embeds=True).transformer.state_dict())
    assert not torch.equal(written["double_blocks.0.img_attn.qkv.weight"], unmerged["double_blocks.0.img_attn.qkv.weight"])
    with safe_open(str(single), framework="pt") as f:
        assert f.metadata()[SINGLE_FILE_KEY] == "original-flux-transformer"
    assert describe(single)["format"] == "merged pipeline checkpoint (original FLUX transformer layout)"

    layers, config = add_text_encoder_lora(pipe.text_encoder, rank=2, alpha=2.0, seed=3)
    with_te = save_forget_lora(tmp_path / "lora-te", pipe.transformer, {"base_model": str(base)},
                               text_encoder_lora_layers=layers, text_encoder_adapter_metadata=config)
    refused = tmp_path / "refused.safetensors"
    args = cli.build_parser().parse_args(["merge", "--lora", str(with_te), "--single_file", str(refused)])
    with pytest.raises(InputError, match=r"adapts FLUX's text encoder, and a FLUX --single_file holds the transformer "
                                         r"only; pass --output_dir to save the whole merged pipeline"):
        args.func(args)
    assert not refused.exists()


def test_original_layout_refuses_a_pipeline_it_does_not_know():
    class KandinskyPipeline:
        pass

    with pytest.raises(InputError, match=r"^single-file checkpoints support StableDiffusionPipeline, "
                                         r"StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline, not "
                                         r"KandinskyPipeline$"):
        original_layout_state_dict(KandinskyPipeline())


def test_what_the_original_layout_cannot_carry_is_said():
    """build_tiny_sd3_pipeline's defaults (as builtin:digits-sd3): a random CLIP-L projection and two encoders of one
    width. Both are named; the round-trip test's pipeline (identity, 32 and 24 wide) has neither."""
    caveats = single_file_caveats(build_tiny_sd3_pipeline())
    assert len(caveats) == 2
    assert caveats[0].startswith("the CLIP-L text projection is not the identity")
    assert caveats[1].startswith("both CLIP encoders are 32 wide: diffusers' from_single_file tells them apart")
    assert single_file_caveats(tiny_sd3()) == []
    assert single_file_caveats(build_tiny_flux_pipeline()) == []
