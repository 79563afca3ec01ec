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

Other tokenizers (a normaliser, another split pattern, offsets trimmed by a byte-level
post-processor) are re-tokenised whole, as before. `tests/guard/test_tokens.py` checks
random edits of real and adversarial texts against whole re-tokenisation.
"""

from __future__ import annotations

import json

MARGIN = 2  # characters: a piece is decided by its own and at most one more


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
        self.text = ""
        self.ids: list[int] = []
        self.starts: list[int] = []  # per token: its character offset if it starts a piece, else -1
        self.encoded = 0  # characters tokenised, all calls together

    def encode(self, text: str) -> list[int]:
        if self.backend is None:
            self.encoded += len(text)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = shared_length(self.text, text) - self.margin
        keep = len(self.ids) - 1
        while keep > 0 and not 0 <= self.starts[keep] <= limit:
            keep -= 1
        keep = max(keep, 0)
        at = self.starts[keep] if keep else 0
        encoding = self.backend.encode(text[at:], add_special_tokens=False)
        self.encoded += len(text) - at
        starts, last = [], object()
        for word, (begin, _) in zip(encoding.word_ids, encoding.offsets):
            starts.append(at + begin if word is None or word != last else -1)
            last = word
        self.ids[keep:] = encoding.ids
        self.starts[keep:] = starts
        self.text = text
        return list(self.ids)
