"""Stacking forget adapters from separate runs: set_adapters weights, cross_attention_kwargs scale, negative weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from train_helpers import load_train_module, run_training, sample

from sa_peft.adapter_io import component_configs, export_kohya, layer_scales, load_adapter_file
from sa_peft.merge import adapter_names, stack_forget_loras
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

PROMPT = "a painting van gogh style"


@pytest.fixture(scope="module")
def runs(tiny_pipe_dir, tmp_path_factory):
    """Two training runs on the tiny pipeline, forgetting different concepts with different LoRA settings."""
    root = tmp_path_factory.mktemp("stack")
    replay = root / "replay.txt"
    replay.write_text("a photo of a cat\na photo of a dog\n")
    train = load_train_module()
    run_training(train, tiny_pipe_dir, root / "pitt", replay, "--forget_prompt", "brad pitt", "--surrogate_type", "noise")
    run_training(train, tiny_pipe_dir, root / "gogh", replay, "--forget_prompt", "van gogh", "--surrogate_type", "noise",
                 "--lora_target", "attn", "--rank", "4", "--lora_alpha", "1", "--use_rslora", "--seed", "1")
    return root / "pitt", root / "gogh"


def load(*dirs_and_names):
    pipe = build_tiny_pipeline()
    for folder, name in dirs_and_names:
        pipe.load_lora_weights(str(folder), adapter_name=name)
    return pipe


def test_adapter_weights_select_and_combine(runs):
    pitt, gogh = runs
    base = sample(build_tiny_pipeline(), PROMPT)
    alone_pitt = sample(load((pitt, "forget_pitt")), PROMPT)
    alone_gogh = sample(load((gogh, "forget_gogh")), PROMPT)
    both = load((pitt, "forget_pitt"), (gogh, "forget_gogh"))
    assert both.get_list_adapters() == {"unet": ["forget_pitt", "forget_gogh"]}
    # Loading makes the last-loaded adapter the only active one: stacking needs set_adapters.
    np.testing.assert_allclose(sample(both, PROMPT), alone_gogh, atol=1e-6)
    both.set_adapters(["forget_pitt", "forget_gogh"])  # weights default to 1.0 each
    together = sample(both, PROMPT)
    assert np.abs(together - alone_pitt).max() > 1e-3 and np.abs(together - alone_gogh).max() > 1e-3
    for weights, expected in (([1.0, 0.0], alone_pitt), ([0.0, 1.0], alone_gogh), ([0.0, 0.0], base)):
        both.set_adapters(["forget_pitt", "forget_gogh"], adapter_weights=weights)
        np.testing.assert_allclose(sample(both, PROMPT), expected, atol=1e-6, err_msg=str(weights))
    both.set_adapters(["forget_pitt", "forget_gogh"], adapter_weights=[1.0, 1.0])
    np.testing.assert_allclose(sample(both, PROMPT), together, atol=1e-6)
    both.disable_lora()
    np.testing.assert_allclose(sample(both, PROMPT), base, atol=1e-6)


def test_scale_multiplies_every_adapter_weight(runs):
    pipe = load((runs[0], "forget_pitt"), (runs[1], "forget_gogh"))
    names = ["forget_pitt", "forget_gogh"]
    pipe.set_adapters(names, adapter_weights=[0.5, -0.7])
    scaled = sample(pipe, PROMPT, cross_attention_kwargs={"scale": 0.6})
    unscaled = sample(pipe, PROMPT)  # the scale applies to that call only
    pipe.set_adapters(names, adapter_weights=[0.3, -0.42])
    np.testing.assert_allclose(scaled, sample(pipe, PROMPT), atol=1e-5)
    pipe.set_adapters(names, adapter_weights=[0.5, -0.7])
    np.testing.assert_allclose(unscaled, sample(pipe, PROMPT), atol=1e-6)
    np.testing.assert_allclose(sample(pipe, PROMPT, cross_attention_kwargs={"scale": 1.0}), unscaled, atol=1e-6)


def test_scale_zero_is_the_base_model_and_resets_weights_to_one(runs):
    """Documented in the README: diffusers re-initialises adapter scales after a call with scale 0."""
    pipe = load((runs[0], "forget_pitt"), (runs[1], "forget_gogh"))
    names = ["forget_pitt", "forget_gogh"]
    pipe.set_adapters(names, adapter_weights=[0.5, -0.7])
    np.testing.assert_allclose(sample(pipe, PROMPT, cross_attention_kwargs={"scale": 0.0}),
                               sample(build_tiny_pipeline(), PROMPT), atol=1e-6)
    after = sample(pipe, PROMPT)
    pipe.set_adapters(names, adapter_weights=[1.0, 1.0])
    np.testing.assert_allclose(after, sample(pipe, PROMPT), atol=1e-6)


def test_negative_weight_subtracts_the_update(runs, tmp_path):
    pitt = runs[0] / "pytorch_lora_weights.safetensors"
    # Layer level: with adapter weight w, an adapted layer computes W x + w · scale · B A x.
    tensors, header = load_adapter_file(pitt)
    scales = layer_scales(tensors, component_configs(header))
    module_name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    _, scale = scales[f"unet.{module_name}"]
    a = tensors[f"unet.{module_name}.lora_A.weight"]
    b = tensors[f"unet.{module_name}.lora_B.weight"]
    pipe = load((runs[0], "forget_pitt"))
    layer = pipe.unet.get_submodule(module_name)
    x = torch.randn(3, a.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = layer.get_base_layer()(x)
        for w in (-1.0, 0.5, 2.0):
            pipe.set_adapters(["forget_pitt"], adapter_weights=[w])
            torch.testing.assert_close(layer(x), base + w * scale * (x @ a.T @ b.T), rtol=1e-5, atol=1e-6)
    # Pipeline level: weight -1 is the same adapter with B negated, at weight 1.
    with safe_open(str(pitt), framework="pt") as f:
        metadata = f.metadata()
    negated = {k: -v if ".lora_B." in k else v for k, v in tensors.items()}
    save_file(negated, tmp_path / "negated.safetensors", metadata=metadata)
    pipe.set_adapters(["forget_pitt"], adapter_weights=[-1.0])
    minus = sample(pipe, PROMPT)
    other = build_tiny_pipeline()
    other.load_lora_weights(str(tmp_path), weight_name="negated.safetensors", adapter_name="negated")
    np.testing.assert_allclose(minus, sample(other, PROMPT), atol=1e-6)
    assert np.abs(minus - sample(load((runs[0], "forget_pitt")), PROMPT)).max() > 1e-3


def test_stack_helper_and_kohya_copies_stack_the_same(runs, tmp_path):
    pitt, gogh = runs
    manual = load((pitt, "forget_pitt"), (gogh, "forget_gogh"))
    manual.set_adapters(["forget_pitt", "forget_gogh"], adapter_weights=[0.8, 1.5])
    expected = sample(manual, PROMPT)
    helper = build_tiny_pipeline()
    assert stack_forget_loras(helper, [pitt, gogh], [0.8, 1.5]) == adapter_names(2)
    np.testing.assert_allclose(sample(helper, PROMPT), expected, atol=1e-6)
    kohya = export_kohya(gogh / "pytorch_lora_weights.safetensors", tmp_path / "gogh_kohya.safetensors")
    mixed = build_tiny_pipeline()
    stack_forget_loras(mixed, [pitt / "pytorch_lora_weights.safetensors", kohya], [0.8, 1.5])
    np.testing.assert_allclose(sample(mixed, PROMPT), expected, atol=1e-5)


def test_stack_rejects_mismatched_weights_and_non_safetensors(runs, tmp_path):
    pipe = build_tiny_pipeline()
    with pytest.raises(ValueError, match="`lora_weight` was given 1 times for 2 `lora`"):
        stack_forget_loras(pipe, list(runs), [1.0])
    (tmp_path / "adapter.bin").write_bytes(b"\x80\x04 not a pickle you should load")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        stack_forget_loras(pipe, [tmp_path / "adapter.bin"])
    with pytest.raises(FileNotFoundError, match="`lora` .*no such file"):
        stack_forget_loras(pipe, [tmp_path / "missing.safetensors"])
