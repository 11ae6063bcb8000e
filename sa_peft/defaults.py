"""Defaults of a forget run: the built-in digits job, and a generic replay prompt list for any model."""

from __future__ import annotations

import os

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_PROMPTS = tuple(f"a handwritten digit {w}" for w in DIGIT_WORDS)
DEFAULT_REPLAY_PROMPTS_FILE = os.path.join(os.path.dirname(__file__), "resources", "replay_prompts.txt")


def digits_defaults(forget_prompts: list[str]) -> dict:
    """The main job on ``builtin:digits``: forget "zero" (unless told otherwise), replay the other digits.

    The surrogate is the frozen model's own images of the next digit not being forgotten ("one" for
    "zero"): with uniform noise, the classifier still gives noise images P(zero) ≈ 0.07, so a noise
    surrogate cannot show P(zero) ≤ 0.02 (benchmarks/RESULTS.md). λ = 5 came from the sweep there.
    """
    forget = forget_prompts or [DIGIT_PROMPTS[0]]
    surrogate = next(p for p in DIGIT_PROMPTS[1:] + DIGIT_PROMPTS[:1] if p not in forget)
    return {
        "forget_prompts": forget,
        "surrogate_prompt": surrogate,
        "replay_prompts": [p for p in DIGIT_PROMPTS if p not in forget],
        "resolution": 16,
        "guidance_scale": 3.0,
        "num_inference_steps": 25,
        "classifier": "builtin:digits-classifier",
    }
