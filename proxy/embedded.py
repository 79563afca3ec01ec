"""The embedded SIREN guard behind the `Scorer` seam, loading on a background thread."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

from policies.config import GuardConfig

from .scorer import ScorerBusy

logger = logging.getLogger(__name__)


def guard_threads(settings: GuardConfig) -> int:
    """Torch threads for the guard: `guard.threads`, else one less than the cores.

    The event loop needs a core of its own: with every core in torch's OpenMP pool, each
    step waits on a thread the proxy is using, and on 2 cores a 16-token step was measured
    8-20x slower with 2 torch threads than with 1.
    """
    if settings.threads is not None:
        return settings.threads
    return max(1, (os.cpu_count() or 1) - 1)


class GuardNotReady(RuntimeError):
    """The guard is still loading, or failed to load."""


class LoadingScorer:
    """A `Scorer` whose model loads on a background thread.

    Calls made before it is ready raise `GuardNotReady`, which the proxy treats as any
    other guard failure (the policy's `on_guard_error` decides). With `start=False` it
    loads nothing until `start()`: a proxy whose routes score nothing at start-up loads
    the model only when a reload makes one score.
    """

    def __init__(self, settings: GuardConfig, *, start: bool = True) -> None:
        self.settings = settings
        self._worker = None
        self._metrics = None
        self._busy: type[BaseException] = ScorerBusy
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._load, name="guard-loader", daemon=True)
        self._start_lock = threading.Lock()  # also orders `close` against a load's end
        self._closed = False
        if start:
            self.start()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> bool:
        """Begin loading on the background thread; True if this call began it."""
        with self._start_lock:
            if self.started or self._closed:
                return False
            self._thread.start()
            return True

    def _load(self) -> None:
        try:
            from guard import SirenGuard
            from guard.worker import GuardWorker

            s = self.settings
            options = {"backbone": s.backbone} if s.backbone is not None else {}
            guard = SirenGuard.from_pretrained(s.artifact, device=s.device, dtype=s.dtype,
                                               trust_remote_code=s.trust_remote_code,
                                               stream_slots=s.stream_slots, compile_steps=s.compile_steps,
                                               prefix_cache_mb=s.prefix_cache_mb, emoji=s.emoji,
                                               **options)
            seconds = guard.warm_up()  # CUDA graphs (and compiled steps) before the first stream
            if seconds:
                logger.info("static streaming steps captured in %.1f s", seconds)
            from guard.tokens import prepare

            prepare(guard.tokenizer)  # the merge table checked here, not on the first stream's check
            from guard.errors import QueueFull

            self._busy = QueueFull
            worker = GuardWorker(guard, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                                 max_queue=s.max_queue, num_threads=guard_threads(s))
            with self._start_lock:
                closed = self._closed
                if not closed:
                    self._worker = worker
            if closed:  # closed while it loaded (the proxy stopping): nobody will use it
                worker.close()
                return
            if self._metrics is not None:
                self._wire(self._metrics)
            logger.info("guard ready")
        except BaseException as exc:  # noqa: BLE001 - reported through /readyz and every call
            self.error = exc
            logger.error("guard failed to load: %s", exc)

    def wait(self, timeout: float | None = None) -> bool:
        if self.started:
            self._thread.join(timeout)
        return self.ready

    @property
    def ready(self) -> bool:
        return self._worker is not None and self._worker.ready

    def _get(self):
        if self._worker is None:
            if self.error is not None:
                raise GuardNotReady("the guard failed to load")
            raise GuardNotReady("the guard is still loading" if self.started else "the guard is not loaded")
        return self._worker

    def watch(self, metrics) -> None:
        """Report the worker's batch sizes and queue depth (from when it has loaded)."""
        self._metrics = metrics
        if self._worker is not None:
            self._wire(metrics)

    def _wire(self, metrics) -> None:
        worker = self._worker
        worker.on_batch = metrics.batch_size.observe
        worker.on_stream_round = metrics.stream_batch_size.observe
        metrics.watch_queue(lambda: worker.queue_depth)
        if worker.guard.prefixes is not None:
            metrics.watch_prefixes(worker.guard.prefixes)

    async def score(self, *, prompt=None, response=None) -> float:
        try:
            return await self._get().score(prompt=prompt, response=response)
        except self._busy as exc:
            raise ScorerBusy(str(exc)) from exc

    async def score_many(self, items: Sequence[tuple[str | None, str | None]]) -> list[float]:
        try:
            return await self._get().score_many(items)
        except self._busy as exc:
            raise ScorerBusy(str(exc)) from exc

    def stream(self, prompt=None, *, cache_salt=None):
        try:
            return self._get().stream(prompt, cache_salt=cache_salt)
        except self._busy as exc:
            raise ScorerBusy(str(exc)) from exc

    def close(self) -> None:
        """Close the worker; one still loading is closed as its load ends."""
        with self._start_lock:
            self._closed = True
            worker = self._worker
        if worker is not None:
            worker.close()
