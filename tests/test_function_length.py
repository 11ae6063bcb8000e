"""No function in the runtime package or the training script grows past ~120 lines (docstring included):
the script's ``main`` reads top to bottom, and each phase is a function one can read on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 120


def function_lengths() -> list[tuple[int, str]]:
    rows = []
    for path in sorted([*ROOT.glob("sa_peft/**/*.py"), *ROOT.glob("training_scripts/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def test_no_function_is_longer_than_120_lines():
    lengths = function_lengths()
    assert len(lengths) > 100  # the files were found
    assert [row for row in lengths if row[0] > MAX_LINES] == []
