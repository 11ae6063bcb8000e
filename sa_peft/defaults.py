"""Defaults of a forget run: the built-in digits job, and a generic replay prompt list for any model."""

from __future__ import annotations

import os

from .errors import InputError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_PROMPTS = tuple(f"a handwritten digit {w}" for w in DIGIT_WORDS)
# The built-in models trained on the digits (examples/digits/): their runs default to the digits job.
DIGITS_MODELS = ("builtin:digits", "builtin:digits-sd3")
DEFAULT_REPLAY_PROMPTS_FILE = os.path.join(os.path.dirname(__file__), "resources", "replay_prompts.txt")


def next_digit_surrogate(forget_prompt: str, forget_prompts: list[str]) -> str:
    """The digit after ``forget_prompt`` (cyclically) that is not itself being forgotten."""
    start = DIGIT_PROMPTS.index(forget_prompt) + 1 if forget_prompt in DIGIT_PROMPTS else 0
    order = DIGIT_PROMPTS[start:] + DIGIT_PROMPTS[:start]
    return next(p for p in order if p not in forget_prompts)


def digits_defaults(forget_prompts: list[str]) -> dict:
    """The main job on ``builtin:digits``: forget "zero" (unless told otherwise), replay the other digits.

    Each forgotten digit's surrogate is the frozen model's own images of the next digit not being
    forgotten ("one" for "zero", "four" for "three"): with uniform noise, the classifier still gives
    noise images P(zero) ≈ 0.07, so a noise surrogate cannot show P(zero) ≤ 0.02 (benchmarks/RESULTS.md).
    """
    forget = forget_prompts or [DIGIT_PROMPTS[0]]
    if len(forget) >= len(DIGIT_PROMPTS):
        raise InputError("every digit is being forgotten: nothing is left to replay or to stand in for them")
    return {
        "forget_prompts": forget,
        "surrogate_prompts": [next_digit_surrogate(f, forget) for f in forget],
        "replay_prompts": [p for p in DIGIT_PROMPTS if p not in forget],
        "resolution": 16,
        "guidance_scale": 3.0,
        "num_inference_steps": 25,
        "classifier": "builtin:digits-classifier",
    }
