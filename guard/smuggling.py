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
  are 0-15, VS17-VS256 16-255), or as ASCII the way garak writes it (U+E0100 plus the
  code point); the one that gives text counts.
- Sneaky bits: U+2062 is 0, U+2064 is 1, a zero-width space a space between words.
  Eight bits a byte when the first bit is 0 (ASCII's first bit); when it is 1, a
  character's bits without their leading zeros (six or seven for ASCII), as garak writes
  them.

A run whose bytes are no text (`guard.encodings._as_text`) stays as written. A growing
run is read as far as it is written: a character whose bytes are not all there yet
waits; in garak's bits, where six bits are a character too, the last one may read as
another until its seventh comes (a stream's session reads again what changed).
"""

from __future__ import annotations

import re

from guard.encodings import _as_text

_HINT = re.compile("[\U000E0020-\U000E007E\uFE00-\uFE0F\U000E0100-\U000E01EF\u2062\u2064]")
# A flag's subdivision (🏴 and its tag letters, then the cancel tag), or a run of tags.
_TAGS = re.compile("(\U0001F3F4[\U000E0030-\U000E0039\U000E0061-\U000E007A]{1,7}(?:\U000E007F|$))"
                   "|[\U000E0020-\U000E007E]+")
_SELECTORS = re.compile("[\uFE00-\uFE0F\U000E0100-\U000E01EF]{4,}")
_BITS = re.compile("[\u2062\u2064][\u2062\u2064\u200B]*")
_TAG_TO_ASCII = {cp: cp - 0xE0000 for cp in range(0xE0020, 0xE007F)}
_PIECE = re.compile(r"[A-Za-z ]")


def _tags(match: re.Match) -> str:
    return match.group() if match.group(1) else f" {match.group().translate(_TAG_TO_ASCII)} "


def _selectors(match: re.Match) -> str:
    points = [ord(ch) for ch in match.group()]
    butler = _as_text(bytes(p - 0xFE00 if p < 0xE0100 else p - 0xE0100 + 16 for p in points))
    garak = None
    if min(points) >= 0xE0100 and max(points) < 0xE0180:  # garak's carry ASCII
        garak = _as_text("".join(chr(p - 0xE0100) for p in points).encode())
    texts = [t for t in (butler, garak) if t is not None]
    if not texts:
        return match.group()
    return f" {max(texts, key=lambda t: len(_PIECE.findall(t)))} "


def _word_from_bits(bits: str) -> str:
    """One word's bits read as characters of six or seven bits, each starting with 1 (a
    character without its leading zeros): the reading with the most letters of the whole
    or of a start up to six bits shorter (those wait for the rest of their character),
    the longer on a tie."""
    best: list[tuple[int, str] | None] = [(0, "")] + [None] * len(bits)
    for end in range(1, len(bits) + 1):
        for size in (6, 7):
            start = end - size
            if start < 0 or best[start] is None or bits[start] != "1":
                continue
            ch = chr(int(bits[start:end], 2))
            if ch == "\x7f":
                continue
            letters, text = best[start]
            candidate = (letters + ch.isalpha(), text + ch)
            if best[end] is None or candidate[0] > best[end][0]:
                best[end] = candidate
    ends = [end for end in range(max(0, len(bits) - 6), len(bits) + 1) if best[end] is not None]
    return best[max(ends, key=lambda end: (best[end][0], end))][1] if ends else ""


def _bits(match: re.Match) -> str:
    run = match.group()
    bits = run.replace("\u200B", "").translate({0x2062: "0", 0x2064: "1"})
    if len(bits) < 7:
        return run
    if bits[0] == "0":
        whole = len(bits) // 8 * 8
        text = _as_text(int(bits[:whole], 2).to_bytes(whole // 8, "big")) if whole else None
    else:
        words = run.translate({0x2062: "0", 0x2064: "1"}).split("\u200B")
        text = _as_text(" ".join(_word_from_bits(word) for word in words).encode())
    return run if text is None else f" {text} "


def reveal_smuggled(text: str) -> str | None:
    """`text` with the text smuggled in tags, variation selectors and invisible operators
    written out (module docstring), or None when it has none."""
    if text.isascii() or not _HINT.search(text):
        return None
    read = _BITS.sub(_bits, _SELECTORS.sub(_selectors, _TAGS.sub(_tags, text)))
    return None if read == text else read
