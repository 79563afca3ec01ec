"""`GuardWorker`: one thread owns the model and serves a queue; the event loop only awaits.

The backbone is not re-entrant and torch must never run on the event loop, so every
scoring call becomes a job on one FIFO queue, served by one thread:

- Full-text scorings (`score`, `score_many`) waiting together are merged into one batch
  (`SirenGuard.p_harmful`: packed on CPU, padded on a GPU): after taking the first, the
  worker waits up to `max_wait_ms` for more, up to `max_batch_size` texts. `score_many`
  is always one batch, whatever its size.
- Streaming steps of different sessions (`append`, and `open` with its prompt's
  prefill), up to `max_stream_batch` (default `max_batch_size`, or the guard's static
  slots if more), run as one `guard.session.append_all`: their new
  tokens go through one packed forward, each session keeping its own KV cache
  (`guard.packing`; no padding), so a new stream's prefill carries the 16-token checks
  of the others at its large-batch rate; on a GPU, windows in static slots step
  together in one CUDA-graph replay (`StaticStepper.feed_many`). After taking the
  first, the worker waits up to `max_wait_ms` for the other open sessions' steps (not
  where steps can't be batched: backbones that are not Llama-style). Measured on 2
  cores: 8 streams checked every 16 tokens, 1.6x the checks per second of stepping them
  one at a time (README, "Benchmark" (e)). Appends are taken from anywhere in the
  queue, so a round of streaming steps is served ahead of the full-text jobs behind
  its first; each session's own jobs keep their order.
- At most `max_queue` jobs wait; one more raises `QueueFull` at once (no blocking). A
  session's close is always taken: it frees the session's cache, and a close refused
  under overload would leave the session counted open for good.
- Any exception from the model reaches the awaiting caller as a `GuardError`
  (`ScoringError` with the original as `__cause__`); the proxy fails closed on it.

Implements `proxy.scorer.Scorer` (async) and offers `submit_score` for threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from guard.errors import Abandoned, GuardError, QueueFull, ScoringError, WorkerClosed
from guard.text import model_text

logger = logging.getLogger(__name__)

STEPS = ("open", "append")  # session jobs that feed tokens: run together, packed


@dataclass
class _Job:
    kind: str  # "texts" | "open" | "append" | "close"
    future: Future = field(default_factory=Future)
    texts: list[str] = field(default_factory=list)
    session: object | None = None  # AsyncStreamSession for session jobs
    payload: str | None = None


class GuardWorker:
    def __init__(
        self, guard, *, max_batch_size: int = 16, max_wait_ms: float = 2.0, max_queue: int = 1024,
        num_threads: int | None = None, max_stream_batch: int | None = None,
    ) -> None:
        import torch

        self.guard = guard
        # OpenMP settings are per thread: without this the worker thread would run with
        # the default thread count, not the one its creator chose with torch.set_num_threads.
        self.num_threads = num_threads or torch.get_num_threads()
        self.max_batch_size = max_batch_size
        # A round of streaming steps takes up to max_batch_size sessions, or, with static
        # steps, as many as there are slots: one replay steps them all (README, "On a GPU").
        stepper = getattr(guard, "stepper", None)
        rounds = max(max_batch_size, stepper.slots) if stepper is not None else max_batch_size
        self.max_stream_batch = rounds if max_stream_batch is None else max_stream_batch
        if self.max_stream_batch < 1:
            raise ValueError(f"max_stream_batch must be at least 1, got {self.max_stream_batch}")
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # full-text batches run (for tests and metrics)
        self.stream_rounds = 0  # append_all calls: streaming steps run together
        self.stream_steps = 0  # streaming steps run in them
        self._open_sessions = 0  # sessions opened and not yet closed (worker thread only)
        # Streaming steps that run together (packed, `guard.packing`, or static steps in
        # one replay, `guard.graphs`) wait up to max_wait_ms for the other open sessions'.
        together = getattr(guard, "packer", None) is not None or stepper is not None
        self._stream_wait = self.max_wait if together else 0.0
        self.on_batch: Callable[[int], None] | None = None  # called with each batch's size
        self.on_stream_round: Callable[[int], None] | None = None  # ... and each packed round's
        self._thread = threading.Thread(target=self._run, name="siren-guard-worker", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the worker (not counting the one it is running)."""
        return len(self._jobs)

    @property
    def ready(self) -> bool:
        return not self._closed and self._thread.is_alive()

    # -- submitting ------------------------------------------------------------------------
    def _submit(self, job: _Job, *, bounded: bool = True) -> Future:
        with self._cond:
            if self._closed:
                raise WorkerClosed("the guard worker is closed")
            if bounded and len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} guard jobs are already waiting (max_queue={self.max_queue})")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def submit_score(self, *, prompt: str | None = None, response: str | None = None) -> Future:
        """Thread-safe: a Future of P(harmful) for `prompt + "\\n" + response`."""
        return self._submit(_Job("texts", texts=[model_text(prompt=prompt, response=response)]))

    async def score(self, *, prompt: str | None = None, response: str | None = None) -> float:
        scores = await asyncio.wrap_future(self.submit_score(prompt=prompt, response=response))
        return scores[0]

    async def score_many(self, items: Sequence[tuple[str | None, str | None]]) -> list[float]:
        if not items:
            return []
        texts = [model_text(prompt=p, response=r if (p, r) != (None, None) else "") for p, r in items]
        return await asyncio.wrap_future(self._submit(_Job("texts", texts=texts)))

    def stream(self, prompt: str | None = None, *, cache_salt: str | None = None) -> AsyncStreamSession:
        return AsyncStreamSession(self, prompt, cache_salt=cache_salt)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._jobs = list(self._jobs), deque()
            self._cond.notify_all()
        for job in pending:
            job.future.set_exception(WorkerClosed("the guard worker was closed before this job ran"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # -- the worker thread -------------------------------------------------------------------
    def _next_jobs(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._jobs.popleft()
            if first.kind in STEPS:
                return self._more_steps(first)
            if first.kind != "texts":
                return [first]
            batch, size = [first], len(first.texts)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch_size:
                if self._jobs and self._jobs[0].kind == "texts":
                    if size + len(self._jobs[0].texts) > self.max_batch_size:
                        break
                    job = self._jobs.popleft()
                    batch.append(job)
                    size += len(job.texts)
                    continue
                remaining = deadline - time.monotonic()
                if self._jobs or remaining <= 0:  # a session job is next, or time is up
                    break
                self._cond.wait(remaining)
            return batch

    def _more_steps(self, first: _Job) -> list[_Job]:
        """`first` and the waiting opens and appends of other sessions (the lock is held).
        A session met again (a second append, or its close) is skipped from there on.
        Where steps are packed, waits up to `max_wait_ms` for the other open sessions'
        next appends."""
        batch, seen = [first], {id(first.session)}
        target = min(self.max_stream_batch, max(1, self._open_sessions))
        deadline = time.monotonic() + self._stream_wait
        while True:
            rest: deque[_Job] = deque()
            while self._jobs and len(batch) < self.max_stream_batch:
                job = self._jobs.popleft()
                if job.kind in STEPS and id(job.session) not in seen:
                    batch.append(job)
                else:
                    rest.append(job)
                if job.session is not None:
                    seen.add(id(job.session))
            rest.extend(self._jobs)
            self._jobs = rest
            remaining = deadline - time.monotonic()
            if len(batch) >= target or remaining <= 0 or self._closed:
                return batch
            self._cond.wait(remaining)

    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.num_threads)
        while True:
            jobs = self._next_jobs()
            if jobs is None:
                return
            try:
                if jobs[0].kind == "texts":
                    self._run_texts(jobs)
                elif jobs[0].kind in STEPS:
                    self._run_steps(jobs)
                else:
                    self._run_close(jobs[0])
            except BaseException as exc:  # never let the worker die silently
                logger.exception("guard worker failed")
                for job in jobs:
                    _fail(job.future, _as_guard_error(exc))

    def _run_texts(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.future.cancelled()]  # nobody waits for these
        if not jobs:
            return
        texts = [t for job in jobs for t in job.texts]
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(texts))
        try:
            scores = self.guard.p_harmful(texts, given_up=lambda: all(job.future.cancelled() for job in jobs))
        except Abandoned:  # every caller left (cancelled): a long text is not read on for nobody
            return
        i = 0
        for job in jobs:
            _resolve(job.future, scores[i : i + len(job.texts)])
            i += len(job.texts)

    def _run_steps(self, jobs: list[_Job]) -> None:
        """Opens (a session and its prompt's prefill) and appends, in one `append_all`."""
        live = []
        for job in jobs:
            handle = job.session
            if job.kind == "open":
                handle._session = self.guard.stream(prompt=handle.prompt, prefill=False,
                                                    cache_salt=handle.cache_salt)
                self._open_sessions += 1
            elif handle._session is None:
                _fail(job.future, ScoringError("the stream session failed to open"))
                continue
            live.append(job)
        steps = [job for job in live if job.kind == "append" or job.session.prompt]  # nothing to prefill
        scores = {}
        if steps:
            from guard.session import append_all  # torch, on the worker thread only

            self.stream_rounds += 1
            self.stream_steps += len(steps)
            if self.on_stream_round is not None:
                self.on_stream_round(len(steps))
            # A step whose caller gave up (a client gone, a deadline passed: the awaiting
            # task was cancelled, and with it the job's future) stops between windows.
            results = append_all([(job.session._session, job.payload or "") for job in steps],
                                 given_up=[job.future.cancelled for job in steps])
            scores = {id(job): result.score for job, result in zip(steps, results)}
        for job in live:  # an open's score is its prompt's own (None without a prompt)
            _resolve(job.future, (scores.get(id(job)), job.session._session.tokens))

    def _run_close(self, job: _Job) -> None:
        """Runs even if its caller was cancelled, so the cache is freed."""
        handle = job.session
        if handle._session is not None:
            self._open_sessions -= 1
        handle._session = None
        _resolve(job.future, None)


def _resolve(future: Future, value) -> None:
    """Set a job's result unless its caller gave up (a cancelled asyncio await cancels it)."""
    try:
        future.set_result(value)
    except InvalidStateError:
        pass


def _fail(future: Future, exc: BaseException) -> None:
    """Fail a job unless it is already settled or its caller gave up."""
    try:
        future.set_exception(exc)
    except InvalidStateError:
        pass


def _as_guard_error(exc: BaseException) -> GuardError:
    if isinstance(exc, GuardError):
        return exc
    err = ScoringError(f"the guard model failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


class AsyncStreamSession:
    """One growing response scored on the worker (`guard.session.StreamSession`).

    The prompt's prefill is queued at creation. Its score is the prompt's own score
    (the text the session has read is the prompt alone), so a caller that must score the
    prompt anyway awaits `prompt_score()` instead of a second, full-text scoring of the
    same tokens. `append` calls must be awaited one after another. A prefill that failed
    (a failed round), or was stopped (a cancelled wait for the prompt's score), fails the
    prompt's score, not the session: like any failed check, it leaves the session to
    read the whole text at its next append, exactly. The prompt's score then raises the
    failure's error, or `Abandoned`.
    """

    def __init__(self, worker: GuardWorker, prompt: str | None, *, cache_salt: str | None = None) -> None:
        self.worker = worker
        self.prompt = prompt
        self.cache_salt = cache_salt
        self.tokens = 0  # tokens of the text scored so far
        self._session = None  # the sync session; touched only on the worker thread
        self._closed = False
        self._unsent = ""  # text of appends a full queue refused: the next append sends it first
        self._opened = worker._submit(_Job("open", session=self))

    async def prompt_score(self) -> float:
        """P(harmful) of the prompt alone, read off its prefill: equal to
        `score(prompt=prompt)`. A cancelled wait stops the prefill for every caller: the
        others get `Abandoned` (a `CancelledError` would reach tasks nobody cancelled)."""
        if not self.prompt:
            raise ValueError("this stream session has no prompt to score")
        if self._closed:
            raise WorkerClosed("this stream session is closed")
        if not self._opened.cancelled():
            try:
                score, _ = await asyncio.wrap_future(self._opened)
                return score
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # this caller left
                    raise
        raise Abandoned("this session's prefill was stopped (a wait for it was cancelled); "
                        "its prompt score was not kept")

    async def append(self, delta: str) -> float:
        """Score everything appended so far. An append a full queue refuses (`QueueFull`)
        is not lost: its text goes first in the next append, as a failed scoring's is
        kept by the session. It does not wait for the open: the worker runs a session's
        jobs in order, and whatever became of the prefill (done, failed, stopped), this
        check scores the whole text, exactly."""
        if self._closed:
            raise WorkerClosed("this stream session is closed")
        delta, self._unsent = self._unsent + delta, ""
        try:
            job = self.worker._submit(_Job("append", session=self, payload=delta))
        except QueueFull:
            self._unsent = delta
            raise
        score, self.tokens = await asyncio.wrap_future(job)
        return score

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Queue the release of the session's cache, without waiting for it: nothing
        the caller sends (a refusal, a stream's end) waits on the worker's queue, and a
        full queue does not refuse it (`GuardWorker._submit`)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.worker._submit(_Job("close", session=self), bounded=False)
        except WorkerClosed:  # the session dies with the worker
            self._session = None


__all__ = ["GuardWorker", "AsyncStreamSession", "QueueFull"]
