"""Input errors: the library names parameters, the command lines name flags, and only input errors are caught."""

from __future__ import annotations

import argparse
import ast
import pathlib
import re

import pytest

import sa_peft
from sa_peft import cli
from sa_peft.commands import common
from sa_peft.commands import generate as generate_command
from sa_peft.config import SelectiveAmnesiaConfig
from sa_peft.errors import (
    ExistingOutputError,
    InputError,
    MissingDependencyError,
    MissingInputError,
    UnwritableOutputError,
    flags_of,
    input_errors_as_flags,
    report_input_errors,
    with_flags,
)

PACKAGE = pathlib.Path(sa_peft.__file__).parent
ERROR_CLASSES = {"InputError", "MissingInputError", "ExistingOutputError", "UnwritableOutputError",
                 "MissingDependencyError", "RunLockedError", "NonFiniteLossError"}


def test_with_flags_writes_known_parameters_as_flags_and_leaves_other_quotes():
    flags = {"fisher_path": "--fisher_path", "stop_when_forgotten": "--train_full_budget"}
    assert with_flags("`fisher_path` 'x' is old; delete `fisher_path` or see `accelerate config` and `lora_B`",
                      flags) == "--fisher_path 'x' is old; delete --fisher_path or see `accelerate config` and `lora_B`"
    assert with_flags("(`stop_when_forgotten`)", flags) == "(--train_full_budget)"
    assert with_flags("no parameters here", flags) == "no parameters here"


def test_flags_of_maps_dests_to_long_options_and_positionals_to_their_names():
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("-o", "--output", dest="output")
    parser.add_argument("--train_full_budget", dest="stop_when_forgotten", action="store_false")
    parser.add_argument("--lora", action="append", metavar="FILE")
    assert flags_of([parser]) == {"path": "path", "output": "--output", "stop_when_forgotten": "--train_full_budget",
                                  "lora": "--lora"}


def test_path_errors_are_input_errors_and_their_os_error_kind():
    for cls, kind in ((MissingInputError, FileNotFoundError), (ExistingOutputError, FileExistsError),
                      (UnwritableOutputError, PermissionError), (MissingDependencyError, ImportError)):
        err = cls("`output_dir` 'x' already exists")
        assert isinstance(err, InputError) and isinstance(err, ValueError) and isinstance(err, kind)
        assert str(err) == "`output_dir` 'x' already exists"


def test_input_errors_as_flags_keeps_the_class_and_rewrites_the_message():
    with pytest.raises(MissingInputError) as info, input_errors_as_flags({"surrogate_data_dir": "--surrogate_data_dir"}):
        raise MissingInputError("`surrogate_data_dir` '/x' is not a folder")
    assert str(info.value) == "--surrogate_data_dir '/x' is not a folder"
    with pytest.raises(ValueError, match="^`a` stays$"), input_errors_as_flags({"a": "--a"}):
        raise ValueError("`a` stays")  # not an input error: untouched


def test_report_input_errors_catches_input_errors_only(capsys):
    def bad_input():
        raise InputError("--rank must be a positive integer, got 0")

    assert report_input_errors("prog", bad_input) == 2
    assert capsys.readouterr().err == "prog: error: --rank must be a positive integer, got 0\n"
    for bug in (ValueError("a bug"), TypeError("a bug"), FileNotFoundError("a bug"), KeyError("a bug")):
        def raise_bug(bug=bug):
            raise bug

        with pytest.raises(type(bug)):
            report_input_errors("prog", raise_bug)
    assert report_input_errors("prog", lambda: None) == 0


def test_sa_peft_cli_names_flags_and_lets_a_bug_keep_its_traceback(monkeypatch, capsys, tmp_path):
    def run(args):
        raise InputError("`forget_prompt`: no prompts given; see `num_inference_steps` and `output_dir`")

    monkeypatch.setattr(generate_command, "load_pipeline_from_args", lambda args, **kw: (_ for _ in ()).throw(ValueError("a bug")))
    parser = argparse.ArgumentParser(prog="sa-peft generate")
    parser.add_argument("--forget_prompt", action="append")
    parser.add_argument("--num_inference_steps")
    wrapped = common.speaking_flags(run, parser)
    with pytest.raises(InputError, match=r"^--forget_prompt: no prompts given; see --num_inference_steps and `output_dir`$"):
        wrapped(argparse.Namespace())
    model = tmp_path / "model"
    model.mkdir()
    # Through cli.main: a real command whose library call hits a bug (a plain ValueError) is not reported as input.
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["generate", "surrogate", "--forget_prompt", "a cat", "--surrogate_type", "noise",
                  "--output_dir", str(tmp_path / "s"), "--pretrained_model_name_or_path", str(model)])
    assert "error:" not in capsys.readouterr().err


def test_training_script_errors_name_its_flags(train, tmp_path):
    # `stop_when_forgotten` is the field behind --train_full_budget: the map follows the flag, not the name.
    assert train.FLAGS["stop_when_forgotten"] == "--train_full_budget"
    assert train.FLAGS["fisher_num_timesteps"] == "--fisher_num_timesteps"
    with pytest.raises(InputError, match="^--learning_rate must be in"):
        train.resolve_defaults(train.parse_args(["--learning_rate", "0", "--output_dir", str(tmp_path / "o")]))
    with pytest.raises(InputError, match="^`learning_rate` must be in"):  # the library itself names the field
        SelectiveAmnesiaConfig(learning_rate=0, output_dir=str(tmp_path / "o"))


def _known_parameters() -> set[str]:
    known = {f.name for f in SelectiveAmnesiaConfig.__dataclass_fields__.values()}
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in sub.choices.values():
        known |= set(flags_of([command]))
        for action in command._actions:  # nested subcommands (generate surrogate|replay)
            if isinstance(action, argparse._SubParsersAction):
                for nested in action.choices.values():
                    known |= set(flags_of([nested]))
    return known


def _raised_messages(path: pathlib.Path):
    """(line, text) of every string literal inside a ``raise <project input error>(...)`` of ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            if getattr(func, "id", None) in ERROR_CLASSES:
                for part in ast.walk(node.exc):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        yield node.lineno, part.value


def test_every_parameter_a_library_error_names_exists():
    """A backquoted name in a library error is a parameter the command lines turn into a flag: a typo (or
    "`lora`_weight") would print as code instead of a flag, so each must be a config field or a flag's dest."""
    known = _known_parameters()
    unknown, count = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        if "commands" in path.parts or path.name == "cli.py":
            continue  # the command line's own messages name flags directly
        for line, text in _raised_messages(path):
            for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", text):
                count += 1
                if name not in known:
                    unknown.append(f"{path.relative_to(PACKAGE)}:{line}: `{name}`")
            if re.search(r"(?<![\w-])--[a-z]", text):
                unknown.append(f"{path.relative_to(PACKAGE)}:{line}: names a flag: {text!r}")
    assert count > 50  # the check saw the library's messages
    assert unknown == []


def test_library_modules_raise_no_bare_value_errors_for_their_parameters():
    """Every ``raise ValueError`` left in the library is an internal invariant, not a parameter check: its
    message names no parameter (those are ``InputError``s, which the command lines catch)."""
    known = _known_parameters()
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                    and getattr(node.exc.func, "id", None) in ("ValueError", "FileNotFoundError", "FileExistsError")):
                text = " ".join(p.value for p in ast.walk(node.exc) if isinstance(p, ast.Constant) and isinstance(p.value, str))
                if re.search(r"--[a-z]|`[a-z_]+`", text) and any(n in known for n in re.findall(r"[a-z_]+", text)):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []

