"""A training checkpoint holds a loadable LoRA; the final outputs are drawn from the adapter file just written."""

from __future__ import annotations

import numpy as np
import pytest
from train_helpers import run_training, sample

from sa_peft.adapter_io import LORA_WEIGHT_NAME, read_adapter_metadata
from sa_peft.checkpoints import read_checkpoint_state
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_checkpoint_lora_loads_and_the_run_ends_on_the_saved_file(train, tiny_pipe_dir, replay_file, tmp_path):
    out = tmp_path / "run"
    pipe = run_training(train, tiny_pipe_dir, out, replay_file, "--forget_prompt", "brad pitt", "--surrogate_type",
                        "noise", "--checkpointing_steps", "2", "--train_text_encoder")
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / LORA_WEIGHT_NAME).exists() and read_checkpoint_state(str(checkpoint))["step"] == 2
    info = read_adapter_metadata(checkpoint)["sa_peft"]
    assert info["trained_steps"] == 2 and info["forget_prompts"] == ["brad pitt"]
    base = build_tiny_pipeline()
    at_checkpoint = build_tiny_pipeline()
    at_checkpoint.load_lora_weights(str(checkpoint))  # diffusers loads a checkpoint like any LoRA
    assert np.abs(sample(at_checkpoint) - sample(base)).max() > 0
    # The returned pipeline holds the file in --output_dir (UNet and text encoder), not the in-memory adapter.
    final = build_tiny_pipeline()
    final.load_lora_weights(str(out))
    np.testing.assert_array_equal(sample(pipe), sample(final))
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}
