"""Exact incremental scoring of a growing response: one `StreamSession` per stream.

Each check returns the score of ``model_text(prompt=prompt, response=response_so_far)``
(response alone when there is no prompt: what the reference's `score_streaming` reads),
equal to a full recompute of that text, at the cost of the new tokens only:

- A causal backbone's states for a token prefix never change when text is appended, so
  the KV cache and the per-token rows of selected neurons (float32) for that prefix stay
  valid; a window's pooled feature is the float32 mean of its rows.
- Appending text can still change the last few tokens (BPE merges across the boundary,
  or cleaning: trailing spaces are stripped until more text arrives). Each check
  re-tokenises the cleaned text (from a piece boundary near its end where that is exact:
  `guard.tokens`), keeps the longest common token prefix with what was scored, crops
  the cache and the rows to it, and feeds only the rest.
- Texts past `max_length` follow `guard.windows`: completed windows keep their scores,
  only the last window grows, and a new window is prefilled once from its start (each
  token is fed at most twice in all). A rollback that reaches into a completed window
  reopens it. The prompt is prefilled when the session is created.
- `_updates` yields each (window, new ids) feed instead of running it, so that one
  driver can run several sessions' updates side by side (`append_all`): each round,
  their windows' feeds go through one packed forward (`guard.packing`).
- With the guard's `StaticStepper` (on CUDA by default; `guard.graphs`) a window keeps
  its cache and rows in a preallocated slot and each feed is one CUDA-graph replay per
  step size; the logic above is unchanged, and a window without a free slot steps
  eagerly. The prefix cache keeps copies taken out of slots, and a window continued
  from one is copied into a free slot (`_Window.continued`).

A session belongs to one `SirenGuard` and is used from one thread at a time; sessions
of one guard may be used from several threads, since each update holds the guard's lock.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache

from guard.result import ScoreResult
from guard.text import model_text, second_reading, visible_reading
from guard.tokens import TextTokens
from guard.windows import text_score


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Window:
    """One window's KV cache and per-token rows; `start` is in body tokens.

    With the guard's `StaticStepper` (a GPU, or `static_steps=True`) and a free slot,
    the cache and rows live in that slot; otherwise in a `DynamicCache` and a tensor
    of its own. The slot goes back when the window is dropped.
    """

    def __init__(self, guard, start: int) -> None:
        self.guard = guard
        self.start = start
        self.n = 0  # tokens fed, prefix included
        self._score = 0.0
        self._stale = False  # cropped since the last score: rescored when read
        self.stepper = guard.stepper
        self.slot = self.stepper.acquire() if self.stepper is not None else None
        if self.slot is not None:
            weakref.finalize(self, self.stepper.release, self.slot)
            return
        readout = guard.readout
        self.cache = DynamicCache(config=readout.model.config)
        self.rows = torch.empty(guard.max_length, readout.n_features,
                                dtype=torch.float32, device=readout.device)  # (max_length, F)

    def copy(self) -> _Window:
        """A compact window of its own (no slot) with this one's tokens, cache and rows:
        an entry of the prefix cache, which is never stepped itself (a session steps
        `continued()`), so it holds its n rows, not room for a whole window. The cache is
        compact too: `DynamicCache` copies what it is given (its layers `torch.cat` onto
        empty ones, as every update does), and a cropped cache's tensors are views of
        longer ones."""
        layers, rows = self._state()
        return self._detached(layers, rows.clone())

    def continued(self) -> _Window:
        """A window for a session that continues this one, an entry's window in the
        prefix cache: in a free static slot, its cache copied in, when the guard steps
        statically; otherwise a copy of its own with room for a whole window's rows (no
        slot free: it steps eagerly, as windows beyond the slots do)."""
        layers, rows = self._state()
        slot = self.stepper.acquire() if self.stepper is not None and self.slot is None else None
        if slot is None:
            room = rows.new_empty(self.guard.max_length, rows.shape[1])
            room[: self.n] = rows
            return self._detached(layers, room)
        twin = self._twin(slot)
        weakref.finalize(twin, self.stepper.release, slot)
        if self.n:
            self.stepper.load(slot, layers, rows)
        return twin

    def _state(self) -> tuple[list, torch.Tensor]:
        """Each kept block's (keys, values) and the rows (n, F) of its n tokens, in its
        slot or its own cache."""
        if self.slot is not None:
            return self.stepper.views(self.slot, self.n)
        return [(layer.keys, layer.values) for layer in self.cache.layers], self.rows[: self.n]

    def _detached(self, layers: list, rows: torch.Tensor) -> _Window:
        twin = self._twin(None)
        twin.cache = DynamicCache(ddp_cache_data=layers)
        twin.rows = rows
        return twin

    def _twin(self, slot: int | None) -> _Window:
        twin = object.__new__(_Window)
        twin.guard, twin.start, twin.n, twin.stepper, twin.slot = self.guard, self.start, self.n, self.stepper, slot
        twin._score, twin._stale = self._score, self._stale
        return twin

    @property
    def nbytes(self) -> int:
        """Bytes of its cache and rows (a window without a slot, as `copy` makes)."""
        cached = sum(t.numel() * t.element_size() for layer in self.cache.layers
                     for t in (layer.keys, layer.values) if t is not None)
        return cached + self.rows.numel() * self.rows.element_size()

    @property
    def score(self) -> float:
        if self._stale:
            self._stale = False
            self._score = self._rescore()
        return self._score

    def crop(self, keep: int) -> None:
        """Forget all but the first `keep` tokens (a text can also get shorter)."""
        if keep < self.n:
            if self.slot is None:
                self.cache.crop(keep - self.n)
            self.n = keep
            self._stale = self.n > 0

    def stepped(self, m: int, score: float) -> None:
        """`StaticStepper.feed_many` fed m tokens into this window's slot (windows
        without one: `take`)."""
        self._stale = False
        self._score = score
        self.n += m

    def take(self, new: torch.Tensor) -> None:
        """Keep the rows (m, F) of m tokens `guard.feed_rows` just fed into `cache`."""
        self._stale = False
        self.rows[self.n : self.n + len(new)] = new
        self.n += len(new)
        self._score = self._rescore()

    def _rescore(self) -> float:
        if self.slot is not None:
            return self.stepper.rescore(self.slot, self.n)
        pooled = self.rows[: self.n].sum(dim=0, keepdim=True) / self.n * self.guard.readout.weights  # (1, F)
        return float(self.guard.head.p_harmful(pooled)[0])


class StreamSession:
    def __init__(self, guard, prompt: str | None = None, threshold: float | None = None, *,
                 prefill: bool = True, cache_salt: str | None = None) -> None:
        self.guard = guard
        self.prompt = prompt
        self.cache_salt = cache_salt  # the prefix cache's partition this session reads and adds to
        self.threshold = guard.threshold(threshold)
        self.response = ""
        self._plan = guard.plan
        self._tokens = TextTokens(guard.tokenizer)  # the body tokens, re-tokenised from near the end
        self._ids: list[int] = []  # body tokens scored so far
        self._finals: dict[int, tuple[int, float]] = {}  # window start -> (end, score)
        self._active: _Window | None = None
        self._spares: dict[int, _Window] = {}  # start -> a cached window to continue (`guard.prefixes`)
        self._previous: _Window | None = None  # the window the last update completed last
        self._score = 0.0  # this reading's
        self._twin: StreamSession | None = None  # the text's second reading (guard.emoji "max")
        self._both = 0.0  # the session's score: the higher of the two readings
        self.tokens_fed = 0  # backbone tokens run, all windows together (for benchmarks)
        self.rolled_back = 0  # scored tokens that a later tokenisation changed
        if prompt and prefill:
            self._update(model_text(prompt=prompt))

    @property
    def tokens(self) -> int:
        """Tokens of the text scored so far (prefix included)."""
        return len(self._plan.prefix) + len(self._ids)

    @property
    def score(self) -> float:
        return self._both

    @torch.no_grad()
    def append(self, delta: str) -> ScoreResult:
        """Append `delta` to the response and score everything so far."""
        return self.set_response(self.response + (delta or ""))

    @torch.no_grad()
    def set_response(self, response_so_far: str) -> ScoreResult:
        """Score the session's prompt joined with `response_so_far` (any edit is exact)."""
        self.response = response_so_far
        return ScoreResult.of(self._update(self._text()), self.threshold)

    def _text(self) -> str:
        """What the session scores: its prompt joined with the response so far."""
        return model_text(prompt=self.prompt or None, response=self.response)

    def _update(self, text: str) -> float:
        return self._settle(_drive(self.guard, self._readings(text)))

    def _readings(self, text: str) -> list[Iterator[tuple[_Window, list[int]]]]:
        """The updates scoring `text`: this session's, and under ``emoji="max"``, once the
        text has had a second reading (emoji, leetspeak, spaced-out letters:
        `guard.text.second_reading`), its twin's over that reading. Under "max" both start
        from the text as a person reads it (`guard.text.visible_reading`). The twin is a
        session of its own, so its reading is as exact and as incremental as this one's;
        the driver packs both in its rounds."""
        if self.guard.emoji != "max":
            return [self._updates(text)]
        text = visible_reading(text) or text
        second = second_reading(text)
        if second is not None and self._twin is None:
            self._twin = StreamSession(self.guard, threshold=self.threshold, prefill=False,
                                       cache_salt=self.cache_salt)
        if self._twin is None:
            return [self._updates(text)]
        return [self._updates(text), self._twin._updates(text if second is None else second)]

    def _settle(self, scores: list[float]) -> float:
        """The session's score from its readings' (`_readings`): the higher, NaN if any is."""
        self._both = text_score(scores)
        return self._both

    def _updates(self, text: str) -> Iterator[tuple[_Window, list[int]]]:
        """Score `text`: yields each (window, new ids) for the driver to feed, returns
        the score (`_drive`). If a feed fails, or the driver closes this update before
        its end, the session forgets every cached token, so that its next check
        recomputes the whole text and stays exact.

        With the guard's prefix cache (`guard.prefixes`), a session with nothing scored
        yet starts from the cached state that covers most of its text, and a session that
        has just scored its prompt alone leaves a copy of its state there."""
        prefixes = self.guard.prefixes
        try:
            ids = self._tokens.encode(text)
            fresh = not self._ids and self._active is None
            if fresh and prefixes is not None:
                found = prefixes.take(ids, len(self._plan.prefix), salt=self.cache_salt)
                if found is not None:
                    self._ids, self._finals, windows = found
                    self._spares = {window.start: window for window in windows}
            puts = fresh and prefixes is not None and bool(self.prompt) and not self.response
            score = yield from self._steps(ids, keep_previous=puts)
        except BaseException:
            self._ids, self._finals, self._active, self._spares = [], {}, None, {}
            raise
        finally:
            previous, self._previous = self._previous, None
        if puts:
            windows = [w for w in (previous, self._active) if w is not None]
            prefixes.put(self._ids, self._finals, windows, salt=self.cache_salt, kept=[previous])
        return score

    def _steps(self, ids: list[int], keep_previous: bool = False) -> Iterator[tuple[_Window, list[int]]]:
        plan = self._plan
        keep = common_prefix(self._ids, ids)
        self.rolled_back += len(self._ids) - keep
        self._finals = {s: v for s, v in self._finals.items() if v[0] <= keep}
        active, self._active = self._active, None  # the one reference: a dropped window frees its slot at once
        if active is not None:
            if active.start > keep or (active.start == keep and not plan.prefix):
                active = None
            else:
                active.crop(len(plan.prefix) + keep - active.start)
        spans = plan.spans(len(ids))
        scores = []
        for k, (start, end) in enumerate(spans):
            last = k == len(spans) - 1
            final = self._finals.get(start)
            if not last and final is not None and final[0] == end:
                scores.append(final[1])
                continue
            if active is None or active.start != start:
                active = None
                active = self._spare(start, keep) or _Window(self.guard, start)
            if active.n == 0:
                yield from self._feed(active, list(plan.prefix) + ids[start:end])
            else:
                yield from self._feed(active, ids[start + active.n - len(plan.prefix) : end])
            scores.append(active.score)
            if not last:
                self._finals[start] = (end, active.score)
                if keep_previous and k == len(spans) - 2:  # the one before the last: a copy for the
                    self._previous = active.copy()  # prefix cache at the update's end (its slot goes back now)
                active = None
        self._finals = {s: v for s, v in self._finals.items() if (s, v[0]) in spans[:-1]}
        self._active, self._spares = active, {}
        self._ids = ids
        self._score = text_score(scores)
        return self._score

    def _spare(self, start: int, keep: int) -> _Window | None:
        """A window taken from the prefix cache for `start`, cut to the `keep` body tokens
        this text shares with the cached one; None if there is none or nothing of it is
        left."""
        window = self._spares.pop(start, None)
        if window is None or start > keep or (start == keep and not self._plan.prefix):
            return None
        window = window.continued()
        window.crop(len(self._plan.prefix) + keep - start)
        return window

    def _feed(self, window: _Window, ids: list[int]) -> Iterator[tuple[_Window, list[int]]]:
        if ids:
            yield window, ids
            self.tokens_fed += len(ids)


@torch.no_grad()
def append_all(appends: Sequence[tuple[StreamSession, str]],
               given_up: Sequence[Callable[[], bool]] | None = None) -> list[ScoreResult]:
    """`session.append(delta)` for several sessions of one guard at once: each round,
    every session's next feed goes into one packed forward (`guard.packing`), so N
    concurrent checks cost far less than N checks (README, "Concurrency"). Scores equal
    those of appending one session at a time. `given_up[i]()` true stops session i's
    update between rounds (`_drive`): its score is NaN, and its next check re-reads it all."""
    if not appends:
        return []
    guard = appends[0][0].guard
    if any(session.guard is not guard for session, _ in appends):
        raise ValueError("append_all takes sessions of one guard")
    if len({id(session) for session, _ in appends}) < len(appends):
        raise ValueError("append_all takes each session once")
    updates, owners = [], []  # each session's readings (`_readings`), and whose each update is
    for i, (session, delta) in enumerate(appends):
        session.response += delta or ""
        readings = session._readings(session._text())
        updates += readings
        owners += [i] * len(readings)
    scores = _drive(guard, updates, None if given_up is None else [given_up[i] for i in owners])
    per_session: list[list[float]] = [[] for _ in appends]
    for i, score in zip(owners, scores):
        per_session[i].append(score)
    return [ScoreResult.of(session._settle(mine), session.threshold)
            for mine, (session, _) in zip(per_session, appends)]


def _drive(guard, updates: list[Iterator[tuple[_Window, list[int]]]],
           given_up: Sequence[Callable[[], bool]] | None = None) -> list[float]:
    """Run session updates (`StreamSession._updates`) side by side to their scores.

    Each round takes every running update's next feed: windows in a static slot step on
    their own, all others go through `guard.feed_rows` together. Between rounds, an
    update whose `given_up[i]()` is true (its caller left: a client gone, a deadline
    passed) is closed, which resets its session, and scores NaN; the others go on. A long
    prompt's prefill is a round per window, so nobody waits minutes for text no one
    will read."""
    with guard.lock:  # windows, slots and the prefix cache are the guard's: one update at a time
        return _drive_locked(guard, updates, given_up)


def _drive_locked(guard, updates: list[Iterator[tuple[_Window, list[int]]]],
                  given_up: Sequence[Callable[[], bool]] | None) -> list[float]:
    scores = [0.0] * len(updates)
    pending: dict[int, tuple[_Window, list[int]]] = {}

    def advance(i: int) -> None:
        try:
            pending[i] = next(updates[i])
        except StopIteration as done:
            scores[i] = done.value

    try:
        for i in range(len(updates)):
            advance(i)
        while pending:
            if given_up is not None:
                for i in [i for i in pending if given_up[i]()]:
                    del pending[i]
                    updates[i].close()
                    scores[i] = float("nan")
                if not pending:
                    break
            feeds, pending = pending, {}
            _feed_round(guard, list(feeds.values()))
            order = list(feeds)
            del feeds  # no reference left: a window its update drops next frees its slot at once
            for i in order:
                advance(i)
    except BaseException:
        for update in updates:  # the unfinished ones reset their sessions (`_updates`)
            update.close()
        raise
    return scores


def _feed_round(guard, feeds: list[tuple[_Window, list[int]]]) -> None:
    """Windows in a static slot step together (`StaticStepper.feed_many`); all others
    share `guard.feed_rows`."""
    static = [(window, ids) for window, ids in feeds if window.slot is not None]
    cached = [(window, ids) for window, ids in feeds if window.slot is None]
    if static:
        scores = guard.stepper.feed_many([(window.slot, window.n, ids) for window, ids in static])
        for (window, ids), score in zip(static, scores):
            window.stepped(len(ids), score)
    for (window, _), rows in zip(cached, guard.feed_rows([(w.cache, ids) for w, ids in cached])):
        window.take(rows)
