"""adapterkit/tiny.py's tokenizers: ranked merges (what builtin:tiny v1/v2 use) and learned merges (every word whole)."""

from __future__ import annotations

import pytest

from adapterkit.tiny import TINY_WORDS, make_tiny_tokenizer


def test_learned_merges_keep_every_word_whole_where_ranked_merges_split_some():
    words = tuple(TINY_WORDS) + ("snowflakes", "dehaze", "graphite", "neutralize", "x")
    ranked, learned = make_tiny_tokenizer(words), make_tiny_tokenizer(words, merges="learned")
    assert {"color", "sepia", "tree"} <= {w for w in words if len(ranked.tokenize(w)) > 1}  # the documented flaw
    assert [w for w in words if len(learned.tokenize(w)) != 1] == []
    # Text outside the list still goes by characters, and the special tokens come last, end of text highest.
    assert learned.tokenize("qz") == ["q", "z</w>"]
    vocab = learned.get_vocab()
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and vocab["<|startoftext|>"] == len(vocab) - 2
    ids = learned("derain the image").input_ids
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"] and len(ids) == 5
    # Deterministic: the same words give the same ids (a build records nothing else about its tokenizer).
    assert make_tiny_tokenizer(words, merges="learned").get_vocab() == vocab


def test_unknown_merges_rule_and_non_byte_characters_are_refused():
    with pytest.raises(ValueError, match="unknown merges rule"):
        make_tiny_tokenizer(TINY_WORDS, merges="greedy")
    with pytest.raises(ValueError, match="printable ASCII"):
        make_tiny_tokenizer(("café", "rain"), merges="learned")
