"""Text spelled out a letter at a time in another alphabet: braille, Morse code and the
NATO spelling alphabet.

garak's ``encoding`` probes send a request in each (``InjectBraille``, ``InjectMorse``,
``InjectNato``), and a large model reads them back; the head read ``⠓⠕⠺`` as rare byte
pieces and ``.... --- .--`` as punctuation. Each is read here as the letters it spells:

- `read_braille`: braille cells (U+2801 to U+28FF; the blank cell U+2800 is a space) as
  English grade-1 braille: letters, the capital sign (two of them: a word in capitals),
  the number sign (the letters a to j are then the digits 1 to 0, to the end of the
  word) and punctuation. A cell with no meaning there stays as written. Braille is
  letters to the people who read it, so this is part of the text read
  (`guard.text.visible_reading`).
- `read_morse`: six codes or more, each of dots and dashes, a space between letters and
  ``/`` between words (``·``, ``•``, ``−``, ``–`` and ``_`` read as dots and dashes), every
  one a letter, digit or punctuation mark, two different ones at least. Read in lower
  case: Morse has no capitals. Part of the text read as well: no text a person writes
  has such a run.
- `read_nato`: four NATO code words or more in a row (``Hotel Oscar Whiskey Delta``),
  each read as its first letter; ``/`` between them is a space between words. The code
  words are words too, so this is read *besides* the text as written
  (`guard.text.second_reading`), as leetspeak is. A text spelled so whole, without its
  word breaks (garak writes none), reads as one long word, which the tokenizer still
  cuts into the right pieces, as `guard.lookalikes.join_spaced` reads ``b o m b``.
"""

from __future__ import annotations

import re

_BRAILLE_LETTERS = dict(zip("⠁⠃⠉⠙⠑⠋⠛⠓⠊⠚⠅⠇⠍⠝⠕⠏⠟⠗⠎⠞⠥⠧⠺⠭⠽⠵", "abcdefghijklmnopqrstuvwxyz"))
_BRAILLE_DIGITS = dict(zip("⠁⠃⠉⠙⠑⠋⠛⠓⠊⠚", "1234567890"))
_BRAILLE_MARKS = {"⠂": ",", "⠆": ";", "⠰": ";", "⠒": ":", "⠲": ".", "⠖": "!", "⠦": "?",
                  "⠄": "'", "⠤": "-", "⠌": "/", "⠶": "\x00"}
_CAPITAL, _NUMBER = "⠠", "⠼"
_BRAILLE = re.compile("[\u2800-\u28FF]+")
_BRAILLE_HINT = re.compile("[\u2801-\u28FF]")


def _braille_word(cells: str) -> str:
    out, capitals, number = [], 0, False
    for cell in cells:
        if cell == _CAPITAL:
            capitals = 2 if capitals else 1
        elif cell == _NUMBER:
            number = True
        elif number and cell in _BRAILLE_DIGITS:
            out.append(_BRAILLE_DIGITS[cell])
        elif number and cell in "⠂⠲":  # a decimal point or a thousands comma
            out.append(_BRAILLE_MARKS[cell])
        elif cell in _BRAILLE_LETTERS:
            number = False
            letter = _BRAILLE_LETTERS[cell]
            out.append(letter.upper() if capitals else letter)
            capitals = 2 if capitals == 2 else 0
        else:
            number, capitals = False, 0
            out.append(_BRAILLE_MARKS.get(cell, cell))
    return "".join(out)


def read_braille(text: str) -> str | None:
    """`text` with its braille read as English grade-1 braille (module docstring), or
    None when it has none."""
    if text.isascii() or not _BRAILLE_HINT.search(text):
        return None
    read = _BRAILLE.sub(lambda m: " ".join(_braille_word(word) for word in m.group().split("⠀")), text)
    if "⠶" in text:  # one cell for both brackets: opening and closing in turn
        parts = read.split("\x00")
        read = "".join(part + ("(" if i % 2 == 0 else ")") for i, part in enumerate(parts[:-1])) + parts[-1]
    return None if read == text else read


_MORSE = {
    ".-": "a", "-...": "b", "-.-.": "c", "-..": "d", ".": "e", "..-.": "f", "--.": "g",
    "....": "h", "..": "i", ".---": "j", "-.-": "k", ".-..": "l", "--": "m", "-.": "n",
    "---": "o", ".--.": "p", "--.-": "q", ".-.": "r", "...": "s", "-": "t", "..-": "u",
    "...-": "v", ".--": "w", "-..-": "x", "-.--": "y", "--..": "z",
    ".----": "1", "..---": "2", "...--": "3", "....-": "4", ".....": "5", "-....": "6",
    "--...": "7", "---..": "8", "----.": "9", "-----": "0",
    ".-.-.-": ".", "--..--": ",", "..--..": "?", "-.-.--": "!", "-..-.": "/", "-....-": "-",
    ".----.": "'", "---...": ":", "-.-.-.": ";", "-...-": "=", ".-.-.": "+", ".--.-.": "@",
    "-.--.": "(", "-.--.-": ")", ".-..-.": '"',
}
_DOTS_AND_DASHES = str.maketrans("·•−–_", "..---")
_CODE = r"[.\-·•−–_]{1,7}"
_MORSE_RUN = re.compile(rf"(?<![\w.\-·•−–/])(?:{_CODE}(?: ?/ ?| )){{5,}}{_CODE}(?![\w.\-·•−–])")
_MORSE_HINT = re.compile(r"[.\-·•−–_]{1,7} [.\-·•−–_]{1,7} ")
_MORSE_PAIRS = (".-", "-.", ". -", "- .")  # one of them in any run of two codes or more
_OTHER_DOTS = re.compile("[·•−–_]")


def _morse(match: re.Match) -> str:
    run = match.group().translate(_DOTS_AND_DASHES)
    words = [word.split() for word in run.split("/")]
    codes = [code for word in words for code in word]
    if len(set(codes)) < 2 or any(code not in _MORSE for code in codes):
        return match.group()
    return " ".join("".join(_MORSE[code] for code in word) for word in words if word)


def read_morse(text: str) -> str | None:
    """`text` with its runs of Morse code read as the letters they spell (module
    docstring), or None when it has none."""
    ascii_codes = text.translate(_DOTS_AND_DASHES) if _OTHER_DOTS.search(text) else text
    if not any(pair in ascii_codes for pair in _MORSE_PAIRS) or not _MORSE_HINT.search(text):
        return None  # cheap scans first
    read = _MORSE_RUN.sub(_morse, text)
    return None if read == text else read


_NATO = {word: word[0] for word in (
    "alfa alpha bravo charlie delta echo foxtrot golf hotel india juliett juliet kilo lima "
    "mike november oscar papa quebec romeo sierra tango uniform victor whiskey whisky xray "
    "x-ray yankee zulu").split()}
_NATO_WORD = "(?:" + "|".join(sorted(map(re.escape, _NATO), key=len, reverse=True)) + ")"
_NATO_RUN = re.compile(rf"(?i)\b{_NATO_WORD}\b(?:(?:[ ,]+|\s*/\s*){_NATO_WORD}\b){{3,}}")
_NATO_WORDS = re.compile(rf"(?i){_NATO_WORD}|/")


def _nato(match: re.Match) -> str:
    return "".join(" " if w == "/" else _NATO[w.lower()] for w in _NATO_WORDS.findall(match.group()))


def read_nato(text: str) -> str | None:
    """`text` with its runs of NATO code words read as the letters they spell (module
    docstring), or None when it has none."""
    words = text.lower().replace(",", " ").replace("/", " ").split()
    if _NATO.keys().isdisjoint(words):
        return None  # a cheap scan first: one code word at least
    in_row = 0
    for word in words:
        in_row = in_row + 1 if word in _NATO else 0
        if in_row == 4:
            break
    else:
        return None
    read = _NATO_RUN.sub(_nato, text)
    return None if read == text else read
