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


def test_the_guard_loads_with_the_configured_options(monkeypatch):
    import guard

    seen = {}

    def from_pretrained(artifact, **options):
        seen.update(options, artifact=artifact)
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(guard.SirenGuard, "from_pretrained", staticmethod(from_pretrained))
    scorer = LoadingScorer(GuardConfig(artifact="/a", device="cpu", dtype="float32", stream_slots=4,
                                       compile_steps=True, backbone="/b"))
    assert not scorer.wait(timeout=60)
    assert seen == {"artifact": "/a", "device": "cpu", "dtype": "float32", "trust_remote_code": False,
                    "stream_slots": 4, "compile_steps": True, "backbone": "/b"}
    assert "stop after the call" in str(scorer.error)
