"""The seam between the proxy and whatever scores text.

The proxy never imports torch: it holds a `Scorer`, which `guard.worker.GuardWorker`
implements (and tests may implement with a few lines). Every method is async because
the real scorer runs on its own worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class ScorerBusy(Exception):
    """The scorer's queue is full: the request gets 503 with Retry-After (fail closed)."""


class StreamSession(Protocol):
    """Scores one growing response; each `append` returns the score of all text so far."""

    async def prompt_score(self) -> float:
        """The prompt's own score, `score(prompt=prompt)`, read off the session's prefill:
        the proxy's prompt stage awaits it instead of scoring the same tokens twice."""
        ...

    async def append(self, delta: str) -> float: ...

    async def aclose(self) -> None: ...


class Scorer(Protocol):
    @property
    def ready(self) -> bool: ...

    async def score(self, *, prompt: str | None = None, response: str | None = None) -> float:
        """P(harmful) of the prompt, the response, or `prompt + "\\n" + response`."""
        ...

    async def score_many(self, items: Sequence[tuple[str | None, str | None]]) -> list[float]:
        """(prompt, response) pairs scored as one batch, e.g. n candidate responses."""
        ...

    def stream(self, prompt: str | None = None, *, cache_salt: str | None = None) -> StreamSession:
        """An incremental session over `prompt + "\\n" + response_so_far`; raises
        `ScorerBusy` if the scorer's queue is full. `cache_salt`: the session shares cached
        prefixes only with sessions of the same salt (`guard.prefixes`)."""
        ...
