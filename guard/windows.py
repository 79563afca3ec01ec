"""Token plans: how a cleaned text becomes the token windows the head reads.

The reference reads only the first `max_length` tokens and silently ignores the rest. We
keep scoring long texts with sliding windows (``long_text="window"``, the default):

- A text's body tokens (the tokenizer's special prefix, if any, left out) are cut into
  windows of ``W = max_length - len(prefix)`` tokens starting every ``S = W // 2``
  tokens: window k covers ``[k*S, min(k*S + W, n))`` for k = 0..K with
  ``K = ceil((n - W) / S)`` (K = 0 when ``n <= W``). So the last window always ends at
  the text's end, and every token is read with at least W/2 tokens of left context
  (except near the start).
- Each window is scored as a text of its own (prefix + its tokens, from position 0),
  exactly as the head saw texts in training; the text's score is the maximum over its
  windows (`text_score`: NaN if any window's is). For ``n <= W`` there is one window and the score is the reference's.

Why windows and not one longer window: SmolLM2 accepts 8k positions, but the head was
fitted on means over at most `max_length` tokens; a harmful paragraph diluted in a mean
over thousands of benign tokens would vanish. A window keeps the dilution bounded.
``long_text="truncate"`` reproduces the reference (one window, the first W tokens).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

LONG_TEXT_MODES = ("window", "truncate")


@dataclass(frozen=True)
class TokenPlan:
    prefix: tuple[int, ...]  # special tokens the tokenizer puts first (none for SmolLM2)
    window: int  # body tokens per window, W
    stride: int  # S
    mode: str

    @classmethod
    def for_tokenizer(cls, tokenizer, max_length: int, mode: str = "window") -> TokenPlan:
        if mode not in LONG_TEXT_MODES:
            raise ValueError(f"long_text must be one of {LONG_TEXT_MODES}, got {mode!r}")
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(with_special)) if with_special[i:i + len(bare)] == bare)
        if start + len(bare) != len(with_special):
            # A suffix (e.g. EOS) changes the last token of every growing prefix, which
            # breaks both windows and incremental streaming.
            raise ValueError("tokenizers that append special tokens are not supported")
        prefix = tuple(with_special[:start])
        window = max_length - len(prefix)
        if window < 2:
            raise ValueError(f"max_length={max_length} leaves no room for text tokens")
        return cls(prefix=prefix, window=window, stride=max(1, window // 2), mode=mode)

    def spans(self, n: int) -> list[tuple[int, int]]:
        """Body-token windows [start, end) for a body of `n` tokens, in order."""
        if n <= self.window:
            return [(0, n)]
        if self.mode == "truncate":
            return [(0, self.window)]
        last = math.ceil((n - self.window) / self.stride)
        return [(k * self.stride, min(k * self.stride + self.window, n)) for k in range(last + 1)]

    def body(self, tokenizer, text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def bodies(self, tokenizer, texts: Sequence[str]) -> list[list[int]]:
        """`body` of each text, in one call: the tokenizer encodes a batch in one pass
        (in parallel where it can), which on a GPU was 18% of a 16-text `score_batch`
        when each text was tokenised on its own."""
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def text_score(window_scores: Iterable[float]) -> float:
    """A text's score: its windows' maximum, NaN if any window scored NaN. A NaN is the
    model failing (a broken head, an overflow in float16), which the proxy reads as a
    guard failure; `max` would skip it (NaN compares false) and pass the text as benign."""
    scores = list(window_scores)
    return math.nan if any(math.isnan(s) for s in scores) else max(scores)
