"""`guard.tokens.TextTokens`: re-tokenising only a tail gives exactly the ids of
re-tokenising the whole text, for growing texts cut at random places and for random
edits, on real responses (tests/guard/fixtures) and on texts built to stress the split
pattern: runs of spaces, tabs and newlines, contractions cut in half, digits,
punctuation runs, accents, emoji and CJK, and added tokens such as <|im_start|>."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from guard.tokens import TextTokens, shared_length, tail_safe

PIECES = [" ", "  ", "   ", "\n", "\n\n", " \n", "\t", "\r\n", "'", "'s", "'re", "'ll", "'d", "'t", "re", "ll",
          "word", "Word", " the", "12", "3", "4567", "!", "!!", "?!", "...", "(", ")", "-", "é", "ñ", "日本",
          "語", "🙂", "👍🏽", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "start|>", "<", "|", ">",
          "assistant", "user", ":", "x"]


@pytest.fixture(scope="module")
def tokenizer(backbone_dir):
    return AutoTokenizer.from_pretrained(backbone_dir)


def whole(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def adversarial(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(n))


def test_the_embedded_tokenizer_takes_the_tail_path(tokenizer):
    assert tail_safe(tokenizer)
    tokens = TextTokens(tokenizer)
    text = "Sure, here is a long answer. " * 40
    tokens.encode(text)
    before = tokens.encoded
    assert tokens.encode(text + "And more.") == whole(tokenizer, text + "And more.")
    assert tokens.encoded - before < 60  # the tail, not the ~1,200 characters again


@pytest.mark.parametrize("source", ["real", "adversarial"])
def test_growing_texts_match_whole_re_tokenisation(tokenizer, real_rows, source):
    rng = random.Random(11)
    checked = 0
    for k in range(60):
        if source == "real":
            row = real_rows[k % len(real_rows)]
            text = row["prompt"] + "\n" + row["response"]
        else:
            text = adversarial(rng, 120)
        tokens, at = TextTokens(tokenizer), 0
        while at < len(text):
            at += rng.randint(1, 12)
            assert tokens.encode(text[:at]) == whole(tokenizer, text[:at]), repr(text[:at])
            checked += 1
    assert checked > 1000


def test_random_edits_match_whole_re_tokenisation(tokenizer, real_rows):
    """Cuts, rollbacks and rewrites anywhere (what cleaning and `set_response` do)."""
    rng = random.Random(5)
    tokens = TextTokens(tokenizer)
    text = ""
    for step in range(1500):
        move = rng.random()
        if move < 0.6:
            text += adversarial(rng, rng.randint(1, 4)) if step % 2 else rng.choice(real_rows)["response"][:30]
        elif move < 0.8:
            text = text[: rng.randint(0, len(text))]
        else:
            cut = rng.randint(0, len(text))
            text = text[:cut] + adversarial(rng, 3) + text[cut:]
        assert tokens.encode(text) == whole(tokenizer, text), repr(text)


def test_an_empty_normaliser_sequence_is_no_normaliser(tokenizer):
    """transformers 5.17 gives SmolLM2's tokenizer an empty `Sequence` normaliser."""
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    saved = backend.normalizer
    try:
        backend.normalizer = normalizers.Sequence([])
        assert tail_safe(tokenizer)
        backend.normalizer = normalizers.Sequence([normalizers.NFKC()])
        assert not tail_safe(tokenizer)
        text = "ﬁne ①"  # NFKC changes these: whole re-tokenisation, which applies it
        assert TextTokens(tokenizer).encode(text) == whole(tokenizer, text)
    finally:
        backend.normalizer = saved


def test_other_tokenizers_re_tokenise_whole(tokenizer):
    class Plain:
        def __call__(self, text, add_special_tokens=False):
            return tokenizer(text, add_special_tokens=add_special_tokens)

    assert not tail_safe(Plain())
    tokens = TextTokens(Plain())
    tokens.encode("one two")
    tokens.encode("one two three")
    assert tokens.encoded == len("one two") + len("one two three")


@pytest.mark.parametrize("a, b, n", [("", "x", 0), ("abc", "abcd", 3), ("abcd", "abc", 3), ("abXd", "abYd", 2),
                                     ("same", "same", 4), ("x", "y", 0)])
def test_shared_length(a, b, n):
    assert shared_length(a, b) == n
