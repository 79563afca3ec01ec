"""Text smuggled in characters that show nothing: ASCII written as Unicode tags, bytes as
variation selectors, bits as invisible operators.

``😈`` followed by the tag characters U+E0048 U+E006F U+E0077 … shows a devil and nothing
else, yet large models read the tags as the letters they shadow ("ASCII smuggling"); so
do they read bytes hidden as a run of variation selectors after an emoji (after Paul
Butler) and bits written as the invisible times and invisible plus signs ("Sneaky Bits",
after Johann Rehberger). garak's ``encoding`` probes send each of them
(``InjectUnicodeTagChars``, ``InjectUnicodeVariantSelectors``, ``InjectSneakyBits``).
The head read them as rare byte pieces, or not at all: the invisible operators were
dropped with the other characters that show nothing. `reveal_smuggled` writes each run
out as the text it carries, which under ``emoji="max"`` is part of the text read
(`guard.text.visible_reading`): the decoding is unambiguous, and no text a person reads
is written so.

- Tags: U+E0020 to U+E007E are ASCII 0x20 to 0x7E. A flag's subdivision code (🏴 and up
  to seven tag letters or digits, as in England's flag) stays an emoji.
- Variation selectors: four or more in a row, which no text a person reads has (one
  follows an emoji or an ideograph). Read as bytes the way Butler wrote them (VS1-VS16
  are 0-15, VS17-VS256 16-255), or as characters the way garak writes them (U+E0100 plus
  the code point, up to ï); the one that gives text counts.
- Sneaky bits: U+2062 is 0, U+2064 is 1, a zero-width space a space between words.
  Eight bits a byte when the first bit is 0 (ASCII's first bit); when it is 1, a
  character's bits without their leading zeros (six or seven for most of ASCII), as
  garak writes them: with no mark between characters, the reading that looks most like
  a word counts (in lower case, capitalised, in capitals, or digits).

A run whose bytes are no text (`guard.encodings._as_text`) stays as written. A growing
run is read as far as it is written: a character whose bytes are not all there yet
waits; in garak's bits, where nothing marks where a character ends, the word being
written may read otherwise until its bits are all there (a stream's session reads again
what changed).
"""

from __future__ import annotations

import re
from functools import lru_cache

from guard.encodings import _as_text

_HINT = re.compile("[\U000E0020-\U000E007E\uFE00-\uFE0F\U000E0100-\U000E01EF\u2062\u2064]")
# A flag's subdivision (🏴 and its tag letters, then the cancel tag), or a run of tags.
_TAGS = re.compile("(\U0001F3F4[\U000E0030-\U000E0039\U000E0061-\U000E007A]{1,7}(?:\U000E007F|$))"
                   "|[\U000E0020-\U000E007E]+")
_SELECTORS = re.compile("[\uFE00-\uFE0F\U000E0100-\U000E01EF]{4,}")
_BITS = re.compile("[\u2062\u2064][\u2062\u2064\u200B]*")
_TAG_TO_ASCII = {cp: cp - 0xE0000 for cp in range(0xE0020, 0xE007F)}
_TO_BITS = {0x2062: "0", 0x2064: "1"}
_PIECE = re.compile(r"[A-Za-z ]")


def _tags(match: re.Match) -> str:
    return match.group() if match.group(1) else f" {match.group().translate(_TAG_TO_ASCII)} "


def _selectors(match: re.Match) -> str:
    points = [ord(ch) for ch in match.group()]
    butler = _as_text(bytes(p - 0xFE00 if p < 0xE0100 else p - 0xE0100 + 16 for p in points))
    garak = None
    if min(points) >= 0xE0100:  # garak's carry a character up to ï (U+E01EF)
        garak = _as_text("".join(chr(p - 0xE0100) for p in points).encode())
    texts = [t for t in (butler, garak) if t is not None]
    if not texts:
        return match.group()
    return f" {max(texts, key=lambda t: len(_PIECE.findall(t)))} "


# A character's bits without their leading zeros, by length: what it may be.
_SIZES = {
    4: lambda ch: ch in "\t\n\r",
    6: lambda ch: True,  # space, digits, punctuation
    7: lambda ch: ch != "\x7f",  # letters and the rest of ASCII
    8: str.isalpha,  # letters of Latin-1
    14: lambda ch: "\u2010" <= ch <= "\u205f",  # dashes, curly quotes, the ellipsis
}


def _kind(ch: str) -> str:
    if ch in "\t\n\r":
        return "\n"
    if not ch.isascii():  # rare in the texts read: a letter of Latin-1, a curly quote, a dash
        return "*" if ch.isalpha() else "."
    if ch.islower():
        return "a"
    if ch.isupper():
        return "A"
    if ch.isdigit():
        return "0"
    return ch if ch == "'" else "." if ch in " .,;:!?\"-()[]/#&" else "*"


# How well a character of one kind follows one of another (or a word's start, ""): words
# are in lower case, capitalised, in capitals (or camel case) or digits; an apostrophe
# goes inside a word, a common mark anywhere but seldom after another, a line break
# counts nothing and a rare character (``*``, ``%``, a letter of Latin-1) less.
_AFTER = {
    "a": {"": 2, "a": 3, "A": 3, "0": 1, ".": 2, "'": 3, "*": 1, "\n": 2},
    "A": {"": 2, "a": 1, "A": 3, "0": 1, ".": 2, "'": 1, "*": 1, "\n": 2},
    "0": {"": 2, "a": 1, "A": 1, "0": 3, ".": 2, "'": 0, "*": 1, "\n": 2},
    "'": {"a": 3, "A": 3},
    ".": {"": 1, "a": 2, "A": 2, "0": 2, "'": 1, "\n": 1},
}


_ANYWHERE = {"\n": 0, "*": -1}  # the same after any kind


def _follows(before: str, kind: str) -> int:
    return _ANYWHERE[kind] if kind in _ANYWHERE else _AFTER[kind].get(before, 0)


_WORD_BITS = 1024  # a longer run between spaces is read a piece at a time, in order


@lru_cache(maxsize=8192)  # a stream's checks read its words again: each piece is worked out once
def _piece_from_bits(bits: str) -> tuple[str, int]:
    """Bits read as characters without their leading zeros (six or seven bits for most of
    ASCII, `_SIZES`): of the readings of the whole, or of a start up to six bits shorter
    (those wait for the rest of their character), the one that reads most like a word
    (`_AFTER`), the longer on a tie; and how many bits it read."""
    # best[end][kind of the last character] = (how word-like, start of that character, kind before it)
    best: list[dict[str, tuple[int, int, str]]] = [{"": (0, 0, "")}] + [{} for _ in bits]
    for end in range(1, len(bits) + 1):
        for size, fits in _SIZES.items():
            start = end - size
            if start < 0 or not best[start] or bits[start] != "1":
                continue
            ch = chr(int(bits[start:end], 2))
            if not fits(ch):
                continue
            kind = _kind(ch)
            for before, (score, _, _) in best[start].items():
                score += _follows(before, kind)
                if kind not in best[end] or score > best[end][kind][0]:
                    best[end][kind] = (score, start, before)
    found = [(score, end, kind) for end in range(max(0, len(bits) - 6), len(bits) + 1)
             for kind, (score, _, _) in best[end].items()]
    if not found:
        return "", 0
    _, end, kind = max(found)
    read, chars = end, []
    while end:
        _, start, before = best[end][kind]
        chars.append(chr(int(bits[start:end], 2)))
        end, kind = start, before
    return "".join(reversed(chars)), read


def _word_from_bits(bits: str) -> str:
    """One word's bits read (`_piece_from_bits`), a piece of `_WORD_BITS` at a time, each
    from where the one before stopped."""
    out, start = [], 0
    while len(bits) - start > _WORD_BITS:
        text, used = _piece_from_bits(bits[start:start + _WORD_BITS])
        out.append(text)
        start += used or _WORD_BITS
    out.append(_piece_from_bits(bits[start:])[0])
    return "".join(out)


def _bits(match: re.Match) -> str:
    run = match.group()
    words = run.translate(_TO_BITS).split("\u200B")
    bits = "".join(words)
    if len(bits) < 7:
        return run
    if bits[0] == "0":
        whole = len(bits) // 8 * 8
        text = _as_text(int(bits[:whole], 2).to_bytes(whole // 8, "big")) if whole else None
    else:
        text = _as_text(" ".join(_word_from_bits(word) for word in words).encode())
    return run if text is None else f" {text} "


def reveal_smuggled(text: str) -> str | None:
    """`text` with the text smuggled in tags, variation selectors and invisible operators
    written out (module docstring), or None when it has none."""
    if text.isascii() or not _HINT.search(text):
        return None
    read = _BITS.sub(_bits, _SELECTORS.sub(_selectors, _TAGS.sub(_tags, text)))
    return None if read == text else read
