"""EWC penalties on peft LoRA layers (Linear, 3x3 and 1x1 Conv2d) against materialised references."""

from __future__ import annotations

import pytest
import torch
from conftest import add_forget_lora, random_fisher

from sa_peft.ewc import EWCPenalty, Rank1FisherPenalty, SumOfPenalties, full_space_penalty, lowrank_space_penalty
from sa_peft.fisher import FisherInfo, load_fisher, save_fisher
from sa_peft.lora import iter_adapted_layers
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

# (rank, alpha, use_rslora): rank one, alpha != rank, rsLoRA with alpha != rank.
LORA_SETTINGS = [(1, None, False), (4, 2.5, False), (3, 7.0, True)]
CONV3X3, CONV1X1, LINEAR = (
    "conv_in",
    "down_blocks.1.resnets.0.conv_shortcut",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
)


def adapted_unet(target="all", rank=2, alpha=None, use_rslora=False, randomize=True):
    unet = build_tiny_pipeline().unet
    names = add_forget_lora(unet, target, rank, alpha, use_rslora, randomize=randomize)
    return unet, names


def merged_deltas(unet):
    """W_adapted − W_base for every LoRA layer, read from the weights after peft merges the adapter."""
    deltas = {}
    for layer in iter_adapted_layers(unet):
        base = layer.module.get_base_layer()
        before = base.weight.detach().clone()
        layer.module.merge(adapter_names=["default"])
        deltas[layer.name] = (base.weight.detach() - before).double()
        layer.module.unmerge()
        torch.testing.assert_close(base.weight.detach(), before, rtol=0, atol=1e-6)
    return deltas


def rank_one_fisher(unet, names, seed=0):
    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    diagonal = {}
    for name in names:
        shape = modules[name].get_base_layer().weight.shape
        n = shape[1:].numel()
        u, v = torch.rand(shape[0], generator=gen) + 0.1, torch.rand(n, generator=gen) + 0.1
        diagonal[f"{name}.weight"] = (u[:, None] * v[None, :]).reshape(shape)
    return FisherInfo.from_diagonal(diagonal, {})


def fisher_mean(fisher, names):
    total = sum(fisher.diagonal[f"{n}.weight"].double().sum() for n in names)
    return float(total / sum(fisher.diagonal[f"{n}.weight"].numel() for n in names))


@pytest.mark.parametrize("space", ["full", "lowrank"])
def test_penalty_is_zero_at_initialisation(space):
    unet, names = adapted_unet("all", rank=4, alpha=8.0, randomize=False)
    layers = list(iter_adapted_layers(unet))
    assert all(torch.count_nonzero(layer.lora_b) == 0 for layer in layers)
    assert any(torch.count_nonzero(layer.lora_a) > 0 for layer in layers)
    penalty = EWCPenalty(unet, random_fisher(unet, names), space=space)()
    assert penalty.item() == 0.0


@pytest.mark.parametrize("rank,alpha,use_rslora", LORA_SETTINGS)
def test_full_space_equals_merged_weight_reference(rank, alpha, use_rslora):
    unet, names = adapted_unet("all", rank, alpha, use_rslora)
    fisher = random_fisher(unet, names, seed=rank)
    deltas = merged_deltas(unet)
    assert {type(layer.module.get_base_layer()) for layer in iter_adapted_layers(unet)} == {
        torch.nn.Linear,
        torch.nn.Conv2d,
    }
    reference = sum((fisher.diagonal[f"{n}.weight"].double() * deltas[n].square()).sum() for n in names)
    assert reference > 0
    raw = EWCPenalty(unet, fisher, space="full", normalization="none")()
    assert raw.dtype == torch.float32
    torch.testing.assert_close(raw.double(), reference, rtol=1e-5, atol=0)
    # normalization="mean" divides by the mean Fisher over the adapted weights.
    normalised = EWCPenalty(unet, fisher, space="full")()
    torch.testing.assert_close(normalised.double(), reference / fisher_mean(fisher, names), rtol=1e-5, atol=0)


@pytest.mark.parametrize("rank,alpha,use_rslora", LORA_SETTINGS)
def test_scale_follows_alpha_and_rslora(rank, alpha, use_rslora):
    unet, _ = adapted_unet(LINEAR, rank, alpha, use_rslora)
    (layer,) = iter_adapted_layers(unet)
    alpha = rank if alpha is None else alpha
    expected = alpha / rank**0.5 if use_rslora else alpha / rank
    assert layer.scale == pytest.approx(expected)
    # the penalty uses that scale: it matches the weight change peft actually merges
    fisher = random_fisher(unet, [LINEAR])
    f = fisher.diagonal[f"{LINEAR}.weight"]
    delta = merged_deltas(unet)[LINEAR]
    torch.testing.assert_close(
        full_space_penalty(f, layer.lora_a, layer.lora_b, layer.scale).double(),
        (f.double() * delta.square()).sum(),
        rtol=1e-5,
        atol=0,
    )


@pytest.mark.parametrize("name", [CONV3X3, CONV1X1, LINEAR])
def test_delta_weight_layout_matches_peft(name):
    unet, _ = adapted_unet(name, rank=3, alpha=5.0)
    (layer,) = iter_adapted_layers(unet)
    shape = layer.weight_shape
    assert layer.delta_weight().shape == (shape[0], shape[1:].numel())
    torch.testing.assert_close(layer.delta_weight().reshape(shape), layer.module.get_delta_weight("default"))
    # and the module's output moves by exactly that ΔW
    base = layer.module.get_base_layer()
    x = torch.randn(2, shape[1], 5, 5) if isinstance(base, torch.nn.Conv2d) else torch.randn(2, shape[1])
    if isinstance(base, torch.nn.Conv2d):
        expected = torch.nn.functional.conv2d(x, layer.delta_weight().reshape(shape), None, base.stride, base.padding)
    else:
        expected = x @ layer.delta_weight().t()
    with torch.no_grad():
        torch.testing.assert_close(layer.module(x) - base(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", [[CONV3X3], [CONV1X1], [LINEAR], "all"])
@pytest.mark.parametrize("rank,alpha,use_rslora", [(1, None, False), (4, 2.5, True)])
def test_lowrank_equals_full_for_rank_one_fisher(target, rank, alpha, use_rslora):
    unet, names = adapted_unet(target, rank, alpha, use_rslora)
    fisher = rank_one_fisher(unet, names)
    full = EWCPenalty(unet, fisher, space="full")()
    lowrank = EWCPenalty(unet, fisher, space="lowrank")()
    assert full > 0
    torch.testing.assert_close(lowrank, full, rtol=1e-5, atol=0)


def test_lowrank_differs_from_full_for_generic_fisher():
    unet, names = adapted_unet("all", rank=4)
    fisher = random_fisher(unet, names)
    full = EWCPenalty(unet, fisher, space="full")().item()
    lowrank = EWCPenalty(unet, fisher, space="lowrank")().item()
    assert lowrank > 0 and full > 0
    assert abs(lowrank - full) / full > 1e-3


@pytest.mark.parametrize("shape", [(6, 5), (8, 3, 3, 3), (7, 4, 1, 1)])
def test_lowrank_formula_equals_materialised_rank_one_fisher(shape):
    gen = torch.Generator().manual_seed(1)
    m, n, r, s = shape[0], int(torch.tensor(shape[1:]).prod()), 3, 0.7
    f = torch.rand(m, n, generator=gen, dtype=torch.float64)
    a, b = torch.randn(r, n, generator=gen, dtype=torch.float64), torch.randn(m, r, generator=gen, dtype=torch.float64)
    u, v, total = f.sum(1), f.sum(0), f.sum()
    f_hat = u[:, None] * v[None, :] / total
    torch.testing.assert_close(f_hat.sum(1), u)
    torch.testing.assert_close(f_hat.sum(0), v)
    expected = (f_hat * (s * b @ a).square()).sum()
    torch.testing.assert_close(lowrank_space_penalty(u, v, total, a, b, s), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(full_space_penalty(f, a, b, s), (f * (s * b @ a).square()).sum(), rtol=1e-10, atol=0)
    assert not torch.isclose(lowrank_space_penalty(u, v, total, a, b, s), full_space_penalty(f, a, b, s), rtol=1e-3)


# chunk_elements: the device default; several layers or a few rows per block; one row per block.
@pytest.mark.parametrize(("space", "chunk_elements"), [("full", None), ("full", 5000), ("full", 1), ("lowrank", None)])
def test_gradients_match_autograd_through_materialised_delta(space, chunk_elements):
    unet, names = adapted_unet("all", rank=3, alpha=4.5, use_rslora=True)
    fisher = random_fisher(unet, names, seed=3)
    layers = list(iter_adapted_layers(unet))
    params = [
        p for layer in layers for p in (layer.module.lora_A["default"].weight, layer.module.lora_B["default"].weight)
    ]
    if chunk_elements == 5000:  # both blocking paths are taken on this UNet
        sizes = [layer.lora_b.shape[0] * layer.lora_a.shape[1] for layer in layers]
        assert min(sizes) * 2 <= chunk_elements < max(sizes)

    penalty = EWCPenalty(unet, fisher, space=space, normalization="none", chunk_elements=chunk_elements)()
    grads = torch.autograd.grad(penalty, params)

    reference = 0.0
    for layer in layers:
        f = fisher.diagonal[f"{layer.name}.weight"].double()
        if space == "lowrank":
            f2 = f.reshape(f.shape[0], -1)
            f = (f2.sum(1)[:, None] * f2.sum(0)[None, :] / f2.sum()).reshape(f.shape)
        reference = reference + (f * layer.module.get_delta_weight("default").double().square()).sum()
    reference_grads = torch.autograd.grad(reference, params)

    torch.testing.assert_close(penalty.double(), reference.detach(), rtol=1e-5, atol=0)
    assert any(g.abs().max() > 0 for g in grads)
    for g, ref in zip(grads, reference_grads):
        torch.testing.assert_close(g.double(), ref.double(), rtol=1e-4, atol=1e-6 * float(ref.abs().max()) + 1e-12)


@pytest.mark.parametrize("space", ["full", "lowrank"])
def test_bf16_autocast_keeps_fp32_penalty(space):
    unet, names = adapted_unet("all", rank=4, alpha=2.0)
    fisher = random_fisher(unet, names)
    ewc = EWCPenalty(unet, fisher, space=space)
    plain = ewc()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # the same products under bf16 autocast would lose precision: the penalty must not
        a = next(iter(iter_adapted_layers(unet))).lora_a
        assert (a @ a.t()).dtype == torch.bfloat16
        under_autocast = ewc()
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=1e-6, atol=0)
    under_autocast.backward()
    lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in lora_params)


def test_mean_normalization_uses_only_adapted_weights():
    unet, names = adapted_unet("xattn", rank=2)
    fisher = random_fisher(unet, names)
    # Extra, non-adapted entries with huge values must not change the normaliser.
    extra = random_fisher(unet, ["conv_in", "conv_out"])
    combined = FisherInfo.from_diagonal({**fisher.diagonal, **{k: v * 1e6 for k, v in extra.diagonal.items()}}, {})
    raw = EWCPenalty(unet, fisher, normalization="none")()
    for space in ("full", "lowrank"):
        mean_a = EWCPenalty(unet, fisher, space=space)()
        mean_b = EWCPenalty(unet, combined, space=space)()
        torch.testing.assert_close(mean_a, mean_b, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        EWCPenalty(unet, fisher, normalization="mean")().double(),
        raw.double() / fisher_mean(fisher, names),
        rtol=1e-5,
        atol=0,
    )
    # Scaling the Fisher does not change the normalised penalty.
    scaled = FisherInfo.from_diagonal({k: v * 1000 for k, v in fisher.diagonal.items()}, {})
    torch.testing.assert_close(EWCPenalty(unet, scaled)(), EWCPenalty(unet, fisher)(), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="normalization"):
        EWCPenalty(unet, fisher, normalization="max")


def test_factored_only_fisher_works_with_lowrank_and_errors_with_full(tmp_path):
    unet, names = adapted_unet("all", rank=2)
    fisher = random_fisher(unet, names)
    path = tmp_path / "factored.safetensors"
    save_fisher(fisher, path, factored_only=True)
    factored = load_fisher(path)
    assert factored.diagonal == {}
    torch.testing.assert_close(
        EWCPenalty(unet, factored, space="lowrank")(), EWCPenalty(unet, fisher, space="lowrank")(), rtol=1e-6, atol=0
    )
    with pytest.raises(ValueError, match="factored-only"):
        EWCPenalty(unet, factored, space="full")


def test_fisher_missing_an_adapted_module_is_a_clear_error():
    unet, names = adapted_unet("xattn", rank=2)
    fisher = random_fisher(unet, names[1:])
    with pytest.raises(ValueError, match="does not cover 1 adapted module") as info:
        EWCPenalty(unet, fisher)
    assert names[0] in str(info.value)


def test_bad_arguments():
    unet, names = adapted_unet("xattn", rank=2)
    fisher = random_fisher(unet, names)
    with pytest.raises(ValueError, match="`ewc_space`"):
        EWCPenalty(unet, fisher, space="diagonal")
    with pytest.raises(ValueError, match="chunk_elements"):
        EWCPenalty(unet, fisher, chunk_elements=0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        EWCPenalty(build_tiny_pipeline().unet, fisher)
    zero = FisherInfo.from_diagonal({k: torch.zeros_like(v) for k, v in fisher.diagonal.items()}, {})
    with pytest.raises(ValueError, match="zero"):
        EWCPenalty(unet, zero)


def test_layer_with_zero_fisher_stays_finite_when_the_mean_normaliser_is_large():
    """A dead layer (SD3's last joint block's attn.add_q_proj) next to a small Fisher: the normaliser 1/mean is large,
    and the low-rank penalty became 0 · inf = NaN."""
    unet, names = adapted_unet("xattn", rank=2)
    diagonal = {k: 0.01 * v for k, v in random_fisher(unet, names).diagonal.items()}
    diagonal[f"{names[0]}.weight"] = torch.zeros_like(diagonal[f"{names[0]}.weight"])
    fisher = FisherInfo.from_diagonal(diagonal, {})
    for space in ("full", "lowrank"):
        mean = EWCPenalty(unet, fisher, space=space, normalization="mean")
        assert mean.normalizer > 2
        raw = EWCPenalty(unet, fisher, space=space, normalization="none")()
        value = mean()
        assert torch.isfinite(value) and value > 0
        torch.testing.assert_close(value, mean.normalizer * raw.detach(), rtol=1e-5, atol=0)


def test_layer_with_zero_fisher_adds_nothing_in_either_space():
    unet, names = adapted_unet("xattn", rank=2)
    diagonal = dict(random_fisher(unet, names).diagonal)
    diagonal[f"{names[0]}.weight"] = torch.zeros_like(diagonal[f"{names[0]}.weight"])
    fisher = FisherInfo.from_diagonal(diagonal, {})
    layers = list(iter_adapted_layers(unet))
    for space in ("full", "lowrank"):
        penalty = EWCPenalty(unet, fisher, space=space, normalization="none")()
        expected = 0.0
        for layer in layers[1:]:
            key = f"{layer.name}.weight"
            if space == "full":
                expected += full_space_penalty(
                    fisher.diagonal[key].reshape(layer.lora_b.shape[0], -1), layer.lora_a, layer.lora_b, layer.scale
                )
            else:
                expected += lowrank_space_penalty(
                    fisher.row_sums[key],
                    fisher.col_sums[key],
                    fisher.row_sums[key].sum(),
                    layer.lora_a,
                    layer.lora_b,
                    layer.scale,
                )
        assert torch.isfinite(penalty)
        torch.testing.assert_close(penalty, expected, rtol=1e-5, atol=0)
        penalty.backward()
        assert all(torch.isfinite(p.grad).all() for n, p in unet.named_parameters() if "lora_" in n)
        unet.zero_grad()


def test_replaced_adapter_is_a_clear_error_not_a_stale_penalty():
    unet, names = adapted_unet("xattn", rank=2)
    ewc = EWCPenalty(unet, random_fisher(unet, names))
    ewc()
    unet.delete_adapters("default")
    add_forget_lora(unet, "xattn", 2)
    with pytest.raises(RuntimeError, match="replaced after the EWC penalty was built"):
        ewc()


@pytest.mark.parametrize("space", ["full", "lowrank"])
def test_module_casts_carry_the_fisher_buffers_and_keep_the_gather_index(space):
    unet, names = adapted_unet("xattn", rank=2)
    ewc = EWCPenalty(unet, random_fisher(unet, names), space=space)
    before = float(ewc().detach())
    buffers = {name: [t.clone() for t in getattr(ewc, name)] for name in ("full_buffers", "a_buffers", "b_buffers")}
    index = [t.clone() for t in ewc.gather_index]
    assert (len(buffers["full_buffers"]) > 0) == (space == "full") and (len(index) == 2) == (space == "lowrank")
    assert ewc.double() is ewc
    for name, originals in buffers.items():
        cast = getattr(ewc, name)
        assert [t.dtype for t in cast] == [torch.float64] * len(originals)
        for t, original in zip(cast, originals):
            torch.testing.assert_close(t, original.double(), rtol=0, atol=0)
    assert [t.dtype for t in ewc.gather_index] == [torch.long] * len(index)  # indices are not floating point
    assert all(torch.equal(t, i) for t, i in zip(ewc.gather_index, index))
    ewc.float()
    assert all(t.dtype == torch.float32 for name in buffers for t in getattr(ewc, name))
    assert float(ewc().detach()) == before


@pytest.mark.parametrize("chunk_elements", [1, 40, 100, 10**9])
def test_full_space_blocks_hold_at_most_chunk_elements_values(monkeypatch, chunk_elements):
    """E = B·A is formed in blocks of at most ``chunk_elements`` values, never smaller than one row of one layer."""
    unet, names = adapted_unet("xattn", rank=2)
    fisher = random_fisher(unet, names)
    reference = EWCPenalty(unet, fisher, chunk_elements=10**9)
    expected = reference()
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in unet.named_parameters() if "lora_" in n}
    unet.zero_grad()
    ewc = EWCPenalty(unet, fisher, chunk_elements=chunk_elements)
    blocks = []
    bmm = torch.bmm

    def recording(a, b, **kwargs):
        out = bmm(a, b, **kwargs)
        if "out" not in kwargs:  # the product E = B·A (its gradients are written into preallocated tensors)
            blocks.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "bmm", recording)
    value = ewc()
    monkeypatch.undo()
    row = max(shape[2] for shape in blocks)  # n of the widest layer
    assert blocks and all(g * rows * n <= max(chunk_elements, n) for g, rows, n in blocks)
    if chunk_elements == 1:
        assert all(g == 1 and rows == 1 for g, rows, _ in blocks)
    if chunk_elements == 10**9:
        assert len(blocks) == len(ewc.full_groups)  # one block per group of layers with the same shapes
    assert row > 1
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    value.backward()
    for n, p in unet.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p.grad, expected_grads[n], rtol=1e-5, atol=1e-8)


def mean_gradient_fisher(unet, names, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fisher = random_fisher(unet, names, seed=seed)
    mean = {k: torch.randn(v.shape, generator=gen) for k, v in fisher.diagonal.items()}
    return FisherInfo.from_diagonal(fisher.diagonal, {}, mean)


def test_rank1_penalty_is_the_trace_matched_square_of_the_projection_on_the_mean_gradient():
    unet, names = adapted_unet("attn", rank=3, alpha=1.5)
    fisher = mean_gradient_fisher(unet, names)
    penalty = Rank1FisherPenalty(unet, fisher)
    layers = list(iter_adapted_layers(unet))
    assert len(layers) == len(names) > 1
    mu = torch.cat([fisher.mean_gradient[f"{layer.name}.weight"].double().flatten() for layer in layers])
    delta = torch.cat([layer.delta_weight().detach().double().flatten() for layer in layers])
    projection = float(mu @ delta)
    coefficient = mu.numel() / float(mu.square().sum())  # c·‖μ‖² = the number of adapted weights
    assert penalty.coefficient == pytest.approx(coefficient, rel=1e-12)
    assert float(penalty.projection()) == pytest.approx(projection, rel=1e-5)
    assert float(penalty()) == pytest.approx(coefficient * projection**2, rel=1e-5)
    # ∂P/∂ΔW = 2cμ(μᵀΔW): check it through autograd on one B factor.
    penalty().backward()
    first = layers[0]
    grad_delta = 2 * coefficient * projection * fisher.mean_gradient[f"{first.name}.weight"].double().reshape(
        first.lora_b.shape[0], -1)
    expected_b = first.scale * grad_delta @ first.lora_a.detach().double().t()
    torch.testing.assert_close(first.module.lora_B["default"].weight.grad.double().reshape(expected_b.shape),
                               expected_b, rtol=1e-4, atol=1e-9)
    assert penalty.double() is penalty
    assert all(d.dtype == torch.float64 for d in penalty.directions)
    assert float(penalty.float().projection()) == pytest.approx(projection, rel=1e-5)


def test_rank1_penalty_refuses_bad_fishers_and_models():
    unet, names = adapted_unet("xattn", rank=2)
    fisher = mean_gradient_fisher(unet, names)
    with pytest.raises(ValueError, match="the model has no LoRA layers for the rank-1 Fisher penalty; add the forget"):
        Rank1FisherPenalty(build_tiny_pipeline().unet, fisher)
    partial = FisherInfo.from_diagonal(fisher.diagonal, {}, {k: v for k, v in list(fisher.mean_gradient.items())[1:]})
    with pytest.raises(ValueError, match=r"no mean gradient for 1 adapted module\(s\).*recompute it \(delete `fisher_path`\)"):
        Rank1FisherPenalty(unet, partial)
    zero = FisherInfo.from_diagonal(fisher.diagonal, {}, {k: torch.zeros_like(v) for k, v in fisher.mean_gradient.items()})
    with pytest.raises(ValueError, match="the Fisher's mean gradient is zero on every adapted weight"):
        Rank1FisherPenalty(unet, zero)


def test_sum_of_penalties_weights_each_term():
    unet, names = adapted_unet("xattn", rank=2)
    fisher = mean_gradient_fisher(unet, names)
    diagonal, rank1 = EWCPenalty(unet, fisher), Rank1FisherPenalty(unet, fisher)
    total = SumOfPenalties([diagonal, rank1], [0.25, 3.0])
    assert list(total.penalties) == [diagonal, rank1] and total.weights == [0.25, 3.0]
    torch.testing.assert_close(total(), 0.25 * diagonal() + 3.0 * rank1(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
@pytest.mark.parametrize("which", [0, -1])
def test_replacing_either_factor_of_the_first_or_last_layer_is_caught(factor, which):
    unet, names = adapted_unet("xattn", rank=2)
    ewc = EWCPenalty(unet, random_fisher(unet, names))
    layer = list(iter_adapted_layers(unet))[which]
    holder = getattr(layer.module, factor)["default"]
    holder.weight = torch.nn.Parameter(holder.weight.detach().clone())
    with pytest.raises(RuntimeError, match="^the LoRA parameters were replaced after the EWC penalty was built; "
                                           "build EWCPenalty after the adapter is added and loaded$"):
        ewc()


def test_rank1_penalty_on_one_layer_of_a_named_adapter_with_a_small_float64_mean_gradient():
    from sa_peft.lora import make_lora_config, resolve_lora_targets

    unet = build_tiny_pipeline().unet
    name = resolve_lora_targets(unet, "xattn")[0]
    unet.add_adapter(make_lora_config([name], 2), adapter_name="forget")
    layer, = iter_adapted_layers(unet, "forget")
    with torch.no_grad():
        layer.module.lora_B["forget"].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    shape = layer.module.get_base_layer().weight.shape
    mu = 1e-3 * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # ‖μ‖² ≪ 1
    fisher = FisherInfo.from_diagonal({f"{name}.weight": torch.ones(shape)}, {}, {f"{name}.weight": mu})
    with pytest.raises(ValueError, match="no LoRA layers"):
        Rank1FisherPenalty(unet, fisher)  # the default adapter is not there
    penalty = Rank1FisherPenalty(unet, fisher, adapter="forget")
    assert [d.dtype for d in penalty.directions] == [torch.float32]
    projection = float(mu.flatten() @ layer.delta_weight().detach().double().flatten())
    coefficient = mu.numel() / float(mu.square().sum())
    assert float(penalty.projection()) == pytest.approx(projection, rel=1e-4)
    assert float(penalty().detach()) == pytest.approx(coefficient * projection**2, rel=1e-4)


def test_rank1_penalty_errors_are_whole_sentences():
    unet, names = adapted_unet("xattn", rank=2)
    fisher = mean_gradient_fisher(unet, names)
    with pytest.raises(ValueError, match="^the model has no LoRA layers for the rank-1 Fisher penalty; add the forget "
                                         "adapter first$"):
        Rank1FisherPenalty(build_tiny_pipeline().unet, fisher)
    kept = dict(list(fisher.mean_gradient.items())[4:])
    missing = [k for k in fisher.mean_gradient if k not in kept]
    assert len(missing) == 4
    with pytest.raises(ValueError) as info:
        Rank1FisherPenalty(unet, FisherInfo.from_diagonal(fisher.diagonal, {}, kept))
    assert str(info.value) == (
        f"the Fisher file has no mean gradient for 4 adapted module(s), e.g. {missing[:3]} (it was written by an older "
        "sa-peft or factored-only); recompute it (delete `fisher_path`) for `fisher_rank1_weight`")
    zero = FisherInfo.from_diagonal(fisher.diagonal, {}, {k: torch.zeros_like(v) for k, v in fisher.mean_gradient.items()})
    with pytest.raises(ValueError, match="^the Fisher's mean gradient is zero on every adapted weight; it cannot weight "
                                         "the penalty$"):
        Rank1FisherPenalty(unet, zero)


def test_ewc_penalty_errors_are_whole_sentences(tmp_path):
    unet, names = adapted_unet("xattn", rank=2)
    fisher = random_fisher(unet, names)
    with pytest.raises(ValueError, match="^the model has no LoRA layers for the EWC penalty; add the forget adapter "
                                         "first$"):
        EWCPenalty(build_tiny_pipeline().unet, fisher)
    kept = dict(list(fisher.diagonal.items())[4:])
    missing = [f"{n}.weight" for n in names if f"{n}.weight" not in kept]
    assert len(missing) == 4
    with pytest.raises(ValueError) as info:
        EWCPenalty(unet, FisherInfo.from_diagonal(kept, {}))
    assert str(info.value) == (
        f"the Fisher file does not cover 4 adapted module(s), e.g. {missing[:3]}; recompute it with the same "
        "`lora_target` (or delete `fisher_path` so it is recomputed)")
    save_fisher(fisher, tmp_path / "factored.safetensors", factored_only=True)
    factored = load_fisher(tmp_path / "factored.safetensors")
    with pytest.raises(ValueError, match="^this Fisher file is factored-only; use `ewc_space` lowrank or recompute it "
                                         "in full$"):
        EWCPenalty(unet, factored, space="full")
    zero = FisherInfo.from_diagonal({k: torch.zeros_like(v) for k, v in fisher.diagonal.items()}, {})
    with pytest.raises(ValueError, match="^the Fisher is zero on every adapted weight; it cannot weight the penalty$"):
        EWCPenalty(unet, zero)


@pytest.mark.parametrize("space", ["full", "lowrank"])
def test_ewc_penalty_of_a_named_adapter_reads_that_adapters_factors(space):
    from sa_peft.lora import make_lora_config, resolve_lora_targets

    unet = build_tiny_pipeline().unet
    names = resolve_lora_targets(unet, "xattn")[:2]
    unet.add_adapter(make_lora_config(names, 2), adapter_name="forget")
    with torch.no_grad():
        for layer in iter_adapted_layers(unet, "forget"):
            layer.module.lora_B["forget"].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    fisher = random_fisher(unet, names)
    with pytest.raises(ValueError, match="no LoRA layers"):
        EWCPenalty(unet, fisher, space=space)  # no "default" adapter
    penalty = EWCPenalty(unet, fisher, space=space, adapter="forget", normalization="none")
    reference = sum((fisher.diagonal[f"{layer.name}.weight"].double() * layer.delta_weight().detach().double().square()).sum()
                    for layer in iter_adapted_layers(unet, "forget"))
    assert reference > 0
    if space == "full":
        assert float(penalty()) == pytest.approx(float(reference), rel=1e-4)
    else:
        assert float(penalty()) > 0


@pytest.mark.parametrize("space", ["full", "lowrank"])
def test_bf16_lora_weights_get_a_float32_penalty(space):
    """bf16 LoRA factors are cast to float32 before the products: the penalty equals the float32 one of the same
    (bf16-representable) values, not a bf16 computation (whose rounding is ~1e-2 relative)."""
    unet, names = adapted_unet("all", rank=4, alpha=2.0)
    fisher = random_fisher(unet, names)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(p.to(torch.bfloat16).float())  # bf16-representable values
    reference = EWCPenalty(unet, fisher, space=space)()
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(torch.bfloat16)
    value = EWCPenalty(unet, fisher, space=space)()
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("space", ["full", "lowrank"])
def test_penalty_scales_with_the_fisher_down_to_totals_below_one(space):
    """P is linear in F: a Fisher 1e-6 as large (each layer's total far below 1) gives a penalty 1e-6 as large,
    not 0 (the low-rank space divides by each layer's total and keeps only an all-zero layer at 0)."""
    unet, names = adapted_unet("all", rank=2)
    fisher = rank_one_fisher(unet, names)
    small = FisherInfo.from_diagonal({k: v * 1e-6 for k, v in fisher.diagonal.items()}, {})
    assert max(float(v.sum()) for v in small.diagonal.values()) < 1
    big, tiny = (EWCPenalty(unet, f, space=space, normalization="none")().item() for f in (fisher, small))
    assert big > 0 and tiny == pytest.approx(big * 1e-6, rel=1e-4)
