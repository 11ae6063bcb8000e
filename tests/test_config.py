"""The run's settings object: flags from its fields, presets in one place, the training info it records."""

from __future__ import annotations

import dataclasses
import json

import pytest
from train_helpers import run_training

from sa_peft import cli
from sa_peft.adapter_io import read_adapter_metadata
from sa_peft.config import TRAINING_INFO_FIELDS, SelectiveAmnesiaConfig, training_info
from sa_peft.defaults import DIGIT_PROMPTS


def test_every_flag_is_a_documented_field(train):
    for f in dataclasses.fields(SelectiveAmnesiaConfig):
        assert f.metadata["help"], f.name
    args = train.parse_args([])
    assert set(vars(args)) == {f.name for f in dataclasses.fields(SelectiveAmnesiaConfig) if f.init}


def test_digits_presets_are_resolved_in_one_place(train, tmp_path):
    config = train.resolve_defaults(train.parse_args(["--output_dir", str(tmp_path / "out")]))
    assert config.forget_prompts == [DIGIT_PROMPTS[0]] and config.replay_prompts == list(DIGIT_PROMPTS[1:])
    assert config.surrogate_prompt == [DIGIT_PROMPTS[1]]
    assert (config.resolution, config.rank, config.learning_rate, config.num_surrogate_images) == (16, 8, 2e-3, 256)
    assert config.validation_prompts == [DIGIT_PROMPTS[0], *DIGIT_PROMPTS[1:3]]
    assert config.schedule(256, 1) == (2e-3, 1000)
    assert config.schedule(256, 2) == (2e-3, 1000)
    epochs = dataclasses.replace(config, num_train_epochs=2, scale_lr=True)
    assert epochs.schedule(256, 2) == (2e-3 * 4 * 2, 2 * 32)


def test_training_info_writes_only_the_listed_fields(train, tmp_path):
    config = train.resolve_defaults(train.parse_args(["--output_dir", str(tmp_path / "out"), "--hub_token", "secret"]))
    info = training_info(config, base_pipeline="StableDiffusionPipeline", fisher_num_timesteps=8)
    assert set(info) - {"config"} <= {key for key, _ in TRAINING_INFO_FIELDS}
    assert info["fisher_num_timesteps"] == 8 and info["ewc_normalization"] == "mean"
    assert info["config"]["forget_prompts"] == [DIGIT_PROMPTS[0]] and "hub_token" not in info["config"]
    json.dumps(info)  # it goes into a safetensors header
    with pytest.raises(KeyError, match="not TRAINING_INFO_FIELDS"):
        training_info(config, unlisted=1)
    assert max(len(label) for _, label in TRAINING_INFO_FIELDS) <= 20  # inspect's column


def ewc_at_step_2(out) -> float:
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return log[1]["ewc"]


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_k_normalisation_and_the_whole_config_are_recorded(train, tiny_pipe_dir, replay_file, tmp_path, capsys):
    common = ("--forget_prompt", "brad pitt", "--surrogate_type", "noise", "--max_train_steps", "2")
    out, raw = tmp_path / "run", tmp_path / "raw"
    run_training(train, tiny_pipe_dir, out, replay_file, *common)
    info = read_adapter_metadata(out)["sa_peft"]
    assert info["fisher_num_timesteps"] == 2 and info["ewc_normalization"] == "mean"
    assert info["config"]["fisher_num_timesteps"] == 2 and info["config"]["forget_prompts"] == ["brad pitt"]
    assert "K = 2 timesteps (normalised by its mean)" in (out / "README.md").read_text()
    assert cli.main(["inspect", str(out)]) == 0
    assert "Fisher timesteps K    2" in capsys.readouterr().out
    # --ewc_normalization reaches the penalty: the same first step, then a penalty on the raw Fisher.
    run_training(train, tiny_pipe_dir, raw, replay_file, *common, "--ewc_normalization", "none")
    assert read_adapter_metadata(raw)["sa_peft"]["ewc_normalization"] == "none"
    assert "(not normalised)" in (raw / "README.md").read_text()
    assert ewc_at_step_2(out) > 0 and ewc_at_step_2(raw) > 0
    assert ewc_at_step_2(raw) != pytest.approx(ewc_at_step_2(out), rel=1e-3)


def test_a_bad_scheduler_name_is_refused_before_any_work(train, tmp_path):
    args = train.parse_args(["--output_dir", str(tmp_path / "out"), "--lr_scheduler", "cosin"])
    with pytest.raises(ValueError, match="--lr_scheduler 'cosin' is not one of diffusers' schedulers: linear, cosine"):
        train.resolve_defaults(args)
