"""The ``sa-peft`` command on a saved tiny pipeline: generate surrogate/replay, fisher, and input errors."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from sa_peft.cli import main
from sa_peft.fisher import load_fisher
from sa_peft.lora import resolve_lora_targets
from sa_peft.models import load_pipeline


@pytest.fixture
def model_args(tiny_pipe_dir):
    return ["--pretrained_model_name_or_path", str(tiny_pipe_dir), "--device", "cpu", "--num_inference_steps", "2"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a cat\na red car\n")
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_surrogate(tmp_path, model_args, capsys):
    out_dir = tmp_path / "surrogate"
    code, out, err = run(
        [
            "generate",
            "surrogate",
            "--output_dir",
            out_dir,
            *model_args,
            "--forget_prompt",
            "brad pitt",
            "--surrogate_prompt",
            "a middle aged man",
            "--num_surrogate_images",
            2,
            "--seed",
            5,
        ],
        capsys,
    )
    assert code == 0, err
    assert "2 images" in out
    rows = [json.loads(line) for line in (out_dir / "metadata.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"], r["kind"], r["source"]) for r in rows] == [
        ("brad pitt", 5, "prompt", "a middle aged man"),
        ("brad pitt", 6, "prompt", "a middle aged man"),
    ]
    settings = json.loads((out_dir / "settings.json").read_text())
    assert settings["num_inference_steps"] == 2 and settings["resolution"] == 32


def test_generate_replay_and_fisher_from_it(tmp_path, model_args, prompts_file, capsys, tiny_pipe_dir):
    replay = tmp_path / "replay"
    code, out, err = run(
        [
            "generate",
            "replay",
            "--output_dir",
            replay,
            *model_args,
            "--replay_prompts_file",
            prompts_file,
            "--num_replay_images_per_prompt",
            1,
        ],
        capsys,
    )
    assert code == 0, err
    assert "2 images" in out
    fisher_path = tmp_path / "fisher.safetensors"
    code, out, err = run(
        [
            "fisher",
            "--output",
            fisher_path,
            *model_args,
            "--data_dir",
            replay,
            "--fisher_num_samples",
            2,
            "--fisher_num_timesteps",
            2,
            "--lora_target",
            "attn2.to_k",
            "--factored_only",
        ],
        capsys,
    )
    assert code == 0, err
    unet = load_pipeline(tiny_pipe_dir).unet
    targets = resolve_lora_targets(unet, "attn2.to_k")
    fisher = load_fisher(fisher_path, unet=unet, required_modules=targets)
    assert fisher.diagonal == {} and fisher.modules == sorted(targets)
    assert fisher.metadata["num_samples"] == "2"


def test_fisher_from_prompts_file(tmp_path, model_args, prompts_file, capsys, tiny_pipe_dir):
    fisher_path = tmp_path / "out" / "fisher.safetensors"
    code, out, err = run(
        [
            "fisher",
            "--output",
            fisher_path,
            *model_args,
            "--prompts_file",
            prompts_file,
            "--fisher_num_samples",
            3,
            "--fisher_num_timesteps",
            2,
            "--lora_target",
            "xattn",
        ],
        capsys,
    )
    assert code == 0, err
    assert str(fisher_path) in out and "16 modules from 3 samples" in out
    unet = load_pipeline(tiny_pipe_dir).unet
    targets = resolve_lora_targets(unet, "xattn")
    fisher = load_fisher(fisher_path, unet=unet, required_modules=targets)
    meta = fisher.metadata
    assert (meta["num_samples"], meta["estimator"], meta["num_timesteps"], meta["unet_passes"]) == (
        "3",
        "fast",
        "2",
        "6",
    )
    assert all(torch.isfinite(d).all() and d.sum() > 0 for d in fisher.diagonal.values())
    # the sampled images are cached beside the output: 2 per prompt, round-robin
    samples = tmp_path / "out" / "fisher-samples-2x0"  # named by images per prompt and seed
    assert len((samples / "metadata.jsonl").read_text().splitlines()) == 4


def test_missing_forget_prompt(tmp_path, model_args, capsys):
    code, _, err = run(
        ["generate", "surrogate", "--output_dir", tmp_path / "s", *model_args, "--surrogate_type", "noise"], capsys
    )
    assert code == 2
    assert "--forget_prompt is required" in err


def test_empty_prompts_file(tmp_path, model_args, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run(
        ["generate", "replay", "--output_dir", tmp_path / "r", *model_args, "--replay_prompts_file", empty], capsys
    )
    assert code == 2 and "--replay_prompts_file" in err and "has no prompts" in err
    code, _, err = run(["fisher", "--output", tmp_path / "f.safetensors", *model_args, "--prompts_file", empty], capsys)
    assert code == 2 and "--prompts_file" in err and "has no prompts" in err
    code, _, err = run(["generate", "replay", "--output_dir", tmp_path / "r", *model_args], capsys)
    assert code == 2 and "--replay_prompts_file is required" in err


def test_fisher_bad_inputs(tmp_path, model_args, prompts_file, capsys):
    code, _, err = run(
        ["fisher", "--output", tmp_path / "fisher.pt", *model_args, "--prompts_file", prompts_file], capsys
    )
    assert code == 2 and "--output" in err and ".safetensors" in err
    code, _, err = run(
        [
            "fisher",
            "--output",
            tmp_path / "f.safetensors",
            *model_args,
            "--prompts_file",
            prompts_file,
            "--fisher_num_samples",
            0,
        ],
        capsys,
    )
    assert code == 2 and "--fisher_num_samples" in err
    code, _, err = run(
        [
            "fisher",
            "--output",
            tmp_path / "f.safetensors",
            *model_args,
            "--prompts_file",
            prompts_file,
            "--fisher_num_samples",
            1,
            "--lora_target",
            "attn9.to_q",
        ],
        capsys,
    )
    assert code == 2 and "'attn9.to_q'" in err
    code, _, err = run(
        ["fisher", "--output", tmp_path / "f.safetensors", *model_args, "--data_dir", tmp_path / "nothing"], capsys
    )
    assert code == 2 and "metadata.jsonl" in err
    assert not (tmp_path / "f.safetensors").exists()


def test_bad_surrogate_inputs(tmp_path, model_args, capsys):
    base = ["generate", "surrogate", "--output_dir", tmp_path / "s", *model_args, "--forget_prompt", "brad pitt"]
    code, _, err = run([*base, "--surrogate_type", "noise", "--surrogate_prompt", "a man"], capsys)
    assert code == 2 and "exactly one surrogate source" in err
    code, _, err = run([*base, "--surrogate_type", "noise", "--resolution", 31], capsys)
    assert code == 2 and "--resolution 31" in err
    code, _, err = run([*base, "--surrogate_type", "noise", "--num_surrogate_images", 0], capsys)
    assert code == 2 and "--num_surrogate_images" in err


def test_missing_model(tmp_path, capsys):
    code, _, err = run(
        [
            "generate",
            "surrogate",
            "--output_dir",
            tmp_path / "s",
            "--device",
            "cpu",
            "--pretrained_model_name_or_path",
            tmp_path / "no" / "model",
            "--forget_prompt",
            "x",
            "--surrogate_type",
            "noise",
        ],
        capsys,
    )
    assert code == 2 and "no such folder" in err


def test_argparse_errors_exit_with_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fisher", "--prompts_file", "p.txt"])  # --output missing
    assert info.value.code == 2
    assert "--output" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["generate", "surrogate", "--output_dir", str(tmp_path), "--surrogate_type", "pink"])
    assert info.value.code == 2


def test_every_help_text_renders():
    """argparse formats each help string with ``%``: a bare percent sign in one (such as "10 %") breaks ``--help``
    of the whole command, and nothing else reads the help texts."""
    from train_helpers import load_train_module

    from sa_peft.cli import SUBCOMMANDS, build_parser

    train_help = load_train_module().build_parser().format_help()
    assert "--robust_forgetting" in train_help and "--require_forgetting" in train_help
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in SUBCOMMANDS:
        assert "usage: sa-peft " + name in subparsers.choices[name].format_help()
