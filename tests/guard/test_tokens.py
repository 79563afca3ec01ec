"""`guard.tokens.TextTokens`: re-tokenising only a tail gives exactly the ids of
re-tokenising the whole text, for growing texts cut at random places and for random
edits, on real responses (tests/guard/fixtures) and on texts built to stress the split
pattern: runs of spaces, tabs and newlines, contractions cut in half, digits,
punctuation runs, accents, emoji and CJK, and added tokens such as <|im_start|>; and on long
runs with no space (`hahaha…`, `!?!?…`, CJK, emoji, multi-byte letters) grown, cut back into
their middle and followed by other runs."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from guard.tokens import TextTokens, shared_length, tail_safe

PIECES = [" ", "  ", "   ", "\n", "\n\n", " \n", "\t", "\r\n", "'", "'s", "'re", "'ll", "'d", "'t", "re", "ll",
          "word", "Word", " the", "12", "3", "4567", "!", "!!", "?!", "...", "(", ")", "-", "é", "ñ", "日本",
          "語", "🙂", "👍🏽", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "start|>", "<", "|", ">",
          "assistant", "user", ":", "x"]
# Units repeated into long pieces: letters (one script or several: one `\p{L}+` piece),
# digits, other characters, white space; one to four bytes a character.
RUNS = ["ha", "a", "ab", "xyz", "hαя日", "日本語", "语", "🙂", "👍🏽", "\U00010348", "é", "ŉ", "!?", "!", "...",
        "'", "''s", "12", "  ", "\n", " \t", "\u0301", "a\u0301"]


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


@pytest.mark.parametrize("unit", RUNS)
def test_long_runs_match_whole_re_tokenisation(tokenizer, unit):
    """One piece that keeps growing, 1-64 characters a step, then more pieces after it."""
    rng = random.Random(sum(map(ord, unit)))
    text = unit * (2400 // len(unit)) + " " + unit * (600 // len(unit)) + "\n\n" + "x" * 50
    tokens, at = TextTokens(tokenizer), 0
    while at < len(text):
        at = min(at + rng.randint(1, 64), len(text))
        assert tokens.encode(text[:at]) == whole(tokenizer, text[:at]), (unit, at)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 16, 48, 64])
def test_hahaha_grows_by_any_step(tokenizer, step):
    text = "ha" * 700
    tokens = TextTokens(tokenizer)
    for at in range(step, len(text) + step, step):
        assert tokens.encode(text[:at]) == whole(tokenizer, text[:at]), at


def test_random_edits_of_long_runs_match_whole_re_tokenisation(tokenizer):
    """Long runs grown, cut back into their middle, rewritten inside, and followed by a
    space, a newline, an added token or another run."""
    rng = random.Random(7)
    tokens = TextTokens(tokenizer)
    text, unit = "", "ha"
    for _ in range(700):
        move = rng.random()
        if move < 0.55:
            text += unit * rng.randint(1, 40)
        elif move < 0.65:
            unit = rng.choice(RUNS)
            text += rng.choice(["", " ", "\n", "  ", "<|im_end|>", "'s ", "x"]) + unit * rng.randint(1, 40)
        elif move < 0.85:
            text = text[: rng.randint(len(text) // 2, len(text))]
        else:
            cut = rng.randint(0, len(text))
            text = text[:cut] + rng.choice(RUNS + PIECES) + text[cut:]
        assert tokens.encode(text) == whole(tokenizer, text), repr(text[-80:])


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
