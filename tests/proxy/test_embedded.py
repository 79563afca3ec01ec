"""The embedded guard behind the Scorer seam: thread budget and loading states."""

from __future__ import annotations

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
