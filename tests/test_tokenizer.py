"""The CLIP tokenizer written from a word list."""

from __future__ import annotations

import pytest

from sa_peft.testing.tiny_pipeline import TINY_WORDS
from sa_peft.testing.tokenizer import MODEL_MAX_LENGTH, write_clip_tokenizer


def test_every_listed_word_is_one_token(tiny_pipe):
    tok = tiny_pipe.tokenizer
    ids = {}
    for word in TINY_WORDS:
        assert tok.tokenize(word) == [word + "</w>"], word
        encoded = tok(word).input_ids
        assert encoded[0] == tok.bos_token_id and encoded[-1] == tok.eos_token_id and len(encoded) == 3, word
        ids[word] = encoded[1]
    assert len(set(ids.values())) == len(set(TINY_WORDS))
    assert tok("Brad  PITT").input_ids == [tok.bos_token_id, ids["brad"], ids["pitt"], tok.eos_token_id]


def test_lengths_and_special_ids_match_the_text_encoder(tiny_pipe):
    tok, config = tiny_pipe.tokenizer, tiny_pipe.text_encoder.config
    assert tok.model_max_length == MODEL_MAX_LENGTH == 77
    assert config.max_position_embeddings == 77
    assert tok.bos_token_id == config.bos_token_id
    assert tok.eos_token_id == config.eos_token_id
    assert tok.pad_token_id == config.pad_token_id == tok.eos_token_id
    assert config.vocab_size == len(tok)
    padded = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(padded) == 77
    long = tok(
        " ".join(["cat"] * 200), padding="max_length", max_length=tok.model_max_length, truncation=True
    ).input_ids
    assert len(long) == 77 and long[-1] == tok.eos_token_id


@pytest.mark.parametrize(
    "words",
    [
        ["an", "man", "woman", "human"],  # "an</w>" must not split "man"
        ["he", "the", "there", "here", "ere"],
        ["ab", "ba", "aba", "bab", "abab", "baba"],  # overlapping merges
        ["photo", "house", "three", "tree", "re"],
    ],
)
def test_words_whose_merges_overlap_stay_one_token(tmp_path, words):
    tok = write_clip_tokenizer(tmp_path, words)
    for word in words:
        assert tok.tokenize(word) == [word + "</w>"], (word, tok.tokenize(word))


def test_unknown_words_tokenize_by_character(tmp_path):
    tok = write_clip_tokenizer(tmp_path, ["cat"])
    assert tok.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]
    assert tok.unk_token_id not in tok("zebra").input_ids[1:-1]


def test_words_with_other_characters_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_clip_tokenizer(tmp_path, ["café"])
