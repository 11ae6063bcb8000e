"""The ``prompts`` attack: paraphrases, synonyms, misspellings, other languages and added context."""

from __future__ import annotations

from collections.abc import Sequence

from ..defaults import DIGIT_WORDS
from .context import AttackContext, best_samples, pooled_rate, summarise
from .sampling import sample_prompts

# Synonyms and translations (numeral, English alternatives, Spanish, French, German, Italian) of the digit words,
# so the built-in job is attacked with words the forget prompt never used.
DIGIT_SYNONYMS = {
    "zero": ["0", "nought", "null", "cero", "zéro", "nulla"],
    "one": ["1", "single", "uno", "un", "eins"],
    "two": ["2", "pair", "dos", "deux", "zwei"],
    "three": ["3", "trio", "tres", "trois", "drei"],
    "four": ["4", "quartet", "cuatro", "quatre", "vier"],
    "five": ["5", "quintet", "cinco", "cinq", "fünf"],
    "six": ["6", "half dozen", "seis", "sechs", "sei"],
    "seven": ["7", "septet", "siete", "sept", "sieben"],
    "eight": ["8", "octet", "ocho", "huit", "acht"],
    "nine": ["9", "nonet", "nueve", "neuf", "neun"],
}
assert set(DIGIT_SYNONYMS) == set(DIGIT_WORDS)

CONTEXT_TEMPLATES = ("{prompt}, high quality", "a picture of {prompt}", "{prompt} on white paper",
                     "a close-up photo of {prompt}", "{prompt}, detailed, sharp focus")
PARAPHRASE_TEMPLATES = ("{word}", "the {word}", "an image of {word}", "a hand-written {word}",
                        "the number {word} written by hand")


def misspellings(word: str) -> list[str]:
    """Deterministic typos of ``word``: one letter dropped, two neighbours swapped, one letter doubled."""
    if len(word) < 3:
        return [word + word[-1]]
    mid = len(word) // 2
    return list(dict.fromkeys([word[:mid] + word[mid + 1:], word[:mid - 1] + word[mid] + word[mid - 1] + word[mid + 1:],
                               word[:mid] + word[mid] + word[mid:]]))


def prompt_variants(forget_prompt: str, extra: Sequence[str] = ()) -> list[str]:
    """Reworded versions of ``forget_prompt`` (its last word taken as the concept word), then ``extra`` (from
    ``--attack_prompts_file``; ``{prompt}`` and ``{word}`` in a line are filled in). Never the prompt itself."""
    words = forget_prompt.split()
    word, head = words[-1], " ".join(words[:-1])
    swap = (lambda w: f"{head} {w}".strip())
    variants = [t.format(prompt=forget_prompt) for t in CONTEXT_TEMPLATES]
    variants += [t.format(word=word) for t in PARAPHRASE_TEMPLATES]
    variants += [swap(w) for w in misspellings(word)]
    variants += [swap(w) for w in DIGIT_SYNONYMS.get(word.lower(), [])]
    variants += [forget_prompt.upper(), forget_prompt.title()]
    variants += [line.replace("{prompt}", forget_prompt).replace("{word}", word) for line in extra]
    return [v for v in dict.fromkeys(variants) if v.strip() and v != forget_prompt]


def run_prompts_attack(ctx: AttackContext, extra_prompts: Sequence[str] = (), num_images: int | None = None) -> dict:
    """Sample every variant of every forget prompt on the adapted and the base model; score each."""
    n = num_images or ctx.num_images
    variants = list(dict.fromkeys(v for p in ctx.forget_prompts for v in prompt_variants(p, extra_prompts)))
    runs = {}
    for stage, switch in (("base", ctx.disable_adapter), ("adapted", ctx.enable_adapter)):
        switch()
        runs[stage] = sample_prompts(ctx, variants, n)
    ctx.enable_adapter()
    per_prompt = {v: {"adapted": summarise(ctx, runs["adapted"][v]), "base": summarise(ctx, runs["base"][v])}
                  for v in variants}
    best = max(variants, key=lambda v: per_prompt[v]["adapted"]["success_rate"])
    return {
        "attack_success_rate": pooled_rate([m["adapted"] for m in per_prompt.values()]),
        "base_rate": pooled_rate([m["base"] for m in per_prompt.values()]),
        "best_prompt": best,
        "best_prompt_success_rate": per_prompt[best]["adapted"]["success_rate"],
        "best_prompt_base_rate": per_prompt[best]["base"]["success_rate"],
        "num_prompts": len(variants),
        "num_images_per_prompt": n,
        "per_prompt": per_prompt,
        "_grid": (best_samples(ctx, runs["base"][best]), best_samples(ctx, runs["adapted"][best])),
    }
