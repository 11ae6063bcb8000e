"""`sa-peft merge`: fusing weighted forget LoRAs into the base and saving a pipeline folder and a single file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import add_forget_lora, add_text_encoder_lora
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from train_helpers import sample

from sa_peft import cli, ldm_layout
from sa_peft.adapter_io import component_configs, layer_scales, load_adapter_file, save_forget_lora
from sa_peft.lora import resolve_lora_targets
from sa_peft.merge import (
    SINGLE_FILE_FORMATS,
    SINGLE_FILE_KEY,
    merge_forget_loras,
    merge_info,
    save_merged_pipeline,
    save_single_file_checkpoint,
    stack_forget_loras,
)
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline, build_tiny_sdxl_pipeline

# fp32 merged (W + Σ w·ΔW) versus unfused (W x + Σ w·s·B A x) outputs (images in [0, 1], 3 steps) differ by
# rounding only: measured ≤ 3e-6 here and ≤ 5e-5 with weights up to ±2 on these random adapters.
TOLERANCE = 1e-4
WEIGHTS = [0.8, -0.5]
PROMPT = "a photo of a cat"


def make_adapters(builder, root, base_model):
    """Two adapters on different modules, with alpha ≠ rank and rsLoRA, saved as training runs save them."""
    folders = []
    for i, (target, kwargs) in enumerate((("all", {"rank": 2, "alpha": 1}), ("attn", {"rank": 4, "use_rslora": True}))):
        pipe = builder()
        add_forget_lora(pipe.unet, target, seed=i + 1, **kwargs)
        folder = root / f"lora{i}"
        save_forget_lora(folder, pipe.unet, {"base_model": str(base_model), "forget_prompts": [f"concept {i}"]})
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def sd_adapters(tiny_pipe_dir, tmp_path_factory):
    return make_adapters(build_tiny_pipeline, tmp_path_factory.mktemp("merge-sd"), tiny_pipe_dir)


def unfused(builder, adapters, weights):
    pipe = builder()
    stack_forget_loras(pipe, adapters, weights)
    return sample(pipe, PROMPT)


def test_fused_weights_are_base_plus_weighted_updates(sd_adapters):
    base = build_tiny_pipeline().unet
    merged = merge_forget_loras(build_tiny_pipeline(), sd_adapters, WEIGHTS).unet
    assert not any("lora" in k for k in merged.state_dict())
    expected = {name: module.weight.detach().clone() for name, module in base.named_modules() if hasattr(module, "weight")
                and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    for folder, weight in zip(sd_adapters, WEIGHTS):
        tensors, header = load_adapter_file(folder)
        for name, (rank, scale) in layer_scales(tensors, component_configs(header)).items():
            module = name.removeprefix("unet.")
            a = tensors[f"{name}.lora_A.weight"].flatten(1)
            b = tensors[f"{name}.lora_B.weight"].flatten(1)
            expected[module] += (weight * scale * (b @ a)).reshape(expected[module].shape)
    merged_modules = dict(merged.named_modules())
    for module, weight in expected.items():
        torch.testing.assert_close(merged_modules[module].weight, weight, rtol=1e-5, atol=1e-6, msg=module)


def test_merge_command_outputs_equal_the_unfused_pipeline(sd_adapters, tiny_pipe_dir, tmp_path):
    folder, single = tmp_path / "merged", tmp_path / "merged.safetensors"
    args = ["merge", "--lora", str(sd_adapters[0]), "--lora", str(sd_adapters[1] / "pytorch_lora_weights.safetensors"),
            "--lora_weight", str(WEIGHTS[0]), "--lora_weight", str(WEIGHTS[1]),
            "--output_dir", str(folder), "--single_file", str(single), "--device", "cpu"]
    assert cli.main(args) == 0  # the base model comes from the adapters' metadata
    expected = unfused(build_tiny_pipeline, sd_adapters, WEIGHTS)
    from_folder = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    from_folder.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample(from_folder, PROMPT), expected, atol=TOLERANCE)
    from_file = read_single_file(StableDiffusionPipeline, single, tiny_pipe_dir)
    np.testing.assert_allclose(sample(from_file, PROMPT), expected, atol=TOLERANCE)
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path))
    # The single file is safetensors in the original SD layout, with what was merged in its header.
    with safe_open(str(single), framework="pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert {".".join(k.split(".")[:2]) for k in keys} == {"model.diffusion_model", "first_stage_model.encoder",
                                                        "first_stage_model.decoder", "first_stage_model.quant_conv",
                                                        "first_stage_model.post_quant_conv", "cond_stage_model.transformer"}
    assert header[SINGLE_FILE_KEY] == SINGLE_FILE_FORMATS["StableDiffusionPipeline"] == "original-sd"
    info = json.loads(header["sa_peft"])
    assert info["base_model"] == str(tiny_pipe_dir) and [e["weight"] for e in info["loras"]] == WEIGHTS
    assert info["loras"][0]["sa_peft"]["forget_prompts"] == ["concept 0"]


def test_merge_info_names_the_files_weights_and_training_info(sd_adapters, tiny_pipe_dir):
    from sa_peft import __version__
    from sa_peft.adapter_io import read_adapter_metadata

    loras = [str(sd_adapters[0]), str(sd_adapters[1] / "pytorch_lora_weights.safetensors")]
    info = merge_info(tiny_pipe_dir, loras, WEIGHTS)
    assert info == {
        "kind": "merged",
        "base_model": str(tiny_pipe_dir),
        "loras": [{"file": "pytorch_lora_weights.safetensors", "weight": w, "sa_peft": read_adapter_metadata(p)["sa_peft"]}
                  for p, w in zip(loras, WEIGHTS)],
        "sa_peft_version": __version__,
    }
    assert [e["sa_peft"]["forget_prompts"] for e in info["loras"]] == [["concept 0"], ["concept 1"]]


def read_single_file(cls, path, config):
    """diffusers' own reader of original-layout checkpoints; ``config`` (a pipeline folder) keeps it offline."""
    pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl():
    # Encoders of different widths, as in SDXL: from_single_file tells them apart by width (see the builder).
    return build_tiny_sdxl_pipeline(text_encoder_2_hidden_size=48)


def test_sdxl_merge_single_file_round_trip(tmp_path):
    adapters = make_adapters(tiny_sdxl, tmp_path, "tiny-sdxl")
    merged = merge_forget_loras(tiny_sdxl(), adapters, WEIGHTS)
    expected = unfused(tiny_sdxl, adapters, WEIGHTS)
    np.testing.assert_allclose(sample(merged, PROMPT), expected, atol=TOLERANCE)
    tiny_sdxl().save_pretrained(tmp_path / "base")
    path = save_single_file_checkpoint(merged, tmp_path / "xl.safetensors")
    with safe_open(path, framework="pt") as f:
        prefixes = {k.split(".")[0] if not k.startswith("conditioner") else ".".join(k.split(".")[:4]) for k in f.keys()}  # noqa: SIM118
    assert prefixes == {"model", "first_stage_model", "conditioner.embedders.0.transformer", "conditioner.embedders.1.model"}
    loaded = read_single_file(StableDiffusionXLPipeline, path, tmp_path / "base")
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    np.testing.assert_allclose(sample(loaded, PROMPT), expected, atol=TOLERANCE)


def test_sd2_openclip_single_file_round_trip(tmp_path):
    """An SD 2.x-style pipeline (OpenCLIP text encoder: gelu) is written in OpenCLIP's layout and read back."""
    pipe = build_tiny_pipeline(prediction_type="v_prediction")
    pipe.text_encoder.config.hidden_act = "gelu"
    pipe.save_pretrained(tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    expected = sample(pipe, PROMPT)
    path = save_single_file_checkpoint(pipe, tmp_path / "sd2.safetensors")
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    loaded = read_single_file(StableDiffusionPipeline, path, tmp_path / "base")
    np.testing.assert_allclose(sample(loaded, PROMPT), expected, atol=TOLERANCE)


def test_half_precision_single_file(sd_adapters, tiny_pipe_dir, tmp_path):
    single = tmp_path / "half.safetensors"
    assert cli.main(["merge", "--lora", str(sd_adapters[0]), "--single_file", str(single), "--dtype", "float16",
                     "--device", "cpu"]) == 0
    with safe_open(str(single), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(tiny_pipe_dir), local_files_only=True,
                                                    torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    assert not (tmp_path / "merged").exists()


FULL_VAE = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, "latent_channels": 4}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}


@pytest.mark.parametrize("arch", ["sd1-ldm", "sdxl-sgm"])
def test_original_layout_keys_match_sd_mecha(arch):
    """Full-size SD 1.5 and SDXL (built on the meta device) in our original layout have exactly the keys and shapes
    of sd-mecha's independent model configs (every required key, nothing unknown)."""
    pytest.importorskip("sd_mecha")
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from sd_mecha.extensions import model_configs
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sa_peft.testing.unet_configs import SD15_UNET, SDXL_UNET

    xl = arch == "sdxl-sgm"
    with init_empty_weights():
        unet, vae = UNet2DConditionModel(**(SDXL_UNET if xl else SD15_UNET)), AutoencoderKL(**FULL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)) if xl else None
    ours = {**ldm_layout.unet_to_ldm(unet.state_dict(), unet.config), **ldm_layout.vae_to_ldm(vae.state_dict(), vae.config)}
    if xl:
        ours.update(ldm_layout.clip_to_ldm(text_encoder.state_dict(), ldm_layout.SDXL_CLIP_PREFIX))
        ours.update(ldm_layout.openclip_to_ldm(text_encoder_2.state_dict(), ldm_layout.SDXL_OPENCLIP_PREFIX))
    else:
        ours.update(ldm_layout.clip_to_ldm(text_encoder.state_dict(), ldm_layout.SD1_CLIP_PREFIX))
    components = model_configs.resolve(arch).components()
    reference = {}
    for name in ("clip_l", "clip_g", "vae", "diffuser"):
        if name in components:
            reference.update(components[name].keys())
    assert sorted(k for k in ours if k not in reference) == []
    assert sorted(k for k, meta in reference.items() if not meta.optional and k not in ours) == []
    assert {k: list(v.shape) for k, v in ours.items()} == {k: list(reference[k].shape) for k in ours}


def test_failed_save_leaves_no_output(tmp_path, monkeypatch):
    pipe = build_tiny_pipeline()

    def broken(folder, **kwargs):
        (open(os.path.join(folder, "partial"), "w")).close()
        raise OSError("disk full")

    monkeypatch.setattr(pipe, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_merged_pipeline(pipe, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_save_merged_pipeline_refuses_an_existing_folder_unless_overwrite(tmp_path, monkeypatch):
    pipe = build_tiny_pipeline()
    calls = []
    monkeypatch.setattr(pipe, "save_pretrained", lambda folder, **kwargs: (
        calls.append(kwargs), open(os.path.join(folder, f"model-{len(calls)}.safetensors"), "w").close()))
    out = tmp_path / "out"
    assert save_merged_pipeline(pipe, out) == os.fspath(out)
    with pytest.raises(FileExistsError, match="already exists; choose a new folder or pass `overwrite`"):
        save_merged_pipeline(pipe, out)
    assert os.listdir(out) == ["model-1.safetensors"]
    save_merged_pipeline(pipe, out, overwrite=True)
    assert os.listdir(out) == ["model-2.safetensors"]  # replaced whole; the refused call wrote nothing
    assert calls == [{"safe_serialization": True}] * 2


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "nothing to write: pass --output_dir"),
        (["--output_dir", "{tmp}/out", "--lora_weight", "1", "--lora_weight", "2"], "--lora_weight was given 2 times for 1 --lora"),
        (["--single_file", "{tmp}/out.ckpt"], "--single_file .* must end in .safetensors"),
        (["--output_dir", "{tmp}"], "--output_dir .* already exists; pass --overwrite"),
    ],
)
def test_merge_flag_errors(sd_adapters, tmp_path, capsys, extra, message):
    args = ["merge", "--lora", str(sd_adapters[0]), *[e.format(tmp=tmp_path) for e in extra]]
    assert cli.main(args) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_merge_refuses_pickles_unknown_bases_and_other_architectures(tmp_path, capsys):
    (tmp_path / "lora.ckpt").write_bytes(b"pickle")
    assert cli.main(["merge", "--lora", str(tmp_path / "lora.ckpt"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "not a .safetensors file" in capsys.readouterr().err
    # An adapter without sa-peft metadata: the base must be given.
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, "attn")
    pipe.save_lora_weights(tmp_path / "plain", unet_lora_layers=__import__("peft").utils.get_peft_model_state_dict(pipe.unet))
    assert cli.main(["merge", "--lora", str(tmp_path / "plain"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "pass --pretrained_model_name_or_path" in capsys.readouterr().err
    # An SDXL adapter on an SD pipeline.
    xl = build_tiny_sdxl_pipeline()
    add_forget_lora(xl.unet, "all")
    save_forget_lora(tmp_path / "xl", xl.unet, {"base_model": "tiny-sdxl"})
    with pytest.raises(ValueError, match="trained for 'tiny-sdxl'.*`pretrained_model_name_or_path`"):
        stack_forget_loras(build_tiny_pipeline(), [tmp_path / "xl"])


def test_stack_refuses_a_lora_whose_layers_only_partly_attach(tmp_path):
    """A LoRA for a deeper base (here: two resnets per block) whose extra layers have no module in this UNet.

    Every tensor has a shape this UNet could take, so diffusers loads the rest and only warns; the
    helper must count the attached layers and refuse the file.
    """
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, "all")
    save_forget_lora(tmp_path / "lora", pipe.unet, {"base_model": "deeper-base"})
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    tensors, header = load_adapter_file(path)
    moved = {k.replace("down_blocks.0.resnets.0.", "down_blocks.0.resnets.1."): v for k, v in tensors.items()}
    assert moved.keys() != tensors.keys()
    layers_moved = {k.split(".lora_")[0] for k in moved} - {k.split(".lora_")[0] for k in tensors}
    assert len(layers_moved) >= 2  # conv1, conv2, time_emb_proj of that resnet
    save_file(moved, path, metadata=header)
    expected = sum(1 for k in moved if k.endswith(".lora_A.weight"))
    message = f"only {expected - len(layers_moved)} of its {expected} LoRA layers match.*trained for 'deeper-base'"
    with pytest.raises(ValueError, match=message):
        stack_forget_loras(build_tiny_pipeline(), [path])
    with pytest.raises(ValueError, match=message):
        merge_forget_loras(build_tiny_pipeline(), [path])
    # the untouched file stacks
    save_forget_lora(tmp_path / "fits", pipe.unet, {"base_model": "tiny"})
    assert stack_forget_loras(build_tiny_pipeline(), [tmp_path / "fits"]) == ["forget_000_"]


def test_builtin_digits_single_file_round_trip(tmp_path):
    """The project's trained digits model (one layer per block, attention in every block) through the original layout."""
    from sa_peft.models import load_pipeline

    pipe = load_pipeline("builtin:digits")
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "base")
    expected = sample(pipe, "a handwritten digit seven")
    path = save_single_file_checkpoint(pipe, tmp_path / "digits.safetensors")
    loaded = read_single_file(StableDiffusionPipeline, path, tmp_path / "base")
    np.testing.assert_allclose(sample(loaded, "a handwritten digit seven"), expected, atol=TOLERANCE)


# --- the helpers one by one, without sampling (fast enough for mutation testing) ---------------------------------


def test_adapter_names_are_numbered_and_none_is_inside_another():
    from sa_peft.merge import adapter_names

    assert adapter_names(0) == []
    assert adapter_names(3) == ["forget_000_", "forget_001_", "forget_002_"]
    names = adapter_names(12)
    assert names[10] == "forget_010_" and len(set(names)) == 12
    assert not any(a in b for a in names for b in names if a != b)
    assert not any(name in key for name in names for key in ("lora_A", "lora_B", "lora_down", "lora_up", "alpha"))


def test_layer_counts_of_a_file_and_of_a_pipeline(tmp_path):
    from sa_peft.merge import _file_layer_count, _loaded_layer_count

    assert _file_layer_count({"a.lora_A.weight": 0, "a.lora_B.weight": 0, "b.lora_down.weight": 0, "b.lora_up.weight": 0,
                              "b.alpha": 0, "c.weight": 0, "lora_A.weight.d": 0}) == 2
    pipe = build_tiny_pipeline()
    names = add_forget_lora(pipe.unet, "attn")
    te_layers, _ = add_text_encoder_lora(pipe.text_encoder, 2, 2, seed=0)
    assert _loaded_layer_count(pipe, "default") == len(names) + len(te_layers) // 2
    assert _loaded_layer_count(pipe, "other") == 0
    unet_only = build_tiny_pipeline()
    add_forget_lora(unet_only.unet, "xattn")
    assert _loaded_layer_count(unet_only, "default") == len(resolve_lora_targets(unet_only.unet, "xattn"))
    xl = build_tiny_sdxl_pipeline()
    te2_layers, _ = add_text_encoder_lora(xl.text_encoder_2, 2, 2, seed=1)
    assert _loaded_layer_count(xl, "default") == len(te2_layers) // 2


def test_check_lora_weights_defaults_to_one_each_and_names_the_flags():
    from sa_peft.errors import InputError
    from sa_peft.merge import check_lora_weights

    assert check_lora_weights(["a", "b"], None) == [1.0, 1.0]
    assert check_lora_weights(["a", "b"], []) == [1.0, 1.0]
    weights = check_lora_weights(["a"], [2])
    assert weights == [2.0] and type(weights[0]) is float
    assert check_lora_weights(["a", "b"], (0.5, -1)) == [0.5, -1.0]
    with pytest.raises(InputError) as info:
        check_lora_weights([], [1.0])
    assert str(info.value) == "no adapter given: pass `lora` PATH (repeatable)"
    with pytest.raises(InputError) as info:
        check_lora_weights([], None, "forget")
    assert str(info.value) == "no adapter given: pass `forget` PATH (repeatable)"
    with pytest.raises(InputError) as info:
        check_lora_weights(["a", "b", "c"], [1.0, 2.0], "x")
    assert str(info.value) == ("`x_weight` was given 2 times for 3 `x` values; give one `x_weight` per `x`, in the same "
                               "order (or none for 1.0 each)")


def layer_scalings(pipe, name):
    from peft.tuners.lora import LoraLayer

    return {module_name: layer.scaling[name] for module_name, layer in pipe.unet.named_modules()
            if isinstance(layer, LoraLayer) and name in layer.scaling}


def test_stack_loads_each_file_as_its_own_adapter_at_its_weight(sd_adapters, tmp_path, monkeypatch):
    pipe = build_tiny_pipeline()
    # As paths, one a folder and one a file relative to the working directory.
    monkeypatch.chdir(sd_adapters[1])
    names = stack_forget_loras(pipe, [sd_adapters[0], "pytorch_lora_weights.safetensors"], WEIGHTS)
    assert names == ["forget_000_", "forget_001_"]
    assert pipe.get_list_adapters() == {"unet": names}
    assert sorted(pipe.get_active_adapters()) == names
    modules = dict(pipe.unet.named_modules())
    for name, folder, weight in zip(names, sd_adapters, WEIGHTS):
        tensors, header = load_adapter_file(folder)
        scales = layer_scales(tensors, component_configs(header))  # alpha and rsLoRA from the file's header
        assert layer_scalings(pipe, name) == pytest.approx({k.removeprefix("unet."): weight * s for k, (_, s) in scales.items()})
        for key in scales:
            module = modules[key.removeprefix("unet.")]
            assert torch.equal(module.lora_A[name].weight, tensors[f"{key}.lora_A.weight"])
            assert torch.equal(module.lora_B[name].weight, tensors[f"{key}.lora_B.weight"])


def test_stack_defaults_to_weight_one_and_names_its_parameter(sd_adapters, tmp_path):
    pipe = build_tiny_pipeline()
    assert stack_forget_loras(pipe, [sd_adapters[1]]) == ["forget_000_"]
    tensors, header = load_adapter_file(sd_adapters[1])
    assert layer_scalings(pipe, "forget_000_") == pytest.approx(
        {k.removeprefix("unet."): s for k, (_, s) in layer_scales(tensors, component_configs(header)).items()})
    with pytest.raises(ValueError) as info:
        stack_forget_loras(build_tiny_pipeline(), sd_adapters, [1.0], parameter="forget")
    assert str(info.value).startswith("`forget_weight` was given 1 times for 2 `forget` values")
    with pytest.raises(FileNotFoundError) as info:
        stack_forget_loras(build_tiny_pipeline(), [tmp_path / "gone"], parameter="forget")
    assert str(info.value) == f"`forget` {str(tmp_path / 'gone')!r}: no such file or folder"
    with pytest.raises(FileNotFoundError) as info:
        stack_forget_loras(build_tiny_pipeline(), [tmp_path / "gone"])
    assert str(info.value) == f"`lora` {str(tmp_path / 'gone')!r}: no such file or folder"
    with pytest.raises(ValueError, match="^`lora_weight` was given 2 times for 1 `lora` values"):
        stack_forget_loras(build_tiny_pipeline(), [sd_adapters[0]], [1.0, 1.0])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"^`forget` '.*junk\.safetensors' is not a valid safetensors file"):
        stack_forget_loras(build_tiny_pipeline(), [tmp_path / "junk.safetensors"], parameter="forget")


@pytest.mark.parametrize("error", [ValueError, RuntimeError, KeyError])
def test_stack_turns_a_load_failure_into_a_sentence_naming_the_base(sd_adapters, tiny_pipe_dir, tmp_path, monkeypatch,
                                                                    error):
    def failing(*args, **kwargs):
        raise error("size mismatch\n  for   conv_in:\t" + "x" * 400)

    collapsed = " ".join(str(error("size mismatch\n  for   conv_in:\t" + "x" * 400)).split())[:300]
    assert len(collapsed) == 300 and "  " not in collapsed
    for path, trained_for in ((str(sd_adapters[0] / "pytorch_lora_weights.safetensors"),
                               f" (it was trained for {str(tiny_pipe_dir)!r})"), (plain_adapter(tmp_path), "")):
        pipe = build_tiny_pipeline()
        monkeypatch.setattr(pipe, "load_lora_weights", failing)
        with pytest.raises(ValueError) as info:
            stack_forget_loras(pipe, [os.path.dirname(path)], parameter="forget")
        assert str(info.value) == (f"`forget` {path!r} does not fit this StableDiffusionPipeline{trained_for} ({collapsed}); "
                                   "pass the base model it was trained on with `pretrained_model_name_or_path`")
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_stack_lets_other_load_errors_through(sd_adapters, monkeypatch):
    pipe = build_tiny_pipeline()

    def failing(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(pipe, "load_lora_weights", failing)
    with pytest.raises(OSError, match="^disk gone$"):
        stack_forget_loras(pipe, [sd_adapters[0]])


def test_stack_counts_the_layers_that_attached(sd_adapters, tiny_pipe_dir, tmp_path, monkeypatch):
    """diffusers only warns when layers find no module; here none attach (a loader that loads nothing)."""
    expected = sum(1 for k in load_adapter_file(sd_adapters[0])[0] if k.endswith(".lora_A.weight"))
    for path, trained_for in ((str(sd_adapters[0] / "pytorch_lora_weights.safetensors"),
                               f" (it was trained for {str(tiny_pipe_dir)!r})"), (plain_adapter(tmp_path, "all"), "")):
        pipe = build_tiny_pipeline()
        monkeypatch.setattr(pipe, "load_lora_weights", lambda *args, **kwargs: None)
        with pytest.raises(ValueError) as info:
            stack_forget_loras(pipe, [path], parameter="forget")
        assert str(info.value) == (f"`forget` {path!r}: only 0 of its {expected} LoRA layers match this "
                                   f"StableDiffusionPipeline{trained_for}; pass the base model it was trained on with "
                                   "`pretrained_model_name_or_path`")


def plain_adapter(folder, target="attn"):
    """A diffusers-saved adapter without sa-peft's header (no base model named)."""
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, target)
    pipe.save_lora_weights(folder, unet_lora_layers=__import__("peft").utils.get_peft_model_state_dict(pipe.unet))
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


def lora_deltas(folder, weight):
    """``{module: weight · scale · B A}`` of an adapter file, by hand."""
    tensors, header = load_adapter_file(folder)
    return {name.removeprefix("unet."): weight * scale * (tensors[f"{name}.lora_B.weight"].flatten(1)
                                                         @ tensors[f"{name}.lora_A.weight"].flatten(1))
            for name, (_, scale) in layer_scales(tensors, component_configs(header)).items()}


def test_fuse_folds_only_the_named_adapters_into_the_weights_and_removes_the_lora_layers(sd_adapters):
    from sa_peft.merge import fuse_forget_loras

    base = dict(build_tiny_pipeline().unet.named_modules())
    pipe = build_tiny_pipeline()
    names = stack_forget_loras(pipe, sd_adapters, WEIGHTS)
    assert fuse_forget_loras(pipe, names[1:]) is pipe
    assert pipe.get_list_adapters() == {} and not any("lora" in k for k in pipe.unet.state_dict())
    deltas = lora_deltas(sd_adapters[1], WEIGHTS[1])
    modules = dict(pipe.unet.named_modules())
    for name, module in modules.items():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            expected = base[name].weight + deltas[name].reshape(base[name].weight.shape) if name in deltas else base[name].weight
            torch.testing.assert_close(module.weight, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_merge_returns_the_fused_pipeline_with_default_weights(sd_adapters):
    base = dict(build_tiny_pipeline().unet.named_modules())
    pipe = build_tiny_pipeline()
    assert merge_forget_loras(pipe, [sd_adapters[0]]) is pipe
    deltas = lora_deltas(sd_adapters[0], 1.0)
    for name, module in pipe.unet.named_modules():
        if name in deltas:
            torch.testing.assert_close(module.weight, base[name].weight + deltas[name].reshape(module.weight.shape),
                                       rtol=1e-5, atol=1e-6, msg=name)


def by_hand_original_layout(pipe, openclip=False):
    def weights(module):
        return dict(module.state_dict())

    out = {**ldm_layout.unet_to_ldm(weights(pipe.unet), pipe.unet.config),
           **ldm_layout.vae_to_ldm(weights(pipe.vae), pipe.vae.config)}
    if hasattr(pipe, "text_encoder_2"):
        out.update(ldm_layout.clip_to_ldm(weights(pipe.text_encoder), "conditioner.embedders.0.transformer."))
        out.update(ldm_layout.openclip_to_ldm(weights(pipe.text_encoder_2), "conditioner.embedders.1.model."))
    elif openclip:
        out.update(ldm_layout.openclip_to_ldm(weights(pipe.text_encoder), "cond_stage_model.model."))
    else:
        out.update(ldm_layout.clip_to_ldm(weights(pipe.text_encoder), "cond_stage_model.transformer."))
    return out


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_original_layout_state_dict_is_each_component_under_its_prefix(kind):
    from sa_peft.merge import original_layout_state_dict

    pipe = build_tiny_sdxl_pipeline() if kind == "sdxl" else build_tiny_pipeline()
    if kind == "sd2":
        pipe.text_encoder.config.hidden_act = "gelu"  # what tells OpenCLIP (SD 2.x) from CLIP
    expected = by_hand_original_layout(pipe, openclip=kind == "sd2")
    out = original_layout_state_dict(pipe)
    assert sorted(out) == sorted(expected)
    assert all(torch.equal(out[k], expected[k]) and out[k].is_contiguous() for k in expected)
    assert {k.split(".")[0] for k in out} == ({"model", "first_stage_model", "conditioner"} if kind == "sdxl" else
                                              {"model", "first_stage_model", "cond_stage_model"})
    assert any(k.startswith({"sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model.",
                             "sdxl": "conditioner.embedders.1.model."}[kind]) for k in out)


def test_single_files_end_in_safetensors(tmp_path):
    from sa_peft.errors import InputError

    with pytest.raises(InputError) as info:
        save_single_file_checkpoint(build_tiny_pipeline(), tmp_path / "model.ckpt")
    assert str(info.value) == f"`single_file` {str(tmp_path / 'model.ckpt')!r} must end in .safetensors"
    assert os.listdir(tmp_path) == []


def test_single_file_holds_the_original_layout_and_its_header(tmp_path):
    from safetensors.torch import load_file

    pipe = build_tiny_pipeline()
    path = save_single_file_checkpoint(pipe, tmp_path / "m.safetensors", {"b": 1, "a": [2]})
    assert path == str(tmp_path / "m.safetensors") and os.listdir(tmp_path) == ["m.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    tensors = load_file(path)
    expected = by_hand_original_layout(pipe)
    assert sorted(tensors) == sorted(expected) and all(torch.equal(tensors[k], expected[k]) for k in expected)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {SINGLE_FILE_KEY: "original-sd", "pipeline_class": "StableDiffusionPipeline",
                                "sa_peft": '{"a": [2], "b": 1}'}
    xl = save_single_file_checkpoint(build_tiny_sdxl_pipeline(), str(tmp_path / "xl.safetensors"))
    with safe_open(xl, framework="pt") as f:
        assert f.metadata() == {SINGLE_FILE_KEY: "original-sd", "pipeline_class": "StableDiffusionXLPipeline",
                                "sa_peft": "{}"}


def test_stack_names_its_parameter_for_a_damaged_header(sd_adapters, tmp_path):
    tensors, header = load_adapter_file(sd_adapters[0])
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata={**header, "sa_peft": "{not json"})
    with pytest.raises(ValueError) as info:
        stack_forget_loras(build_tiny_pipeline(), [path], parameter="forget")
    assert str(info.value) == f"`forget` {str(path)!r}: the 'sa_peft' header entry is not valid JSON; the file is damaged"


def test_stack_takes_each_named_file_of_a_shared_folder(sd_adapters, tmp_path):
    import shutil

    for i, name in enumerate(("b.safetensors", "a.safetensors")):
        shutil.copy(sd_adapters[i] / "pytorch_lora_weights.safetensors", tmp_path / name)
    pipe = build_tiny_pipeline()
    names = stack_forget_loras(pipe, [tmp_path / "b.safetensors", tmp_path / "a.safetensors"])
    modules = dict(pipe.unet.named_modules())
    for name, folder in zip(names, sd_adapters):
        tensors = load_adapter_file(folder)[0]
        assert {k for k, m in modules.items() if name in getattr(m, "lora_A", {})} == {
            k.removeprefix("unet.").removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
        for key, value in tensors.items():
            if key.endswith(".lora_A.weight"):
                assert torch.equal(modules[key.removeprefix("unet.").removesuffix(".lora_A.weight")].lora_A[name].weight, value)
