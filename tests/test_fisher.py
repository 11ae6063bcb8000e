"""Fisher estimation (per-sample gradients, both estimators, sharding), storage and checked loading."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import add_forget_lora
from safetensors.torch import save_file

import sa_peft
import sa_peft.fisher as fisher_module
from sa_peft.conditioning import encode_prompts
from sa_peft.fisher import (
    FISHER_FORMAT,
    FisherInfo,
    base_weights_hash,
    check_fisher_settings,
    estimate_fisher,
    load_fisher,
    prompts_hash,
    save_fisher,
)
from sa_peft.lora import resolve_lora_targets
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

MODULES = ["conv_in", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "down_blocks.1.resnets.0.conv_shortcut"]
PROMPTS = ["a photo of a cat", "a red car"]


def setup(num_samples=2, **pipe_kwargs):
    pipe = build_tiny_pipeline(**pipe_kwargs)
    conditioning = encode_prompts(pipe, PROMPTS)
    latents = torch.randn(num_samples, 4, 16, 16, generator=torch.Generator().manual_seed(123))
    prompt_ids = torch.arange(num_samples) % len(PROMPTS)
    return pipe, conditioning, latents, prompt_ids


def hand_per_sample_grads(pipe, conditioning, latents, prompt_ids, modules, timesteps_for, seed):
    """g_n = weight · ∇ Σ_t ℓ_t(x_n), written out with diffusers' scheduler and the UNet directly."""
    unet, scheduler = pipe.unet, pipe.scheduler
    named = dict(unet.named_modules())
    params = [named[m].weight for m in modules]
    grads = []
    for n in range(len(latents)):
        generator = torch.Generator().manual_seed(seed + n)
        timesteps, weight = timesteps_for(generator)
        x0 = latents[n : n + 1].expand(len(timesteps), -1, -1, -1)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        hidden = conditioning.encoder_hidden_states[prompt_ids[n]].expand(len(timesteps), -1, -1)
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, timesteps)
        else:
            target = noise
        per_timestep = (prediction - target).square().mean(dim=(1, 2, 3))
        grads.append([weight * g for g in torch.autograd.grad(per_timestep.sum(), params)])
    return grads


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fast_estimator_is_mean_of_squared_per_sample_gradients(prediction_type):
    pipe, conditioning, latents, prompt_ids = setup(num_samples=2, prediction_type=prediction_type)
    T, K, seed = 1000, 4, 7

    def stratified(generator):  # one uniform draw in each of K equal bins of width T/K
        width = T / K
        offsets = torch.rand(K, generator=generator)
        return (torch.arange(K, dtype=torch.float32) * width + offsets * width).long(), T / K

    fisher = estimate_fisher(
        pipe.unet,
        pipe.scheduler,
        latents,
        prompt_ids,
        conditioning,
        MODULES,
        estimator="fast",
        num_timesteps=K,
        seed=seed,
        show_progress=False,
    )
    grads = hand_per_sample_grads(pipe, conditioning, latents, prompt_ids, MODULES, stratified, seed)
    assert fisher.metadata["prediction_type"] == prediction_type
    for i, name in enumerate(MODULES):
        g1, g2 = grads[0][i], grads[1][i]
        per_sample = (g1.square() + g2.square()) / 2
        squared_mean = ((g1 + g2) / 2).square()
        got = fisher.diagonal[f"{name}.weight"]
        assert got.shape == pipe.unet.get_submodule(name).weight.shape
        torch.testing.assert_close(got, per_sample, rtol=1e-4, atol=1e-6 * float(per_sample.max()))
        # the two definitions really differ here, and the estimator is not the squared batch gradient
        assert (per_sample - squared_mean).abs().sum() > 0.05 * per_sample.sum()
    assert fisher.metadata["unet_passes"] == str(2 * K)


def test_v_prediction_differs_from_epsilon_on_the_same_weights():
    eps = setup(num_samples=1)
    v = setup(num_samples=1, prediction_type="v_prediction")
    torch.testing.assert_close(eps[0].unet.conv_in.weight, v[0].unet.conv_in.weight)
    results = []
    for pipe, conditioning, latents, prompt_ids in (eps, v):
        f = estimate_fisher(
            pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, MODULES, num_timesteps=2, show_progress=False
        )
        assert all(torch.isfinite(t).all() and t.sum() > 0 for t in f.diagonal.values())
        results.append(f.diagonal["conv_in.weight"])
    assert not torch.allclose(results[0], results[1], rtol=1e-2)


def test_reference_estimator_matches_hand_loop_over_all_timesteps():
    pipe, conditioning, latents, prompt_ids = setup(num_samples=2, num_train_timesteps=50)
    fisher = estimate_fisher(
        pipe.unet,
        pipe.scheduler,
        latents,
        prompt_ids,
        conditioning,
        MODULES[:2],
        estimator="reference",
        seed=3,
        show_progress=False,
    )
    grads = hand_per_sample_grads(
        pipe, conditioning, latents, prompt_ids, MODULES[:2], lambda g: (torch.arange(50), 1.0), 3
    )
    for i, name in enumerate(MODULES[:2]):
        expected = (grads[0][i].square() + grads[1][i].square()) / 2
        torch.testing.assert_close(
            fisher.diagonal[f"{name}.weight"], expected, rtol=1e-4, atol=1e-6 * float(expected.max())
        )
    assert fisher.metadata["estimator"] == "reference"
    assert fisher.metadata["num_timesteps"] == "50"
    assert fisher.metadata["unet_passes"] == str(2 * 50)


def record_timesteps(monkeypatch):
    seen = []
    original = fisher_module.per_sample_diffusion_loss

    def recording(unet, scheduler, latents, timesteps, noise, kwargs):
        seen.append(timesteps.clone())
        return original(unet, scheduler, latents, timesteps, noise, kwargs)

    monkeypatch.setattr(fisher_module, "per_sample_diffusion_loss", recording)
    return seen


def test_reference_estimator_covers_every_timestep(monkeypatch):
    pipe, conditioning, latents, prompt_ids = setup(num_samples=2, num_train_timesteps=50)
    seen = record_timesteps(monkeypatch)
    fisher = estimate_fisher(
        pipe.unet,
        pipe.scheduler,
        latents,
        prompt_ids,
        conditioning,
        MODULES[:1],
        estimator="reference",
        timestep_batch_size=16,
        show_progress=False,
    )
    assert [len(t) for t in seen] == [16, 16, 16, 2] * 2
    everything = torch.cat(seen)
    assert torch.equal(everything[:50], torch.arange(50)) and torch.equal(everything[50:], torch.arange(50))
    assert fisher.metadata["unet_passes"] == "100"


def test_fast_estimator_draws_one_timestep_per_bin(monkeypatch):
    pipe, conditioning, latents, prompt_ids = setup(num_samples=3)
    seen = record_timesteps(monkeypatch)
    estimate_fisher(
        pipe.unet,
        pipe.scheduler,
        latents,
        prompt_ids,
        conditioning,
        MODULES[:1],
        estimator="fast",
        num_timesteps=8,
        show_progress=False,
    )
    assert len(seen) == 3
    for timesteps in seen:
        assert torch.equal(timesteps // 125, torch.arange(8))  # T = 1000, 8 bins of 125
    assert not torch.equal(seen[0], seen[1])  # each sample has its own draw
    # K = T gives every timestep exactly once
    seen.clear()
    small = setup(num_samples=1, num_train_timesteps=50)
    estimate_fisher(
        small[0].unet,
        small[0].scheduler,
        small[2],
        small[3],
        small[1],
        MODULES[:1],
        estimator="fast",
        num_timesteps=50,
        show_progress=False,
    )
    assert torch.equal(torch.cat(seen), torch.arange(50))


class StubAccelerator:
    def __init__(self, process_index, num_processes):
        self.process_index, self.num_processes = process_index, num_processes
        self.reductions = []

    def reduce(self, tensor, reduction="mean"):
        self.reductions.append(reduction)
        return tensor


def test_sharded_estimate_sums_to_single_process_result():
    pipe, conditioning, latents, prompt_ids = setup(num_samples=3)
    kwargs = {"estimator": "fast", "num_timesteps": 2, "seed": 5, "show_progress": False}
    single = estimate_fisher(pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, MODULES, **kwargs)
    halves = []
    for rank in (0, 1):
        accelerator = StubAccelerator(rank, 2)
        halves.append(
            estimate_fisher(
                pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, MODULES, accelerator=accelerator, **kwargs
            )
        )
        assert accelerator.reductions == ["sum"]
    for key, expected in single.diagonal.items():
        a, b = halves[0].diagonal[key], halves[1].diagonal[key]
        assert a.sum() > 0 and b.sum() > 0
        assert not torch.allclose(a, expected)
        torch.testing.assert_close(a + b, expected, rtol=1e-5, atol=1e-9 * float(expected.max()))
    assert halves[0].metadata == single.metadata


def test_estimate_restores_training_state_and_requires_grad():
    pipe, conditioning, latents, prompt_ids = setup(num_samples=1)
    unet = pipe.unet
    unet.train()
    unet.requires_grad_(False)
    unet.conv_out.weight.requires_grad_(True)
    before = {n: p.requires_grad for n, p in unet.named_parameters()}
    estimate_fisher(
        unet, pipe.scheduler, latents, prompt_ids, conditioning, MODULES, num_timesteps=1, show_progress=False
    )
    assert unet.training
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == before
    assert all(p.grad is None for p in unet.parameters())


def test_estimate_rejects_bad_arguments():
    pipe, conditioning, latents, prompt_ids = setup(num_samples=2)
    args = (pipe.unet, pipe.scheduler)
    with pytest.raises(ValueError, match="no samples"):
        estimate_fisher(*args, latents[:0], prompt_ids[:0], conditioning, MODULES, show_progress=False)
    with pytest.raises(ValueError, match="differ in length"):
        estimate_fisher(*args, latents, prompt_ids[:1], conditioning, MODULES, show_progress=False)
    with pytest.raises(ValueError, match="unknown UNet modules"):
        estimate_fisher(*args, latents, prompt_ids, conditioning, ["conv_in", "no.such.module"], show_progress=False)
    for k in (0, 1001):
        with pytest.raises(ValueError, match="`fisher_num_timesteps`"):
            estimate_fisher(*args, latents, prompt_ids, conditioning, MODULES, num_timesteps=k, show_progress=False)
    with pytest.raises(ValueError, match="`fisher_estimator`"):
        estimate_fisher(*args, latents, prompt_ids, conditioning, MODULES, estimator="exact", show_progress=False)


@pytest.fixture
def estimated():
    pipe, conditioning, latents, prompt_ids = setup(num_samples=2)
    modules = resolve_lora_targets(pipe.unet, "xattn") + ["conv_in"]
    fisher = estimate_fisher(
        pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, modules, num_timesteps=2, show_progress=False
    )
    return pipe, modules, fisher


def test_save_load_round_trip(tmp_path, estimated):
    pipe, modules, fisher = estimated
    path = tmp_path / "fisher.safetensors"
    save_fisher(fisher, path)
    loaded = load_fisher(path, unet=pipe.unet, required_modules=modules)
    assert loaded.shapes == fisher.shapes
    assert loaded.modules == sorted(modules)
    for key in fisher.shapes:
        assert torch.equal(loaded.diagonal[key], fisher.diagonal[key])
        assert torch.equal(loaded.row_sums[key], fisher.row_sums[key])
        assert torch.equal(loaded.col_sums[key], fisher.col_sums[key])
    assert loaded.metadata == fisher.metadata
    meta = loaded.metadata
    assert meta["format"] == FISHER_FORMAT
    assert meta["base_weights_hash"] == base_weights_hash(pipe.unet, modules)
    assert json.loads(meta["modules"]) == modules
    assert meta["prompts_hash"] == prompts_hash(PROMPTS)
    assert meta["num_samples"] == "2"
    assert meta["estimator"] == "fast"
    assert "per-sample" in meta["loss_normalization"] and "T/K" in meta["loss_normalization"]
    assert meta["dtype"] == "float32"
    assert meta["sa_peft_version"] == sa_peft.__version__
    # rows and cols are the marginals of the m×(n·k·k) diagonal
    flat = fisher.diagonal["conv_in.weight"].reshape(16, -1)
    torch.testing.assert_close(loaded.row_sums["conv_in.weight"], flat.sum(1))
    torch.testing.assert_close(loaded.col_sums["conv_in.weight"], flat.sum(0))


def test_factored_only_round_trip(tmp_path, estimated):
    pipe, _, fisher = estimated
    path = tmp_path / "factored.safetensors"
    save_fisher(fisher, path, factored_only=True)
    loaded = load_fisher(path, unet=pipe.unet)
    assert loaded.diagonal == {}
    assert loaded.shapes == fisher.shapes
    for key in fisher.shapes:
        assert torch.equal(loaded.row_sums[key], fisher.row_sums[key])
        assert torch.equal(loaded.col_sums[key], fisher.col_sums[key])
    with pytest.raises(ValueError, match="factored-only"):
        save_fisher(loaded, tmp_path / "again.safetensors")


def test_mean_gradient_round_trips_in_full_files_only(tmp_path, estimated):
    _, _, fisher = estimated
    assert set(fisher.mean_gradient) == set(fisher.shapes)
    save_fisher(fisher, tmp_path / "full.safetensors")
    loaded = load_fisher(tmp_path / "full.safetensors")
    assert set(loaded.mean_gradient) == set(fisher.shapes)
    for key in fisher.shapes:
        assert torch.equal(loaded.mean_gradient[key], fisher.mean_gradient[key])
    save_fisher(fisher, tmp_path / "factored.safetensors", factored_only=True)
    assert load_fisher(tmp_path / "factored.safetensors").mean_gradient == {}
    # A Fisher without a mean gradient (files written before it existed) saves and loads without one.
    older = FisherInfo.from_diagonal(fisher.diagonal, fisher.metadata)
    save_fisher(older, tmp_path / "older.safetensors")
    reloaded = load_fisher(tmp_path / "older.safetensors")
    assert reloaded.mean_gradient == {} and set(reloaded.diagonal) == set(fisher.shapes)


def test_check_fisher_settings_names_every_differing_setting_and_its_flag(tmp_path):
    fisher = FisherInfo({}, {}, {}, metadata={"estimator": "reference", "num_timesteps": "8", "seed": "0", "custom": "a"})
    same = {"estimator": "reference", "num_timesteps": "8", "seed": "0"}
    assert check_fisher_settings(fisher, tmp_path / "f.safetensors", same) is None
    path = tmp_path / "f.safetensors"
    with pytest.raises(ValueError) as info:
        check_fisher_settings(fisher, path, {"estimator": "fast", "num_timesteps": "8", "seed": "3", "custom": "b",
                                             "prompts_hash": "abc"})
    assert str(info.value) == (
        f"`fisher_path` {str(path)!r} was made with other settings (`fisher_estimator`: file 'reference', this run 'fast'; "
        "`seed`: file '0', this run '3'; custom: file 'a', this run 'b'; the replay prompts: file None, this run 'abc'); "
        "delete the file, pass a new `fisher_path`, or run with the file's settings")


def test_load_checks_base_model_and_coverage(tmp_path, estimated):
    pipe, modules, fisher = estimated
    path = tmp_path / "fisher.safetensors"
    save_fisher(fisher, path)
    with pytest.raises(ValueError, match="another base model"):
        load_fisher(path, unet=build_tiny_pipeline(seed=1).unet)
    with pytest.raises(ValueError, match="does not cover 1 module") as info:
        load_fisher(path, unet=pipe.unet, required_modules=[*modules, "conv_out"])
    assert "conv_out" in str(info.value)
    # The hash is of the base weights, so the UNet still matches once the forget LoRA is added to it.
    add_forget_lora(pipe.unet, "xattn")
    assert load_fisher(path, unet=pipe.unet, required_modules=modules).modules == sorted(modules)


def test_load_rejects_bad_files(tmp_path, estimated):
    _, _, fisher = estimated
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fisher(tmp_path / "missing.safetensors")
    wrong_suffix = tmp_path / "fisher.bin"
    save_fisher(fisher, tmp_path / "good.safetensors")
    wrong_suffix.write_bytes((tmp_path / "good.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"\.safetensors"):
        load_fisher(wrong_suffix)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_fisher(garbage)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an sa-peft Fisher file"):
        load_fisher(other)


def test_load_errors_name_the_flag_and_the_foreign_format(tmp_path, estimated):
    _, _, fisher = estimated
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    with pytest.raises(ValueError, match=r"^`fisher_path` '.*garbage\.safetensors' is not a valid safetensors file"):
        load_fisher(garbage)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"is not an sa-peft Fisher file \(format 'pt'\)$"):
        load_fisher(other)
    # A file without the factored_only entry is a full file.
    save_fisher(fisher, tmp_path / "full.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "full.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        header = {k: v for k, v in f.metadata().items() if k != "factored_only"}
    save_file(tensors, str(tmp_path / "no-entry.safetensors"), metadata=header)
    loaded = load_fisher(tmp_path / "no-entry.safetensors")
    assert set(loaded.diagonal) == set(fisher.shapes)


def test_load_mismatch_errors_say_what_to_do(tmp_path, estimated):
    _, modules, fisher = estimated
    path = tmp_path / "fisher.safetensors"
    save_fisher(fisher, path)
    with pytest.raises(ValueError, match=r"was computed for another base model \(weights hash differs\); recompute it for "
                                         r"this `pretrained_model_name_or_path` \(delete the file or pass a new `fisher_path`\)$"):
        load_fisher(path, unet=build_tiny_pipeline(seed=1).unet)
    extra = ["conv_out", "time_embedding.linear_1", "time_embedding.linear_2", "down_blocks.0.resnets.0.conv1"]
    with pytest.raises(ValueError) as info:
        load_fisher(path, required_modules=[*modules, *extra])
    assert str(info.value) == (
        f"`fisher_path` {str(path)!r} does not cover 4 module(s) the LoRA adapts, e.g. {sorted(extra)[:3]}; recompute it "
        "for this `lora_target` (delete the file or pass a new `fisher_path`)")


def test_timestep_chunks_accumulate_into_one_per_sample_gradient():
    """Splitting a sample's timesteps into chunks must sum the chunks' gradients before squaring.

    T = 50 in chunks of 16 gives four chunks (16, 16, 16, 2) per sample; the result must equal both
    the one-chunk estimate and the hand loop over all 50 timesteps at once (the noise stream is the
    same, drawn chunk after chunk from the sample's generator).
    """
    pipe, conditioning, latents, prompt_ids = setup(num_samples=2, num_train_timesteps=50)
    kwargs = {"estimator": "reference", "seed": 3, "show_progress": False}
    args = (pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, MODULES[:2])
    chunked = estimate_fisher(*args, timestep_batch_size=16, **kwargs)
    whole = estimate_fisher(*args, timestep_batch_size=64, **kwargs)
    grads = hand_per_sample_grads(
        pipe, conditioning, latents, prompt_ids, MODULES[:2], lambda g: (torch.arange(50), 1.0), 3
    )
    for i, name in enumerate(MODULES[:2]):
        key = f"{name}.weight"
        expected = (grads[0][i].square() + grads[1][i].square()) / 2
        tol = {"rtol": 1e-4, "atol": 1e-6 * float(expected.max())}
        torch.testing.assert_close(whole.diagonal[key], expected, **tol)
        torch.testing.assert_close(chunked.diagonal[key], expected, **tol)
        torch.testing.assert_close(chunked.diagonal[key], whole.diagonal[key], **tol)
        # The mean gradient (the rank-1 Fisher's direction) is the signed mean of the same per-sample gradients.
        mean = (grads[0][i] + grads[1][i]) / 2
        mean_tol = {"rtol": 1e-4, "atol": 1e-6 * float(mean.abs().max())}
        torch.testing.assert_close(chunked.mean_gradient[key], mean, **mean_tol)
        torch.testing.assert_close(whole.mean_gradient[key], mean, **mean_tol)


@pytest.mark.slow
def test_two_real_processes_give_the_one_process_fisher(tmp_path):
    """`accelerate launch` with two CPU processes (gloo): the all-reduced Fisher equals the one-process one."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors import safe_open
    from two_process_fisher import MODULES as WORKER_MODULES
    from two_process_fisher import SETTINGS, fisher_inputs

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:  # a free port, so parallel runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "fisher.safetensors"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(port), str(root / "tests" / "two_process_fisher.py"), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["num_processes"] == "2"
        launched = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    pipe, conditioning, latents, prompt_ids = fisher_inputs()
    single = estimate_fisher(pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, WORKER_MODULES, **SETTINGS)
    assert launched.keys() == single.diagonal.keys()
    for key, expected in single.diagonal.items():
        assert expected.sum() > 0
        torch.testing.assert_close(launched[key], expected, rtol=1e-5, atol=1e-9 * float(expected.max()))



def test_estimate_records_its_settings_and_refuses_bad_inputs_in_whole_sentences():
    pipe, conditioning, latents, prompt_ids = setup(num_samples=2, num_train_timesteps=40)
    args = (pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, MODULES[:1])
    fast = estimate_fisher(*args, estimator="fast", num_timesteps=3, show_progress=False)
    reference = estimate_fisher(*args, estimator="reference", num_timesteps=3, show_progress=False)
    assert (fast.metadata["num_timesteps"], fast.metadata["num_train_timesteps"]) == ("3", "40")
    assert (reference.metadata["num_timesteps"], reference.metadata["num_train_timesteps"]) == ("40", "40")
    with pytest.raises(ValueError, match=r"^no samples to estimate the Fisher from; raise `fisher_num_samples`$"):
        estimate_fisher(pipe.unet, pipe.scheduler, latents[:0], prompt_ids[:0], conditioning, MODULES[:1])
    with pytest.raises(ValueError, match=r"^latents and prompt_ids differ in length$"):
        estimate_fisher(pipe.unet, pipe.scheduler, latents, prompt_ids[:1], conditioning, MODULES[:1])
    unknown = [f"nowhere.{i}" for i in range(7)]
    with pytest.raises(ValueError) as info:
        estimate_fisher(pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, unknown)
    assert str(info.value) == f"unknown UNet modules for the Fisher: {unknown[:5]}"


def test_prompts_hash_names_the_prompts_in_order():
    assert prompts_hash(["a", "b"]) != prompts_hash(["b", "a"]) != prompts_hash(["a"])
    assert prompts_hash(("a", "b")) == prompts_hash(["a", "b"])
    assert len(prompts_hash(["a"])) == 16


def test_bf16_unet_gets_a_float32_fisher_close_to_the_float32_one():
    """A bf16 UNet's Fisher: the latents, noise and conditioning are cast to the UNet's dtype, the sums are
    float32, and the base-weights hash reads bf16 weights (numpy has no bf16)."""
    pipe, conditioning, latents, prompt_ids = setup(num_samples=2)
    kwargs = {"estimator": "fast", "num_timesteps": 4, "seed": 1, "show_progress": False}
    pipe.unet.to(torch.bfloat16)
    half = estimate_fisher(pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, MODULES, **kwargs)
    bf16_hash = base_weights_hash(pipe.unet, MODULES)
    pipe.unet.to(torch.float32)  # the same (bf16-representable) weights in float32
    full = estimate_fisher(pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, MODULES, **kwargs)
    assert bf16_hash == base_weights_hash(pipe.unet, MODULES)
    assert half.metadata["model_dtype"] == "bfloat16"
    for key, value in half.diagonal.items():
        assert value.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(value.flatten(), full.diagonal[key].flatten(), dim=0)
        assert float(cosine) > 0.95
        assert float(value.sum() / full.diagonal[key].sum()) == pytest.approx(1.0, rel=0.15)


def test_base_weights_hash_refuses_a_module_not_in_the_unet_by_name():
    unet = build_tiny_pipeline().unet
    with pytest.raises(ValueError) as info:
        base_weights_hash(unet, ["conv_in", "no.such.layer"])
    assert str(info.value) == "module 'no.such.layer' is not in the UNet"


def test_estimate_defaults_are_the_fast_estimator_with_eight_timesteps_and_seed_zero():
    pipe, conditioning, latents, prompt_ids = setup(num_samples=1)
    args = (pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, MODULES[:1])
    default = estimate_fisher(*args, show_progress=False)
    explicit = estimate_fisher(*args, estimator="fast", num_timesteps=8, seed=0, show_progress=False)
    meta = default.metadata
    assert (meta["estimator"], meta["num_timesteps"], meta["seed"], meta["unet_passes"]) == ("fast", "8", "0", "8")
    assert meta == explicit.metadata
    torch.testing.assert_close(default.diagonal["conv_in.weight"], explicit.diagonal["conv_in.weight"], rtol=0, atol=0)


def test_fast_timesteps_at_the_top_of_the_last_bin_stay_below_t(monkeypatch):
    """torch.rand's largest value, 1 − 2⁻²⁴, can round a bin's draw up to its upper edge in float32; for the last bin
    that edge is T, which is no timestep: it is clamped to T − 1."""
    top = 1 - 2**-24
    monkeypatch.setattr(torch, "rand", lambda n, generator=None: torch.full((n,), top))
    got = fisher_module.fisher_timesteps("fast", 1000, 8, torch.Generator().manual_seed(0))
    assert got[-1] == 999 and int(got.max()) == 999  # not 1000
    assert torch.equal(got[:1], torch.tensor([124]))


def test_reference_timesteps_of_a_flow_matching_model_are_its_density_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sa_peft.diffusion_loss import FlowMatchingNoise

    noise = FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    got = fisher_module.fisher_timesteps("reference", 1000, 8, torch.Generator().manual_seed(0), noise)
    torch.testing.assert_close(got, noise.grid_timesteps())
    assert len(got) == 1000 and not torch.equal(got, torch.arange(1000).to(got.dtype))


def test_estimate_records_how_the_loss_was_normalized_for_each_estimator():
    pipe, conditioning, latents, prompt_ids = setup(num_samples=1, num_train_timesteps=4)
    args = (pipe.unet, pipe.scheduler, latents, prompt_ids, conditioning, MODULES[:1])
    start = "per-sample loss = mean over latent elements of the squared prediction error, summed over "
    end = "; F = mean over samples of the squared per-sample gradient"
    fast = estimate_fisher(*args, estimator="fast", num_timesteps=2, show_progress=False)
    reference = estimate_fisher(*args, estimator="reference", show_progress=False)
    assert fast.metadata["loss_normalization"] == start + "K stratified timesteps and scaled by T/K" + end
    assert reference.metadata["loss_normalization"] == start + "all T timesteps" + end
