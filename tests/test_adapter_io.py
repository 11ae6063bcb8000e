"""``sa_peft.adapter_io`` function by function on tiny models and hand-made state dicts (no sampling): the adapter
file and its header, finding and reading adapter files, per-layer scales, kohya names and headers.

The round trips through diffusers' readers (images equal after reload) are in ``test_export_inspect.py``."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import add_forget_lora, add_text_encoder_lora
from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sa_peft.adapter_io import (
    LORA_WEIGHT_NAME,
    UNET_LAYOUT_KEY,
    _kohya_text_encoder_module,
    _local_unet_layout,
    check_lora_file,
    component_configs,
    export_kohya,
    kohya_state_dict,
    layer_scales,
    load_adapter_file,
    read_adapter_metadata,
    resolve_adapter_file,
    save_forget_lora,
    unet_layout_info,
    unet_lora_state_dict,
)
from sa_peft.errors import InputError, MissingInputError
from sa_peft.ldm_layout import UnetLayout, unet_module_to_ldm
from sa_peft.lora import iter_adapted_layers, make_lora_config, resolve_lora_targets
from sa_peft.testing.tiny_pipeline import (
    build_tiny_flux_pipeline,
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
)

HINT = "pass an adapter written by sa-peft or diffusers' save_lora_weights"
BASE_KOHYA_HEADER = {"ss_network_module": "networks.lora"}


def header_of(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def peft_keyed(model, component="unet", adapter="default"):
    return {f"{component}.{k}": v for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


@pytest.fixture(scope="module")
def sd():
    """A tiny SD pipeline whose UNet has a random "all" forget LoRA (rank 2, alpha 3) and whose text encoder has one
    (rank 3, alpha 1.5)."""
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, "all", rank=2, alpha=3)
    return SimpleNamespace(unet=pipe.unet, te=add_text_encoder_lora(pipe.text_encoder, 3, 1.5, seed=1))


@pytest.fixture(scope="module")
def xl():
    """A tiny SDXL pipeline with random LoRAs on the UNet ("all": added-conditioning MLP included) and both encoders."""
    pipe = build_tiny_sdxl_pipeline()
    add_forget_lora(pipe.unet, "all", rank=2, alpha=1)
    return SimpleNamespace(unet=pipe.unet, te=add_text_encoder_lora(pipe.text_encoder, 2, 2, seed=2),
                           te2=add_text_encoder_lora(pipe.text_encoder_2, 2, 4, seed=3))


@pytest.fixture(scope="module")
def sd_file(sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd-lora")
    return save_forget_lora(folder, sd.unet, {"base_model": "tiny", "forget_prompts": ["brad pitt"]},
                            text_encoder_lora_layers=sd.te[0], text_encoder_adapter_metadata=sd.te[1])


@pytest.fixture(scope="module")
def xl_file(xl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl-lora")
    return save_forget_lora(folder, xl.unet, {"base_model": "tiny-xl"}, text_encoder_lora_layers=xl.te[0],
                            text_encoder_adapter_metadata=xl.te[1], text_encoder_2_lora_layers=xl.te2[0],
                            text_encoder_2_adapter_metadata=xl.te2[1])


def flux_transformer(names=("transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.0.proj_out")):
    transformer = build_tiny_flux_pipeline().transformer
    transformer.add_adapter(make_lora_config(list(names), 2, alpha=3.0))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in iter_adapted_layers(transformer):
            for w in (layer.module.lora_A["default"].weight, layer.module.lora_B["default"].weight):
                w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    return transformer


# --- unet_lora_state_dict ---------------------------------------------------------------------------------------


def test_unet_lora_state_dict_is_the_named_adapters_factors_in_peft_keys():
    unet = build_tiny_pipeline().unet
    names = add_forget_lora(unet, "attn", rank=2)
    unet.add_adapter(make_lora_config(resolve_lora_targets(unet, "xattn"), 3), adapter_name="other")
    default = unet_lora_state_dict(unet)
    assert default.keys() == {f"{n}.lora_{x}.weight" for n in names for x in "AB"}
    modules = dict(unet.named_modules())
    for n in names:
        assert torch.equal(default[f"{n}.lora_A.weight"], modules[n].lora_A["default"].weight)
        assert torch.equal(default[f"{n}.lora_B.weight"], modules[n].lora_B["default"].weight)
    other = unet_lora_state_dict(unet, "other")
    assert other.keys() == {f"{n}.lora_{x}.weight" for n in resolve_lora_targets(unet, "xattn") for x in "AB"}
    assert {v.shape[0] for k, v in other.items() if k.endswith("lora_A.weight")} == {3}


# --- save_forget_lora --------------------------------------------------------------------------------------------


def test_save_forget_lora_writes_the_factors_configs_and_headers(sd, sd_file, tmp_path):
    assert sd_file == os.path.join(os.path.dirname(sd_file), LORA_WEIGHT_NAME)
    assert os.listdir(os.path.dirname(sd_file)) == [LORA_WEIGHT_NAME]  # no temporary folder left
    assert os.stat(sd_file).st_mode & 0o777 == 0o666 & ~umask()
    tensors = load_file(sd_file)
    expected = {**peft_keyed(sd.unet), **{f"text_encoder.{k}": v for k, v in sd.te[0].items()}}
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    header = header_of(sd_file)
    assert header["sa_peft"] == json.dumps({"base_pipeline": "StableDiffusionPipeline", "base_model": "tiny",
                                            "forget_prompts": ["brad pitt"]}, sort_keys=True)
    assert header[UNET_LAYOUT_KEY] == json.dumps(unet_layout_info(sd.unet), sort_keys=True)
    assert json.loads(header[UNET_LAYOUT_KEY]) == {"layers_per_block": 1,
                                                   "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    configs = component_configs(header)
    assert configs.keys() == {"unet", "text_encoder"}
    assert (configs["unet"]["r"], configs["unet"]["lora_alpha"]) == (2, 3)
    assert sorted(configs["unet"]["target_modules"]) == sorted(sd.unet.peft_config["default"].target_modules)
    assert (configs["text_encoder"]["r"], configs["text_encoder"]["lora_alpha"]) == (3, 1.5)


def test_save_forget_lora_makes_the_folder_replaces_the_file_and_keeps_given_info(sd, tmp_path):
    folder = tmp_path / "a" / "b"
    first = save_forget_lora(folder, sd.unet, {"base_model": "one"})
    assert first == os.path.join(str(folder), LORA_WEIGHT_NAME)
    assert load_file(first).keys() == peft_keyed(sd.unet).keys()  # no text-encoder layers unless given
    assert component_configs(header_of(first)).keys() == {"unet"}
    second = save_forget_lora(folder, sd.unet, {"base_model": "two", "base_pipeline": "Given"})
    assert second == first and os.listdir(folder) == [LORA_WEIGHT_NAME]
    assert json.loads(header_of(second)["sa_peft"]) == {"base_model": "two", "base_pipeline": "Given"}


def test_save_forget_lora_writes_in_a_hidden_folder_inside_the_output(sd, tmp_path, monkeypatch):
    seen = []
    original = StableDiffusionPipeline.save_lora_weights

    def recording(save_directory, **kwargs):
        seen.append((save_directory, sorted(os.listdir(tmp_path))))
        return original(save_directory, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", recording)
    save_forget_lora(tmp_path, sd.unet, {})
    ((directory, listing),) = seen
    assert os.path.dirname(directory) == str(tmp_path) and os.path.basename(directory).startswith(".tmp-lora-")
    assert listing == [os.path.basename(directory)]
    assert os.listdir(tmp_path) == [LORA_WEIGHT_NAME]


def test_save_forget_lora_of_a_named_adapter(tmp_path):
    unet = build_tiny_pipeline().unet
    add_forget_lora(unet, "attn", rank=2)
    unet.add_adapter(make_lora_config(resolve_lora_targets(unet, "xattn"), 3, alpha=6), adapter_name="forget")
    path = save_forget_lora(tmp_path, unet, {}, adapter="forget")
    tensors = load_file(path)
    assert tensors.keys() == peft_keyed(unet, adapter="forget").keys()
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")} == {3}
    config = component_configs(header_of(path))["unet"]
    assert (config["r"], config["lora_alpha"]) == (3, 6)


def test_save_forget_lora_sdxl_has_both_encoders_and_sd_refuses_a_second(sd, xl, xl_file, tmp_path):
    tensors = load_file(xl_file)
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert {k.removeprefix("text_encoder_2.") for k in tensors if k.startswith("text_encoder_2.")} == xl.te2[0].keys()
    header = header_of(xl_file)
    configs = component_configs(header)
    assert (configs["text_encoder_2"]["r"], configs["text_encoder_2"]["lora_alpha"]) == (2, 4)
    assert (configs["text_encoder"]["r"], configs["text_encoder"]["lora_alpha"]) == (2, 2)
    assert json.loads(header["sa_peft"])["base_pipeline"] == "StableDiffusionXLPipeline"
    assert json.loads(header[UNET_LAYOUT_KEY])["addition_embed_type"] == "text_time"
    with pytest.raises(ValueError) as info:
        save_forget_lora(tmp_path, sd.unet, {}, text_encoder_2_lora_layers=xl.te2[0],
                         text_encoder_2_adapter_metadata=xl.te2[1])
    assert str(info.value) == "text_encoder_2_lora_layers: only SDXL and SD3 have a second CLIP text encoder"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_save_forget_lora_names_the_transformer_and_its_pipeline(kind, tmp_path):
    if kind == "flux":
        transformer, pipeline = flux_transformer(), "FluxPipeline"
    else:
        transformer, pipeline = build_tiny_sd3_pipeline().transformer, "StableDiffusion3Pipeline"
        transformer.add_adapter(make_lora_config(["transformer_blocks.0.attn.to_q"], 2))
    path = save_forget_lora(tmp_path, transformer, {"forget_prompts": ["x"]})
    tensors = load_file(path)
    assert tensors.keys() == peft_keyed(transformer, "transformer").keys()
    header = header_of(path)
    assert json.loads(header["sa_peft"]) == {"base_pipeline": pipeline, "forget_prompts": ["x"]}
    assert component_configs(header)["transformer"]["r"] == 2


# --- resolve_adapter_file, load_adapter_file, check_lora_file, read_adapter_metadata -----------------------------


def test_resolve_adapter_file_finds_the_file_of_a_folder_or_says_why_not(tmp_path):
    def put(folder, *names):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"x")
        return folder

    both = put(tmp_path / "both", "a.safetensors", LORA_WEIGHT_NAME, "z.safetensors")
    assert resolve_adapter_file(both) == str(both / LORA_WEIGHT_NAME)
    one = put(tmp_path / "one", "notes.txt", "adapter.safetensors", "adapter.bin")
    assert resolve_adapter_file(one) == str(one / "adapter.safetensors")
    assert resolve_adapter_file(one / "adapter.safetensors") == str(one / "adapter.safetensors")
    none = put(tmp_path / "none", "adapter.bin")
    with pytest.raises(MissingInputError) as info:
        resolve_adapter_file(none, "adapter")
    assert str(info.value) == (f"`adapter` {str(none)!r}: the folder holds no .safetensors adapter file; pass the folder a "
                               f"training run wrote (it holds {LORA_WEIGHT_NAME}) or the file itself")
    several = put(tmp_path / "several", "b.safetensors", "a.safetensors")
    with pytest.raises(InputError) as info:
        resolve_adapter_file(several)
    assert not isinstance(info.value, FileNotFoundError)
    assert str(info.value) == (f"`lora` {str(several)!r}: the folder holds several .safetensors files (a.safetensors, "
                               f"b.safetensors) and no {LORA_WEIGHT_NAME}; pass the file itself")
    with pytest.raises(MissingInputError) as info:
        resolve_adapter_file(tmp_path / "missing.safetensors")
    assert str(info.value) == f"`lora` {str(tmp_path / 'missing.safetensors')!r}: no such file or folder"
    with pytest.raises(InputError) as info:
        resolve_adapter_file(one / "adapter.bin", "x")
    assert not isinstance(info.value, FileNotFoundError)
    assert str(info.value) == (f"`x` {str(one / 'adapter.bin')!r} is not a .safetensors file; adapters are read only "
                               "from safetensors (never pickle/.bin/.pt/.ckpt); convert it or pass the .safetensors file")


def test_load_adapter_file_gives_tensors_and_header(sd, sd_file, tmp_path):
    tensors, header = load_adapter_file(os.path.dirname(sd_file))
    assert header == header_of(sd_file)
    expected = load_file(sd_file)
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
    save_file({"a": torch.ones(1)}, str(tmp_path / "bare.safetensors"))
    assert load_adapter_file(tmp_path / "bare.safetensors")[1] == {}
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match=rf"^`lora` '.*broken\.safetensors' is not a valid safetensors file \(.+\); {HINT}$"):
        load_adapter_file(broken)
    with pytest.raises(InputError, match=r"^`source` '.*broken\.safetensors' is not a valid"):
        load_adapter_file(broken, "source")
    with pytest.raises(MissingInputError, match=r"^`source` '.*gone': no such file"):
        load_adapter_file(tmp_path / "gone", "source")


def test_check_lora_file_accepts_lora_keys_and_refuses_other_files_naming_the_flag(tmp_path):
    for i, key in enumerate(("unet.conv_in.lora_A.weight", "lora_unet_conv_in.lora_down.weight",
                             "unet.conv_in.lora.down.weight")):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        save_file({key: torch.zeros(2, 2)}, str(folder / LORA_WEIGHT_NAME))
        assert check_lora_file(folder) == str(folder / LORA_WEIGHT_NAME)
        assert check_lora_file(folder / LORA_WEIGHT_NAME, "x") == str(folder / LORA_WEIGHT_NAME)
    plain = tmp_path / "weights.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2), "conv_in.lora_B.weight": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(ValueError) as info:
        check_lora_file(plain, "adapter")
    assert str(info.value) == (f"`adapter` {str(plain)!r}: 'weights.safetensors' holds no LoRA weights (no lora_A/lora_down "
                               "keys); pass a forget LoRA written by sa-peft or diffusers' save_lora_weights")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=rf"^`adapter` '.*broken\.safetensors' is not a valid safetensors file \(.*\); {HINT}$"):
        check_lora_file(broken, "adapter")
    with pytest.raises(FileNotFoundError, match="^`lora` '.*missing': no such file or folder$"):
        check_lora_file(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="^`adapter` '.*missing': no such file or folder$"):
        check_lora_file(tmp_path / "missing", "adapter")


def test_read_adapter_metadata_parses_both_entries_or_names_the_damaged_one(sd, sd_file, tmp_path):
    info = read_adapter_metadata(os.path.dirname(sd_file))
    header = header_of(sd_file)
    assert info == {"sa_peft": json.loads(header["sa_peft"]),
                    "lora_adapter_metadata": json.loads(header["lora_adapter_metadata"])}
    tensors = {"unet.conv_in.lora_A.weight": torch.zeros(2, 2)}
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    assert read_adapter_metadata(tmp_path / "plain.safetensors") == {}
    save_file(tensors, str(tmp_path / "only.safetensors"), metadata={"sa_peft": '{"a": 1}', "other": "{"})
    assert read_adapter_metadata(tmp_path / "only.safetensors") == {"sa_peft": {"a": 1}}
    for key in ("sa_peft", "lora_adapter_metadata"):
        path = tmp_path / f"bad-{key}.safetensors"
        save_file(tensors, str(path), metadata={"sa_peft": "{}", "lora_adapter_metadata": "{}", key: "{not json"})
        with pytest.raises(InputError) as err:
            read_adapter_metadata(path)
        assert str(err.value) == f"`adapter` {str(path)!r}: the {key!r} header entry is not valid JSON; the file is damaged"
    with pytest.raises(MissingInputError, match=r"^`adapter` '.*gone\.safetensors': no such file or folder$"):
        read_adapter_metadata(tmp_path / "gone.safetensors")
    with pytest.raises(MissingInputError, match=r"^`forget` '.*gone\.safetensors': no such file or folder$"):
        read_adapter_metadata(tmp_path / "gone.safetensors", "forget")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match=rf"^`adapter` .* is not a valid safetensors file .*; {HINT}$"):
        read_adapter_metadata(tmp_path / "junk.safetensors")


# --- unet_layout_info, component_configs, layer_scales -----------------------------------------------------------


def test_unet_layout_info_keeps_the_naming_fields_as_lists():
    xl_unet = build_tiny_sdxl_pipeline().unet
    assert unet_layout_info(xl_unet) == {"layers_per_block": 1, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                                         "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                                         "addition_embed_type": "text_time"}
    assert unet_layout_info({"layers_per_block": (2, 2), "up_block_types": ["A"], "addition_embed_type": None,
                             "sample_size": 64}) == {"layers_per_block": [2, 2], "up_block_types": ["A"]}
    assert unet_layout_info({}) == {}


def test_component_configs_splits_the_flat_header_by_component():
    header = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 3.0, "text_encoder.r": 4,
                                                   "text_encoder_2.use_rslora": True})}
    assert component_configs(header) == {"unet": {"r": 2, "lora_alpha": 3.0}, "text_encoder": {"r": 4},
                                         "text_encoder_2": {"use_rslora": True}}
    assert component_configs({"sa_peft": "{}"}) == {}


def zeros_lora(rank, width=8, **more):
    return {"lora_A.weight": torch.zeros(rank, width), "lora_B.weight": torch.zeros(width, rank), **more}


def lora_state(layers: dict[str, int]) -> dict[str, torch.Tensor]:
    """``{"unet.down.attn2.to_k": 4, ...}`` -> zero peft-keyed factors of those ranks."""
    return {f"{name}.{k}": v for name, rank in layers.items() for k, v in zeros_lora(rank).items()}


def test_layer_scales_is_alpha_over_rank_with_patterns_and_rslora():
    state = lora_state({"unet.mid.attn2.to_k": 4, "unet.mid.attn2.to_q": 2, "unet.mid.proj_out": 2,
                        "text_encoder.layers.0.q_proj": 3, "text_encoder_2.layers.0.q_proj": 4, "other.fc": 5})
    state["unet.mid.attn2.to_q.base_layer.weight"] = torch.zeros(8, 8)
    configs = {"unet": {"r": 2, "lora_alpha": 1, "rank_pattern": {"attn2.to_k": 4}, "alpha_pattern": {"proj_out": 6}},
               "text_encoder": {"r": 3, "lora_alpha": 6, "use_rslora": True, "rank_pattern": {}, "alpha_pattern": None},
               "text_encoder_2": {"r": 4, "lora_alpha": 2, "use_rslora": False}}
    scales = layer_scales(state, configs)
    assert scales == {"unet.mid.attn2.to_k": (4, 0.25), "unet.mid.attn2.to_q": (2, 0.5), "unet.mid.proj_out": (2, 3.0),
                      "text_encoder.layers.0.q_proj": (3, 6 / math.sqrt(3)), "text_encoder_2.layers.0.q_proj": (4, 0.5),
                      "other.fc": (5, 1.0)}
    assert all(type(rank) is int and type(scale) is float for rank, scale in scales.values())


def test_layer_scales_refuses_dora_and_ranks_that_disagree_with_the_config():
    with pytest.raises(InputError) as info:
        layer_scales({**lora_state({"unet.a": 2}), "unet.a.lora_magnitude_vector.default.weight": torch.ones(8)},
                     {"unet": {"r": 2, "lora_alpha": 2}})
    assert str(info.value) == "unet.a.lora_magnitude_vector.default.weight: DoRA adapters are not supported by the kohya export"
    with pytest.raises(InputError) as info:
        layer_scales(lora_state({"unet.b.attn2.to_k": 3}), {"unet": {"r": 2, "lora_alpha": 2, "rank_pattern": {"to_q": 3}}})
    assert str(info.value) == ("unet.b.attn2.to_k.lora_A.weight: rank 3 in the file but 2 in its adapter config; "
                               "the file is damaged")
    assert layer_scales(lora_state({"unet.b.attn2.to_k": 3}), {"unet": {"r": 2, "lora_alpha": 6,
                                                                      "rank_pattern": {"to_k": 3}}}) == {
        "unet.b.attn2.to_k": (3, 2.0)}


# --- kohya_state_dict ---------------------------------------------------------------------------------------------


def test_kohya_text_encoder_names_go_through_text_model_except_the_projection():
    assert _kohya_text_encoder_module("text_model.encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
    assert _kohya_text_encoder_module("encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
    assert _kohya_text_encoder_module("text_projection") == "text_projection"
    assert _kohya_text_encoder_module("text_model.text_projection") == "text_projection"


def expected_kohya(state, configs, unet_name, te_prefixes):
    """kohya's keys and tensors by hand: peft's A/B as lora_down/lora_up, alpha = scale · rank."""
    out = {}
    for key, (rank, scale) in layer_scales(state, configs).items():
        component, _, module = key.partition(".")
        if component == "unet":
            name = "lora_unet_" + unet_name(module).replace(".", "_")
        else:
            name = te_prefixes[component] + ("text_model." + module.removeprefix("text_model.")).replace(".", "_")
        out[f"{name}.lora_down.weight"] = state[f"{key}.lora_A.weight"]
        out[f"{name}.lora_up.weight"] = state[f"{key}.lora_B.weight"]
        out[f"{name}.alpha"] = torch.tensor(scale * rank)
    return out


def assert_same(actual, expected):
    assert sorted(actual) == sorted(expected)
    for k, v in expected.items():
        assert actual[k].dtype == (torch.float32 if k.endswith(".alpha") else v.dtype), k
        torch.testing.assert_close(actual[k], v.to(actual[k].dtype), rtol=1e-6, atol=0, msg=k)


def test_kohya_state_dict_of_an_sd_adapter(sd):
    state = {**peft_keyed(sd.unet), **{f"text_encoder.{k}": v for k, v in sd.te[0].items()}}
    configs = {"unet": sd.unet.peft_config["default"].to_dict(), "text_encoder": sd.te[1]}
    kohya = kohya_state_dict(state, configs)
    assert_same(kohya, expected_kohya(state, configs, lambda m: m, {"text_encoder": "lora_te_"}))
    assert float(kohya["lora_unet_conv_in.alpha"]) == pytest.approx(3.0)  # alpha 3 at rank 2
    assert float(kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == pytest.approx(1.5)
    # A layout is only used for SDXL.
    assert kohya_state_dict(state, configs, unet_layout=unet_layout_info(sd.unet)).keys() == kohya.keys()


def test_kohya_state_dict_of_an_sdxl_adapter_with_and_without_the_layout(xl):
    state = {**peft_keyed(xl.unet), **{f"text_encoder.{k}": v for k, v in xl.te[0].items()},
             **{f"text_encoder_2.{k}": v for k, v in xl.te2[0].items()}}
    configs = {"unet": xl.unet.peft_config["default"].to_dict(), "text_encoder": xl.te[1], "text_encoder_2": xl.te2[1]}
    te = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    layout = UnetLayout.of(xl.unet)
    with_layout = kohya_state_dict(state, configs, unet_layout=unet_layout_info(xl.unet))  # SDXL from text_encoder_2
    assert_same(with_layout, expected_kohya(state, configs, lambda m: unet_module_to_ldm(m, layout), te))
    assert "lora_unet_label_emb_0_0.alpha" in with_layout and "lora_unet_output_blocks_1_2_conv.alpha" in with_layout
    renames = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    without = kohya_state_dict(state, configs, sdxl=True)
    assert_same(without, expected_kohya(state, configs, lambda m: renames.get(m, m), te))
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.alpha" in without
    unet_only = {k: v for k, v in state.items() if k.startswith("unet.")}
    assert kohya_state_dict(unet_only, configs, sdxl=True, unet_layout=unet_layout_info(xl.unet)).keys() == {
        k for k in with_layout if k.startswith("lora_unet_")}
    assert_same(kohya_state_dict(unet_only, configs),  # not SDXL: diffusers' names, the MLP as label_emb
                expected_kohya(unet_only, configs, lambda m: renames.get(m, m), te))


@pytest.mark.parametrize("up_block_types, sgm", [
    (["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], True),
    (["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], True),
    (["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], False),
    (["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"], False),
])
def test_sgm_names_only_when_every_up_block_but_the_last_has_attention(up_block_types, sgm):
    """An upsampler after an up block without attention would be ``output_blocks.N.1.conv``, which diffusers' sgm
    reader takes for an attention: such a UNet keeps diffusers' names even as SDXL (SDXL itself has none)."""
    state = lora_state({"unet.conv_in": 2, "unet.time_embedding.linear_1": 2})
    layout = {"layers_per_block": 1, "up_block_types": up_block_types, "addition_embed_type": "text_time"}
    kohya = kohya_state_dict(state, {}, sdxl=True, unet_layout=layout)
    assert {k.split(".")[0] for k in kohya} == ({"lora_unet_input_blocks_0_0", "lora_unet_time_embed_0"} if sgm else
                     {"lora_unet_conv_in", "lora_unet_time_embedding_linear_1"})


def test_sgm_names_are_not_used_for_a_tiny_sd_unet_even_as_sdxl():
    unet = build_tiny_pipeline().unet  # up blocks: UpBlock2D (with upsampler), CrossAttnUpBlock2D
    add_forget_lora(unet, "all")
    kohya = kohya_state_dict(peft_keyed(unet), {"unet": unet.peft_config["default"].to_dict()}, sdxl=True,
                             unet_layout=unet_layout_info(unet))
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.alpha" in kohya
    assert not any("output_blocks" in k for k in kohya)


def test_kohya_state_dict_refuses_unknown_components_empty_adapters_and_lost_layers(monkeypatch):
    with pytest.raises(InputError) as info:
        kohya_state_dict({**lora_state({"unet.a": 2, "transformer.b": 2, "vae.c": 2})}, {})
    assert str(info.value) == ("LoRA keys of unknown components ['transformer', 'vae']; expected keys starting with "
                               "('unet', 'text_encoder', 'text_encoder_2')")
    with pytest.raises(InputError) as info:
        kohya_state_dict({"unet.a.lora_B.weight": torch.zeros(2, 2)}, {})
    assert str(info.value) == "the adapter holds no LoRA layers (no '.lora_A.weight' keys)"
    import diffusers.utils

    convert = diffusers.utils.convert_state_dict_to_kohya
    monkeypatch.setattr(diffusers.utils, "convert_state_dict_to_kohya",
                        lambda sd: {k: v for k, v in convert(sd).items() if k != "lora_unet_b.lora_up.weight"})
    with pytest.raises(KeyError) as info:
        kohya_state_dict(lora_state({"unet.a": 2, "unet.b": 2}), {})
    assert info.value.args == ("kohya conversion lost layer unet.b (lora_unet_b.lora_up.weight)",)


def test_kohya_tensors_are_contiguous():
    a = torch.randn(8, 2).T  # a transposed view
    assert not a.is_contiguous()
    kohya = kohya_state_dict({"unet.conv_in.lora_A.weight": a, "unet.conv_in.lora_B.weight": torch.randn(2, 8).T}, {})
    assert all(v.is_contiguous() for v in kohya.values())
    assert torch.equal(kohya["lora_unet_conv_in.lora_down.weight"], a)


# --- export_kohya and its header ----------------------------------------------------------------------------------


def test_export_from_a_file_copies_the_training_info_and_writes_kohyas_header(sd, sd_file, tmp_path):
    out = export_kohya(sd_file, tmp_path / "k.safetensors")
    assert out == str(tmp_path / "k.safetensors") and os.listdir(tmp_path) == ["k.safetensors"]
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask()
    state, header = load_adapter_file(sd_file)
    assert_same(load_file(out), kohya_state_dict(state, component_configs(header)))
    assert header_of(out) == {"sa_peft": header["sa_peft"], **BASE_KOHYA_HEADER, "ss_network_dim": "2"}
    folder_out = export_kohya(os.path.dirname(sd_file), str(tmp_path / "f.safetensors"), metadata={"ss_network_dim": 9,
                                                                                                    "note": 1.5})
    assert header_of(folder_out) == {"sa_peft": header["sa_peft"], **BASE_KOHYA_HEADER, "ss_network_dim": "9",
                                     "note": "1.5"}


def test_export_from_a_live_unet_equals_export_from_its_file(tmp_path):
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, "noxattn", rank=2, alpha=5)
    lora_file = save_forget_lora(tmp_path, pipe.unet, {})
    from_file = load_file(export_kohya(lora_file, tmp_path / "a.safetensors"))
    live_path = export_kohya(pipe.unet, tmp_path / "b.safetensors")
    live = load_file(live_path)
    assert from_file.keys() == live.keys()
    assert all(torch.equal(from_file[k], live[k]) for k in live)
    assert header_of(live_path) == {**BASE_KOHYA_HEADER, "ss_network_dim": "2"}  # no training info to copy


def test_export_from_live_unet_takes_the_named_adapter(tmp_path):
    pipe = build_tiny_pipeline()
    add_forget_lora(pipe.unet, "noxattn", rank=2, alpha=5)
    reference = load_file(export_kohya(pipe.unet, tmp_path / "default.safetensors"))
    names = resolve_lora_targets(pipe.unet, "xattn")
    pipe.unet.add_adapter(make_lora_config(names, 3, alpha=1.5), adapter_name="forget")
    with torch.no_grad():
        for layer in iter_adapted_layers(pipe.unet, "forget"):
            layer.module.lora_B["forget"].weight.fill_(0.5)
    named_path = export_kohya(pipe.unet, tmp_path / "forget.safetensors", adapter="forget")
    named = load_file(named_path)
    assert named.keys() != reference.keys()
    assert all(named[k].shape[0] == 3 for k in named if k.endswith("lora_down.weight"))
    assert all(float(named[k]) == pytest.approx(1.5) for k in named if k.endswith(".alpha"))
    assert all(torch.all(named[k] == 0.5) for k in named if k.endswith("lora_up.weight"))
    assert len([k for k in named if k.endswith("lora_down.weight")]) == len(names)
    assert header_of(named_path)["ss_network_dim"] == "3"


def test_kohya_header_names_the_rank_only_when_the_unet_has_one(tmp_path):
    # two UNet ranks (a rank pattern): no ss_network_dim; text-encoder ranks do not count
    state = lora_state({"unet.conv_in": 2, "unet.conv_out": 4, "text_encoder.layers.0.q_proj": 3})
    configs = {"unet": {"r": 2, "lora_alpha": 2, "rank_pattern": {"conv_out": 4}}}
    save_file(state, str(tmp_path / "two.safetensors"), metadata={"lora_adapter_metadata": json.dumps(
        {f"unet.{k}": v for k, v in configs["unet"].items()})})
    assert header_of(export_kohya(tmp_path / "two.safetensors", tmp_path / "k2.safetensors")) == BASE_KOHYA_HEADER
    save_file(lora_state({"unet.conv_in": 2, "text_encoder.layers.0.q_proj": 3}), str(tmp_path / "one.safetensors"))
    assert header_of(export_kohya(tmp_path / "one.safetensors", tmp_path / "k1.safetensors")) == {
        **BASE_KOHYA_HEADER, "ss_network_dim": "2"}
    save_file(lora_state({"text_encoder.layers.0.q_proj": 3}), str(tmp_path / "te.safetensors"))
    assert header_of(export_kohya(tmp_path / "te.safetensors", tmp_path / "kt.safetensors")) == BASE_KOHYA_HEADER


def sgm_names(unet):
    layout = UnetLayout.of(unet)
    return {"lora_unet_" + unet_module_to_ldm(layer.name, layout).replace(".", "_") for layer in iter_adapted_layers(unet)}


def unet_names(kohya):
    return {k.rsplit(".", 1)[0] for k in kohya if k.startswith("lora_unet_") and k.endswith(".alpha")}


def test_export_of_an_sdxl_file_uses_the_layout_in_its_header(xl, xl_file, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = export_kohya(xl_file, tmp_path / "k.safetensors")
    kohya = load_file(out)
    assert unet_names(kohya) == sgm_names(xl.unet)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert header_of(out) == {"sa_peft": header_of(xl_file)["sa_peft"], **BASE_KOHYA_HEADER, "ss_network_dim": "2",
                              "ss_base_model_version": "sdxl_base_v1-0"}


def rewrite_header(path, **changes):
    tensors, header = load_file(path), header_of(path)
    header.update(changes)
    save_file(tensors, str(path), metadata={k: v for k, v in header.items() if v is not None})
    return path


def test_export_of_an_sdxl_file_without_layout_reads_the_local_base_or_warns(xl, xl_file, tmp_path):
    copy = tmp_path / "lora.safetensors"
    save_file(load_file(xl_file), str(copy), metadata=header_of(xl_file))
    # No layout in the header: the base model's UNet config, if it is local.
    xl.unet.save_config(tmp_path / "base" / "unet")
    rewrite_header(copy, **{UNET_LAYOUT_KEY: None, "sa_peft": json.dumps({"base_model": str(tmp_path / "base")})})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unet_names(load_file(export_kohya(copy, tmp_path / "local.safetensors"))) == sgm_names(xl.unet)
    # Not local: diffusers' names (with the added-conditioning MLP as label_emb) and a warning naming the source.
    for info in ({"base_model": str(tmp_path / "not-here"), "base_pipeline": "StableDiffusionXLPipeline"}, None):
        rewrite_header(copy, sa_peft=None if info is None else json.dumps(info))
        message = (f"export {str(copy)!r}: SDXL adapter without its UNet layout (no {UNET_LAYOUT_KEY} header, base model "
                   "not found locally); UNet keys keep diffusers' names, which A1111 maps incompletely")
        with pytest.warns(UserWarning) as record:
            out = export_kohya(str(copy), tmp_path / "diffusers-names.safetensors")
        assert [str(w.message) for w in record] == [message]
        # the caller's line (stacklevel 2); under mutmut its trampoline's frames come between
        assert record[0].filename == __file__ or os.sep + "mutmut" + os.sep in record[0].filename
        kohya = load_file(out)
        assert "lora_unet_up_blocks_0_upsamplers_0_conv.alpha" in kohya and "lora_unet_label_emb_0_0.alpha" in kohya
        assert not any("output_blocks" in k for k in kohya)
        assert header_of(out)["ss_base_model_version"] == "sdxl_base_v1-0"
        assert ("sa_peft" in header_of(out)) == (info is not None)


def test_export_tells_sdxl_from_its_keys_or_its_header(xl, tmp_path):
    # A UNet-only SDXL adapter with no sa-peft header: SDXL from its added-conditioning MLP.
    unet_state = peft_keyed(xl.unet)
    save_file(unet_state, str(tmp_path / "unet.safetensors"))
    with pytest.warns(UserWarning, match="SDXL adapter without its UNet layout"):
        kohya = load_file(export_kohya(tmp_path / "unet.safetensors", tmp_path / "k1.safetensors"))
    assert "lora_unet_label_emb_0_0.alpha" in kohya
    # ... or from a second text encoder.
    te2 = {f"text_encoder_2.{k}": v for k, v in xl.te2[0].items()}
    attn = {k: v for k, v in unet_state.items() if "attn" in k}
    save_file({**attn, **te2}, str(tmp_path / "te2.safetensors"))
    with pytest.warns(UserWarning, match="SDXL adapter without its UNet layout"):
        out = export_kohya(tmp_path / "te2.safetensors", tmp_path / "k2.safetensors")
    assert {k.split("_")[1] for k in load_file(out)} == {"unet", "te2"}
    assert header_of(out)["ss_base_model_version"] == "sdxl_base_v1-0"
    # ... or from its layout alone (an SDXL UNet adapted only in attention).
    save_file(attn, str(tmp_path / "attn.safetensors"),
              metadata={UNET_LAYOUT_KEY: json.dumps(unet_layout_info(xl.unet))})
    out = export_kohya(tmp_path / "attn.safetensors", tmp_path / "k3.safetensors")
    assert header_of(out)["ss_base_model_version"] == "sdxl_base_v1-0"
    layout = UnetLayout.of(xl.unet)
    assert unet_names(load_file(out)) == {
        "lora_unet_" + unet_module_to_ldm(k.removeprefix("unet.").removesuffix(".lora_A.weight"), layout).replace(".", "_")
        for k in attn if k.endswith("lora_A.weight")}
    # ... or from its header's pipeline alone (no layout, the base model not found).
    save_file(attn, str(tmp_path / "named.safetensors"),
              metadata={"sa_peft": json.dumps({"base_pipeline": "StableDiffusionXLPipeline"})})
    with pytest.warns(UserWarning, match="SDXL adapter without its UNet layout"):
        out = export_kohya(tmp_path / "named.safetensors", tmp_path / "k5.safetensors")
    assert header_of(out)["ss_base_model_version"] == "sdxl_base_v1-0"
    # An SD adapter is none of these: no warning, no base version.
    save_file(attn, str(tmp_path / "sd.safetensors"), metadata={"sa_peft": json.dumps({"base_pipeline": "StableDiffusionPipeline"})})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = export_kohya(tmp_path / "sd.safetensors", tmp_path / "k4.safetensors")
    assert "ss_base_model_version" not in header_of(out)
    assert unet_names(load_file(out)) == {"lora_unet_" + k.removeprefix("unet.").removesuffix(".lora_A.weight").replace(".", "_")
                                          for k in attn if k.endswith("lora_A.weight")}


def test_export_of_an_sd_file_keeps_diffusers_names_even_with_a_layout(sd, sd_file, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kohya = load_file(export_kohya(sd_file, tmp_path / "k.safetensors"))
    assert unet_names(kohya) == {"lora_unet_" + layer.name.replace(".", "_") for layer in iter_adapted_layers(sd.unet)}
    assert {k.split("_")[1] for k in kohya} == {"unet", "te"}


@pytest.mark.parametrize("entry", ["not json", "[1, 2]", '{"layers_per_block": "x", "up_block_types": 3}',
                                   '{"layers_per_block": 2, "up_block_types": 3}',
                                   '{"layers_per_block": [1, 2], "up_block_types": []}'])
def test_export_refuses_a_damaged_layout_header(xl, tmp_path, entry):
    path = tmp_path / "lora.safetensors"
    save_file(peft_keyed(xl.unet), str(path), metadata={UNET_LAYOUT_KEY: entry})
    with pytest.raises(InputError) as info:
        export_kohya(path, tmp_path / "out.safetensors")
    assert re.fullmatch(rf"export source {re.escape(repr(str(path)))}: the '{UNET_LAYOUT_KEY}' header entry is not a UNet "
                        r"layout \(.+\); the file is damaged", str(info.value))
    assert not (tmp_path / "out.safetensors").exists()


def test_a_layout_header_without_block_counts_is_taken_as_it_is(xl, tmp_path):
    path = tmp_path / "lora.safetensors"
    layout = {"layers_per_block": None, "up_block_types": 3, "addition_embed_type": "text_time"}
    save_file(peft_keyed(xl.unet), str(path), metadata={UNET_LAYOUT_KEY: json.dumps(layout)})
    with pytest.warns(UserWarning, match="SDXL adapter without its UNet layout"):
        kohya = load_file(export_kohya(path, tmp_path / "out.safetensors"))
    assert "lora_unet_label_emb_0_0.alpha" in kohya and not any("output_blocks" in k for k in kohya)


def test_local_unet_layout_never_downloads(monkeypatch):
    from diffusers import UNet2DConditionModel

    calls = []

    def load_config(name, **kwargs):
        calls.append((name, kwargs))
        if name == "missing":
            raise OSError("not in the cache")
        if name == "bad":
            raise ValueError("not a config")
        return {"layers_per_block": 2, "down_block_types": ("A", "B"), "up_block_types": ["C"], "sample_size": 64}

    monkeypatch.setattr(UNet2DConditionModel, "load_config", load_config)
    assert _local_unet_layout("some/model") == {"layers_per_block": 2, "down_block_types": ["A", "B"],
                                                "up_block_types": ["C"]}
    assert _local_unet_layout("missing") is None and _local_unet_layout("bad") is None
    assert _local_unet_layout(None) is None and _local_unet_layout("") is None
    assert calls == [(name, {"subfolder": "unet", "local_files_only": True}) for name in ("some/model", "missing", "bad")]


def test_flux_export_from_a_file_or_the_live_transformer(tmp_path):
    from sa_peft.kohya_flux import flux_kohya_state_dict

    transformer = flux_transformer()
    file = save_forget_lora(tmp_path / "lora", transformer, {"forget_prompts": ["x"]})
    state = peft_keyed(transformer, "transformer")
    expected = flux_kohya_state_dict(state, {"transformer_blocks.0.attn.to_out.0": 1.5,
                                             "single_transformer_blocks.0.proj_out": 1.5})  # alpha 3 / rank 2
    assert {k.rsplit(".", 2)[0] for k in expected} == {"lora_unet_double_blocks_0_img_attn_proj",
                                                       "lora_unet_single_blocks_0_linear2"}
    from_file = export_kohya(file, tmp_path / "file.safetensors")
    live = export_kohya(transformer, tmp_path / "live.safetensors")
    for out in (from_file, live):
        assert_same(load_file(out), expected)
    info = header_of(file)["sa_peft"]
    assert header_of(from_file) == {"sa_peft": info, **BASE_KOHYA_HEADER, "ss_network_dim": "2"}
    with_metadata = export_kohya(file, tmp_path / "m.safetensors", metadata={"ss_network_dim": 5, "note": "x"})
    assert header_of(with_metadata) == {"sa_peft": info, **BASE_KOHYA_HEADER, "ss_network_dim": "5", "note": "x"}
    assert header_of(live) == {**BASE_KOHYA_HEADER, "ss_network_dim": "2"}


def test_sd3_adapters_are_refused_by_the_kohya_export(tmp_path):
    transformer = build_tiny_sd3_pipeline().transformer
    transformer.add_adapter(make_lora_config(["transformer_blocks.0.attn.to_q"], 2))
    file = save_forget_lora(tmp_path / "lora", transformer, {})
    for source in (file, transformer):  # a live SD3 transformer was written under UNet names
        with pytest.raises(InputError, match=r": an SD3 adapter has no kohya layout to convert to; ComfyUI reads the "
                                             r"diffusers file \(its `transformer.` keys\) as it is"):
            export_kohya(source, tmp_path / "k.safetensors")
    assert not (tmp_path / "k.safetensors").exists()


def test_export_of_a_live_sdxl_unet_takes_its_layout(xl, xl_file, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = export_kohya(xl.unet, tmp_path / "live.safetensors")
    kohya = load_file(out)
    assert unet_names(kohya) == sgm_names(xl.unet)
    from_file = load_file(export_kohya(xl_file, tmp_path / "file.safetensors"))
    assert all(torch.equal(kohya[k], from_file[k]) for k in kohya)
    assert header_of(out) == {**BASE_KOHYA_HEADER, "ss_network_dim": "2", "ss_base_model_version": "sdxl_base_v1-0"}


def test_export_errors_name_the_export_source(tmp_path):
    with pytest.raises(MissingInputError) as info:
        export_kohya(tmp_path / "gone.safetensors", tmp_path / "k.safetensors")
    assert str(info.value) == f"`export source` {str(tmp_path / 'gone.safetensors')!r}: no such file or folder"
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match=rf"^`export source` '.*junk\.safetensors' is not a valid safetensors file \(.+\); {HINT}$"):
        export_kohya(tmp_path / "junk.safetensors", tmp_path / "k.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["junk.safetensors"]
