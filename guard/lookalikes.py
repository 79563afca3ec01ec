"""Letters drawn as Latin ones, read as the Latin letters a person sees.

A request written with a Cyrillic ``о`` in ``bоmb``, in 𝐛𝐨𝐥𝐝 𝐦𝐚𝐭𝐡 letters, in ᴄᴀᴘs or with a
stroke through each letter reads the same to a person, while the byte-level tokenizer
cuts every such word into rare byte pieces the head never learned. `fold_lookalikes`
gives the text as read, which is what ``emoji="max"`` scores (`guard.text.visible_reading`):

- Styled letters: letters, digits and circled letters whose compatibility form (NFKC)
  is one to three ASCII letters or digits (fullwidth ``Ｂ``, mathematical ``𝐁 𝔅 𝕭``,
  circled ``ⓑ``, superscript letters ``ᵇ``, ligatures ``ﬁ``), squared and negative
  squared capitals (``🅱``, which have none), and Latin small capitals (``ʙ``). Left as
  they are: Latin-1 (``ª º ¹``), superscript and subscript digits (``343⁷`` is not
  ``3437``), and every letter whose compatibility form is not ASCII (``é``).
- Marks drawn over letters as decoration: strokes, slashes, under- and overlines,
  enclosing circles (``b̶o̶m̶b̶``), and any run of three or more combining marks
  ("Zalgo" text). One or two marks (an accent written decomposed, Vietnamese) stay.
- Letters of other scripts drawn as Latin ones (Cyrillic ``а с е о р х у і ј ѕ``,
  Greek capitals, Armenian ``օ ս հ ո``, Cherokee capitals, dotless ``ı``: `LOOKALIKES`,
  a subset of Unicode's confusables (UTS #39) chosen so that each is drawn the same as
  its Latin letter in common fonts) are folded in a word that mixes them with Latin
  letters, and in a word made of nothing else when the nearest letter before it is
  Latin (or it opens the text). A Russian or Greek text keeps its words: their
  neighbours are not Latin. The rule looks only backwards, so a growing text can refold
  only the word being written, and streaming stays incremental.

A text with none of these comes back unchanged (None), so it scores exactly as the
reference scores it. Leetspeak (`fold_leet`) is read differently: besides the text as
written, since a digit in a word can mean itself.
"""

from __future__ import annotations

import re
import unicodedata

# Lookalike letter -> the Latin letter it is drawn as. Lower-case Greek is left out but
# for omicron: α, ν, ι and the rest are read as themselves in science and maths.
LOOKALIKES = {
    # Cyrillic
    "а": "a", "с": "c", "ԁ": "d", "е": "e", "һ": "h", "і": "i", "ј": "j", "ӏ": "l", "о": "o",
    "р": "p", "ԛ": "q", "ѕ": "s", "ԝ": "w", "х": "x", "у": "y", "ү": "y", "ѵ": "v",
    "А": "A", "В": "B", "С": "C", "Е": "E", "Н": "H", "І": "I", "Ј": "J", "К": "K", "М": "M",
    "О": "O", "Р": "P", "Ԛ": "Q", "Ѕ": "S", "Т": "T", "Ԝ": "W", "Х": "X", "Ү": "Y", "Ӏ": "I",
    # Greek
    "ο": "o", "ϲ": "c", "ϳ": "j",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "Ϲ": "C",
    # Armenian
    "օ": "o", "ս": "u", "հ": "h", "ո": "n", "զ": "q", "Օ": "O", "Ս": "U",
    # Cherokee capitals
    "Ꭺ": "A", "Ᏼ": "B", "Ꮯ": "C", "Ꭼ": "E", "Ꮋ": "H", "Ꭻ": "J", "Ꮶ": "K", "Ꮇ": "M",
    "Ꮲ": "P", "Ꮪ": "S", "Ꭲ": "T", "Ꮃ": "W", "Ꮓ": "Z", "Ꮩ": "V", "Ꮮ": "L", "Ꭰ": "D",
    # Latin letters drawn as plain ones
    "ı": "i", "ɩ": "i", "ȷ": "j", "ɑ": "a", "ɡ": "g", "ƅ": "b",
}

# Latin small capitals (styled text, and a few IPA symbols, which read the same folded).
SMALL_CAPITALS = dict(zip("ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘǫʀꜱᴛᴜᴠᴡʏᴢ", "abcdefghijklmnopqrstuvwyz", strict=True))

# Squared (U+1F130) and negative circled and squared (U+1F150, U+1F170) capitals; only the
# first have a compatibility form.
_ENCLOSED = {chr(base + i): chr(ord("A") + i) for base in (0x1F130, 0x1F150, 0x1F170) for i in range(26)}

# Marks drawn over a letter as decoration: overline, underlines, overlays (tilde, strokes,
# solidi), double overline, and the combining symbol marks but for the keycap (U+20E3).
_DECORATION = "\u0305\u0332-\u0338\u033F\u20D0-\u20E2\u20E4-\u20F0"
_MARKS = "\u0300-\u036F\u1AB0-\u1AFF\u1DC0-\u1DFF\u20D0-\u20FF\uFE20-\uFE2F"
_DECORATIONS = re.compile(f"[{_MARKS}]{{3,}}|[{_DECORATION}]+")

# The blocks that hold every styled character (`_styled`; a test scans all of Unicode).
_STYLED_BLOCKS = ((0x0100, 0x02FF), (0x1D00, 0x1DFF), (0x2000, 0x24FF), (0x2C00, 0x2CFF), (0x3200, 0x32FF),
                  (0xA700, 0xA7FF), (0xFB00, 0xFBFF), (0xFF00, 0xFFFF), (0x10700, 0x107FF), (0x1D400, 0x1D7FF),
                  (0x1F100, 0x1F1FF), (0x1FB00, 0x1FBFF))


def _styled(ch: str) -> str | None:
    """The ASCII letters a styled character stands for, or None."""
    if ch in SMALL_CAPITALS:
        return SMALL_CAPITALS[ch]
    if ch in _ENCLOSED:
        return _ENCLOSED[ch]
    if ord(ch) < 0x100 or not (unicodedata.category(ch)[0] in "LN" or "LATIN" in unicodedata.name(ch, "")):
        return None
    if ch.isdigit() and unicodedata.decomposition(ch).startswith(("<super>", "<sub>")):
        return None  # an exponent or an index: 343⁷ is not 3437
    plain = unicodedata.normalize("NFKC", ch)
    if plain != ch and 0 < len(plain) <= 3 and plain.isascii() and plain.isalnum():
        return plain
    return None


def _ranges(chars) -> str:
    """A regex character class for `chars`, as ranges (SRE tests a class of single
    characters outside the BMP one by one)."""
    points = sorted(map(ord, chars))
    spans: list[list[int]] = []
    for point in points:
        if spans and point == spans[-1][1] + 1:
            spans[-1][1] = point
        else:
            spans.append([point, point])
    return "[" + "".join(re.escape(chr(lo)) + ("-" + re.escape(chr(hi)) if hi > lo else "") for lo, hi in spans) + "]"


def _block_chars(*blocks: tuple[int, int]) -> list[str]:
    return [chr(point) for lo, hi in blocks for point in range(lo, hi + 1)]


STYLED = {ch: plain for ch in _block_chars(*_STYLED_BLOCKS) if (plain := _styled(ch))}
_STYLED = re.compile(_ranges(STYLED))
_MARK_CHARS = frozenset(_block_chars((0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF),
                                     (0xFE20, 0xFE2F)))
_LOOKALIKE = re.compile(_ranges(LOOKALIKES))
_TO_LATIN = str.maketrans(LOOKALIKES)

# Latin letters: ASCII's and those of the Latin blocks (Unicode names them LATIN ...).
LATIN = frozenset(
    [*map(chr, range(0x41, 0x5B)), *map(chr, range(0x61, 0x7B))]
    + [ch for ch in _block_chars((0x00C0, 0x02AF), (0x1D00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF),
                                 (0xAB30, 0xAB6F), (0xFB00, 0xFB06), (0xFF21, 0xFF5A), (0x10780, 0x107BF),
                                 (0x1DF00, 0x1DFFF))
       if ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN")]
)


# A word: letters and the marks on them.
_WORD = re.compile(f"(?:[^\\W\\d_]|[{_MARKS}])+")


def _last_letter(word: str) -> str:
    return next((ch for ch in reversed(word) if ch.isalpha()), "")


def _fold_words(text: str, has_latin: bool) -> str:
    """Lookalike letters folded in the words that mix them with Latin letters, and in the
    words made of nothing else whose nearest letter before is Latin (or that open the text).
    Without a Latin letter in the text only the words that open it can fold."""
    parts: list[str] = []
    end = 0
    latin_before = True  # the text's start counts as Latin: a disguised text opens with its disguise
    for match in _WORD.finditer(text):
        word = match.group()
        if _LOOKALIKE.search(word):
            others = {ch for ch in word if ch not in LOOKALIKES and ch.isalpha()}
            if not others.isdisjoint(LATIN) or (latin_before and not others):
                parts += [text[end:match.start()], word.translate(_TO_LATIN)]
                end = match.end()
                latin_before = True
                continue
        latin_before = _last_letter(word) in LATIN
        if not (has_latin or latin_before):
            break
    return "".join([*parts, text[end:]]) if parts else text


def fold_lookalikes(text: str) -> str | None:
    """`text` as read: styled letters, decorating marks and lookalike letters folded to
    plain Latin (module docstring); None when nothing changes."""
    if text.isascii():
        return None
    chars = set(text)
    folded = text
    if not chars.isdisjoint(STYLED):
        folded = _STYLED.sub(lambda m: STYLED[m.group()], folded)
    if not chars.isdisjoint(_MARK_CHARS):
        folded = _DECORATIONS.sub("", folded)
    if not chars.isdisjoint(LOOKALIKES):
        folded = _fold_words(folded, has_latin=not LATIN.isdisjoint(folded))
    return None if folded == text else folded


# Leetspeak: digits and symbols written for the letters they resemble.
LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
_LEET_CHAR = re.compile(r"[0-9@$]")  # searched first: a cheap scan rules most texts out
_LEET_HINT = re.compile(r"[A-Za-z][0-9@$]+[A-Za-z]|[0-9@$][A-Za-z]+[0-9@$]")
_NOT_LETTERS = "0123456789@$"
_LEET_WORD = re.compile(r"[A-Za-z0-9@$]+")
_FROM_LEET = str.maketrans(LEET)


_FROM_LEET_UPPER = str.maketrans({k: v.upper() for k, v in LEET.items()})


def _unleet(match: re.Match) -> str:
    word = match.group()
    digits = [ch for ch in word if ch.isdigit()]
    if any(ch not in LEET for ch in digits) or sum(ch.isalpha() for ch in word) < 2:
        return word
    if not any(ch in LEET for ch in word.lstrip(_NOT_LETTERS)) or not any(ch in LEET for ch in word.rstrip(_NOT_LETTERS)):
        return word  # digits before the letters or after them only: 4th, 10am, 4chan, mp3, gpt4, win10
    if "@" in word and match.string.startswith(".", match.end()):
        return word  # an e-mail address
    return word.translate(_FROM_LEET_UPPER if word.upper() == word else _FROM_LEET)


def fold_leet(text: str) -> str | None:
    """`text` with leetspeak read as letters (``b0mb``, ``m3th``, ``5t34l``, ``a$$ault``), or
    None when it has none. A word (ASCII letters, digits, ``@`` and ``$``) is read so when
    it has two letters or more, all its digits are leet digits (``0 1 3 4 5 7``), and they
    (or the symbols) stand not only before its letters nor only after them (between two
    letters, or at both ends: ``3xpr355``); then each is read as its letter (a capital in a word of capitals). Ordinals, units, versions, names and e-mail
    addresses (``4th``, ``10am``, ``mp3``, ``gpt4``, ``B2B``, ``i18n``, ``x86``) are not. An ambiguous digit takes one letter (``1`` is
    ``i``, so ``k1ll`` reads ``kill`` and ``a1cohol`` ``aicohol``). In a text with two such
    words or more, which is written in leetspeak, a word of letters and leet digits
    anywhere (``a7``, ``5tep``, ``70``) and a lone ``4`` or ``1`` are read as letters too
    (garak's leetspeak writes each of a e i o s t so, half the time). Unlike lookalike letters
    these are read *besides* the text as written (`guard.text.second_reading`): a digit
    inside a word can mean itself (``W3C``, ``sha1sum``, ``0x7f3a``)."""
    if not _LEET_CHAR.search(text) or not _LEET_HINT.search(text):
        return None
    read = _LEET_WORD.sub(_unleet, text)
    if read == text:
        return None
    if sum(a != b for a, b in zip(_LEET_WORD.findall(text), _LEET_WORD.findall(read))) >= 2:
        read = _LEET_WORD.sub(_unleet_loosely, read)  # a text in leetspeak: digits at one end too
    return read


def _unleet_loosely(match: re.Match) -> str:
    """In a text with two leetspeak words or more, a word of letters and leet digits
    (``a7``, ``5tep``, ``70``) and a lone 4 or 1 (``a``, ``I``) are read as letters too."""
    word = match.group()
    if word in ("4", "1"):
        return LEET[word]
    if len(word) < 2 or any(ch.isdigit() and ch not in LEET for ch in word):
        return word
    return word.translate(_FROM_LEET_UPPER if word.isupper() else _FROM_LEET)


# Spaced-out letters: three letters or more, one by one, with the same separator between.
_SPACED = re.compile(r"(?<![^\W\d_])[^\W\d_]([ .\-_*])[^\W\d_](?:\1[^\W\d_])+(?![^\W\d_])")
# What every such run holds (a separator, a letter, a separator, a single letter), and
# which a scan finds 3-4x faster than the run itself: searched first.
_SPACED_HINT = re.compile(r"[ .\-_*][^\W\d_][ .\-_*][^\W\d_](?![^\W\d_])")


def join_spaced(text: str) -> str | None:
    """`text` with letters written one by one read as a word (``b o m b``, ``b.o.m.b``,
    ``b-o-m-b``: three letters or more, the same separator between, a space, dot, hyphen,
    underscore or asterisk), or None when it has none. A one-letter word before a spaced
    word joins it (``a b o m b`` reads ``abomb``: "a" may as well begin the word, as in
    ``a c c u s e``). Read besides the text as written,
    like leetspeak: a list ``A B C`` or initials ``U.S.A.`` join too. A text spaced out
    whole loses its word breaks (the guard reads a text with its runs of spaces folded),
    so it reads as one long word, which the tokenizer still cuts into the right pieces."""
    if not _SPACED_HINT.search(text):
        return None
    read = _SPACED.sub(lambda m: m.group()[::2], text)
    return None if read == text else read
