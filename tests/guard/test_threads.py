"""One `SirenGuard` used from several threads scores as from one.

The reference reads `output_hidden_states` per call, so a `siren_guard` user may share
one guard between threads (a threaded web server) and get each text's own score. Ours
reads the selected states through forward hooks into one shared buffer, so calls from
two threads at once must not interleave: without the guard's lock, one call read
another's states (a wrong score, silently) or failed inside torch. The padded path is
what a GPU and backbones without packed steps take, hence `packed_steps=False` here.
"""

from __future__ import annotations

import threading

import pytest
import torch

from guard import SirenGuard
from guard.text import model_text
from tests.guard.conftest import DEVICE


@pytest.fixture(scope="module")
def guard(artifact_factory):
    folder = artifact_factory("threads", pooling="residual_mean", layers=[1, 3], scale=3.0, max_length=64)
    return SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, packed_steps=False)


def run_in_threads(work, n: int = 4) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k)
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_scores_from_several_threads_equal_serial_scores(guard):
    texts = [f"{i}: " + "the museum opens at nine " * (1 + i % 6) for i in range(16)]
    want = guard.p_harmful([model_text(t) for t in texts])
    got: dict[int, list[float]] = {i: [] for i in range(len(texts))}

    def work(k: int) -> None:
        for _ in range(4):
            for i in range(k, len(texts), 4):
                got[i].append(guard.score(texts[i]).score)

    assert run_in_threads(work) == []
    for i, scores in got.items():
        assert scores == pytest.approx([want[i]] * 4, abs=1e-5)


def test_sessions_in_several_threads_stay_exact(guard):
    response = "Sure, here is how the museum's ticket office works on weekdays and holidays. " * 2

    def work(k: int) -> None:
        session = guard.stream(prompt=f"question {k}")
        for i in range(0, len(response), 9):
            result = session.append(response[i : i + 9])
        expect = guard.score(prompt=f"question {k}", response=response).score
        assert result.score == pytest.approx(expect, abs=1e-4)

    assert run_in_threads(work) == []
