"""Token ids of a growing text, re-tokenising only its tail where that is exact.

A stream session re-tokenises its whole text at every check (BPE merges can change the
last tokens when text is appended). For a 512-token text that costs about 0.7 ms, the
same on a GPU's host as here: on a GPU, half of a check (README, "On a GPU"). For the
tokenizers where it is provably the same, `TextTokens` keeps what it tokenised and
encodes again only from a piece boundary near the end of what the new text shares with
the old one:

- A byte-level BPE tokenizer with GPT-2's split pattern (`ByteLevel(use_regex=True)`,
  no normaliser: SmolLM2, GPT-2, …) cuts the text into pieces and merges within each
  piece only. The pattern has no look-behind, so the pieces of ``text[c:]``, for a
  piece boundary c of ``text``, are ``text``'s pieces from c on.
- Each alternative of that pattern decides a piece from its own characters and at most
  one past its end (a contraction reads 3 from its start, a run reads up to the first
  character outside it, ``\\s+(?!\\S)`` one past the run). So a boundary of the old text
  at least `MARGIN` characters before the end of what the two texts share is a boundary
  of the new text, with the same pieces before it.
- Added tokens (``<|im_start|>`` …) are cut out before the pattern runs: a boundary also
  keeps clear of the longest of them, so no added token can straddle it.

A piece that keeps growing (``hahaha…``, a run of ``!``) would be encoded whole at every
check, quadratic in its length, so one at least `INSIDE` characters long is encoded again
from a token j inside it, where ``x`` is the piece's text before token j, ``y`` token j's:

- Token j starts at a character c, and c + 1 is in the piece too, both before the same
  bound as a piece boundary (so the new text's piece holds them, and no added token).
  A piece's characters are all of one class of the pattern (letters, digits, other,
  white space), so the pattern run from c ends the piece where the pattern run from its
  start does (a contraction needs a letter after ``'``, which a run of other characters
  does not hold; ``\\s+(?!\\S)`` backs off one character in both): encoding ``text[c:]``
  gives the piece's tail, then the pieces that follow.
- BPE with a merge table in which every merge makes a new token out of tokens made by
  earlier merges (`merges_in_order`) applies, in any text, its merges in rank order.
  Then if BPE(x y) ends with y and BPE(y z) starts with y, no merge crosses either side
  of y in x y z: the first that would has the lowest rank of all pairs there, it has
  one in x y or in y z, and the same merges done before it (all of lower rank, on the
  same symbols) lead to it there too (GitHub's rust-gems `bpe` crate, "Corollary III",
  builds on this). So BPE(x y z) = BPE(x) + BPE(y z): the old tokens before j, then the
  new encoding, accepted where it starts with token j. Otherwise j steps back, doubling,
  and in the end the piece is encoded whole.
- HuggingFace's BPE drops the bytes missing from its vocabulary (SmolLM2 lacks 0x04, 0x06,
  0x13, 0x14, 0x16, 0x1d, 0xf1 and 0xf2), even between a token's own bytes, and a token's
  offsets after one are off: where each token starts is counted from the tokens' own
  lengths, skipping those; a token starts a character where it holds the first byte of
  it the model keeps.

Other tokenizers (a normaliser, another split pattern, offsets trimmed by a byte-level
post-processor) are re-tokenised whole, as before. `tests/guard/test_tokens.py` checks
growing texts, long runs and random edits against whole re-tokenisation.
"""

from __future__ import annotations

import json
import weakref
from bisect import bisect_left, bisect_right

MARGIN = 2  # characters: a piece is decided by its own and at most one more
INSIDE = 64  # characters: a piece is entered only where that saves at least this many
_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 bytes that do not start a character

_RULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # backend -> `inside_rules`


def tail_safe(tokenizer) -> bool:
    """Whether `TextTokens` may re-tokenise only a tail for `tokenizer`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    pre, model, post = backend.pre_tokenizer, backend.model, backend.post_processor
    return (
        _no_normaliser(backend.normalizer)
        and type(pre).__name__ == "ByteLevel" and pre.use_regex and not pre.add_prefix_space
        and type(model).__name__ == "BPE" and not model.dropout
        and not (type(post).__name__ == "ByteLevel" and post.trim_offsets)
    )


def _no_normaliser(normalizer) -> bool:
    """None, or an empty sequence (what transformers 5.17 writes for SmolLM2)."""
    if normalizer is None:
        return True
    state = json.loads(normalizer.__getstate__())
    return state.get("type") == "Sequence" and not state.get("normalizers")


def merges_in_order(state: dict) -> bool:
    """Whether a BPE model's state (``model.__getstate__()``) merges in rank order.

    Each merge makes a token no other merge makes, from tokens that only earlier merges
    make: then a merge only creates pairs of higher rank, so HuggingFace's queue (lowest
    rank first, leftmost among equals; an entry is live while its pair makes the same
    token) applies merges in rank order. Nothing may merge outside the table: no
    dropout, no `ignore_merges` (whole words looked up first), no subword affixes, no
    unknown token or byte fallback (a byte missing from the vocabulary is dropped).
    """
    if (state.get("type") != "BPE" or state.get("dropout") or state.get("ignore_merges")
            or state.get("continuing_subword_prefix") or state.get("end_of_word_suffix")
            or state.get("unk_token") is not None or state.get("byte_fallback")):
        return False
    merges = [m.split(" ") if isinstance(m, str) else m for m in state["merges"]]
    made: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        if made.setdefault(left + right, rank) != rank:
            return False
    return all(made.get(part, -1) < rank for rank, pair in enumerate(merges) for part in pair)


def prepare(tokenizer) -> None:
    """Check now what `TextTokens` reads of `tokenizer` (its merge table: about 0.16 s on
    SmolLM2's, once per tokenizer), so that the first stream does not wait for it."""
    if tail_safe(tokenizer):
        inside_rules(tokenizer.backend_tokenizer)


def inside_rules(backend) -> tuple[bytes, list[int]] | None:
    """(the bytes `backend`'s BPE drops, each token id's length in bytes), or None where
    no piece may be entered (merges not in order). Cached per backend."""
    if backend not in _RULES:
        _RULES[backend] = _inside_rules(backend)
    return _RULES[backend]


def _inside_rules(backend) -> tuple[bytes, list[int]] | None:
    from tokenizers import pre_tokenizers

    if not merges_in_order(json.loads(backend.model.__getstate__())):
        return None
    if set(BYTE_CHARS) != set(pre_tokenizers.ByteLevel.alphabet()):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    sizes = [0] * backend.get_vocab_size(with_added_tokens=True)
    for token, id_ in vocab.items():
        sizes[id_] = len(token)  # a character a byte
    for id_, token in backend.get_added_tokens_decoder().items():
        sizes[id_] = len(token.content.encode())
    return bytes(byte for byte, char in enumerate(BYTE_CHARS) if char not in vocab), sizes


def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode, which `ByteLevel` uses: printable bytes as themselves,
    the others as U+0100 on, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) if byte in printable else chr(0x100 + others.index(byte)) for byte in range(256)]


BYTE_CHARS = _byte_chars()


def shared_length(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings (string compares only)."""
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


class TextTokens:
    """`tokenizer(text, add_special_tokens=False)["input_ids"]` for successive texts."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer if tail_safe(tokenizer) else None
        if self.backend is not None:
            added = getattr(tokenizer, "added_tokens_decoder", {}).values()
            self.margin = MARGIN + max((len(token.content) for token in added), default=0)
        self.rules = inside_rules(self.backend) if self.backend is not None else None
        self.text = ""
        self.ids: list[int] = []
        self.firsts: list[int] = []  # the tokens that start a piece (or are added tokens)
        self.pieces: list[int] = []  # and the character offsets of those pieces
        self.begins: list[int] = []  # with `rules`, per token: the character its first byte is in
        self.whole: list[bool] = []  # and whether that byte is the character's first
        self.encoded = 0  # characters tokenised, all calls together

    def encode(self, text: str) -> list[int]:
        if self.backend is None:
            self.encoded += len(text)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = shared_length(self.text, text) - self.margin
        piece = bisect_right(self.pieces, limit) - 1
        keep, at = (self.firsts[piece], self.pieces[piece]) if piece >= 0 else (0, 0)
        end = self.firsts[piece + 1] if piece + 1 < len(self.firsts) else len(self.ids)
        found = None
        if self.rules is not None and limit - at >= INSIDE and end - keep > 2:
            found = self._inside(text, keep, end, at, limit)
        cut, start, encoding = found or (keep, at, None)
        if encoding is None:
            encoding = self.backend.encode(text[at:], add_special_tokens=False)
            self.encoded += len(text) - at
        del self.ids[cut:], self.begins[cut:], self.whole[cut:]
        piece = bisect_left(self.firsts, cut)
        del self.firsts[piece:], self.pieces[piece:]
        ids, words = encoding.ids, encoding.word_ids
        last = words[0] if found else object()  # entered: the first word goes on a piece
        for k, (word, (begin, _)) in enumerate(zip(words, encoding.offsets)):
            if word is None or word != last:
                self.firsts.append(cut + k)
                self.pieces.append(start + begin)
            last = word
        if self.rules is not None:
            self._count_bytes(text[start:].encode(), start, ids, words)
        self.ids += ids
        self.text = text
        return list(self.ids)

    def _count_bytes(self, data: bytes, start: int, ids: list[int], words: list) -> None:
        """`begins` and `whole` of `ids`, the encoding of `data` (which starts at character
        `start`; `words`: its word ids), from each token's length and the bytes dropped."""
        missing, sizes = self.rules
        if len(data.translate(None, missing)) == len(data):  # nothing dropped: tokens follow each other
            if data.isascii():  # a byte a character
                for token in ids:
                    self.begins.append(start)
                    start += sizes[token]
                self.whole += [True] * len(ids)
                return
            at = counted = 0
            chars = start - 1  # the character byte `counted - 1` is in
            for token in ids:
                chars += len(data[counted:at + 1].translate(None, _CONTINUATION))
                counted = at + 1
                self.begins.append(chars)
                self.whole.append(data[at] & 0xC0 != 0x80)
                at += sizes[token]
            return
        # A dropped byte can sit between a token's own bytes too: go byte by byte. A token
        # that starts a character starts at its first byte the model keeps.
        at, chars, kept = 0, start - 1, False  # kept: a byte of character `chars` was kept
        for token, word in zip(ids, words):
            for n in range(sizes[token]):
                while True:
                    byte = data[at]
                    at += 1
                    if byte & 0xC0 != 0x80:
                        chars, kept = chars + 1, False
                    if byte not in missing or word is None:  # an added token's bytes are its own
                        break
                if n == 0:
                    self.begins.append(chars)
                    self.whole.append(not kept)
                kept = True

    def _inside(self, text: str, first: int, end: int, at: int, limit: int):
        """(token index, offset, encoding of ``text[offset:]``) entering the piece of tokens
        first..end-1, which starts at `at`, from a token inside it; None where none fits."""
        top = bisect_right(self.begins, limit, first, end) - 1  # tokens up to it are shared
        j, back = top - 1, 1
        while j > first and self.begins[j] - at >= INSIDE:
            start = self.begins[j]
            if self.whole[j] and start < self.begins[top]:  # the next character is in the piece too
                encoding = self.backend.encode(text[start:], add_special_tokens=False)
                self.encoded += len(text) - start
                if encoding.ids[:1] == self.ids[j:j + 1]:
                    return j, start, encoding
                j, back = j - back, back * 2
            else:
                j -= 1
        return None
