"""Model path resolution and pipeline loading."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sa_peft.models import load_pipeline, resolve_model_path
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline


@pytest.mark.parametrize("name", ["CompVis/stable-diffusion-v1-4", "/some/local/folder", "relative/folder/x", "model"])
def test_non_builtin_names_pass_through(name):
    assert resolve_model_path(name) == name


def test_unknown_builtin_is_an_error():
    with pytest.raises(ValueError, match="unknown built-in model 'builtin:nope'.*builtin:digits"):
        resolve_model_path("builtin:nope")


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)
    afile = tmp_path / "model.safetensors"
    afile.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        load_pipeline(afile)


@pytest.mark.parametrize("relative", ["missing/deeper/model", "missing-model"])
def test_missing_path_that_is_not_a_hub_id(tmp_path, relative):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pipeline(tmp_path / relative)


@pytest.mark.parametrize("name", ["/missing-sa-peft-model", "./missing-sa-peft-model", "~/missing-sa-peft-model"])
def test_missing_local_looking_paths_with_one_slash_are_not_hub_ids(name):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pipeline(name)


def test_saved_tiny_pipeline_loads(tiny_pipe_dir):
    pipe = load_pipeline(tiny_pipe_dir)
    reference = build_tiny_pipeline()
    assert isinstance(pipe, StableDiffusionPipeline)
    for a, b in zip(pipe.unet.state_dict().values(), reference.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert pipe.unet.dtype == torch.float32
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.tokenizer("brad pitt").input_ids == reference.tokenizer("brad pitt").input_ids
    # loaded as float16 on request
    assert load_pipeline(str(tiny_pipe_dir), torch_dtype=torch.float16).unet.dtype == torch.float16
