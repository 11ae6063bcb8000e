"""`sa-peft export` (kohya keys, read back by diffusers), `sa-peft inspect`, and sharing on the hub offline."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from conftest import add_forget_lora, add_text_encoder_lora
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import load_train_module, run_training, sample

from sa_peft import cli
from sa_peft.adapter_io import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, export_kohya, save_forget_lora
from sa_peft.lora import iter_adapted_layers
from sa_peft.merge import save_single_file_checkpoint
from sa_peft.model_card import write_model_card
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline, build_tiny_sdxl_pipeline

PROMPT = "a photo of a cat"
LORA_SETTINGS = [{"rank": 4, "alpha": 2, "use_rslora": True}, {"rank": 3, "alpha": 6}]


def kohya_unet_name(module, xl, unet):
    """The name kohya-ss gives a UNet module: diffusers' path for SD 1.x, the original (sgm) path for SDXL."""
    from sa_peft.ldm_layout import UnetLayout, unet_module_to_ldm

    return "lora_unet_" + (unet_module_to_ldm(module, UnetLayout.of(unet)) if xl else module).replace(".", "_")


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
@pytest.mark.parametrize("settings", LORA_SETTINGS, ids=["rslora-alpha2-r4", "alpha6-r3"])
def test_kohya_export_from_file_reads_back_identically(xl, settings, tmp_path):
    def builder():
        return build_tiny_sdxl_pipeline() if xl else build_tiny_pipeline()

    pipe = builder()
    add_forget_lora(pipe.unet, "all", **settings)
    te_layers, te_config = add_text_encoder_lora(pipe.text_encoder, 2, 3, seed=5)
    te2 = dict(zip(("text_encoder_2_lora_layers", "text_encoder_2_adapter_metadata"),
                   add_text_encoder_lora(pipe.text_encoder_2, 3, 1, seed=6))) if xl else {}
    expected = sample(pipe, PROMPT)
    lora_file = save_forget_lora(tmp_path, pipe.unet, {"base_model": "tiny"}, text_encoder_lora_layers=te_layers,
                                 text_encoder_adapter_metadata=te_config, **te2)
    kohya_file = export_kohya(lora_file, tmp_path / KOHYA_WEIGHT_NAME)
    kohya = load_file(kohya_file)
    layers = list(iter_adapted_layers(pipe.unet))
    te_prefixes = ("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_") if xl else \
        ("lora_te_text_model_encoder_layers_",)
    te_keys = {k for k in kohya if k.startswith("lora_te")}
    assert {k.split("layers_")[0] + "layers_" for k in te_keys} == set(te_prefixes)
    te_count = len(te_layers) + len(te2.get("text_encoder_2_lora_layers", {}))  # lora_A + lora_B per layer
    assert len(te_keys) == 3 * te_count // 2 and len(kohya) == 3 * len(layers) + len(te_keys)
    if xl:  # kohya's SDXL UNet names (sgm), among them the upsampler A1111 cannot find under diffusers' name
        assert "lora_unet_output_blocks_1_2_conv.alpha" in kohya and "lora_unet_label_emb_0_0.alpha" in kohya
        assert not any("up_blocks" in k or "down_blocks" in k for k in kohya)
    for layer in layers:  # kohya readers scale by alpha / rank, so alpha = scale · rank
        alpha = kohya[kohya_unet_name(layer.name, xl, pipe.unet) + ".alpha"]
        assert float(alpha) == pytest.approx(layer.scale * settings["rank"], rel=1e-6)
    assert float(kohya[te_prefixes[0] + "0_self_attn_q_proj.alpha"]) == pytest.approx(3.0)
    fresh = builder()
    fresh.load_lora_weights(str(tmp_path), weight_name=KOHYA_WEIGHT_NAME)
    np.testing.assert_allclose(sample(fresh, PROMPT), expected, atol=1e-6)
    with safe_open(str(kohya_file), framework="pt") as f:
        assert json.loads(f.metadata()["sa_peft"])["base_model"] == "tiny"


def test_export_command(tmp_path, capsys):
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, "attn", rank=2, alpha=1)
    save_forget_lora(tmp_path, pipe.unet, {})
    assert cli.main(["export", str(tmp_path), "--format", "kohya"]) == 0
    default = tmp_path / KOHYA_WEIGHT_NAME  # pytorch_lora_weights.safetensors -> pytorch_lora_weights_kohya.safetensors
    assert default.exists() and "weight_name=" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / LORA_WEIGHT_NAME)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / LORA_WEIGHT_NAME), "--overwrite"]) == 0
    assert cli.main(["export", str(tmp_path / LORA_WEIGHT_NAME), "--output", str(tmp_path / LORA_WEIGHT_NAME),
                     "--overwrite"]) == 2
    assert "is the input path" in capsys.readouterr().err
    (tmp_path / "adapter.bin").write_bytes(b"pickle")
    assert cli.main(["export", str(tmp_path / "adapter.bin")]) == 2
    assert "not a .safetensors file" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path), "--output", str(tmp_path / "out.pt")]) == 2
    assert "--output" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tiny_pipe_dir, tmp_path_factory):
    """A training run with --push_to_hub while the hub is unreachable (offline mode): everything is written, then
    the upload fails with a clear error."""
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("inspect")
    replay = root / "replay.txt"
    replay.write_text("a photo of a cat\na photo of a dog\n")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        start = time.perf_counter()
        with pytest.raises(RuntimeError) as err:
            run_training(load_train_module(), tiny_pipe_dir, out, replay, "--forget_prompt", "brad pitt",
                         "--surrogate_type", "noise", "--lora_alpha", "1", "--ewc_lambda", "3", "--replay_weight", "0.5",
                         "--output_kohya_format", "--push_to_hub", "--hub_model_id", "someone/forget-brad-pitt")
    return out, str(err.value), time.perf_counter() - start


def test_push_to_hub_offline_fails_clearly_after_saving_everything(trained):
    out, message, seconds = trained
    for name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, "README.md", "validation_before_after.png"):
        assert (out / name).exists(), name
    assert "--push_to_hub" in message and "saved locally" in message and "offline" in message.lower()
    assert seconds < 60  # no network timeouts


def test_push_folder_fails_fast_without_network(monkeypatch, tmp_path):
    import types

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    train = load_train_module()
    args = types.SimpleNamespace(hub_model_id=None, output_dir=str(tmp_path / "forget-x"), hub_token=None)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="--push_to_hub: could not upload .* to 'forget-x'.*rerun with --push_to_hub"):
        train.push_folder(args)
    assert time.perf_counter() - start < 5


def test_model_card_metadata_parses_offline(trained, tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained[0] / "README.md")
    data = card.data.to_dict()
    assert {"lora", "diffusers", "stable-diffusion", "selective-amnesia", "concept-erasure"} <= set(data["tags"])
    assert "stable-diffusion-xl" not in data["tags"]
    assert data["library_name"] == "diffusers" and data["license"] == "creativeml-openrail-m"
    assert "base_model" not in data  # a local folder is not a hub repo; the hub would reject it
    assert 'pipe.load_lora_weights("someone/forget-brad-pitt"' in card.text and "brad pitt" in card.text
    info = json.loads(load_info(trained[0]))
    info["base_model"] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    write_model_card(tmp_path, info)
    hub_card = ModelCard.load(tmp_path / "README.md")
    assert hub_card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert 'DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")' in hub_card.text
    info["base_pipeline"] = "StableDiffusionXLPipeline"
    write_model_card(tmp_path, info)
    xl_card = ModelCard.load(tmp_path / "README.md")
    assert "stable-diffusion-xl" in xl_card.data.tags and "stable-diffusion" in xl_card.data.tags
    assert xl_card.data.license == "openrail++"


def load_info(folder) -> str:
    with safe_open(str(folder / LORA_WEIGHT_NAME), framework="pt") as f:
        return f.metadata()["sa_peft"]


def test_inspect_prints_the_training_metadata(trained, tiny_pipe_dir, capsys):
    out = trained[0]
    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in (f"base model            {tiny_pipe_dir}", "brad pitt", "uniform noise", "EWC λ                 3.0",
                     "replay weight γ       0.5", "lowrank", "rank", "alpha                 1.0", "targets               all",
                     "steps                 3", "sa-peft version       0.1.0", "StableDiffusionPipeline"):
        assert expected in text, expected
    assert cli.main(["inspect", str(out / LORA_WEIGHT_NAME), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    info = summary["sa_peft"]
    assert info["forget_prompts"] == ["brad pitt"] and info["ewc_lambda"] == 3.0 and info["replay_weight"] == 0.5
    assert info["ewc_space"] == "lowrank" and info["rank"] == 2 and info["lora_target"] == "all"
    assert info["max_train_steps"] == 3 and info["sa_peft_version"] == "0.1.0"
    assert summary["ranks"] == [2] and summary["lora_layers"] == info["num_adapted_modules"]
    assert summary["adapter_config"]["lora_alpha"] == 1.0
    # The kohya copy carries the same training info.
    assert cli.main(["inspect", str(out / KOHYA_WEIGHT_NAME), "--json"]) == 0
    kohya = json.loads(capsys.readouterr().out)
    assert kohya["format"].startswith("kohya") and kohya["sa_peft"] == info


def test_inspect_merged_checkpoint_and_foreign_files(tmp_path, capsys):
    path = save_single_file_checkpoint(build_tiny_pipeline(), tmp_path / "merged.safetensors",
                                       {"base_model": "tiny", "loras": [{"file": "a.safetensors", "weight": 0.5,
                                                                         "sa_peft": {"forget_prompts": ["x"]}}]})
    assert cli.main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert "merged pipeline checkpoint" in text and "a.safetensors × 0.5: forgets x" in text
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, "attn")
    pipe.save_lora_weights(tmp_path / "plain", unet_lora_layers=__import__("peft").utils.get_peft_model_state_dict(pipe.unet))
    assert cli.main(["inspect", str(tmp_path / "plain")]) == 0
    assert "not written by sa-peft" in capsys.readouterr().out


@pytest.mark.parametrize("name, content, message", [
    ("adapter.bin", b"\x80\x04pickle", "is not a .safetensors file; adapters are read only from safetensors"),
    ("adapter.ckpt", b"PK\x03\x04", "is not a .safetensors file"),
    ("junk.safetensors", b"not safetensors at all", "is not a valid safetensors file"),
    ("missing.safetensors", None, "no such file"),
])
def test_inspect_refuses_non_safetensors(tmp_path, capsys, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    assert cli.main(["inspect", str(tmp_path / name)]) == 2
    assert message in capsys.readouterr().err


# rank_pattern / alpha_pattern: every attn2.to_k has rank 4, every proj_out alpha 6, conv_in alpha 0.3 (others r 2, alpha 1).
# Not an alpha pattern on attention projections (to_q/k/v/out): diffusers 0.42's kohya reader keys their per-layer
# alphas as "...processor.to_v_lora.down.weight", which matches no module, so a kohya copy with a distinct alpha there
# reads back at the common alpha in diffusers (the file itself is right; A1111/ComfyUI read alpha per layer).
PATTERNS = {"rank_pattern": {"attn2.to_k": 4}, "alpha_pattern": {"proj_out": 6, "conv_in": 0.3}}


def _hand_rank_and_scale(module: str) -> tuple[int, float]:
    rank = 4 if module.endswith("attn2.to_k") else 2
    alpha = 6.0 if module.endswith("proj_out") else 0.3 if module == "conv_in" else 1.0
    return rank, alpha / rank


def _patterned_lora(tmp_path):
    from peft import LoraConfig

    from sa_peft.lora import resolve_lora_targets

    pipe = build_tiny_pipeline()
    names = resolve_lora_targets(pipe.unet, "all")
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=1, init_lora_weights="gaussian", target_modules=names, **PATTERNS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in iter_adapted_layers(pipe.unet):
            for w in (layer.module.lora_A["default"].weight, layer.module.lora_B["default"].weight):
                w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    layers = {layer.name: layer for layer in iter_adapted_layers(pipe.unet)}
    # the patterns really change some layers, and peft's live scaling is the hand value
    assert {_hand_rank_and_scale(n)[0] for n in layers} == {2, 4}
    assert len({_hand_rank_and_scale(n)[1] for n in layers}) == 4
    for name, layer in layers.items():
        assert (layer.lora_a.shape[0], layer.scale) == pytest.approx(_hand_rank_and_scale(name)), name
    return pipe, layers, save_forget_lora(tmp_path, pipe.unet, {"base_model": "tiny"})


def test_rank_and_alpha_patterns_survive_export_merge_and_stack(tmp_path):
    from sa_peft.adapter_io import component_configs, layer_scales, load_adapter_file
    from sa_peft.merge import merge_forget_loras, stack_forget_loras

    pipe, layers, lora_file = _patterned_lora(tmp_path)
    expected = sample(pipe, PROMPT)
    tensors, header = load_adapter_file(lora_file)
    scales = layer_scales(tensors, component_configs(header))
    assert scales.keys() == {f"unet.{n}" for n in layers}
    for name in layers:
        assert scales[f"unet.{name}"] == pytest.approx(_hand_rank_and_scale(name)), name

    # export: kohya alpha = scale · rank per layer, and the kohya copy gives the same images
    kohya_file = export_kohya(lora_file, tmp_path / KOHYA_WEIGHT_NAME)
    kohya = load_file(kohya_file)
    for name in layers:
        rank, scale = _hand_rank_and_scale(name)
        key = "lora_unet_" + name.replace(".", "_")
        assert kohya[key + ".lora_down.weight"].shape[0] == rank
        assert float(kohya[key + ".alpha"]) == pytest.approx(scale * rank, rel=1e-6), name
    fresh = build_tiny_pipeline()
    fresh.load_lora_weights(str(tmp_path), weight_name=KOHYA_WEIGHT_NAME)
    np.testing.assert_allclose(sample(fresh, PROMPT), expected, atol=1e-5)

    # merge: fused weight = W + w · s · B A with each layer's own scale
    base = dict(build_tiny_pipeline().unet.named_modules())
    merged = dict(merge_forget_loras(build_tiny_pipeline(), [lora_file], [0.7]).unet.named_modules())
    for name, layer in layers.items():
        _, scale = _hand_rank_and_scale(name)
        delta = (layer.lora_b @ layer.lora_a).detach().reshape(base[name].weight.shape)
        torch.testing.assert_close(merged[name].weight, base[name].weight + 0.7 * scale * delta, rtol=1e-5, atol=1e-6,
                                   msg=name)

    # stack: the diffusers file and its kohya copy at half weight each add up to the adapter at full weight
    stacked = build_tiny_pipeline()
    stack_forget_loras(stacked, [lora_file, kohya_file], [0.5, 0.5])
    np.testing.assert_allclose(sample(stacked, PROMPT), expected, atol=1e-5)


FULL_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
FULL_CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
               "projection_dim": 1280, "hidden_act": "gelu"}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_kohya_keys_are_in_sd_mecha_kohya_lora_key_sets(arch):
    """Every key of a kohya export of a full-size SD 1.5/SDXL forget LoRA (all UNet layers of the ``all`` preset and a
    text-encoder LoRA on every encoder; models on the meta device) is a key of sd-mecha's independent kohya-LoRA
    key set for that model (``sd1-kohya_kohya_lora``, ``sdxl-kohya_kohya_lora``, derived from kohya's checkpoints)."""
    pytest.importorskip("sd_mecha")
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from sd_mecha.extensions import model_configs
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sa_peft.adapter_io import kohya_state_dict, unet_layout_info
    from sa_peft.lora import make_lora_config, resolve_lora_targets
    from sa_peft.testing.unet_configs import UNET_CONFIGS

    xl = arch == "sdxl"
    with init_empty_weights():
        unet = UNet2DConditionModel(**UNET_CONFIGS[arch])
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(**FULL_CLIP_L))}
        if xl:
            encoders["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**FULL_CLIP_G))
        unet.add_adapter(make_lora_config(resolve_lora_targets(unet, "all"), 4))
        te_config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
        for encoder in encoders.values():
            inject_adapter_in_model(te_config, encoder, "default")
    state_dict = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    for name, encoder in encoders.items():
        state_dict.update({f"{name}.{k}": v for k, v in get_peft_model_state_dict(encoder).items()})
    configs = {"unet": unet.peft_config["default"].to_dict(), **{n: te_config.to_dict() for n in encoders}}
    kohya = kohya_state_dict(state_dict, configs, sdxl=xl, unet_layout=unet_layout_info(unet))
    assert len(kohya) == 3 * sum(k.endswith("lora_A.weight") for k in state_dict)
    reference = set(model_configs.resolve("sdxl-kohya_kohya_lora" if xl else "sd1-kohya_kohya_lora").keys())
    assert sorted(k for k in kohya if k not in reference) == []
    assert {k.split("_")[1] for k in kohya} == ({"unet", "te1", "te2"} if xl else {"unet", "te"})


COMFYUI_DIR = os.environ.get("SA_PEFT_COMFYUI_DIR")


@pytest.mark.skipif(not COMFYUI_DIR, reason="set SA_PEFT_COMFYUI_DIR to a ComfyUI checkout to run ComfyUI's LoRA loader")
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_comfyui_loader_patches_every_layer_of_a_kohya_export(xl, tmp_path, caplog):
    """ComfyUI's own key maps (``comfy.lora.model_lora_keys_unet``/``model_lora_keys_clip``, built from the model's
    weight names in its original layout and ComfyUI's ``clip_l``/``clip_g`` text-encoder names) and its loader
    (``comfy.lora.load_lora``) patch every layer of a kohya export, UNet and text encoders, with no key left over."""
    import logging
    import sys
    import types

    sys.path.insert(0, COMFYUI_DIR)
    import comfy.lora
    import comfy.model_detection

    from sa_peft import ldm_layout
    from sa_peft.ldm_layout import UnetLayout, unet_module_to_ldm

    pipe = build_tiny_sdxl_pipeline() if xl else build_tiny_pipeline()
    add_forget_lora(pipe.unet, "all", rank=2, alpha=1)
    encoders = {"text_encoder": pipe.text_encoder, **({"text_encoder_2": pipe.text_encoder_2} if xl else {})}
    te = {name: add_text_encoder_lora(encoder, 2, 2, seed=i) for i, (name, encoder) in enumerate(encoders.items())}
    kwargs = {"text_encoder_lora_layers": te["text_encoder"][0], "text_encoder_adapter_metadata": te["text_encoder"][1]}
    if xl:
        kwargs.update(text_encoder_2_lora_layers=te["text_encoder_2"][0], text_encoder_2_adapter_metadata=te["text_encoder_2"][1])
    kohya = load_file(export_kohya(save_forget_lora(tmp_path, pipe.unet, {}, **kwargs), tmp_path / "kohya.safetensors"))

    # ComfyUI maps LoRA keys from the base model's weight names (original layout); a fresh pipeline gives them.
    base_unet = (build_tiny_sdxl_pipeline() if xl else build_tiny_pipeline()).unet
    ldm_unet = ldm_layout.unet_to_ldm(base_unet.state_dict(), base_unet.config)
    unet_config = comfy.model_detection.detect_unet_config(ldm_unet, ldm_layout.UNET_PREFIX)
    unet_sd = {"diffusion_model." + k[len(ldm_layout.UNET_PREFIX):]: v for k, v in ldm_unet.items()}
    unet_model = types.SimpleNamespace(state_dict=lambda: unet_sd, model_config=types.SimpleNamespace(unet_config=unet_config))
    fresh = build_tiny_sdxl_pipeline() if xl else build_tiny_pipeline()
    clip_sd = {f"clip_l.transformer.{k}": v for k, v in ldm_layout.clip_to_ldm(fresh.text_encoder.state_dict(), "").items()}
    if xl:
        clip_sd.update({f"clip_g.transformer.{k}": v
                        for k, v in ldm_layout.clip_to_ldm(fresh.text_encoder_2.state_dict(), "").items()})
    clip_model = types.SimpleNamespace(state_dict=lambda: clip_sd)
    key_map = comfy.lora.model_lora_keys_unet(unet_model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip_model, key_map)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(kohya, key_map)
    assert "not loaded" not in caplog.text
    layout = UnetLayout.of(base_unet)
    expected = {f"diffusion_model.{unet_module_to_ldm(layer.name, layout)}.weight" for layer in iter_adapted_layers(pipe.unet)}
    for name, prefix in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        if name in te:
            expected |= {f"{prefix}.transformer.text_model.{k.removeprefix('text_model.')[: -len('.lora_A.weight')]}.weight"
                         for k in te[name][0] if k.endswith(".lora_A.weight")}
    assert {k if isinstance(k, str) else k[0] for k in patches} == expected


def test_sdxl_export_without_layout_keeps_diffusers_names_and_warns(tmp_path):
    """An SDXL adapter whose header lacks the UNet layout (and whose base model is not local) cannot get kohya's
    sgm names; the export says so and writes diffusers' names, which diffusers still reads back exactly."""
    from sa_peft.adapter_io import UNET_LAYOUT_KEY

    pipe = build_tiny_sdxl_pipeline()
    add_forget_lora(pipe.unet, "all", rank=2, alpha=1)
    expected = sample(pipe, PROMPT)
    lora_file = save_forget_lora(tmp_path, pipe.unet, {"base_model": str(tmp_path / "not-here")})
    tensors, header = load_file(lora_file), None
    with safe_open(lora_file, framework="pt") as f:
        header = dict(f.metadata())
    del header[UNET_LAYOUT_KEY]
    save_file(tensors, lora_file, metadata=header)
    with pytest.warns(UserWarning, match="without its UNet layout"):
        kohya = load_file(export_kohya(lora_file, tmp_path / KOHYA_WEIGHT_NAME))
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.alpha" in kohya and "lora_unet_label_emb_0_0.alpha" in kohya
    fresh = build_tiny_sdxl_pipeline()
    fresh.load_lora_weights(str(tmp_path), weight_name=KOHYA_WEIGHT_NAME)
    np.testing.assert_allclose(sample(fresh, PROMPT), expected, atol=1e-6)
    # With the base model found locally, its UNet config gives the layout: kohya's SDXL names again.
    build_tiny_sdxl_pipeline().save_pretrained(tmp_path / "base")
    header["sa_peft"] = json.dumps({"base_model": str(tmp_path / "base")})
    save_file(tensors, lora_file, metadata=header)
    kohya = load_file(export_kohya(lora_file, tmp_path / "local.safetensors"))
    assert "lora_unet_output_blocks_1_2_conv.alpha" in kohya and not any("up_blocks" in k for k in kohya)
