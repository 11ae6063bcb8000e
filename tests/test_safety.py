"""No silent wrong results (issue 17): bad numbers, clashing prompts, shared folders, outputs over inputs,
precision, stale caches, unreadable files, and what gets published."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sa_peft.cli import main as cli_main
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_sa_lora.py"
LORA = "pytorch_lora_weights.safetensors"


def tiny_args(model_dir, replay_file, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
        "--forget_prompt", "brad pitt", "--replay_prompts_file", str(replay_file), "--surrogate_type", "noise",
        "--num_surrogate_images", "4", "--num_replay_images_per_prompt", "2", "--fisher_num_samples", "4",
        "--fisher_num_timesteps", "2", "--generation_num_inference_steps", "2", "--num_validation_images", "1",
        "--validation_steps", "1000", "--train_batch_size", "2", "--num_probe_images", "2", "--num_sample_check_images", "2", "--max_train_steps", "2",
        *extra,
    ]


# ---- numeric flags --------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--ewc_lambda", "inf", "--ewc_lambda must be a finite number, got inf"),
    ("--ewc_lambda", "nan", "--ewc_lambda must be a finite number, got nan"),
    ("--learning_rate", "nan", "--learning_rate must be a finite number"),
    ("--learning_rate", "0", r"--learning_rate must be in \(0, inf\]"),
    ("--replay_weight", "-1", r"--replay_weight must be in \[0, inf\]"),
    ("--adam_beta2", "1", r"--adam_beta2 must be in \[0, 1\)"),
    ("--noise_offset", "inf", "--noise_offset must be a finite number"),
    ("--generation_guidance_scale", "nan", "--generation_guidance_scale must be a finite number"),
    ("--generation_num_inference_steps", "0", "--generation_num_inference_steps must be a positive integer, got 0"),
    ("--fisher_num_timesteps", "0", "--fisher_num_timesteps must be a positive integer"),
    ("--checkpoints_total_limit", "0", "--checkpoints_total_limit must be a positive integer"),
    ("--seed", "-1", r"--seed must be in \[0, inf\]"),
    ("--retention_bound", "nan", "--retention_bound must be a finite number"),
])
def test_numeric_flags_are_finite_and_in_range_before_any_work(train, replay_file, tmp_path, flag, value, message):
    # The model path does not exist: the check must come before any model is loaded.
    args = train.parse_args(tiny_args(tmp_path / "no-model", replay_file, tmp_path / "out", flag, value))
    with pytest.raises(ValueError, match=message):
        train.resolve_defaults(args)


def test_non_finite_loss_stops_the_run_and_writes_no_adapter(train, tiny_pipe_dir, replay_file, tmp_path):
    from sa_peft.objective import NonFiniteLossError

    out = tmp_path / "run"
    # A finite flag that overflows the loss: offset noise of 1e30 squares to inf.
    with pytest.raises(NonFiniteLossError, match="not finite at step 1.*no adapter was written"):
        train.main(tiny_args(tiny_pipe_dir, replay_file, out, "--noise_offset", "1e30"))
    assert not (out / LORA).exists() and not (out / "README.md").exists()


@pytest.mark.parametrize("forget, replay", [
    ("A  Photo of a CAT", "a photo of a cat"),  # case and spacing: the same token ids
    ("x " * 80 + "one", "x " * 80 + "two"),  # equal after the 77-token truncation
])
def test_forget_and_replay_prompts_clashing_on_token_ids_are_refused(train, tiny_pipe_dir, tmp_path, forget, replay):
    replay_file = tmp_path / "replay.txt"
    replay_file.write_text(f"{replay}\na red car\n")
    args = tiny_args(tiny_pipe_dir, replay_file, tmp_path / "out")
    args[args.index("--forget_prompt") + 1] = forget
    with pytest.raises(ValueError, match="give the model the same tokens.*--replay_prompts_file"):
        train.main(args)
    assert not (tmp_path / "out" / "cache").exists()  # refused before any set was generated


def test_sampling_commands_refuse_zero_steps(tiny_pipe_dir, tmp_path, capsys):
    base = ["--pretrained_model_name_or_path", str(tiny_pipe_dir), "--device", "cpu", "--num_inference_steps", "0"]
    assert cli_main(["generate", "surrogate", "--output_dir", str(tmp_path / "s"), "--forget_prompt", "a",
                     "--surrogate_type", "noise", *base]) == 2
    assert "--num_inference_steps must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ---- one run per folder -----------------------------------------------------------------------------

def test_a_second_run_on_one_output_dir_fails_at_once_naming_the_first(train, tiny_pipe_dir, replay_file, tmp_path):
    from sa_peft.run_lock import RunLockedError, folder_lock

    out = tmp_path / "run"
    with folder_lock(out, "--output_dir"), pytest.raises(RunLockedError, match=f"in use by another sa-peft run \\(PID {os.getpid()}"):
        train.main(tiny_args(tiny_pipe_dir, replay_file, out))
    assert sorted(os.listdir(out)) == []  # nothing written, and the lock went with the first "run"


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_a_stale_lock_is_taken_over_and_temporaries_are_cleaned(train, tiny_pipe_dir, replay_file, tmp_path):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "cache").mkdir(parents=True)
    (out / ".sa-peft.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "x"}))
    (out / ".tmp-checkpoint-4").mkdir()
    (out / "cache" / ".tmp-abc.safetensors").write_bytes(b"half")
    train.main(tiny_args(tiny_pipe_dir, replay_file, out))
    assert (out / LORA).exists()
    assert not (out / ".tmp-checkpoint-4").exists() and not (out / "cache" / ".tmp-abc.safetensors").exists()
    assert not (out / ".sa-peft.lock").exists()  # released at the end


def test_lock_of_a_reused_pid_is_stale(tmp_path):
    from sa_peft.run_lock import acquire

    lock = tmp_path / ".sa-peft.lock"
    # Our own PID, but started at another tick: the PID was reused, the run that wrote it is gone.
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "start_tick": "1"}))
    owner = acquire(str(lock), "--output_dir")
    assert json.loads(lock.read_text()) == owner


# ---- outputs apart from inputs ----------------------------------------------------------------------

@pytest.fixture
def trained_dir(tmp_path):
    from sa_peft.adapter_io import save_forget_lora
    from sa_peft.lora import make_lora_config, resolve_lora_targets

    pipe = build_tiny_pipeline()
    pipe.unet.add_adapter(make_lora_config(resolve_lora_targets(pipe.unet, "all"), 2))
    folder = tmp_path / "training-run"
    save_forget_lora(folder, pipe.unet, {"base_model": "x", "forget_prompts": ["brad pitt"]})
    (folder / "checkpoint-2").mkdir()
    return folder


def test_merge_into_its_own_lora_folder_is_refused_and_the_folder_survives(trained_dir, tiny_pipe_dir, capsys):
    before = sorted(os.listdir(trained_dir))
    assert cli_main(["merge", "--lora", str(trained_dir), "--output_dir", str(trained_dir), "--overwrite",
                     "--pretrained_model_name_or_path", str(tiny_pipe_dir)]) == 2
    assert f"--output_dir {str(trained_dir)!r} is the input --lora" in capsys.readouterr().err
    assert sorted(os.listdir(trained_dir)) == before
    assert cli_main(["merge", "--lora", str(trained_dir / LORA), "--output_dir", str(trained_dir.parent), "--overwrite",
                     "--pretrained_model_name_or_path", str(tiny_pipe_dir)]) == 2
    assert "contains the input --lora" in capsys.readouterr().err
    assert cli_main(["merge", "--lora", str(trained_dir), "--single_file", str(tiny_pipe_dir / "m.safetensors"),
                     "--pretrained_model_name_or_path", str(tiny_pipe_dir)]) == 2
    assert "--single_file" in (err := capsys.readouterr().err) and "lies inside the input --pretrained_model_name_or_path" in err


def test_generate_and_fisher_refuse_outputs_inside_inputs(tiny_pipe_dir, tmp_path, capsys):
    images = tmp_path / "my-images"
    images.mkdir()
    base = ["--pretrained_model_name_or_path", str(tiny_pipe_dir), "--device", "cpu", "--num_inference_steps", "2"]
    assert cli_main(["generate", "surrogate", "--output_dir", str(images / "set"), "--forget_prompt", "a",
                     "--surrogate_data_dir", str(images), *base]) == 2
    assert "lies inside the input --surrogate_data_dir" in capsys.readouterr().err
    assert cli_main(["fisher", "--output", str(tiny_pipe_dir / "f.safetensors"), "--data_dir", str(images), *base]) == 2
    assert "lies inside the input --pretrained_model_name_or_path" in capsys.readouterr().err


def test_unwritable_output_is_refused_before_the_work(trained_dir, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert cli_main(["export", str(trained_dir), "--output", str(locked / "k.safetensors")]) == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_training_output_inside_the_surrogate_images_is_refused(train, replay_file, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    args = tiny_args(tmp_path / "no-model", replay_file, images / "out")
    args[args.index("--surrogate_type"): args.index("--surrogate_type") + 2] = ["--surrogate_data_dir", str(images)]
    with pytest.raises(ValueError, match="--output_dir .* lies inside the input --surrogate_data_dir"):
        train.resolve_defaults(train.parse_args(args))


def test_evaluate_refuses_a_bad_lora_before_the_base_evaluation(tmp_path, capsys, monkeypatch):
    from sa_peft import before_after
    from sa_peft.commands import evaluate

    def no_sampling(*a, **k):
        raise AssertionError("the base evaluation ran")

    monkeypatch.setattr(before_after, "evaluate_pipeline", no_sampling)
    monkeypatch.setattr(evaluate, "load_pipeline_from_args", no_sampling)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert cli_main(["evaluate", "--lora", str(bad), "--output_dir", str(tmp_path / "ev"), "--device", "cpu"]) == 2
    assert f"--lora {str(bad)!r} is not a valid safetensors file" in capsys.readouterr().err
    save_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    assert cli_main(["evaluate", "--lora", str(tmp_path / "weights.safetensors"), "--output_dir", str(tmp_path / "ev"),
                     "--device", "cpu"]) == 2
    assert "holds no LoRA weights" in capsys.readouterr().err


# ---- errors: one line for input, a traceback for bugs -------------------------------------------------

def test_cli_lets_a_type_error_through(monkeypatch):
    from sa_peft.commands import inspect

    def buggy(args):
        raise TypeError("a bug")

    monkeypatch.setattr(inspect, "run", buggy)
    with pytest.raises(TypeError, match="a bug"):
        cli_main(["inspect", "x"])


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_training_script_input_error_is_one_line(replay_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    result = subprocess.run([sys.executable, str(SCRIPT), *tiny_args(tmp_path / "m", replay_file, tmp_path / "o",
                                                                     "--ewc_lambda", "nan")],
                            check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == "train_sa_lora.py: error: --ewc_lambda must be a finite number, got nan"
    assert "Traceback" not in result.stderr


def test_prompt_files_in_other_encodings_name_the_file(tmp_path):
    from sa_peft.prompts import read_prompts_file

    for encoding, text in (("utf-16", "a cat\n"), ("utf-16-le", "a cat\n"), ("latin-1", "café\n")):
        path = tmp_path / f"{encoding}.txt"
        path.write_bytes(text.encode(encoding))
        with pytest.raises(ValueError, match=f"`replay_prompts_file` {str(path)!r} .*save it as UTF-8"):
            read_prompts_file(path, "replay_prompts_file")


def test_corrupt_surrogate_image_names_the_file(tiny_pipe, tmp_path):
    from sa_peft.data import generate_surrogate_set

    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="`surrogate_data_dir`: cannot read the image .*broken.png"):
        generate_surrogate_set(tiny_pipe, tmp_path / "set", ["a"], 2, surrogate_data_dir=images, num_inference_steps=2,
                               show_progress=False)


# ---- sets and Fisher files --------------------------------------------------------------------------

def test_a_missing_or_truncated_shard_is_regenerated(tiny_pipe, tmp_path):
    from sa_peft.data import generate_replay_set, load_image_set

    folder = tmp_path / "set"
    kwargs = {"seed": 0, "num_inference_steps": 2, "show_progress": False}
    first = generate_replay_set(tiny_pipe, folder, ["a cat", "a dog"], 10, **kwargs)  # 20 images: two shards
    assert len(first.latents) == 20
    (folder / "latents-00001.safetensors").unlink()
    with pytest.raises(ValueError, match="a shard is missing"):
        load_image_set(folder)
    again = generate_replay_set(tiny_pipe, folder, ["a cat", "a dog"], 10, **kwargs)
    assert torch.equal(again.latents, first.latents)
    shard = folder / "latents-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="the shard 'latents-00000.safetensors' cannot be read"):
        load_image_set(folder)
    assert torch.equal(generate_replay_set(tiny_pipe, folder, ["a cat", "a dog"], 10, **kwargs).latents, first.latents)


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_a_fisher_made_with_other_settings_is_not_reused(train, tiny_pipe_dir, replay_file, tmp_path):
    fisher = tmp_path / "fisher.safetensors"
    train.main(tiny_args(tiny_pipe_dir, replay_file, tmp_path / "a", "--fisher_path", str(fisher)))
    with pytest.raises(ValueError, match=r"other settings \(--fisher_num_timesteps: file '2', this run '3'\)"):
        train.main(tiny_args(tiny_pipe_dir, replay_file, tmp_path / "b", "--fisher_path", str(fisher),
                             "--fisher_num_timesteps", "3"))
    assert not (tmp_path / "b" / LORA).exists()


# ---- precision --------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on a GPU")
def test_fp16_on_cpu_is_refused_early_with_the_fix(train, replay_file, tmp_path):
    args = train.parse_args(tiny_args(tmp_path / "no-model", replay_file, tmp_path / "out", "--mixed_precision", "fp16"))
    with pytest.raises(ValueError, match="--mixed_precision fp16 needs a CUDA GPU.*use --mixed_precision bf16"):
        train.resolve_defaults(args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_training_validates_and_saves_on_gpu(train, tiny_pipe_dir, replay_file, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_pipe_dir, replay_file, out, "--mixed_precision", "fp16"))
    assert (out / LORA).exists() and (out / "validation_before_after.png").exists()


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_bf16_on_cpu_trains_validates_and_evaluates(train, tiny_pipe_dir, tmp_path):
    from sa_peft.classifier import DigitsClassifier, DigitsCNN

    labels = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    torch.manual_seed(0)
    classifier = tmp_path / "classifier"
    DigitsClassifier(DigitsCNN(), labels, reference_images=torch.rand(20, 1, 16, 16),
                     reference_labels=torch.arange(20) % 10).save(classifier)
    replay = tmp_path / "replay.txt"
    replay.write_text("a handwritten digit one\na handwritten digit two\n")
    out = tmp_path / "run"
    args = tiny_args(tiny_pipe_dir, replay, out, "--mixed_precision", "bf16", "--classifier", str(classifier),
                     "--num_evaluation_images_per_prompt", "2")
    args[args.index("--forget_prompt") + 1] = "a handwritten digit zero"
    train.main(args)
    assert (out / LORA).exists() and (out / "validation_before_after.png").exists()
    assert json.loads((out / "evaluation" / "metrics.json").read_text())["after"]["per_prompt"]


# ---- publishing -------------------------------------------------------------------------------------

def _crafted_info():
    return {
        "base_model": "/home/someone/private/models/my-sd", "forget_prompts": ['evil") ; import os ; ("|x\n# forged'],
        "surrogate": "images from the folder 'faces'", "num_surrogate_images": 4, "num_replay_prompts": 2,
        "num_replay_images_per_prompt": 2, "ewc_lambda": 1.0, "ewc_space": "lowrank", "fisher_estimator": "fast",
        "fisher_num_samples": 4, "replay_weight": 1.0, "rank": 2, "lora_alpha": 2, "lora_target": "all",
        "num_adapted_modules": 3, "max_train_steps": 2, "train_batch_size": 2, "learning_rate": 1e-3,
        "sa_peft_version": "0", "base_pipeline": "StableDiffusionPipeline",
    }


def test_card_quotes_prompts_escapes_cells_and_hides_local_paths(tmp_path):
    import ast
    import re

    from sa_peft.model_card import write_model_card

    text = Path(write_model_card(tmp_path, _crafted_info())).read_text()
    assert "/home/someone" not in text and "`my-sd`" in text
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    calls = [n for n in ast.walk(ast.parse(snippet)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "pipe"]
    assert calls and all(c.args[0].value == _crafted_info()["forget_prompts"][0] for c in calls)  # a string, not code
    imported = {a.name for n in ast.walk(ast.parse(snippet)) if isinstance(n, ast.Import) for a in n.names}
    assert "os" not in imported  # the prompt's "import os" stayed inside the string
    row = next(line for line in text.splitlines() if line.startswith("| forgotten concept(s) |"))
    assert row.count(" | ") == 1 and "\\|x\\n# forged" in row  # the | is escaped, the newline is not a line
    assert "\n# forged" not in text


def test_inspect_escapes_control_characters(tmp_path, capsys):
    from sa_peft.adapter_io import save_forget_lora
    from sa_peft.lora import make_lora_config, resolve_lora_targets

    pipe = build_tiny_pipeline()
    pipe.unet.add_adapter(make_lora_config(resolve_lora_targets(pipe.unet, "all"), 2))
    save_forget_lora(tmp_path, pipe.unet, {"base_model": "m\x1b[2J\nbase model  forged", "forget_prompts": ["a\u202eb"]})
    assert cli_main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "m\\x1b[2J\\nbase model  forged" in out
    assert not any(line.startswith("base model  forged") for line in out.splitlines())
    assert cli_main(["inspect", str(tmp_path), "--json"]) == 0
    raw = capsys.readouterr().out
    assert "\x1b" not in raw and "\u202e" not in raw
    assert json.loads(raw)["sa_peft"]["forget_prompts"] == ["a\u202eb"]  # escaped, not altered


def test_push_ignores_temporaries_and_the_lock(train):
    from fnmatch import fnmatch

    def ignored(path):
        return any(fnmatch(path, p) for p in train.PUSH_IGNORE_PATTERNS)

    for path in (".tmp-lora-x/pytorch_lora_weights.safetensors", ".tmp-abc.png", ".sa-peft.lock",
                 "checkpoint-4/lora_unet.safetensors", "cache/replay-1/latents-00000.safetensors",
                 "evaluation/.tmp-1.json"):
        assert ignored(path), path
    for path in (LORA, "README.md", "validation_before_after.png", "evaluation/metrics.json"):
        assert not ignored(path), path


def test_adapter_and_merged_weights_are_world_readable(trained_dir, tmp_path):
    from sa_peft.merge import save_merged_pipeline

    umask = os.umask(0o022)
    try:
        mode = stat.S_IMODE(os.stat(trained_dir / LORA).st_mode)
        save_merged_pipeline(build_tiny_pipeline(), tmp_path / "merged")
    finally:
        os.umask(umask)
    assert mode == 0o644
    weights = list((tmp_path / "merged").rglob("*.safetensors"))
    assert weights and all(stat.S_IMODE(w.stat().st_mode) == 0o644 for w in weights)


# ---- resume -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpointed_run(train, tiny_pipe_dir, replay_file, tmp_path_factory):
    """A 4-step run with a checkpoint at step 2, and its arguments; one run for the module (the tests only read it)."""
    args = tiny_args(tiny_pipe_dir, replay_file, tmp_path_factory.mktemp("checkpointed") / "run", "--max_train_steps", "4", "--checkpointing_steps", "2",
                     "--learning_rate", "1e-2")
    train.main(args)
    return Path(args[args.index("--output_dir") + 1]), args


def _resume(args, output_dir, checkpoint, *extra):
    args = list(args)
    args[args.index("--output_dir") + 1] = str(output_dir)
    return [*args, "--resume_from_checkpoint", str(checkpoint), *extra]


def test_checkpoints_hold_no_pickles_and_resume_without_torch_load(train, checkpointed_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    out, args = checkpointed_run
    assert sorted(os.listdir(out / "checkpoint-2")) == ["lora_unet.safetensors", "optimizer.safetensors",
                                                        "pytorch_lora_weights.safetensors", "training_state.json"]

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    # A copy under any folder name resumes, and to the adapter of the uninterrupted run.
    backup = tmp_path / "my backup"
    import shutil

    shutil.copytree(out / "checkpoint-2", backup)
    train.main(_resume(args, tmp_path / "resumed", backup))
    a, b = load_file(out / LORA), load_file(tmp_path / "resumed" / LORA)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [3, 4]


def test_resume_with_other_training_settings_is_refused_listing_them(train, checkpointed_run, tmp_path):
    out, args = checkpointed_run
    changed = [a if a != "1e-2" else "2e-2" for a in args] + ["--ewc_lambda", "3"]
    with pytest.raises(ValueError, match=r"other settings: ewc_lambda: checkpoint 5\.0, now 3\.0; learning_rate: "
                                         r"checkpoint 0\.01, now 0\.02\..*--resume_with_new_settings"):
        train.main(_resume(changed, tmp_path / "b", out / "checkpoint-2"))
    assert not (tmp_path / "b" / "cache").exists()  # refused before the sets were generated
    train.main(_resume(changed, tmp_path / "b", out / "checkpoint-2", "--resume_with_new_settings"))
    assert json.loads(next(iter(_header_info(tmp_path / "b"))))["learning_rate"] == 0.02


def _header_info(folder):
    from sa_peft.adapter_io import read_adapter_metadata

    yield json.dumps(read_adapter_metadata(folder)["sa_peft"])


def test_resume_past_the_step_limit_is_refused(train, checkpointed_run, tmp_path):
    out, args = checkpointed_run
    shorter = [*args, "--max_train_steps", "1"]
    with pytest.raises(ValueError, match="is at step 2, past --max_train_steps 1"):
        train.main(_resume(shorter, tmp_path / "b", out / "checkpoint-2"))
    assert not (tmp_path / "b" / LORA).exists()


@pytest.mark.slow  # fast tier under 3 minutes: a whole (tiny) run, also covered in CI
def test_resume_continues_the_adaptive_lambda(train, tiny_pipe_dir, replay_file, tmp_path):
    """λ decays at every check here (a tiny learning rate stalls the signal, far inside a loose retention
    bound); a resumed run must go on from the checkpoint's λ, not restart at --ewc_lambda."""
    from safetensors.torch import load_file

    args = tiny_args(tiny_pipe_dir, replay_file, tmp_path / "full", "--max_train_steps", "4", "--checkpointing_steps", "2",
                     "--forgetting_check_steps", "1", "--retention_bound", "10", "--forgetting_threshold", "-9",
                     "--learning_rate", "1e-6")
    train.main(args)
    state = json.loads((tmp_path / "full" / "checkpoint-2" / "training_state.json").read_text())
    assert state["loop"]["ewc_lambda"] != 5.0  # λ moved before the checkpoint
    train.main(_resume(args, tmp_path / "resumed", tmp_path / "full" / "checkpoint-2"))
    a, b = load_file(tmp_path / "full" / LORA), load_file(tmp_path / "resumed" / LORA)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_set_and_fisher_commands_refuse_a_folder_or_file_in_use(tiny_pipe_dir, tmp_path, capsys):
    from sa_peft.run_lock import file_lock, folder_lock

    base = ["--pretrained_model_name_or_path", str(tiny_pipe_dir), "--device", "cpu", "--num_inference_steps", "2"]
    with folder_lock(tmp_path / "set", "--output_dir"):
        assert cli_main(["generate", "surrogate", "--output_dir", str(tmp_path / "set"), "--forget_prompt", "a",
                         "--surrogate_type", "noise", *base]) == 2
    assert f"in use by another sa-peft run (PID {os.getpid()}" in capsys.readouterr().err
    assert not (tmp_path / "set" / "settings.json").exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    with file_lock(tmp_path / "f.safetensors", "--output"):
        assert cli_main(["fisher", "--output", str(tmp_path / "f.safetensors"), "--prompts_file", str(prompts), *base]) == 2
    assert "--output" in (err := capsys.readouterr().err) and f"PID {os.getpid()}" in err


def test_an_old_pickled_checkpoint_is_refused_clearly(tmp_path):
    from sa_peft.checkpoints import read_checkpoint_state

    old = tmp_path / "checkpoint-500"
    old.mkdir()
    (old / "random_states_0.pkl").write_bytes(b"\x80\x04payload")
    with pytest.raises(ValueError, match="is not an sa-peft checkpoint .*older versions held pickles"):
        read_checkpoint_state(str(old))
