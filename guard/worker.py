"""`GuardWorker`: one thread owns the model and serves a queue; the event loop only awaits.

The backbone is not re-entrant and torch must never run on the event loop, so every
scoring call becomes a job on one FIFO queue, served by one thread:

- Full-text scorings (`score`, `score_many`) waiting together are merged into one batch
  (`SirenGuard.p_harmful`, windows sorted by length): after taking the first, the worker
  waits up to `max_wait_ms` for more, up to `max_batch_size` texts. `score_many` is
  always one batch, whatever its size.
- Streaming steps run one at a time, in arrival order. Sessions hold KV caches of
  different lengths; batching them would pad every cache to the longest, and on CPU a
  16-token step is bound by reading the weights once, which batching would share, but
  not enough to repay the padding and copies here (README, "Benchmark").
- At most `max_queue` jobs wait; one more raises `QueueFull` at once (no blocking).
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

from guard.errors import GuardError, QueueFull, ScoringError, WorkerClosed
from guard.text import model_text

logger = logging.getLogger(__name__)


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
        num_threads: int | None = None,
    ) -> None:
        import torch

        self.guard = guard
        # OpenMP settings are per thread: without this the worker thread would run with
        # the default thread count, not the one its creator chose with torch.set_num_threads.
        self.num_threads = num_threads or torch.get_num_threads()
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # full-text batches run (for tests and metrics)
        self.on_batch: Callable[[int], None] | None = None  # called with each batch's size
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
    def _submit(self, job: _Job) -> Future:
        with self._cond:
            if self._closed:
                raise WorkerClosed("the guard worker is closed")
            if len(self._jobs) >= self.max_queue:
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

    def stream(self, prompt: str | None = None) -> AsyncStreamSession:
        return AsyncStreamSession(self, prompt)

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
                else:
                    self._run_session(jobs[0])
            except BaseException as exc:  # never let the worker die silently
                logger.exception("guard worker failed")
                for job in jobs:
                    try:
                        job.future.set_exception(_as_guard_error(exc))
                    except InvalidStateError:  # already settled, or its caller gave up
                        pass

    def _run_texts(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.future.cancelled()]  # nobody waits for these
        if not jobs:
            return
        texts = [t for job in jobs for t in job.texts]
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(texts))
        scores = self.guard.p_harmful(texts)
        i = 0
        for job in jobs:
            _resolve(job.future, scores[i : i + len(job.texts)])
            i += len(job.texts)

    def _run_session(self, job: _Job) -> None:
        handle = job.session
        if job.kind == "open":
            handle._session = self.guard.stream(prompt=handle.prompt)
            _resolve(job.future, handle._session.tokens)
        elif job.kind == "append":
            if handle._session is None:
                raise ScoringError("the stream session failed to open")
            result = handle._session.append(job.payload)
            _resolve(job.future, (result.score, handle._session.tokens))
        else:  # close: runs even if its caller was cancelled, so the cache is freed
            handle._session = None
            _resolve(job.future, None)


def _resolve(future: Future, value) -> None:
    """Set a job's result unless its caller gave up (a cancelled asyncio await cancels it)."""
    try:
        future.set_result(value)
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

    The prompt's prefill is queued at creation, so it overlaps with waiting for the
    upstream's first token. `append` calls must be awaited one after another.
    """

    def __init__(self, worker: GuardWorker, prompt: str | None) -> None:
        self.worker = worker
        self.prompt = prompt
        self.tokens = 0  # tokens of the text scored so far
        self._session = None  # the sync session; touched only on the worker thread
        self._closed = False
        self._opened = worker._submit(_Job("open", session=self))

    async def append(self, delta: str) -> float:
        if self._closed:
            raise WorkerClosed("this stream session is closed")
        await asyncio.wrap_future(self._opened)
        score, self.tokens = await asyncio.wrap_future(
            self.worker._submit(_Job("append", session=self, payload=delta))
        )
        return score

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wrap_future(self.worker._submit(_Job("close", session=self)))
        except GuardError:  # closed worker or full queue: the session dies with it anyway
            self._session = None


__all__ = ["GuardWorker", "AsyncStreamSession", "QueueFull"]
