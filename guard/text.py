"""The exact strings a SIREN head sees: cleaning and prompt/response joining.

A head is only valid on the string it was fitted on, so training, scoring, streaming
and evaluation all build their text here and nowhere else. The rules are the reference
runtime's (`siren_guard._to_raw_text`, `_join_prompt_response`), to the character:
chat-template markers become a space, runs of spaces and tabs fold to one space, three
or more newlines fold to two, and the result is stripped. An empty text scores as " ".

One addition: surrogate code points (JSON can carry ``"\\ud83d"``; a tokenizer cannot
read them, and the reference raises) are first re-paired, a high and a low surrogate in a
row becoming the character they encode, and any left alone become U+FFFD.
"""

from __future__ import annotations

import re

from guard.encodings import decode_blobs, read_ciphers
from guard.flipped import read_flipped
from guard.lookalikes import fold_leet, fold_lookalikes, join_spaced
from guard.smuggling import reveal_smuggled
from guard.spelled import read_braille, read_morse, read_nato

_CHAT_ARTIFACTS = re.compile(
    r"<\|im_start\|>|<\|im_end\|>|<\|im_sep\|>"
    r"|<\|system\|>|<\|user\|>|<\|assistant\|>"
    r"|<\|begin_of_text\|>|<\|end_of_text\|>"
    r"|<\|start_header_id\|>|<\|end_header_id\|>|<\|eot_id\|>"
    r"|<\|endoftext\|>|<\|fim_prefix\|>|<\|fim_suffix\|>|<\|fim_middle\|>"
    r"|<<SYS>>|<</SYS>>|\[INST\]|\[/INST\]"
    r"|<s>|</s>|<\|s\|>|<\|/s\|>"
)
_HORIZONTAL_SPACE = re.compile(r"[ \t]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_SURROGATE = re.compile("[\ud800-\udfff]")

EMPTY_TEXT = " "

# Emoji and the invisible characters that build them or hide between letters: pictographs,
# flags' regional indicators and tags, skin tones, dingbats and other symbols drawn as
# emoji, variation selectors, the keycap mark, zero-width joiners and spaces, the word
# joiner, the BOM and the soft hyphen. `without_emoji` drops them for a second reading.
_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\u231A\u231B\u23E9-\u23F3\u23F8-\u23FA"
    "\uFE00-\uFE0F\u20E3\U000E0020-\U000E007F\u200B-\u200D\u2060\uFEFF\u00AD]"
)


def clean_text(text: str | None) -> str:
    """The reference's `_to_raw_text`: strip chat markers and fold white space."""
    if not text:
        return ""
    if _SURROGATE.search(text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    cleaned = _CHAT_ARTIFACTS.sub(" ", text)
    cleaned = _HORIZONTAL_SPACE.sub(" ", cleaned)
    cleaned = _MANY_NEWLINES.sub("\n\n", cleaned)
    return cleaned.strip()


def join_prompt_response(prompt: str | None, response: str | None) -> str:
    """`prompt + "\\n" + response`, dropping a part that is None or empty."""
    return "\n".join(p for p in (prompt, response) if p)


def model_text(text: str | None = None, *, prompt: str | None = None, response: str | None = None) -> str:
    """The string the backbone reads for `text`, or for `prompt` and `response` joined.

    Cleaning comes after joining, as in the reference, so a response that starts with
    spaces is folded the same way whether it was scored alone or after its prompt.
    """
    if text is not None and (prompt is not None or response is not None):
        raise ValueError("pass either text or prompt/response, not both")
    if text is None:
        if prompt is None and response is None:
            raise ValueError("provide text, or at least one of prompt/response")
        text = join_prompt_response(prompt, response)
    return clean_text(text) or EMPTY_TEXT


# Invisible characters that join nothing and mean nothing to a reader: the zero-width space,
# the word joiner, the BOM, the soft hyphen, the Mongolian vowel separator, the invisible
# math operators. (The zero-width joiner and non-joiner build emoji and shape some scripts:
# they stay, and only the emoji reading drops them.)
_INVISIBLE = re.compile("[\u200B\u2060-\u2064\uFEFF\u00AD\u180E]")


def without_emoji(text: str | None) -> str | None:
    """`text` without emoji and invisible characters (`_EMOJI`); None stays None.

    Not part of the reference's cleaning: a head reads emoji, and scores must equal the
    reference's. It is a second reading of the same text, taken where emoji lowered a
    harmful request's score (`emoji_reading`)."""
    return text if not text else _EMOJI.sub("", text)


def visible_reading(prepared: str) -> str | None:
    """A prepared text as a person reads it: the text smuggled in characters that show
    nothing written out (`guard.smuggling`), without the invisible characters that join
    nothing (`_INVISIBLE`), its runs of base64 and the other binary-to-text encodings that
    encode text decoded (`guard.encodings.decode_blobs`), braille and Morse code read as
    their letters (`guard.spelled`), lookalike and styled letters folded to the Latin ones
    they are drawn as (`guard.lookalikes`), cleaned again; None when nothing changes. Under
    ``emoji="max"`` this is the text read: a reader sees no difference, while the head
    reads them as rare byte pieces (a zero-width space inside each longer word took
    alpaca_eval's false positives from 0.109 to 0.627 and hid a StrongREJECT request at
    0.25; Cyrillic letters in place of half the Latin ones that have one hid it at 0.06;
    in hex no StrongREJECT request was flagged)."""
    visible = prepared if prepared.isascii() else _INVISIBLE.sub("", reveal_smuggled(prepared) or prepared)
    for _ in range(3):  # base64 of base64, hex of base64: three levels at most
        decoded = decode_blobs(visible)
        if decoded is None:
            break
        visible = decoded
    visible = read_morse(visible) or visible
    if not visible.isascii():
        visible = read_braille(visible) or visible
        visible = fold_lookalikes(visible) or visible
    if visible == prepared:
        return None
    return clean_text(visible) or EMPTY_TEXT


def second_reading(prepared: str) -> str | None:
    """The second reading of a text as read (`visible_reading`'s) under ``emoji="max"``:
    without its emoji (as `emoji_reading`), with NATO code words read as their letters
    (`guard.spelled.read_nato`), text written backwards read the right way round
    (`guard.flipped.read_flipped`), sentences in a letter code read decoded
    (`guard.encodings.read_ciphers`), leetspeak read as letters and letters spaced out
    read as words (`guard.lookalikes.fold_leet`, `join_spaced`); None when none of these
    changes it, so nothing to read twice."""
    text = _EMOJI.sub("", prepared) if _EMOJI.search(prepared) else prepared
    for read in (read_nato, read_flipped, read_ciphers, fold_leet, join_spaced):
        text = read(text) or text
    return None if text == prepared else clean_text(text) or EMPTY_TEXT


def emoji_reading(prepared: str) -> str | None:
    """The second reading of a prepared text (`model_text`'s) under ``emoji="max"``: the
    text without its emoji and invisible characters, cleaned again (a dropped emoji
    leaves two spaces); None when there is nothing to drop, so nothing to read twice."""
    if not _EMOJI.search(prepared):
        return None
    return clean_text(_EMOJI.sub("", prepared)) or EMPTY_TEXT
