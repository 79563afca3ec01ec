"""Deterministic scorers for proxy tests (the real guard is tested in tests/guard), and
`embedded_scorer`, the real embedded guard for the tests that run it end to end.

`KeywordScorer` implements `proxy.scorer.Scorer` by looking for marker words, so a test
controls exactly where a stream crosses: "BOMB" scores 0.99, "borderline" 0.4, anything
else 0.01; with `together=(a, b, ...)`, a text holding every one of those words scores
0.99 too (a request split across turns: each part alone scores 0.01). Sessions score the prompt (when given) plus everything appended, like the
real guard's sessions; `calls` lists the full texts scored, a session's `prompt_score`
included.
"""

from __future__ import annotations

import asyncio

from proxy.scorer import ScorerBusy


def embedded_scorer():
    """The embedded guard as `siren-proxy serve` loads it, once loaded (a generator for
    module fixtures: `yield from embedded_scorer()`)."""
    from policies.config import GuardConfig
    from proxy.embedded import LoadingScorer

    loading = LoadingScorer(GuardConfig())
    assert loading.wait(timeout=300), f"guard did not load: {loading.error!r}"
    yield loading
    loading.close()


def keyword_score(text: str) -> float:
    if "BOMB" in text:
        return 0.99
    if "borderline" in text:
        return 0.4
    return 0.01


class GuardBroke(RuntimeError):
    pass


class KeywordSession:
    def __init__(self, scorer: KeywordScorer, prompt: str | None, cache_salt: str | None = None) -> None:
        self.scorer = scorer
        self.prompt = prompt
        self.cache_salt = cache_salt  # the partition the proxy asked for
        self.text = prompt + "\n" if prompt else ""
        self.closed = False
        self.prompt_scored = False  # `prompt_score` was asked (the prompt stage used this session)

    async def prompt_score(self) -> float:
        if not self.prompt:
            raise ValueError("this stream session has no prompt to score")
        if not self.prompt_scored:  # the real session's prefill runs once, however often it is awaited
            self.scorer.calls.append(self.prompt)
        self.prompt_scored = True
        return await self.scorer._score(self.prompt)

    async def append(self, delta: str) -> float:
        self.text += delta
        self.scorer.checks.append(len(self.text))
        return await self.scorer._score(self.text)

    async def aclose(self) -> None:
        await asyncio.sleep(0)  # a yield point, as any await in the proxy's cleanup is
        self.closed = True


class KeywordScorer:
    def __init__(self, *, fail: bool = False, busy: bool = False, delay: float = 0.0,
                 sessions_before_busy: int | None = None, together: tuple[str, ...] = ()) -> None:
        self.together = together
        self.fail = fail
        self.busy = busy
        self.sessions_before_busy = sessions_before_busy  # the queue fills after this many sessions
        self.delay = delay
        self.calls: list[str] = []
        self.checks: list[int] = []
        self.sessions: list[KeywordSession] = []
        self.most_open = 0  # the most sessions open at once

    @property
    def ready(self) -> bool:
        return True

    async def _score(self, text: str) -> float:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.busy:
            raise ScorerBusy("scripted full queue")
        if self.fail:
            raise GuardBroke("scripted guard failure")
        if self.together and all(word in text for word in self.together):
            return 0.99
        return keyword_score(text)

    async def score(self, *, prompt: str | None = None, response: str | None = None) -> float:
        text = "\n".join(p for p in (prompt, response) if p)
        self.calls.append(text)
        return await self._score(text)

    async def score_many(self, items) -> list[float]:
        return [await self.score(prompt=p, response=r) for p, r in items]

    def stream(self, prompt: str | None = None, *, cache_salt: str | None = None) -> KeywordSession:
        if self.busy or len(self.sessions) == self.sessions_before_busy:
            raise ScorerBusy("scripted full queue")
        session = KeywordSession(self, prompt, cache_salt)
        session.calls_before = len(self.calls)  # what had been scored when it opened
        self.most_open = max(self.most_open, 1 + sum(not s.closed for s in self.sessions))
        self.sessions.append(session)
        return session
