"""A CLIP tokenizer written from the project's own word list, so tiny and built-in models need no hub."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable

from transformers import CLIPTokenizer

from ..errors import InputError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one word: repeatedly merge every occurrence of the best-ranked pair."""
    word = list(symbols)
    while len(word) > 1:
        pair = min(itertools.pairwise(word), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def write_clip_tokenizer(folder: str | os.PathLike, words: Iterable[str]) -> CLIPTokenizer:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config for ``words`` and load it.

    Every lowercase letter and digit is in the vocabulary, so unknown words still tokenize
    (character by character); each listed word of letters becomes one token (CLIP's pre-tokenizer
    splits digits off, so a word with digits cannot).
    """
    os.makedirs(folder, exist_ok=True)
    words = sorted({w.strip().lower() for w in words if w.strip()})
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab: dict[str, int] = {}
    for tok in [*chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not all(c in chars for c in word):
            raise InputError(f"word {word!r} has characters outside [a-z0-9]; the tokenizer only covers those")
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        # Merges of earlier words can split this one (e.g. "an</w>" inside "man"), so run BPE with the
        # merges so far and append merges until the word is one symbol. Appended merges rank last, so
        # they never change how the earlier words encode.
        while len(pieces := _bpe(symbols, ranks)) > 1:
            left, right = pieces[0], pieces[1]
            ranks[(left, right)] = len(merges)
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


def t5_tokenizer(words: Iterable[str]):
    """A ``T5TokenizerFast`` over ``words`` (a ``tokenizers`` Unigram model, as T5's own is), built in memory.

    Each word is one piece ``▁word``; every lowercase letter and digit is a piece too, so other words still
    tokenize (letter by letter). Ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>`` as in T5; no sentinel tokens.
    """
    from transformers import T5TokenizerFast

    words = sorted({w.strip().lower() for w in words if w.strip()})
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    # Unigram picks the segmentation with the highest total log-probability: whole words (-1) beat letters (-5 each).
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in words] + [(c, -5.0) for c in chars]
    # 256: the T5 sequence length StableDiffusion3Pipeline encodes prompts to (its max_sequence_length).
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=256)
