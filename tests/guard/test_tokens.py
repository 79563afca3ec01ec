"""`guard.tokens.TextTokens`: re-tokenising only a tail gives exactly the ids of
re-tokenising the whole text, for growing texts cut at random places and for random
edits, on real responses (tests/guard/fixtures) and on texts built to stress the split
pattern: runs of spaces, tabs and newlines, contractions cut in half, digits,
punctuation runs, accents, emoji and CJK, and added tokens such as <|im_start|>; and on long
runs with no space (`hahaha…`, `!?!?…`, CJK, emoji, multi-byte letters, dropped bytes) grown,
cut back into their middle and followed by other runs. Each runs with long pieces entered
from a token inside them (the default) and with every piece entered where a token fits
(`INSIDE` = 1); and what that rests on: the merge table's order, the bytes the model drops,
where each token starts, a kept token that the new encoding does not start with."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

import guard.tokens
from guard.tokens import BYTE_CHARS, TextTokens, inside_rules, merges_in_order, shared_length, tail_safe

PIECES = [" ", "  ", "   ", "\n", "\n\n", " \n", "\t", "\r\n", "'", "'s", "'re", "'ll", "'d", "'t", "re", "ll",
          "word", "Word", " the", "12", "3", "4567", "!", "!!", "?!", "...", "(", ")", "-", "é", "ñ", "日本",
          "語", "🙂", "👍🏽", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "start|>", "<", "|", ">",
          "assistant", "user", ":", "x"]
# Units repeated into long pieces: letters (one script or several: one `\p{L}+` piece),
# digits, other characters, white space; one to four bytes a character; and characters
# holding a byte SmolLM2's vocabulary lacks (0x04, 0xf1), which its BPE drops.
RUNS = ["ha", "a", "ab", "xyz", "hαя日", "日本語", "语", "🙂", "👍🏽", "\U00010348", "é", "ŉ", "!?", "!", "...",
        "'", "''s", "12", "  ", "\n", " \t", "\u3000", "\u0301", "a\u0301", "!\x04", "?!\x04\x04", "\U00040000"]


@pytest.fixture(scope="module")
def tokenizer(backbone_dir):
    return AutoTokenizer.from_pretrained(backbone_dir)



def test_the_converted_tokenizer_is_byte_level_as_the_gguf_declares(tokenizer):
    """The GGUF says "gpt2": byte-level BPE, no unknown token. transformers 5.17 converted
    it with `<|endoftext|>` as an unknown token, byte fallback and eos `<|im_start|>`; the
    shipped head was trained on the byte-level form (guard.backbone.GGUF_TRANSFORMERS)."""
    import json

    state = json.loads(tokenizer.backend_tokenizer.model.__getstate__())
    assert (state["type"], state["unk_token"], state["byte_fallback"], state["fuse_unk"]) == ("BPE", None, False, False)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("\x04!")["input_ids"] == tokenizer("!")["input_ids"]  # a byte outside the vocabulary is dropped

@pytest.fixture(params=["long pieces", "every piece"])
def inside(request, monkeypatch):
    """Pieces entered from inside where that saves `INSIDE` characters (the default), or
    wherever a token inside fits, so that every text here goes through that path."""
    if request.param == "every piece":
        monkeypatch.setattr(guard.tokens, "INSIDE", 1)
    return guard.tokens.INSIDE


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
def test_growing_texts_match_whole_re_tokenisation(tokenizer, real_rows, source, inside):
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


def test_random_edits_match_whole_re_tokenisation(tokenizer, real_rows, inside):
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
def test_long_runs_match_whole_re_tokenisation(tokenizer, unit, inside):
    """One piece that keeps growing, 1-64 characters a step, then more pieces after it;
    each step encodes about its own characters and a token or two again (white space
    tokens hold up to 64 spaces), not the piece (about 47 times the text's length)."""
    rng = random.Random(sum(map(ord, unit)))
    text = unit * (2400 // len(unit)) + " " + unit * (600 // len(unit)) + "\n\n" + "x" * 50
    tokens, at = TextTokens(tokenizer), 0
    while at < len(text):
        at = min(at + rng.randint(1, 64), len(text))
        assert tokens.encode(text[:at]) == whole(tokenizer, text[:at]), (unit, at)
    assert tokens.encoded < 6 * len(text)


@pytest.mark.parametrize("unit", RUNS)
def test_long_runs_entered_next_to_the_edit(tokenizer, unit, monkeypatch):
    """The same with a margin of `MARGIN` (these texts hold no added token to keep clear
    of) and any piece entered: the token kept before the new encoding then often ends a
    few characters before the edit, where BPE(y z) does not always start with y."""
    monkeypatch.setattr(guard.tokens, "INSIDE", 1)
    rng = random.Random(sum(map(ord, unit)) + 1)
    text = unit * (1500 // len(unit)) + " " + unit * (300 // len(unit)) + "!\n" + "x" * 50
    tokens, at = TextTokens(tokenizer), 0
    tokens.margin = guard.tokens.MARGIN
    while at < len(text):
        at = min(at + rng.randint(1, 24), len(text))
        if rng.random() < 0.1:
            at -= rng.randint(0, min(at, 80))  # back into the run
        assert tokens.encode(text[:at]) == whole(tokenizer, text[:at]), (unit, at)


@pytest.mark.parametrize("old, new", [("." * 14, "." * 16), ("." * 78, "." * 80), (" " * 319, " " * 320)])
def test_a_token_that_does_not_start_the_new_encoding_is_not_kept(tokenizer, monkeypatch, old, new):
    """BPE(y z) need not start with y. 14 dots are 8, 4, 2 and 16 are one token: entered
    at the 4, the tail would be an 8, and keeping the 8 before it would give 8, 8. 319
    spaces are 4 tokens of 64, then 32, 16, 15, and 320 are 5 of 64. A margin of
    `MARGIN` (these texts hold no added token) lets a piece be entered next to the edit."""
    monkeypatch.setattr(guard.tokens, "INSIDE", 1)
    tokens = TextTokens(tokenizer)
    tokens.margin = guard.tokens.MARGIN
    tokens.encode(old)
    assert tokens.encode(new) == whole(tokenizer, new)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 16, 48, 64])
def test_hahaha_grows_by_any_step(tokenizer, step, inside):
    text = "ha" * 700
    tokens = TextTokens(tokenizer)
    for at in range(step, len(text) + step, step):
        assert tokens.encode(text[:at]) == whole(tokenizer, text[:at]), at
    assert tokens.encoded < (tokens.margin + inside + step + 8) * len(text) / step


def test_random_edits_of_long_runs_match_whole_re_tokenisation(tokenizer, inside):
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


def test_the_embedded_merges_are_in_order_and_out_of_order_tables_are_refused(tokenizer):
    """What entering a piece rests on (`merges_in_order`), and tables it does not hold for."""
    import json

    state = json.loads(tokenizer.backend_tokenizer.model.__getstate__())
    assert merges_in_order(state)
    assert inside_rules(tokenizer.backend_tokenizer) is not None
    tiny = {"type": "BPE", "merges": [["a", "b"], ["ab", "c"], ["x", "y"]]}
    assert merges_in_order(tiny)
    assert not merges_in_order({**tiny, "merges": [["ab", "c"], ["a", "b"]]})  # uses a later token
    assert not merges_in_order({**tiny, "merges": [["a", "b"], ["ab", "c"], ["a", "bc"]]})  # abc twice
    assert not merges_in_order({**tiny, "ignore_merges": True})
    assert not merges_in_order({**tiny, "continuing_subword_prefix": "##"})
    assert merges_in_order({**tiny, "merges": ["a b", "ab c"]})  # the older text form


def test_the_bytes_the_model_drops_are_the_ones_skipped(tokenizer):
    """Where each token starts is counted from the tokens' lengths and the bytes the model
    drops between them (offsets are off after one): those, against a round trip."""
    missing, sizes = inside_rules(tokenizer.backend_tokenizer)
    assert set(missing) == {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}
    chars = [chr(c) for c in [*range(1, 0x250), 0x7FF, 0x800, 0xFFFD, 0x10000, 0x1F642, 0x3FFFF, 0x40000,
                              0x7FFFF, 0x80000, 0xBFFFF, 0xC0000, 0x10FFFF]]
    for char in chars:
        dropped = tokenizer.decode(whole(tokenizer, "a" + char + "a")) != "a" + char + "a"
        assert any(byte in missing for byte in char.encode()) == dropped, hex(ord(char))
    ids = whole(tokenizer, "<|im_start|>hello 日本")
    assert sizes[ids[0]] == 12 and sum(sizes[i] for i in ids) == len("<|im_start|>hello 日本".encode())


@pytest.mark.parametrize("text", ["🙂" * 50 + "👍🏽" * 30 + " 日本語" * 20 + "é" * 40 + "ŉ" * 20 + "\U00010348" * 20,
                                  "hαя日" * 40 + "!?" * 40, "".join(PIECES) * 3,
                                  "!\x04" * 50 + "\U00040000" * 30 + " \x04x\x04 " * 20 + "\x14" * 9 + "<|im_end|>\x04!"])
def test_each_token_is_placed_at_its_own_bytes(tokenizer, text):
    """`begins` and `whole` against the tokens' own bytes found in the text in order,
    only dropped bytes between them (and between the bytes of one token: ``!\\x04!``
    makes ``!!``); a token starts a character where the bytes before it in it are dropped."""
    tokens = TextTokens(tokenizer)
    tokens.encode(text[: len(text) // 2])
    ids = tokens.encode(text)
    missing, _ = tokens.rules
    byte_of = {char: byte for byte, char in enumerate(BYTE_CHARS)}
    data, at = text.encode(), 0
    for k, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        own = token.encode() if ids[k] in tokenizer.added_tokens_decoder else bytes(byte_of[c] for c in token)
        for n, byte in enumerate(own):
            while data[at] != byte:
                assert data[at] in missing, (k, token)
                at += 1
            if n == 0:
                lead = at
                while data[lead] & 0xC0 == 0x80:
                    lead -= 1
                assert tokens.whole[k] == all(b in missing for b in data[lead:at]), (k, token)
                assert tokens.begins[k] == sum(b & 0xC0 != 0x80 for b in data[: at + 1]) - 1, (k, token)
            at += 1
    assert all(byte in missing for byte in data[at:])


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


def test_prepare_checks_the_merge_table_once_ahead_of_the_first_text(tokenizer, monkeypatch):
    """`prepare` (which the proxy's guard loader calls) leaves nothing for the first
    `TextTokens` to check: the merge table is read once per tokenizer."""
    guard.tokens._RULES.pop(tokenizer.backend_tokenizer, None)
    guard.tokens.prepare(tokenizer)
    assert tokenizer.backend_tokenizer in guard.tokens._RULES
    monkeypatch.setattr(guard.tokens, "_inside_rules", lambda backend: pytest.fail("checked again"))
    assert TextTokens(tokenizer).encode("ha" * 100) == tokenizer("ha" * 100, add_special_tokens=False)["input_ids"]
