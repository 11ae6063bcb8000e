"""The product's promise, end to end: the default run on builtin:digits forgets a concept it was not tuned on.

Slow (several minutes on 2 cores): run with `pytest -m slow`; `.ci/run` runs it with everything else.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sa_peft.adapter_io import read_adapter_metadata

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_sa_lora.py"
THREE = "a handwritten digit three"


@pytest.mark.slow
def test_default_run_forgets_three_and_keeps_the_other_digits(tmp_path):
    """"three" stayed at P 0.58 with the first version's fixed λ = 5; the adaptive run must erase it."""
    from accelerate.state import AcceleratorState

    spec = importlib.util.spec_from_file_location("train_sa_lora_e2e", SCRIPT)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = tmp_path / "forget-three"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        train.main(["--forget_prompt", THREE, "--output_dir", str(out), "--num_evaluation_images_per_prompt", "20",
                    "--num_validation_images", "1", "--checkpointing_steps", "100000", "--require_forgetting"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    forgetting = read_adapter_metadata(out)["sa_peft"]["forgetting"]
    assert forgetting["reached"] and forgetting["retained"], forgetting
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert before["forget"]["p_forgotten"] > 0.9  # the base model draws threes
    assert after["forget"]["p_forgotten"] <= 0.05, after["forget"]  # judged by the built-in classifier
    assert after["retained"]["mean_accuracy"] >= before["retained"]["mean_accuracy"] - 0.02
    assert after["retained"]["worst_accuracy"] >= 0.9
