"""What a user sees after a run: the labelled grids, training_curves.png and the model card's usage snippet."""

from __future__ import annotations

import ast
import json
import re
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import load_train_module

from sa_peft import validation
from sa_peft.evaluation import samples_grid
from sa_peft.image_grid import render_grid
from sa_peft.model_card import ADAPTER_PLACEHOLDER, model_card_text, usage_snippet, write_model_card
from sa_peft.training_curves import (
    MARKER_COLOR,
    curve_panels,
    forgotten_step,
    render_training_curves,
    write_training_curves,
)
from sa_peft.validation import encode_for_sampling, generate_validation_images, save_before_after_grid

RED, BLUE = (255, 0, 0), (0, 0, 255)


def solid(color, size=16) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def count(image: Image.Image, color) -> int:
    return int((np.asarray(image.convert("RGB")) == np.array(color, dtype=np.uint8)).all(-1).sum())


def dark(region: np.ndarray) -> int:
    """Pixels of drawn text: dark grey or black (the images in these tests are pure red or blue)."""
    return int((region.max(-1) < 128).sum())


def image_box(image: Image.Image, color) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero((np.asarray(image) == np.array(color, dtype=np.uint8)).all(-1))
    return xs.min(), ys.min(), xs.max(), ys.max()


# ------------------------------------------------------------------------------------------ grids


def checkerboard(size=16) -> Image.Image:
    """Red and blue pixels alternating: any blending resampler mixes them into purple."""
    yy, xx = np.indices((size, size))
    arr = np.where(((yy + xx) % 2 == 0)[..., None], np.array(RED, np.uint8), np.array(BLUE, np.uint8))
    return Image.fromarray(arr.astype(np.uint8))


def test_small_samples_are_enlarged_with_nearest_neighbour():
    grid = render_grid([("a handwritten digit zero", [checkerboard(), solid(RED)])])
    # 16 px × 6 = 96 px: every source pixel becomes a 6×6 block, no blended colours.
    assert count(grid, BLUE) == 96 * 96 // 2 and count(grid, RED) == 96 * 96 // 2 + 96 * 96
    big = render_grid([("x", [solid(RED, 600)])], max_cell_px=128)
    assert count(big, RED) == 128 * 128


def test_labels_headers_and_title_are_drawn():
    """Each part of the text against a render without it (a blank render: no ink there at all)."""
    images = [solid(RED), solid(BLUE)]
    blank = np.asarray(render_grid([(" ", images), (" ", images)]))
    left, top, _, _ = image_box(Image.fromarray(blank), RED)
    assert dark(blank) == 0
    labelled = np.asarray(render_grid([("a handwritten digit zero", images), ("one", images)]))
    assert labelled.shape[0] == blank.shape[0] and labelled.shape[1] > blank.shape[1]
    left, top, _, _ = image_box(Image.fromarray(labelled), RED)
    for i in range(2):  # ink left of the images, within each row's height
        assert dark(labelled[top + i * 100 : top + i * 100 + 96, :left]) > 20, f"row {i} has no label"
    headed = np.asarray(render_grid([(" ", images)] * 2, column_headers=["before", "after"]))
    titled = np.asarray(render_grid([(" ", images)] * 2, title="validation, step 7"))
    for picture in (headed, titled):
        _, top, _, _ = image_box(Image.fromarray(picture), RED)
        assert top > 0 and dark(picture[:top]) > 20 and dark(picture[top:]) == 0


def test_uneven_column_headers_are_refused():
    with pytest.raises(ValueError, match="3 columns cannot be split evenly between 2"):
        render_grid([("x", [solid(RED)] * 3)], column_headers=["before", "after"])


def test_validation_images_batched_over_prompts_are_each_prompts_own(monkeypatch):
    from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calls = []
    original = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, prompt, **kw: calls.append(len(prompt)) or original(self, prompt, **kw))
    prompts = ["brad pitt", "a photo of a cat", "a red car"]
    batched = generate_validation_images(pipe, prompts, 2, seed=3, resolution=32, guidance_scale=3.0, num_inference_steps=2)
    assert calls == [6]  # three prompts of two 32-px images: one call
    monkeypatch.setattr(validation, "VALIDATION_PIXELS_PER_CALL", 1)  # one prompt a call, as before
    single = generate_validation_images(pipe, prompts, 2, seed=3, resolution=32, guidance_scale=3.0, num_inference_steps=2)
    assert calls == [6, 2, 2, 2] and list(batched) == prompts
    for prompt in prompts:
        for a, b in zip(batched[prompt], single[prompt], strict=True):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    # Different prompts (and seeds within a prompt) give different images: the check above can fail.
    assert np.abs(np.asarray(batched[prompts[0]][0], dtype=int) - np.asarray(batched[prompts[1]][0], dtype=int)).max() > 10


def test_validation_grid_is_readable_and_labelled(tmp_path):
    before = {"a handwritten digit zero": [solid(RED)] * 4, "a photo of a cat": [solid(RED)] * 4}
    after = {p: [solid(BLUE)] * 4 for p in before}
    path = tmp_path / "validation_before_after.png"
    save_before_after_grid(before, after, str(path), step=400)
    grid = Image.open(path).convert("RGB")
    assert count(grid, RED) == 8 * 96 * 96 and count(grid, BLUE) == 8 * 96 * 96
    arr = np.asarray(grid)
    r_left, r_top, r_right, _ = image_box(grid, RED)
    b_left, _, b_right, _ = image_box(grid, BLUE)
    assert b_left > r_right  # "after" to the right of "before"
    assert dark(arr[:r_top, r_left:r_right]) > 20 and dark(arr[:r_top, b_left:b_right]) > 20  # both headers
    assert dark(arr[r_top:, :r_left]) > 40  # the prompts


def test_evaluation_grid_uses_the_same_renderer():
    samples = {"a handwritten digit zero": torch.ones(3, 1, 16, 16), "a handwritten digit one": torch.zeros(3, 1, 16, 16)}
    grid = samples_grid(samples, samples, num_samples=2)
    # 2 prompts × 2 samples × (before, after), enlarged to 96 px: white ones and black ones.
    assert count(grid, (0, 0, 0)) >= 4 * 96 * 96
    assert grid.size[0] > 4 * 96 and grid.size[1] > 2 * 96


# ------------------------------------------------------------------------------------------ curves


def fake_log(steps: int, forgotten_at: int | None = None, moving_lambda: bool = False) -> list[dict]:
    log = []
    for s in range(1, steps + 1):
        entry = {"step": s, "loss": 1.0, "forget": 1.0 / s, "replay": 0.1 + 0.01 * (s % 3), "ewc": 1e-3 * s, "lr": 1e-4}
        if s % 2 == 0:
            entry.update({"preference/a handwritten digit zero": 1 - s / steps, "max_preference": 1 - s / steps,
                          "retention": 0.001 * s, "forgotten": forgotten_at is not None and s >= forgotten_at,
                          "retained": True, "ewc_lambda": 5.0 / s if moving_lambda else 5.0})
        log.append(entry)
    return log


def write_log(path, log) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in log))


def test_panels_follow_the_log():
    panels = {p.title: p for p in curve_panels(fake_log(10), threshold=0.0, retention_bound=0.05)}
    assert "EWC λ (adaptive)" not in panels  # λ that does not move gets no curve
    assert "EWC λ (adaptive)" in {p.title for p in curve_panels(fake_log(10, moving_lambda=True))}
    preference = panels["forgetting: preference (1 = base model)"]
    assert [s.name for s in preference.series] == ["a handwritten digit zero"] and preference.series[0].steps == [2, 4, 6, 8, 10]
    assert preference.hlines == [("forgotten at ≤ 0", 0.0)]
    assert panels["retention: drift of held-out replay predictions"].hlines == [("bound 0.05", 0.05)]
    losses = panels["forget and replay loss"].series
    assert [(s.name, s.raw) for s in losses] == [("forget", True), ("forget", False), ("replay", True), ("replay", False)]
    assert forgotten_step(fake_log(10, forgotten_at=6)) == 6 and forgotten_step(fake_log(10)) is None


def test_curves_file_is_written_and_changes_with_the_log(tmp_path):
    pytest.importorskip("matplotlib")
    log_path, out = tmp_path / "train_log.jsonl", tmp_path / "training_curves.png"
    assert write_training_curves(log_path, out) is None and not out.exists()  # no log yet: nothing to draw
    write_log(log_path, fake_log(6))
    write_training_curves(log_path, out, threshold=0.0, retention_bound=0.05)
    first = out.read_bytes()
    with open(log_path, "a") as f:
        f.write(json.dumps({"step": 7, "forget": 3.0, "replay": 0.5, "ewc": 0.1}) + "\n")
    write_training_curves(log_path, out, threshold=0.0, retention_bound=0.05)
    assert out.read_bytes() != first
    _, backend = render_training_curves(fake_log(6))
    assert backend == "matplotlib"


def test_pil_fallback_draws_the_curves_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    image, backend = render_training_curves(fake_log(20, forgotten_at=12), threshold=0.0, retention_bound=0.05)
    assert backend == "pil"
    assert count(image, (0x1F, 0x77, 0xB4)) > 50 and count(image, (0xFF, 0x7F, 0x0E)) > 50  # forget, replay curves
    assert count(image, (0x44, 0x44, 0x44)) > 50  # the threshold and bound lines
    assert marker_column_pixels(image) > 60  # the dashed "forgotten at step 12" line, down each panel
    unforgotten, _ = render_training_curves(fake_log(20), backend="pil")
    assert marker_column_pixels(unforgotten) == 0
    log_path, out = tmp_path / "train_log.jsonl", tmp_path / "training_curves.png"
    write_log(log_path, fake_log(6))
    write_training_curves(log_path, out)
    first = out.read_bytes()
    write_log(log_path, fake_log(12))
    write_training_curves(log_path, out)
    assert out.read_bytes() != first


MARKER_COLOR_RGB = tuple(int(MARKER_COLOR[i : i + 2], 16) for i in (1, 3, 5))


def marker_column_pixels(image: Image.Image) -> int:
    """The most marker-coloured pixels in one pixel column: a vertical line has many, legend text a few."""
    return int((np.asarray(image) == np.array(MARKER_COLOR_RGB, dtype=np.uint8)).all(-1).sum(0).max())


def test_training_script_writes_curves_and_logs_them_to_trackers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # fast, and the fallback path of a bare install
    train = load_train_module()
    write_log(tmp_path / "train_log.jsonl", fake_log(8))
    logged = []
    tensorboard = types.SimpleNamespace(name="tensorboard", log_images=lambda values, step, **kw: logged.append(
        ("tensorboard", values, step, kw)))
    wandb = types.SimpleNamespace(name="wandb", log_images=lambda values, step: logged.append(("wandb", values, step, {})))
    accelerator = types.SimpleNamespace(trackers=[tensorboard, wandb])
    args = types.SimpleNamespace(output_dir=str(tmp_path), forgetting_threshold=0.0, retention_bound=0.05)
    train.update_training_curves(accelerator, args, str(tmp_path / "train_log.jsonl"), 8)
    picture = Image.open(tmp_path / "training_curves.png")
    (tb_name, tb_values, tb_step, tb_kw), (wb_name, wb_values, wb_step, _) = logged
    assert (tb_name, tb_step, wb_name, wb_step) == ("tensorboard", 8, "wandb", 8)
    assert tb_values["training_curves"].shape == (1, picture.size[1], picture.size[0], 3)
    assert tb_kw == {"dataformats": "NHWC"} and wb_values["training_curves"][0].size == picture.size


# ------------------------------------------------------------------------------------------ model card


def card_info(**overrides) -> dict:
    info = {"base_model": "builtin:digits", "forget_prompts": ['a "quoted" digit \\ zero'], "surrogate": "uniform noise",
            "num_surrogate_images": 8, "num_replay_prompts": 2, "num_replay_images_per_prompt": 4, "ewc_lambda": 1.0,
            "ewc_space": "lowrank", "fisher_estimator": "fast", "fisher_num_samples": 8, "replay_weight": 1.0,
            "rank": 2, "lora_alpha": 2, "lora_target": "attn", "num_adapted_modules": 4, "max_train_steps": 3,
            "train_batch_size": 2, "learning_rate": 1e-4, "sa_peft_version": "0.1.0"}
    return {**info, **overrides}


def snippet_of(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)


def call_arguments(code: str, method: str) -> list:
    """The literal first arguments of every ``.<method>(...)`` call in ``code`` (a non-literal: its source)."""
    out = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method:
            arg = node.args[0]
            out.append(arg.value if isinstance(arg, ast.Constant) else ast.unparse(arg))
    return out


@pytest.mark.parametrize("base", ["builtin:digits", "stable-diffusion-v1-5/stable-diffusion-v1-5"])
def test_card_snippet_is_valid_python_and_names_no_builtin_path(base):
    info = card_info(base_model=base)
    code = snippet_of(model_card_text(info, repo_id="someone/forget-zero"))
    (model,) = call_arguments(code, "from_pretrained")
    if base.startswith("builtin:"):
        assert model == "sa_peft.resolve_model_path('builtin:digits')" and code.startswith("import sa_peft\n")
    else:
        assert model == base and "import sa_peft" not in code
    assert call_arguments(code, "load_lora_weights")[0] == "someone/forget-zero"
    prompts = [n.args[0].value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and n.args
               and isinstance(n.func, ast.Name) and n.func.id == "pipe"]
    assert prompts == [info["forget_prompts"][0]] * 2  # quotes and backslashes survive as one literal
    text = model_card_text(info)
    assert "https://github.com/)" not in text and "](http" not in text  # no placeholder project link


def test_card_embeds_the_pictures_that_exist(tmp_path):
    info = card_info()
    write_model_card(tmp_path, info)
    assert "## Pictures" not in (tmp_path / "README.md").read_text()
    Image.new("RGB", (4, 4)).save(tmp_path / "training_curves.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "validation_before_after.png")
    write_model_card(tmp_path, {**info, "forgetting": {"reached": True, "retained": True, "reached_at_step": 3,
                                                      "trained_steps": 3, "threshold": 0.0, "retention_bound": 0.05,
                                                      "retention": 0.01, "concepts": {}}})
    card = (tmp_path / "README.md").read_text()
    assert "](validation_before_after.png)" in card and "](training_curves.png)" in card
    assert "samples_grid.png" not in card  # no evaluation ran
    assert card.index("## Did it forget?") < card.index("## Pictures") < card.index("## Usage")
    assert "FORGOTTEN after 3 steps (the signal first said forgotten at step 3)" in card


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_validation_from_precomputed_embeddings_needs_no_text_encoder_and_draws_the_same_images(family,
                                                                                                guidance_scale):
    from sa_peft.testing import tiny_pipeline

    build = {"sd": tiny_pipeline.build_tiny_pipeline, "sdxl": tiny_pipeline.build_tiny_sdxl_pipeline,
             "sd3": tiny_pipeline.build_tiny_sd3_pipeline, "flux": tiny_pipeline.build_tiny_flux_pipeline}[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    prompts = ["brad pitt", "a photo of a cat"]
    kwargs = {"seed": 3, "resolution": 32, "guidance_scale": guidance_scale, "num_inference_steps": 2}
    from_prompts = generate_validation_images(pipe, prompts, 2, **kwargs)
    embeddings = encode_for_sampling(pipe, prompts, guidance_scale)
    assert all(t.shape[0] == 1 and t.device.type == "cpu" for e in embeddings.values() for t in e.values())
    # negative embeddings only where the family samples with classifier-free guidance
    assert ("negative_prompt_embeds" in embeddings[prompts[0]]) == (guidance_scale > 1 and family != "flux")
    def unusable(*args, **kwargs):
        raise AssertionError("a text encoder was called")

    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # as if off the device: any call fails
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).forward = unusable
    from_embeddings = generate_validation_images(pipe, prompts, 2, **kwargs, embeddings=embeddings)
    for prompt in prompts:
        for a, b in zip(from_prompts[prompt], from_embeddings[prompt], strict=True):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    # the prompts' embeddings are not interchangeable: the comparison above can fail
    swapped = {prompts[0]: embeddings[prompts[1]], prompts[1]: embeddings[prompts[0]]}
    other = generate_validation_images(pipe, prompts, 2, **kwargs, embeddings=swapped)
    assert np.abs(np.asarray(other[prompts[0]][0], dtype=int) - np.asarray(from_prompts[prompts[0]][0], dtype=int)).max() > 2


@pytest.mark.slow  # fast tier under 3 minutes: samples the built-in model (~6 s idle), also covered in CI
def test_builtin_card_snippet_runs_as_written(tmp_path):
    """The card of a digits adapter, its snippet exec'd as a user would (only the folder filled in): ~4 s."""
    from sa_peft.adapter_io import save_forget_lora
    from sa_peft.lora import make_lora_config, resolve_lora_targets
    from sa_peft.models import load_pipeline

    pipe = load_pipeline("builtin:digits")
    names = resolve_lora_targets(pipe.unet, "attn")
    pipe.unet.add_adapter(make_lora_config(names, 2))
    info = card_info(num_adapted_modules=len(names))
    save_forget_lora(tmp_path, pipe.unet, info)
    write_model_card(tmp_path, info)
    code = snippet_of((tmp_path / "README.md").read_text())
    assert code.count(ADAPTER_PLACEHOLDER) == 1
    scope: dict = {}
    exec(code.replace(ADAPTER_PLACEHOLDER, str(tmp_path)), scope)  # noqa: S102 (our own card's snippet)
    assert isinstance(scope["image"], Image.Image) and "forget" in scope["pipe"].get_list_adapters()["unet"]
    assert usage_snippet(info).count("builtin:digits") == 1  # only as resolve_model_path's argument
