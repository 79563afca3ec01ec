"""The embedded guard behind the Scorer seam: thread budget and loading states."""

from __future__ import annotations

import asyncio
import os

import pytest

from policies.config import GuardConfig
from proxy.embedded import GuardNotReady, LoadingScorer, guard_threads


@pytest.mark.parametrize("cores,threads,expect", [(2, None, 1), (1, None, 1), (8, None, 7), (2, 2, 2)])
def test_guard_threads_leave_a_core_to_the_event_loop(monkeypatch, cores, threads, expect):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert guard_threads(GuardConfig(threads=threads)) == expect


def test_a_guard_that_fails_to_load_fails_every_call(tmp_path):
    scorer = LoadingScorer(GuardConfig(artifact=str(tmp_path / "no-such-artifact")))
    assert not scorer.wait(timeout=120)
    assert scorer.error is not None and not scorer.ready
    with pytest.raises(GuardNotReady, match="failed to load"):
        scorer.stream("x")


def test_a_guard_not_started_loads_nothing_until_started(tmp_path):
    """What `siren-proxy serve` holds while no route scores: no model, calls refused as
    not loaded; `start()` begins the load once."""
    scorer = LoadingScorer(GuardConfig(artifact=str(tmp_path / "no-such-artifact")), start=False)
    assert not scorer.started and not scorer.wait(timeout=0.1) and scorer.error is None
    with pytest.raises(GuardNotReady, match="not loaded"):
        scorer.stream("x")
    assert scorer.start() is True and scorer.started
    assert scorer.start() is False  # once
    assert not scorer.wait(timeout=120) and scorer.error is not None  # it did try: the artifact is missing


def test_the_guard_loads_with_the_configured_options(monkeypatch):
    import guard

    seen = {}

    def from_pretrained(artifact, **options):
        seen.update(options, artifact=artifact)
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(guard.SirenGuard, "from_pretrained", staticmethod(from_pretrained))
    scorer = LoadingScorer(GuardConfig(artifact="/a", device="cpu", dtype="float32", stream_slots=4,
                                       compile_steps=True, backbone="/b", prefix_cache_mb=8, emoji="read"))
    assert not scorer.wait(timeout=60)
    assert seen == {"artifact": "/a", "device": "cpu", "dtype": "float32", "trust_remote_code": False,
                    "stream_slots": 4, "compile_steps": True, "backbone": "/b", "prefix_cache_mb": 8,
                    "emoji": "read"}
    assert "stop after the call" in str(scorer.error)


def test_a_full_queue_is_scorer_busy_for_sessions_too(tmp_path):
    """The prompt stage opens a session: a full queue there must be `ScorerBusy` (503 with
    Retry-After under `on_guard_error: block`), as it is for `score`."""
    from guard.errors import QueueFull
    from guard.worker import GuardWorker
    from proxy.scorer import ScorerBusy

    scorer = LoadingScorer(GuardConfig(artifact=str(tmp_path / "no-such-artifact")))
    scorer.wait(timeout=120)
    worker = GuardWorker(object(), max_queue=0, num_threads=1)  # every job finds the queue full
    scorer._worker, scorer._busy = worker, QueueFull  # what a successful load leaves
    try:
        with pytest.raises(ScorerBusy, match="max_queue=0"):
            scorer.stream("hi")
        with pytest.raises(ScorerBusy, match="max_queue=0"):
            asyncio.run(scorer.score(prompt="hi"))
    finally:
        worker.close()


def test_a_guard_closed_while_it_loads_starts_no_worker(monkeypatch):
    """`serve` stopping during the load (Ctrl-C in the first seconds): the worker the load
    ends with is closed at once (its thread ran on, and `close()` had done nothing)."""
    import threading

    import guard

    loading, release = threading.Event(), threading.Event()

    class Loaded:
        prefixes = None
        tokenizer = None  # (`guard.tokens.prepare` takes it: not a tokenizer it can enter pieces of)

        def warm_up(self) -> float:
            return 0.0

    def from_pretrained(artifact, **options):
        loading.set()
        release.wait(10)
        return Loaded()

    def workers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "siren-guard-worker" and t.is_alive()}

    monkeypatch.setattr(guard.SirenGuard, "from_pretrained", staticmethod(from_pretrained))
    before = workers()  # (other tests' workers in this process, if any are still open)
    scorer = LoadingScorer(GuardConfig())
    assert loading.wait(10)
    scorer.close()
    release.set()
    assert not scorer.wait(timeout=10) and scorer.error is None
    assert workers() <= before
    assert scorer.start() is False  # closed: nothing loads again
