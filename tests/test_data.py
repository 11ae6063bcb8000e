"""Surrogate and replay sets: sources, metadata, determinism, resume and input checks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

import sa_peft.data as data_module
from sa_peft.data import check_resolution, generate_replay_set, generate_surrogate_set, load_image_set
from sa_peft.prompts import check_prompts, read_prompts_file

FAST = {"num_inference_steps": 2, "show_progress": False}
REAL_LATENTS_FOR_ROWS = data_module._latents_for_rows


def read_metadata(folder):
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_surrogate_from_prompt(tiny_pipe, tmp_path):
    out = tmp_path / "surrogate"
    result = generate_surrogate_set(
        tiny_pipe, out, ["brad pitt", "pitt"], 3, surrogate_prompt="a middle aged man", seed=4, **FAST
    )
    assert result.latents.shape == (3, 4, 16, 16)
    assert result.prompts == ["brad pitt", "pitt", "brad pitt"]
    rows = read_metadata(out)
    assert rows == [
        {
            "file_name": f"images/{i:05d}.png",
            "prompt": p,
            "seed": 4 + i,
            "kind": "prompt",
            "source": "a middle aged man",
        }
        for i, p in enumerate(result.prompts)
    ]
    for row in rows:
        assert Image.open(out / row["file_name"]).size == (32, 32)
    assert json.loads((out / "settings.json").read_text())["set"] == "surrogate"
    # image i is the frozen pipeline's DDIM sample of the surrogate prompt with seed + i
    assert not torch.equal(result.latents[0], result.latents[2])
    loaded = load_image_set(out)
    assert torch.equal(loaded.latents, result.latents) and loaded.prompts == result.prompts


def test_generation_is_deterministic_for_a_seed(tiny_pipe, tmp_path):
    kwargs = dict(surrogate_prompt="a middle aged man", **FAST)
    a = generate_surrogate_set(tiny_pipe, tmp_path / "a", ["brad pitt"], 2, seed=0, **kwargs)
    b = generate_surrogate_set(tiny_pipe, tmp_path / "b", ["brad pitt"], 2, seed=0, **kwargs)
    c = generate_surrogate_set(tiny_pipe, tmp_path / "c", ["brad pitt"], 2, seed=1, **kwargs)
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)
    # seed + i per image: image 1 of seed 0 is image 0 of seed 1
    torch.testing.assert_close(a.latents[1], c.latents[0], rtol=1e-4, atol=1e-5)


def test_surrogate_from_image_folder(tiny_pipe, tmp_path):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 48), (200, 30, 30)).save(folder / "b.png")
    Image.new("RGB", (48, 40), (20, 30, 220)).save(folder / "sub" / "a.png")
    (folder / "notes.txt").write_text("not an image")
    result = generate_surrogate_set(tiny_pipe, tmp_path / "out", ["brad pitt"], 3, surrogate_data_dir=folder, **FAST)
    rows = read_metadata(tmp_path / "out")
    assert [r["kind"] for r in rows] == ["images"] * 3
    assert [os.path.basename(r["source"]) for r in rows] == ["b.png", "a.png", "b.png"]
    assert all(r["prompt"] == "brad pitt" for r in rows)
    assert torch.equal(result.latents[0], result.latents[2])  # the same image cycled round
    assert not torch.allclose(result.latents[0], result.latents[1])


@pytest.mark.parametrize(
    "surrogate_type,kind",
    [("noise", "uniform_noise"), ("uniform_noise", "uniform_noise"), ("gaussian_noise", "gaussian_noise")],
)
def test_surrogate_from_noise(tiny_pipe, tmp_path, surrogate_type, kind):
    result = generate_surrogate_set(tiny_pipe, tmp_path / "out", ["nudity"], 2, surrogate_type=surrogate_type, **FAST)
    rows = read_metadata(tmp_path / "out")
    assert [r["kind"] for r in rows] == [kind, kind]
    assert [r["seed"] for r in rows] == [0, 1]
    assert result.latents.shape == (2, 4, 16, 16)
    assert not torch.allclose(result.latents[0], result.latents[1])


def test_uniform_and_gaussian_noise_differ(tiny_pipe, tmp_path):
    u = generate_surrogate_set(tiny_pipe, tmp_path / "u", ["nudity"], 1, surrogate_type="uniform_noise", **FAST)
    g = generate_surrogate_set(tiny_pipe, tmp_path / "g", ["nudity"], 1, surrogate_type="gaussian_noise", **FAST)
    assert not torch.allclose(u.latents, g.latents)


def test_replay_set(tiny_pipe, tmp_path):
    out = tmp_path / "replay"
    result = generate_replay_set(tiny_pipe, out, ["a photo of a cat", "a red car"], 2, seed=10, **FAST)
    assert result.latents.shape == (4, 4, 16, 16)
    assert result.prompts == ["a photo of a cat", "a red car"] * 2
    rows = read_metadata(out)
    assert rows == [
        {"file_name": f"images/{i:05d}.png", "prompt": p, "seed": 10 + i, "kind": "replay"}
        for i, p in enumerate(result.prompts)
    ]
    assert torch.equal(result.prompt_ids(["a red car", "a photo of a cat"]), torch.tensor([1, 0, 1, 0]))


def count_shard_generations(monkeypatch, fail_after=None):
    calls = []
    original = REAL_LATENTS_FOR_ROWS

    def wrapped(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise RuntimeError("simulated kill")
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(data_module, "_latents_for_rows", wrapped)
    return calls


def test_resume_after_interruption_gives_the_uninterrupted_set(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "SHARD_SIZE", 2)
    prompts = ["a photo of a cat", "a red car", "a dog"]
    full = generate_replay_set(tiny_pipe, tmp_path / "full", prompts, 2, **FAST)  # 6 images, 3 shards

    # a run killed during its second shard
    count_shard_generations(monkeypatch, fail_after=1)
    with pytest.raises(RuntimeError, match="simulated kill"):
        generate_replay_set(tiny_pipe, tmp_path / "killed", prompts, 2, **FAST)
    assert sorted(p.name for p in (tmp_path / "killed").glob("latents-*")) == ["latents-00000.safetensors"]
    assert not (tmp_path / "killed" / "metadata.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_image_set(tmp_path / "killed")

    calls = count_shard_generations(monkeypatch)
    resumed = generate_replay_set(tiny_pipe, tmp_path / "killed", prompts, 2, **FAST)
    assert len(calls) == 2  # only the missing shards are generated
    assert torch.equal(resumed.latents, full.latents)
    assert resumed.prompts == full.prompts
    assert read_metadata(tmp_path / "killed") == read_metadata(tmp_path / "full")

    # a finished set is loaded, not regenerated
    generate_replay_set(tiny_pipe, tmp_path / "killed", prompts, 2, **FAST)
    assert len(calls) == 2


def test_resume_after_losing_the_last_shard(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "SHARD_SIZE", 2)
    out = tmp_path / "s"
    kwargs = dict(surrogate_prompt="a middle aged man", seed=3, **FAST)
    full = generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 5, **kwargs)
    first_shard = (out / "latents-00000.safetensors").read_bytes()
    os.remove(out / "latents-00002.safetensors")
    os.remove(out / "metadata.jsonl")
    calls = count_shard_generations(monkeypatch)
    again = generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 5, **kwargs)
    assert len(calls) == 1
    assert torch.equal(again.latents, full.latents)
    assert (out / "latents-00000.safetensors").read_bytes() == first_shard


def test_settings_mismatch_is_an_error(tiny_pipe, tmp_path):
    out = tmp_path / "s"
    generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 2, surrogate_type="noise", seed=0, **FAST)
    for change in (
        {"seed": 1},
        {"num_images": 3},
        {"surrogate_type": "gaussian_noise"},
        {"forget_prompts": ["nudity"]},
    ):
        kwargs = dict(forget_prompts=["brad pitt"], num_images=2, surrogate_type="noise", seed=0, **FAST)
        kwargs.update(change)
        with pytest.raises(ValueError, match="other settings"):
            generate_surrogate_set(tiny_pipe, out, **kwargs)


def test_bad_inputs_name_the_flag(tiny_pipe, tmp_path):
    out = tmp_path / "s"
    noise = dict(surrogate_type="noise", **FAST)
    with pytest.raises(ValueError, match="`forget_prompt`"):
        generate_surrogate_set(tiny_pipe, out, [], 2, **noise)
    with pytest.raises(ValueError, match="`forget_prompt`"):
        generate_surrogate_set(tiny_pipe, out, ["brad pitt", "  "], 2, **noise)
    for n in (0, -3):
        with pytest.raises(ValueError, match="`num_surrogate_images`"):
            generate_surrogate_set(tiny_pipe, out, ["brad pitt"], n, **noise)
        with pytest.raises(ValueError, match="`num_replay_images_per_prompt`"):
            generate_replay_set(tiny_pipe, out, ["a cat"], n, **FAST)
    with pytest.raises(ValueError, match="exactly one surrogate source"):
        generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 2, **FAST)
    with pytest.raises(ValueError, match="exactly one surrogate source"):
        generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 2, surrogate_prompt="a man", **noise)
    with pytest.raises(ValueError, match="`surrogate_type`"):
        generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 2, surrogate_type="pink_noise", **FAST)
    with pytest.raises(ValueError, match="`surrogate_prompt`"):
        generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 2, surrogate_prompt=" ", **FAST)
    for resolution in (33, 0, -4):
        with pytest.raises(ValueError, match="`resolution`"):
            generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 2, resolution=resolution, **noise)
        with pytest.raises(ValueError, match="`resolution`"):
            generate_replay_set(tiny_pipe, out, ["a cat"], 1, resolution=resolution, **FAST)
    with pytest.raises(ValueError, match="`replay_prompts_file`"):
        generate_replay_set(tiny_pipe, out, [], 1, **FAST)
    with pytest.raises(FileNotFoundError, match="`surrogate_data_dir`"):
        generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 2, surrogate_data_dir=tmp_path / "missing", **FAST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="`surrogate_data_dir`"):
        generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 2, surrogate_data_dir=tmp_path / "empty", **FAST)
    assert not out.exists()  # nothing is written before the inputs are checked


def test_check_resolution(tiny_pipe):
    assert tiny_pipe.vae_scale_factor == 2
    assert check_resolution(tiny_pipe, 16) == 16
    for bad in (17, 12, 0, -16):  # 12 is a multiple of the VAE factor but not of 8, which the pipelines need
        with pytest.raises(ValueError, match=f"`resolution` {bad} is not a positive multiple"):
            check_resolution(tiny_pipe, bad)


def test_other_resolution(tiny_pipe, tmp_path):
    result = generate_replay_set(tiny_pipe, tmp_path / "r", ["a cat"], 1, resolution=16, **FAST)
    assert result.latents.shape == (1, 4, 8, 8)


def test_read_prompts_file(tmp_path):
    good = tmp_path / "prompts.txt"
    good.write_text("a photo of a cat\n\n  a red car  \n")
    assert read_prompts_file(good, "prompts_file") == ["a photo of a cat", "a red car"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    with pytest.raises(ValueError, match="`prompts_file` .* has no prompts"):
        read_prompts_file(empty, "prompts_file")
    with pytest.raises(FileNotFoundError, match="`replay_prompts_file` .* does not exist"):
        read_prompts_file(tmp_path / "missing.txt", "replay_prompts_file")
    assert check_prompts([" a ", "b"], "x") == ["a", "b"]


def test_load_image_set_rejects_incomplete_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_image_set(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="no latents shards"):
        load_image_set(tmp_path)


def test_replay_and_prompt_surrogate_latents_are_the_pipelines_own_samples(tiny_pipe, tmp_path):
    """Each stored latent is exactly what the frozen pipeline samples (DDIM) for its prompt and seed."""
    from diffusers import DDIMScheduler

    replay = generate_replay_set(tiny_pipe, tmp_path / "replay", ["a photo of a cat", "a photo of a dog"], 2,
                                 seed=5, num_inference_steps=3, guidance_scale=2.0, show_progress=False)
    surrogate = generate_surrogate_set(tiny_pipe, tmp_path / "surrogate", ["brad pitt"], 2, surrogate_prompt="a man",
                                       seed=9, num_inference_steps=3, guidance_scale=2.0, show_progress=False)
    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = DDIMScheduler.from_config(original.config)
    for image_set in (replay, surrogate):
        for i, row in enumerate(image_set.rows):
            expected = tiny_pipe(row["source"], num_inference_steps=3, guidance_scale=2.0, output_type="latent",
                                 generator=torch.Generator().manual_seed(row["seed"])).images[0]
            torch.testing.assert_close(image_set.latents[i], expected, rtol=1e-4, atol=1e-5)
    tiny_pipe.scheduler = original


def _noise_images(pipe, tmp_path, monkeypatch, surrogate_type, num_images=8):
    """The pixel-space images the VAE is asked to encode for a noise surrogate."""
    seen = []
    original = data_module._encode_images

    def recording(pipe, images):
        seen.append(images.clone())
        return original(pipe, images)

    monkeypatch.setattr(data_module, "_encode_images", recording)
    generate_surrogate_set(pipe, tmp_path / surrogate_type, ["nudity"], num_images, surrogate_type=surrogate_type,
                           **FAST)
    images = torch.cat(seen)
    assert images.shape == (num_images, 3, 32, 32)
    return images


def test_uniform_noise_surrogate_is_uniform_on_minus_one_to_one(tiny_pipe, tmp_path, monkeypatch):
    images = _noise_images(tiny_pipe, tmp_path, monkeypatch, "uniform_noise")
    # image n is U(-1, 1) from seed n
    torch.testing.assert_close(images[3], torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    values = images.flatten()  # 24 576 values
    assert values.min() >= -1 and values.max() <= 1
    assert values.min() < -0.99 and values.max() > 0.99
    assert abs(values.mean().item()) < 0.02
    assert values.std().item() == pytest.approx(2 / 12**0.5, rel=0.02)  # U(-1, 1): std 1/√3
    share = torch.histc(values, bins=10, min=-1, max=1) / len(values)
    assert share.min() > 0.09 and share.max() < 0.11  # flat over the ten bins
    assert (values < 0).double().mean().item() == pytest.approx(0.5, abs=0.02)


def test_gaussian_noise_surrogate_is_half_a_standard_normal_clipped(tiny_pipe, tmp_path, monkeypatch):
    images = _noise_images(tiny_pipe, tmp_path, monkeypatch, "gaussian_noise")
    expected = (torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(5)) * 0.5).clamp(-1, 1)
    torch.testing.assert_close(images[5], expected)
    values = images.flatten()
    assert values.min() == -1 and values.max() == 1  # clipped at ±2σ
    assert abs(values.mean().item()) < 0.02
    assert values.std().item() == pytest.approx(0.5, rel=0.05)
    assert (values.abs() < 0.5).double().mean().item() == pytest.approx(0.6827, abs=0.02)


def test_load_image_center_crops_and_scales_to_minus_one_one(tmp_path):
    """A centre square, resized to `resolution`, as float32 in [-1, 1] (pixel / 127.5 − 1), grey or RGB."""
    import numpy as np

    from sa_peft.data import _load_image

    gen = np.random.default_rng(0)
    # (width, height) and the centre square: an odd excess rounds down, an excess of 2 is split evenly.
    for size, box in (((6, 4), (1, 0, 5, 4)), ((4, 7), (0, 1, 4, 5)), ((7, 4), (1, 0, 5, 4)), ((4, 6), (0, 1, 4, 5))):
        pixels = gen.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.fromarray(pixels).save(path)
        rgb = _load_image(str(path), 4, 3)  # the square's side: no resampling
        left, top, right, bottom = box
        expected = torch.from_numpy(pixels[top:bottom, left:right].astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        assert rgb.dtype == torch.float32 and rgb.shape == (3, 4, 4)
        torch.testing.assert_close(rgb, expected, rtol=0, atol=1e-6)
        grey = _load_image(str(path), 4, 1)
        luma = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float32)[top:bottom, left:right]
        assert grey.shape == (1, 4, 4)
        torch.testing.assert_close(grey[0], torch.from_numpy(luma / 127.5 - 1.0), rtol=0, atol=1e-6)
    assert _load_image(str(path), 8, 3).shape == (3, 8, 4 * 2)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"^`surrogate_data_dir`: cannot read the image '.*bad\.png' \(.*\); replace or "
                                         r"remove it$"):
        _load_image(str(bad), 4, 3)


def test_encode_images_is_the_scaled_posterior_mean_in_the_vae_dtype(tiny_pipe):
    from sa_peft.data import _encode_images

    vae = tiny_pipe.vae.to(torch.float64)
    vae.register_to_config(scaling_factor=0.3)
    images = torch.rand(2, vae.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = _encode_images(tiny_pipe, images)  # float32 images into a float64 VAE
    with torch.no_grad():
        expected = vae.encode(images.double()).latent_dist.mean * 0.3
    assert latents.dtype == torch.float64
    torch.testing.assert_close(latents, expected, rtol=1e-12, atol=0)


def test_set_builders_pass_their_defaults_settings_and_rows(tiny_pipe, tmp_path, monkeypatch):
    """What the two builders hand to _build_set, with every default left alone (nothing is generated here)."""
    calls = []
    monkeypatch.setattr(data_module, "_build_set", lambda *args: calls.append(args) or "built")
    common = {"resolution": 32, "guidance_scale": 7.5, "num_inference_steps": 50, "seed": 0, "shard_size": 16,
              "latent_channels": tiny_pipe.vae.config.latent_channels}
    assert generate_replay_set(tiny_pipe, tmp_path / "r", ["a cat", "a dog"], 2) == "built"
    (_, folder, rows, settings, resolution, guidance, steps, accelerator, progress, desc), = calls
    assert (folder, resolution, guidance, steps, accelerator, progress, desc) == (
        str(tmp_path / "r"), 32, 7.5, 50, None, True, "replay set")
    assert settings == {"set": "replay", "prompts": ["a cat", "a dog"], "num_images_per_prompt": 2, **common}
    assert rows == [{"file_name": f"images/{i:05d}.png", "prompt": p, "source": p, "seed": i, "kind": "replay"}
                    for i, p in enumerate(["a cat", "a dog"] * 2)]
    calls.clear()
    assert generate_surrogate_set(tiny_pipe, tmp_path / "s", ["brad pitt"], 2, surrogate_prompt="a man") == "built"
    (_, folder, rows, settings, resolution, guidance, steps, accelerator, progress, desc), = calls
    assert (folder, resolution, guidance, steps, accelerator, progress, desc) == (
        str(tmp_path / "s"), 32, 7.5, 50, None, True, "surrogate set")
    assert settings == {"set": "surrogate", "kind": "prompt", "forget_prompts": ["brad pitt"], "sources": ["a man"],
                        "num_images": 2, **common}
    assert [r["seed"] for r in rows] == [0, 1]


def test_count_and_prompt_errors_are_whole_sentences(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="^`num_replay_images_per_prompt` must be a positive integer, got 0$"):
        generate_replay_set(tiny_pipe, tmp_path, ["a cat"], 0)
    with pytest.raises(ValueError, match="^`num_surrogate_images` must be a positive integer, got -1$"):
        generate_surrogate_set(tiny_pipe, tmp_path, ["brad pitt"], -1, surrogate_type="noise")
    with pytest.raises(ValueError, match="^`replay_prompts_file`: no prompts given$"):
        generate_replay_set(tiny_pipe, tmp_path, [], 1)


def test_builders_pass_paired_surrogate_prompts_and_the_accelerator(tiny_pipe, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data_module, "_build_set", lambda *args: calls.append(args))
    accelerator = object()
    generate_surrogate_set(tiny_pipe, tmp_path / "s", ["brad pitt", "a dog"], 4, surrogate_prompt=["a man", "a cat"],
                           accelerator=accelerator)
    generate_replay_set(tiny_pipe, tmp_path / "r", ["a cat"], 1, accelerator=accelerator)
    (surrogate, replay) = calls
    assert surrogate[3]["sources"] == ["a man", "a cat"]
    assert [(r["prompt"], r["source"]) for r in surrogate[2]] == [("brad pitt", "a man"), ("a dog", "a cat")] * 2
    assert surrogate[7] is accelerator and replay[7] is accelerator
    with pytest.raises(ValueError, match="^`forget_prompt`: no prompts given$"):
        generate_surrogate_set(tiny_pipe, tmp_path, [], 1, surrogate_type="noise")
    with pytest.raises(ValueError, match="^give exactly one surrogate source: `surrogate_prompt`, `surrogate_data_dir` or "
                                         "`surrogate_type`$"):
        generate_surrogate_set(tiny_pipe, tmp_path, ["brad pitt"], 1)


@pytest.mark.parametrize("channels", [3, 1])
def test_decoded_images_are_the_vae_decode_scaled_to_0_255(tiny_pipe, channels):
    import numpy as np
    from diffusers import AutoencoderKL

    if channels == 1:  # a grey VAE, like the digits model's: PIL images in mode L
        torch.manual_seed(0)
        tiny_pipe.vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                      latent_channels=4, norm_num_groups=8, sample_size=32)
    vae = tiny_pipe.vae
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    expected = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert ((expected > 0) & (expected < 255)).any()
    if channels == 3:  # this VAE saturates both ends: the clamp to [0, 1] is exercised
        assert (expected == 0).any() and (expected == 255).any()
    with torch.no_grad():
        images = data_module._decode_to_pil(tiny_pipe, latents)
    assert [im.mode for im in images] == ["RGB" if channels == 3 else "L"] * 2
    for image, want in zip(images, expected):
        got = np.asarray(image)
        assert np.array_equal(got if channels == 3 else got[..., None], want)


def test_check_resolution_uses_the_vaes_factor_and_suggests_the_nearest_size():
    from types import SimpleNamespace

    sixteen = SimpleNamespace(vae_scale_factor=16)
    assert check_resolution(sixteen, 32) == 32
    with pytest.raises(ValueError, match=r"^`resolution` 24 is not a positive multiple of 16 \(the VAE's downsampling "
                                         r"factor and 8\); use e\.g\. 32$"):
        check_resolution(sixteen, 24)  # a multiple of 8, not of the VAE's factor
    eight = SimpleNamespace(vae_scale_factor=8)
    with pytest.raises(ValueError, match=r"; use e\.g\. 32$"):
        check_resolution(eight, 30)
    with pytest.raises(ValueError, match=r"; use e\.g\. 96$"):
        check_resolution(eight, 92)


def test_set_folder_holds_only_the_set_and_nothing_lands_in_the_working_directory(tiny_pipe, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "set"
    generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 2, surrogate_prompt="a middle aged man", **FAST)
    assert sorted(os.listdir(out)) == ["images", "latents-00000.safetensors", "metadata.jsonl", "settings.json"]
    assert sorted(os.listdir(out / "images")) == ["00000.png", "00001.png"]
    assert os.listdir(cwd) == []
    assert load_image_set(out).latents.shape[0] == 2  # read by its folder, from another working directory


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_a_lost_shard_of_a_complete_set_is_generated_again(tiny_pipe, tmp_path, monkeypatch, damage):
    monkeypatch.setattr(data_module, "SHARD_SIZE", 2)
    out = tmp_path / "s"
    kwargs = dict(surrogate_prompt="a middle aged man", seed=3, **FAST)
    full = generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 5, **kwargs)
    shard = out / "latents-00001.safetensors"
    if damage == "deleted":
        os.remove(shard)
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    calls = count_shard_generations(monkeypatch)
    again = generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 5, **kwargs)  # metadata.jsonl is still there
    assert len(calls) == 1
    assert torch.equal(again.latents, full.latents)


def test_set_errors_are_whole_sentences(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match=r"^2 `surrogate_prompt` for 3 forget prompts: give one surrogate for all of "
                                         r"them, or one per forget prompt \(paired in order\)$"):
        generate_surrogate_set(tiny_pipe, tmp_path / "a", ["x", "y", "z"], 3, surrogate_prompt=["p", "q"], **FAST)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"^`surrogate_data_dir` '.*empty' holds no images \(\.png, \.jpg, \.jpeg, "
                                         r"\.webp, \.bmp\)$"):
        generate_surrogate_set(tiny_pipe, tmp_path / "b", ["x"], 1, surrogate_data_dir=empty, **FAST)
    with pytest.raises(ValueError, match=r"^`surrogate_type` must be 'noise', uniform_noise or gaussian_noise; got "
                                         r"'pink'$"):
        generate_surrogate_set(tiny_pipe, tmp_path / "c", ["x"], 1, surrogate_type="pink", **FAST)


def test_image_set_load_errors_are_whole_sentences(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "SHARD_SIZE", 2)
    out = tmp_path / "s"
    generate_surrogate_set(tiny_pipe, out, ["brad pitt"], 3, surrogate_prompt="a middle aged man", **FAST)
    (out / "latents-00001.safetensors").write_bytes(b"not a shard")
    with pytest.raises(ValueError, match=r"^image set '.*s': the shard 'latents-00001\.safetensors' cannot be read "
                                         r"\(.*\); delete it and rerun the command that made the set to generate it "
                                         r"again$"):
        load_image_set(out)
    os.remove(out / "latents-00001.safetensors")
    with pytest.raises(ValueError, match=r"^image set '.*s' holds 2 images in its shards but its metadata\.jsonl lists "
                                         r"3: a shard is missing; rerun the command that made the set to generate it "
                                         r"again$"):
        load_image_set(out)
