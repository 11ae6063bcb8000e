"""A CLIP tokenizer written from the project's own word list, so tiny and built-in models need no hub."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build ``word</w>`` from its characters."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    current = symbols[0]
    for symbol in symbols[1:]:
        merges.append((current, symbol))
        current = current + symbol
    return merges


def write_clip_tokenizer(folder: str | os.PathLike, words: Iterable[str]) -> CLIPTokenizer:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config for ``words`` and load it.

    Every lowercase letter and digit is in the vocabulary, so unknown words still tokenize
    (character by character); each listed word becomes one token.
    """
    os.makedirs(folder, exist_ok=True)
    words = sorted({w.strip().lower() for w in words if w.strip()})
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab: dict[str, int] = {}
    for tok in [*chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        if not all(c in chars for c in word):
            raise ValueError(f"word {word!r} has characters outside [a-z0-9]; the tokenizer only covers those")
        for left, right in _word_merges(word):
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
    for tok in (BOS_TOKEN, EOS_TOKEN):
        vocab.setdefault(tok, len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return CLIPTokenizer.from_pretrained(folder)
