"""LoRA target presets, explicit module names, and the LoRA config."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import add_forget_lora

from sa_peft.lora import LORA_TARGET_PRESETS, iter_adapted_layers, make_lora_config, resolve_lora_targets

ATTN = re.compile(r".*\.attn([12])\.(to_q|to_k|to_v|to_out\.0)$")


@pytest.fixture
def unet(tiny_pipe):
    return tiny_pipe.unet


def adaptable(unet):
    return [n for n, m in unet.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]


def test_presets(unet):
    everything = adaptable(unet)
    targets = {preset: resolve_lora_targets(unet, preset) for preset in LORA_TARGET_PRESETS}
    assert targets["all"] == everything
    # xattn: the four projections of every cross-attention, nothing else
    assert targets["xattn"] and all(ATTN.match(n) and ".attn2." in n for n in targets["xattn"])
    assert len(targets["xattn"]) == 4 * 4  # 4 transformer blocks in the tiny UNet
    assert {n.rsplit(".attn2.", 1)[1] for n in targets["xattn"]} == {"to_q", "to_k", "to_v", "to_out.0"}
    # attn: self- and cross-attention projections
    assert set(targets["attn"]) == {n for n in everything if ATTN.match(n)}
    assert set(targets["xattn"]) < set(targets["attn"])
    assert any(".attn1." in n for n in targets["attn"])
    # noxattn: everything except cross-attention, the output layer and the time embedding
    nox = set(targets["noxattn"])
    assert not any(".attn2." in n for n in nox)
    assert "conv_out" not in nox and not any(n.startswith("time_embedding.") for n in nox)
    assert {
        "conv_in",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.resnets.0.conv1",
        "mid_block.resnets.0.time_emb_proj",
    } <= nox
    excluded = set(everything) - nox
    assert excluded == {n for n in everything if ".attn2." in n or n == "conv_out" or n.startswith("time_embedding.")}
    assert {"time_embedding.linear_1", "time_embedding.linear_2", "conv_out"} <= excluded


def test_explicit_names(unet):
    assert resolve_lora_targets(unet, "attn2.to_k") == [n for n in adaptable(unet) if n.endswith(".attn2.to_k")]
    assert resolve_lora_targets(unet, "conv_in, conv_out") == ["conv_in", "conv_out"]
    assert resolve_lora_targets(unet, ["conv_out", "conv_in", "conv_out"]) == ["conv_out", "conv_in"]
    full = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    assert resolve_lora_targets(unet, full) == [full]
    regex = resolve_lora_targets(unet, r".*attn1\.to_(q|k)")
    assert len(regex) == 8 and all(re.fullmatch(r".*attn1\.to_(q|k)", n) for n in regex)
    # "to_k" must not match "to_k_something" or only part of a name
    assert all(n.endswith(".to_k") for n in resolve_lora_targets(unet, "to_k"))


@pytest.mark.parametrize(
    "target,bad",
    [
        ("attn3.to_q", "attn3.to_q"),
        (["conv_in", "nonexistent"], "nonexistent"),
        ("conv_in,  time_embed", "time_embed"),
        ("norm1", "norm1"),
    ],
)
def test_unknown_entries_are_named(unet, target, bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        resolve_lora_targets(unet, target)


def test_empty_target(unet):
    with pytest.raises(ValueError, match="empty"):
        resolve_lora_targets(unet, " , ")


@pytest.mark.parametrize("rank", [0, -2])
def test_rank_must_be_positive(rank):
    with pytest.raises(ValueError, match="`rank`"):
        make_lora_config(["conv_in"], rank)


def test_config_and_adapted_layers(unet):
    config = make_lora_config(["conv_in"], 4)
    assert config.r == 4 and config.lora_alpha == 4 and not config.use_rslora
    names = add_forget_lora(unet, "xattn", rank=4, alpha=2.0, use_rslora=True, randomize=False)
    layers = list(iter_adapted_layers(unet))
    assert [layer.name for layer in layers] == names
    for layer in layers:
        assert layer.scale == pytest.approx(2.0 / 2.0)
        assert layer.lora_a.shape == (4, layer.weight_shape[1]) and layer.lora_b.shape == (layer.weight_shape[0], 4)
        assert torch.count_nonzero(layer.lora_b) == 0
    assert list(iter_adapted_layers(unet, adapter="other")) == []
    # only the LoRA factors are trainable
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_fused_adapters_give_the_adapted_outputs_and_leave_the_base_weights_bit_for_bit(unet):
    from sa_peft.lora import adapters_fused
    from sa_peft.objective import adapters_disabled

    add_forget_lora(unet)
    base_weights = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=gen)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        adapted = unet(x, t, context).sample
        with adapters_disabled(unet):
            base = unet(x, t, context).sample
        with adapters_fused(unet):
            layers = list(iter_adapted_layers(unet))
            assert layers and all(layer.module.merged for layer in layers)
            fused = unet(x, t, context).sample
        again = unet(x, t, context).sample
        # Switched-off adapters are not fused: the frozen model stays the frozen model.
        with adapters_disabled(unet), adapters_fused(unet):
            still_base = unet(x, t, context).sample
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(fused, adapted, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, adapted) and torch.equal(still_base, base)
    assert not any(layer.module.merged for layer in iter_adapted_layers(unet))
    for name, param in unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_weights[name]), name
