"""The batching worker: same numbers as the sync guard, batches, backpressure, errors."""

from __future__ import annotations

import asyncio
import importlib
import math
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from guard import GuardError, QueueFull, ScoringError, SirenGuard, WorkerClosed
from guard.text import model_text
from guard.worker import GuardWorker
from tests.guard.conftest import DEVICE

TOL = 1e-4


@pytest.fixture(scope="module")
def guard(artifact_factory):
    folder = artifact_factory("worker", pooling="residual_mean", layers=[0, 2], scale=3.0, max_length=64)
    g = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32)
    yield g
    g.close()


@pytest.fixture(scope="module")
def padded(artifact_factory):
    """Padded batches: what a GPU runs, and backbones packing does not support (on CPU a
    batch's windows are packed: tests/guard/test_packing.py)."""
    folder = artifact_factory("worker", pooling="residual_mean", layers=[0, 2], scale=3.0, max_length=64)
    g = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, packed_steps=False)
    yield g
    g.close()


def record_forwards(guard, monkeypatch) -> list[tuple[int, int]]:
    """(padded, real) tokens of every forward `p_harmful` runs from now on."""
    forwards = []
    rows = guard._readout.rows

    def recording(ids, mask=None, cache=None):
        forwards.append((ids.numel(), int(mask.sum()) if mask is not None else ids.numel()))
        return rows(ids, mask, cache)

    monkeypatch.setattr(guard._readout, "rows", recording)
    return forwards


def uneven_texts(real_rows) -> list[str]:
    return [model_text(prompt=r["prompt"][: 10 + 7 * i]) for i, r in enumerate(real_rows[:12])]


def test_uneven_batches_are_cut_into_forwards_of_even_length(padded, real_rows, monkeypatch):
    from guard.siren import max_pad_share

    guard = padded
    share = max_pad_share(guard.device)
    texts = uneven_texts(real_rows)
    singles = [guard.p_harmful([t])[0] for t in texts]
    forwards = record_forwards(guard, monkeypatch)
    batched = guard.p_harmful(texts)
    assert batched == pytest.approx(singles, abs=TOL)
    assert sum(real for _, real in forwards) == sum(len(guard.plan.body(guard.tokenizer, t)) for t in texts)
    if math.isinf(share):  # SIREN_TEST_DEVICE=cuda: launches cost more than padding there
        assert len(forwards) == 1
    else:
        assert 1 < len(forwards) < len(texts)  # neither one padded forward nor one per text
        assert all(padded <= (1 + share) * real for padded, real in forwards)


def test_on_a_gpu_uneven_batches_go_in_one_forward(padded, real_rows, monkeypatch):
    guard = padded
    siren = importlib.import_module("guard.siren")
    assert math.isinf(siren.max_pad_share(torch.device("cuda")))
    monkeypatch.setattr(siren, "max_pad_share", lambda device: math.inf)
    texts = uneven_texts(real_rows)
    singles = [guard.p_harmful([t])[0] for t in texts]
    forwards = record_forwards(guard, monkeypatch)
    assert guard.p_harmful(texts) == pytest.approx(singles, abs=TOL)
    assert len(forwards) == 1


def test_concurrent_scores_are_batched_and_exact(guard, real_rows):
    items = [(r["prompt"][:80], r["response"][:120]) for r in real_rows[:16]]
    expected = guard.p_harmful([model_text(prompt=p, response=r) for p, r in items])
    worker = GuardWorker(guard, max_batch_size=8, max_wait_ms=50)
    try:
        async def main():
            singles = await asyncio.gather(*(worker.score(prompt=p, response=r) for p, r in items))
            many = await worker.score_many(items)
            return singles, many

        singles, many = asyncio.run(main())
    finally:
        worker.close()
    assert singles == pytest.approx(expected, abs=TOL)
    assert many == pytest.approx(expected, abs=TOL)
    assert worker.batches <= 4  # 16 callers in batches of at most 8, then one score_many


def test_stream_sessions_match_the_sync_session(guard, real_rows):
    worker = GuardWorker(guard)
    prompt, response = real_rows[5]["prompt"][:100], real_rows[5]["response"][:300]
    deltas = [response[i : i + 17] for i in range(0, len(response), 17)]
    try:
        async def main():
            a, b = worker.stream(prompt=prompt), worker.stream()
            assert await a.prompt_score() == pytest.approx(guard.score(prompt=prompt).score, abs=TOL)
            with pytest.raises(ValueError, match="no prompt"):
                await b.prompt_score()
            got_a, got_b = [], []
            for d in deltas:  # two interleaved sessions on one worker
                got_a.append(await a.append(d))
                got_b.append(await b.append(d))
            tokens = a.tokens
            await a.aclose()
            await b.aclose()
            return got_a, got_b, tokens

        got_a, got_b, tokens = asyncio.run(main())
    finally:
        worker.close()
    sync_a, sync_b = guard.stream(prompt=prompt), guard.stream()
    assert got_a == pytest.approx([sync_a.append(d).score for d in deltas], abs=TOL)
    assert got_b == pytest.approx([sync_b.append(d).score for d in deltas], abs=TOL)
    assert tokens == sync_a.tokens > 0


async def busy(worker, guard, monkeypatch) -> tuple[asyncio.Future, threading.Event]:
    """Keep the worker on one full-text job until the returned gate is set."""
    gate = threading.Event()
    p_harmful = guard.p_harmful

    def gated(prepared, given_up=None):
        gate.wait(5)
        return p_harmful(prepared, given_up)

    monkeypatch.setattr(guard, "p_harmful", gated)
    blocker = worker.submit_score(response="busy")  # queued now, not when a task first runs
    await queued(worker, 0)  # the worker has taken the blocker and waits on the gate
    return asyncio.wrap_future(blocker), gate


async def queued(worker, depth: int) -> None:
    """Wait (5 s at most) until `depth` jobs wait in the worker's queue."""
    deadline = time.monotonic() + 5
    while worker.queue_depth != depth:
        assert time.monotonic() < deadline, f"{worker.queue_depth} jobs queued, expected {depth}"
        await asyncio.sleep(0.01)


def test_a_new_sessions_prefill_goes_with_other_sessions_checks(guard, real_rows, monkeypatch):
    """An open (the prompt's prefill) waiting beside another session's append runs in
    the same packed round; both sessions score as they would alone."""
    worker = GuardWorker(guard)
    (p1, r1), (p2, r2) = [(r["prompt"][:80], r["response"][:150]) for r in real_rows[6:8]]
    try:
        async def main():
            a = worker.stream(prompt=p1)
            await asyncio.wrap_future(a._opened)
            blocker, gate = await busy(worker, guard, monkeypatch)
            b = worker.stream(prompt=p2)
            checked = asyncio.ensure_future(a.append(r1))
            await queued(worker, 2)
            before = (worker.stream_rounds, worker.stream_steps)
            gate.set()
            await blocker
            score_a, (prompt_b, tokens_b) = await checked, await asyncio.wrap_future(b._opened)
            rounds = (worker.stream_rounds - before[0], worker.stream_steps - before[1])
            return score_a, prompt_b, tokens_b, rounds, await b.append(r2)

        score_a, prompt_b, tokens_b, rounds, score_b = asyncio.run(main())
    finally:
        worker.close()
    assert rounds == (1, 2), (rounds, tokens_b)
    assert tokens_b == guard.stream(prompt=p2).tokens > 0
    assert prompt_b == pytest.approx(guard.score(prompt=p2).score, abs=TOL)  # the prefill's own score
    assert score_a == pytest.approx(guard.score(prompt=p1, response=r1).score, abs=TOL)
    assert score_b == pytest.approx(guard.score(prompt=p2, response=r2).score, abs=TOL)


def test_waiting_stream_steps_run_together_and_exact(guard, real_rows, monkeypatch):
    """Four sessions' appends queued behind a busy worker run as one packed round
    (`append_all`); later rounds pack whatever is waiting. Every score equals the same
    session stepped alone."""
    worker = GuardWorker(guard)
    texts = [(r["prompt"][:60], r["response"][:200]) for r in real_rows[:4]]
    deltas = [[r[i : i + 23] for i in range(0, len(r), 23)] for _, r in texts]
    try:
        async def main():
            sessions = [worker.stream(prompt=p) for p, _ in texts]
            for session in sessions:
                await asyncio.wrap_future(session._opened)
            assert worker.stream_steps == 4  # the four prompts' prefills (packed as they came)
            worker.stream_rounds = worker.stream_steps = 0
            blocker, gate = await busy(worker, guard, monkeypatch)
            first = [asyncio.ensure_future(s.append(d[0])) for s, d in zip(sessions, deltas)]
            await queued(worker, len(sessions))
            gate.set()
            await blocker
            got = [[await f] for f in first]
            assert (worker.stream_rounds, worker.stream_steps) == (1, 4)  # one round took all four

            async def rest(k):
                for d in deltas[k][1:]:
                    got[k].append(await sessions[k].append(d))

            await asyncio.gather(*(rest(k) for k in range(len(sessions))))
            for session in sessions:
                await session.aclose()
            return got

        got = asyncio.run(main())
    finally:
        worker.close()
    for (prompt, _), steps, scores in zip(texts, deltas, got):
        sync = guard.stream(prompt=prompt)
        assert scores == pytest.approx([sync.append(d).score for d in steps], abs=TOL)
    assert worker.stream_steps == sum(len(d) for d in deltas)
    assert worker.stream_rounds < worker.stream_steps - 3  # concurrent rounds packed more than the first


def test_a_packed_step_waits_briefly_for_the_other_open_sessions(guard):
    """With packed steps a lone append waits up to max_wait_ms for the other open
    sessions' next steps; with no other session open it runs at once."""
    worker = GuardWorker(guard, max_wait_ms=1000)
    try:
        async def main():
            sessions = [worker.stream(prompt=f"question {k}") for k in range(3)]
            for session in sessions:
                await asyncio.wrap_future(session._opened)
            opened = (worker.stream_rounds, worker.stream_steps)
            first = asyncio.ensure_future(sessions[0].append("Hello"))
            await asyncio.sleep(0.2)
            held = not first.done()  # the worker holds it for the other two sessions
            await asyncio.gather(first, sessions[1].append("a"), sessions[2].append("b"))
            rounds = (worker.stream_rounds - opened[0], worker.stream_steps - opened[1])
            await sessions[1].aclose()
            await sessions[2].aclose()
            started = time.monotonic()
            await sessions[0].append(" there")
            return held, rounds, time.monotonic() - started

        held, rounds, alone = asyncio.run(main())
    finally:
        worker.close()
    assert held and rounds == (1, 3)
    assert alone < 0.5  # the one open session does not wait for anybody


def test_a_session_closed_while_the_queue_is_full_is_closed(guard, monkeypatch):
    """A stream that ends while the queue is full (overload) still has its session
    closed. Its close used to be refused (QueueFull) and dropped: its open then ran,
    the session stayed counted open for good, and every later lone check waited
    max_wait_ms for it (the guard slower after each overload)."""
    worker = GuardWorker(guard, max_wait_ms=2000, max_queue=2)
    try:
        async def main():
            blocker, gate = await busy(worker, guard, monkeypatch)
            left = worker.stream(prompt="a client that leaves")  # its open waits in the queue
            filler = asyncio.wrap_future(worker.submit_score(response="x"))
            await queued(worker, 2)  # the queue is full
            await left.aclose()
            gate.set()
            await asyncio.gather(blocker, filler)
            session = worker.stream(prompt="the only open stream")
            await asyncio.wrap_future(session._opened)
            started = time.monotonic()
            await session.append(" hello")
            alone = time.monotonic() - started
            await session.aclose()
            return alone

        alone = asyncio.run(main())
        deadline = time.monotonic() + 5
        while worker.queue_depth and time.monotonic() < deadline:
            time.sleep(0.01)
        assert alone < 1.0  # not held for a session that no longer exists
    finally:
        worker.close()
    assert worker._open_sessions == 0


def test_a_session_used_as_a_context_manager_is_closed_on_exit(guard):
    """A session never closed keeps its cache and counts as open, so every later packed
    round waits `max_wait_ms` for it; `async with` closes it however the block ends."""
    worker = GuardWorker(guard, max_wait_ms=2000)
    try:
        async def main():
            async with worker.stream(prompt="hi") as session:
                await session.append(" there")
            with pytest.raises(RuntimeError, match="boom"):
                async with worker.stream(prompt="hi") as failing:
                    raise RuntimeError("boom")
            return session, failing

        session, failing = asyncio.run(main())
        deadline = time.monotonic() + 5
        while worker._open_sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        assert session._closed and failing._closed and worker._open_sessions == 0
    finally:
        worker.close()


def test_a_failed_packed_round_fails_each_caller_and_sessions_recover(guard, real_rows, monkeypatch):
    worker = GuardWorker(guard, max_wait_ms=1000)  # the round waits for all three sessions
    texts = [(r["prompt"][:50], r["response"][:120]) for r in real_rows[:3]]
    feed_rows = guard.feed_rows

    def failing(feeds):
        raise RuntimeError("out of memory")

    try:
        async def main():
            sessions = [worker.stream(prompt=p) for p, _ in texts]
            for session in sessions:  # prompts prefilled before the failure
                await asyncio.wrap_future(session._opened)
            worker.stream_rounds = worker.stream_steps = 0
            monkeypatch.setattr(guard, "feed_rows", failing)
            failed = await asyncio.gather(*(s.append(r[:60]) for s, (_, r) in zip(sessions, texts)),
                                          return_exceptions=True)
            monkeypatch.setattr(guard, "feed_rows", feed_rows)
            scores = await asyncio.gather(*(s.append(r[60:]) for s, (_, r) in zip(sessions, texts)))
            return failed, scores

        failed, scores = asyncio.run(main())
    finally:
        worker.close()
    assert worker.stream_rounds == 2 and worker.stream_steps == 6  # one failed round of three, one good
    for error in failed:
        assert isinstance(error, ScoringError) and "RuntimeError: out of memory" in str(error)
    expected = guard.p_harmful([model_text(prompt=p, response=r) for p, r in texts])
    assert scores == pytest.approx(expected, abs=TOL)


def test_a_session_whose_prefill_failed_recovers_at_its_next_append(guard, real_rows, monkeypatch):
    """A failed round fails its checks and resets their sessions (above); an open's prefill
    is such a check: `prompt_score()` keeps its error, but the next append reads the whole
    text, exactly, rather than raising the prefill's error again at every append."""
    worker = GuardWorker(guard)
    prompt, response = real_rows[0]["prompt"][:200], real_rows[0]["response"][:120]
    feed_rows = guard.feed_rows

    def failing(feeds):
        raise RuntimeError("out of memory")

    try:
        async def main():
            monkeypatch.setattr(guard, "feed_rows", failing)
            session = worker.stream(prompt=prompt)
            with pytest.raises(ScoringError):
                await session.prompt_score()
            monkeypatch.setattr(guard, "feed_rows", feed_rows)
            first = await session.append(response[:60])
            second = await session.append(response[60:])
            with pytest.raises(ScoringError):
                await session.prompt_score()
            await session.aclose()
            return first, second

        first, second = asyncio.run(main())
    finally:
        worker.close()
    assert [first, second] == pytest.approx(guard.p_harmful(
        [model_text(prompt=prompt, response=response[:60]), model_text(prompt=prompt, response=response)]), abs=TOL)


def test_appends_are_taken_one_per_session_in_order():
    """Waiting opens and appends of other sessions join the first; a session met again
    (a second append, its close) is left in place, and so is every other job, in order."""
    from guard.worker import _Job

    worker = GuardWorker(_Fake(), max_stream_batch=3)
    a, b, c, d = "abcd"
    queued = [_Job("texts", texts=["t"]), _Job("open", session=b), _Job("append", session=a),
              _Job("append", session=c), _Job("close", session=c), _Job("append", session=c),
              _Job("append", session=d)]
    first = _Job("append", session=a)
    with worker._cond:  # the worker thread cannot take jobs while this is held
        worker._jobs.extend(queued)
        batch = worker._more_steps(first)
        left = list(worker._jobs)
        worker._jobs.clear()
    worker.close()
    assert batch == [first, queued[1], queued[3]]  # a, b, c: max_stream_batch 3 reached
    assert left == [queued[0], queued[2], queued[4], queued[5], queued[6]]
    with pytest.raises(ValueError, match="max_stream_batch must be at least 1"):
        GuardWorker(_Fake(), max_stream_batch=0)


def test_with_static_steps_a_round_takes_as_many_sessions_as_there_are_slots():
    """One replay steps every slot (`StaticStepper.feed_many`), so a round is not cut at
    max_batch_size; without static steps it is."""
    static = _Fake()
    static.stepper = SimpleNamespace(slots=64)
    for fake, expected in ((static, 64), (_Fake(), 16)):
        worker = GuardWorker(fake, max_batch_size=16)
        assert worker.max_stream_batch == expected
        worker.close()
    worker = GuardWorker(static, max_batch_size=16, max_stream_batch=8)  # as asked
    assert worker.max_stream_batch == 8
    worker.close()


class _Fake:
    """Stands in for SirenGuard where the test is about the worker, not the model."""

    def __init__(self, error: Exception | None = None, gate: threading.Event | None = None):
        self.error, self.gate = error, gate

    def p_harmful(self, texts, given_up=None):
        if self.gate is not None:
            self.gate.wait(5)
        if self.error is not None:
            raise self.error
        return [0.25] * len(texts)

    def stream(self, prompt=None, **options):
        raise RuntimeError("no sessions here")


def test_model_errors_reach_the_caller_as_guard_errors():
    worker = GuardWorker(_Fake(error=RuntimeError("boom")))
    try:
        with pytest.raises(ScoringError) as info:
            asyncio.run(worker.score(response="x"))
        assert isinstance(info.value.__cause__, RuntimeError)

        async def open_and_append():
            session = worker.stream(prompt="p")
            return await session.append("x")

        with pytest.raises(GuardError):
            asyncio.run(open_and_append())
        assert worker.ready  # the worker survives a failing job
    finally:
        worker.close()


def test_full_queue_raises_at_once_and_close_fails_pending():
    gate = threading.Event()
    worker = GuardWorker(_Fake(gate=gate), max_batch_size=1, max_queue=3)
    first = worker.submit_score(response="a")  # taken by the worker, which then blocks
    deadline = time.monotonic() + 5
    while worker._jobs and time.monotonic() < deadline:
        time.sleep(0.01)
    pending = [worker.submit_score(response=str(i)) for i in range(3)]
    started = time.monotonic()
    with pytest.raises(QueueFull):
        worker.submit_score(response="one too many")
    assert time.monotonic() - started < 0.5
    threading.Timer(0.2, gate.set).start()
    worker.close()
    assert first.result(timeout=5) == [0.25]
    for future in pending:
        with pytest.raises(WorkerClosed):
            future.result(timeout=5)
    assert not worker.ready
    with pytest.raises(WorkerClosed):
        worker.submit_score(response="late")


def test_the_event_loop_keeps_running_while_the_model_works():
    gate = threading.Event()
    worker = GuardWorker(_Fake(gate=gate))

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while not gate.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        threading.Timer(0.3, gate.set).start()
        score, _ = await asyncio.gather(worker.score(response="x"), ticker())
        return score, ticks

    try:
        score, ticks = asyncio.run(main())
    finally:
        worker.close()
    assert score == 0.25 and ticks >= 10


# -- callers that leave: no long text is read on for nobody ---------------------------------

def long_prompt(real_rows) -> str:
    return "\n".join(r["prompt"] + " " + r["response"] for r in real_rows[:12])  # ~40 windows of 64


def slowed_rounds(monkeypatch) -> list[int]:
    """Each packed round of the sessions' feeds (its feed count, appended as it starts)
    takes 20 ms more, so that a test can act between rounds."""
    import guard.session as session_module

    rounds, feed_round = [], session_module._feed_round

    def slow_round(g, feeds):
        rounds.append(len(feeds))
        time.sleep(0.02)
        return feed_round(g, feeds)

    monkeypatch.setattr(session_module, "_feed_round", slow_round)
    return rounds


def test_a_prefill_whose_caller_left_stops_between_windows(guard, real_rows, monkeypatch):
    """A session's prefill runs a round per window; when its caller's await is cancelled
    (a client gone, a deadline passed) the worker stops it at the next round and serves
    the queue, rather than reading a long prompt to its end for nobody."""
    prompt = long_prompt(real_rows)
    windows = len(guard.plan.spans(len(guard.plan.body(guard.tokenizer, model_text(prompt=prompt)))))
    assert windows >= 20
    rounds = slowed_rounds(monkeypatch)
    worker = GuardWorker(guard)

    async def main():
        session = worker.stream(prompt)
        waiting = asyncio.ensure_future(session.prompt_score())
        while not rounds:
            await asyncio.sleep(0.005)
        waiting.cancel()
        after = await worker.score(response="a short text after it")  # served once the prefill stops
        await session.aclose()
        return after

    try:
        after = asyncio.run(main())
    finally:
        worker.close()
    assert len(rounds) < windows / 2, (len(rounds), windows)
    assert after == pytest.approx(guard.p_harmful([model_text(response="a short text after it")])[0], abs=TOL)


def test_a_session_whose_prefill_wait_was_cancelled_goes_on(guard, real_rows, monkeypatch):
    """A caller that stops waiting for `prompt_score()` (`asyncio.wait_for`'s timeout)
    stops the prefill, and nothing more: the session's next append reads everything and
    is exact, and a later `prompt_score()` says the score was not kept, as a `GuardError`.
    A `CancelledError` there would reach a task nobody cancelled, at every later call."""
    from guard.errors import Abandoned

    prompt = long_prompt(real_rows)[:3000]
    rounds = slowed_rounds(monkeypatch)
    worker = GuardWorker(guard)

    async def main():
        session = worker.stream(prompt)
        waiting = asyncio.ensure_future(session.prompt_score())
        other = asyncio.ensure_future(session.prompt_score())  # a second caller, not cancelled
        while not rounds:
            await asyncio.sleep(0.005)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        with pytest.raises(Abandoned):
            await other
        score = await session.append("Sure, here it is.")
        with pytest.raises(Abandoned):
            await session.prompt_score()
        again = await session.append(" More.")
        await session.aclose()
        return score, again

    try:
        score, again = asyncio.run(main())
    finally:
        worker.close()
    assert score == pytest.approx(guard.p_harmful([model_text(prompt=prompt, response="Sure, here it is.")])[0],
                                  abs=TOL)
    assert again == pytest.approx(
        guard.p_harmful([model_text(prompt=prompt, response="Sure, here it is. More.")])[0], abs=TOL)


def test_a_session_stopped_part_way_reads_everything_at_its_next_check(guard, real_rows):
    """`append_all(..., given_up=...)`: the session given up scores NaN and forgets its
    cache; its next check re-reads the whole text (exact); the others are unaffected."""
    from guard.session import append_all

    prompt = long_prompt(real_rows)[:1500]
    left, stays = guard.stream(prompt=prompt), guard.stream(prompt="otters?")
    first = append_all([(left, "Sure, "), (stays, "Otters ")], given_up=[lambda: True, lambda: False])
    assert math.isnan(first[0].score)
    assert first[1].score == pytest.approx(guard.p_harmful([model_text(prompt="otters?", response="Otters ")])[0],
                                           abs=TOL)
    again = left.append("here it is.")
    assert left.response == "Sure, here it is."
    assert again.score == pytest.approx(
        guard.p_harmful([model_text(prompt=prompt, response="Sure, here it is.")])[0], abs=TOL)


def test_a_full_text_scoring_nobody_waits_for_stops_between_forwards(guard, real_rows, monkeypatch):
    import guard.siren as siren_module
    from guard.errors import Abandoned

    monkeypatch.setattr(siren_module, "MAX_BATCH_TOKENS", 256)  # several forwards for short texts
    texts = [model_text(prompt=r["prompt"] + " " + r["response"][:400]) for r in real_rows[:4]]
    checks = []

    def gives_up():
        checks.append(1)
        return len(checks) > 1  # after the first forward

    with pytest.raises(Abandoned):
        guard.p_harmful(texts, given_up=gives_up)
    checks.clear()
    assert guard.p_harmful(texts, given_up=lambda: bool(checks.append(1))) == guard.p_harmful(texts)
    assert len(checks) >= 4  # the whole scoring takes several forwards; the abandoned one ran one


def test_an_append_a_full_queue_refuses_is_sent_with_the_next(guard, monkeypatch):
    """A caller that catches `QueueFull` and goes on appending loses no text: the refused
    delta goes first in the next append (it was dropped, and the session scored a text
    without it, unlike an append whose scoring failed)."""
    worker = GuardWorker(guard, max_queue=1)
    try:
        async def main():
            session = worker.stream(prompt="q")
            await asyncio.wrap_future(session._opened)
            blocker, gate = await busy(worker, guard, monkeypatch)
            filler = asyncio.wrap_future(worker.submit_score(response="x"))
            await queued(worker, 1)
            with pytest.raises(QueueFull):
                await session.append(" first part,")
            gate.set()
            await asyncio.gather(blocker, filler)
            score = await session.append(" second part.")
            await session.aclose()
            return score

        score = asyncio.run(main())
    finally:
        worker.close()
    assert score == pytest.approx(guard.score(prompt="q", response=" first part, second part.").score, abs=1e-4)
