"""The prefix cache (`guard.prefixes`): a session whose text starts with tokens an earlier
session ran continues from that session's state, and every score still equals a full
recompute of the same text.

Conversations are built from real rows (tests/guard/fixtures) the way the proxy's
`conversation` scope renders them, so each turn's prompt starts with the previous turn's;
the windows case (max_length 12) makes long prompts span many windows, so completed
windows are reused too; the static case keeps windows in slots, copies them out into
the cache and back into a free slot.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from guard import SirenGuard
from guard.session import append_all, common_prefix
from guard.text import model_text
from tests.guard.conftest import DEVICE

TOL = 1e-4

CASES = {
    "one-window": dict(pooling="mlp_mean", layers=[1, 2], max_length=512),
    "windows": dict(pooling="residual_mean", layers=[0, 2], max_length=12),
    "static-one-window": dict(pooling="mlp_mean", layers=[1, 2], max_length=512),
    "static-windows": dict(pooling="residual_mean", layers=[0, 2], max_length=12),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def guard(request, artifact_factory):
    folder = artifact_factory("prefixes-" + request.param, scale=3.0, seed=2, **CASES[request.param])
    static = True if request.param.startswith("static-") else None
    guard = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, static_steps=static)
    yield guard
    guard.close()


def conversations(rows, turns: int = 3) -> list[list[tuple[str, str]]]:
    """Each conversation's turns: (prompt as the `conversation` scope renders it, reply)."""
    out = []
    for i in range(0, 2 * turns, turns):
        history, convo = [], []
        for row in rows[i : i + turns]:
            user, reply = row["prompt"][:70], row["response"][:60]
            history.append(f"user: {user}")
            convo.append(("\n".join(history), reply))
            history.append(f"assistant: {reply}")
        out.append(convo)
    return out


def full(guard, prompt, response=None) -> float:
    return guard.p_harmful([model_text(prompt=prompt, response=response)])[0]


def test_each_turn_continues_the_last_and_scores_exactly(guard, real_rows):
    # what a turn may run again of the last turn's prompt: BPE merges at the join, and with
    # windows the start of the window the join falls in
    slack = 4 if guard.max_length > 100 else guard.plan.window + 4
    hits = guard.prefixes.hits
    for convo in conversations(real_rows):
        guard.prefixes.clear()
        before = 0
        for turn, (prompt, reply) in enumerate(convo):
            session = guard.stream(prompt=prompt)  # the cache holds the last turn's prompt
            assert session.score == pytest.approx(full(guard, prompt), abs=TOL)
            guard.prefixes.clear()
            alone = guard.stream(prompt=prompt)  # what it costs without (and the next turn's entry)
            assert alone.score == pytest.approx(session.score, abs=TOL)
            if turn:
                assert session.tokens_fed <= alone.tokens_fed - before + slack
            before = session.tokens
            for cut in range(0, len(reply), 9):
                result = session.append(reply[cut : cut + 9])
                assert result.score == pytest.approx(full(guard, prompt, reply[: cut + 9]), abs=TOL)
    assert guard.prefixes.hits >= hits + 4
    assert guard.prefixes.tokens_reused > 0


def test_a_shared_system_prompt_runs_only_what_follows_it(guard, real_rows):
    """`conversation_with_system`: one system prompt, then questions of different lengths,
    so the texts' windows are laid out differently. Each text continues the cached windows
    that start inside the shared part (the last one and the one before), so it runs only
    what follows that part, plus at most a stride of window layout and BPE merges."""
    system = "system: " + " ".join(row["response"][:120] for row in real_rows[:2])
    questions = ["user: Why?", "user: And then what happened next, exactly?", "user: Go on.",
                 "user: Can you say that again, but much shorter and simpler?", "user: Sure?"]
    tok = guard.tokenizer
    guard.prefixes.clear()
    seen = []
    for question in questions:
        prompt = f"{system}\n{question}"
        ids = guard.plan.body(tok, model_text(prompt=prompt))
        keep = max((common_prefix(ids, other) for other in seen), default=0)
        session = guard.stream(prompt=prompt)
        assert session.score == pytest.approx(full(guard, prompt), abs=TOL)
        if seen:
            assert session.tokens_fed <= len(ids) - keep + guard.plan.stride + 4, (question, keep, len(ids))
        seen.append(ids)


def test_texts_that_part_anywhere_score_exactly(guard, real_rows):
    """Random pairs: a real prompt, then another that keeps a random number of its
    characters and goes on differently, so the common prefix ends anywhere (inside a
    word, at a window's start or end). The second starts from the first's entry and must
    equal a full recompute, and so must a response appended to it."""
    rng = random.Random(7)
    worst, hits = 0.0, guard.prefixes.hits
    for _ in range(40):
        first, other = rng.sample(real_rows, 2)
        a = first["prompt"][:rng.randrange(20, 200)]
        b = a[:rng.randrange(0, len(a) + 1)] + other["response"][:rng.randrange(1, 120)]
        guard.prefixes.clear()
        guard.stream(prompt=a)
        session = guard.stream(prompt=b)
        worst = max(worst, abs(session.score - full(guard, b)))
        reply = other["prompt"][:40]
        worst = max(worst, abs(session.append(reply).score - full(guard, b, reply)))
    assert worst <= TOL, worst
    assert guard.prefixes.hits - hits >= 5  # the pairs that share enough took the entry


def test_a_long_prompt_continued_runs_only_its_new_tokens(guard, real_rows):
    """Completed windows keep their scores; the open ones continue from copies."""
    guard.prefixes.clear()
    prompt = real_rows[0]["prompt"][:200]
    first = guard.stream(prompt=prompt)
    again = guard.stream(prompt=prompt + " Answer briefly.")
    assert again.score == pytest.approx(full(guard, prompt + " Answer briefly."), abs=TOL)
    assert again.tokens_fed <= len(guard.tokenizer(" Answer briefly.")["input_ids"]) + 4 < first.tokens_fed / 4


def test_cached_windows_step_in_static_slots_while_any_is_free(guard, real_rows):
    """With static steps a taken window is copied into a free slot and steps there; with
    none free it steps eagerly from its own copy. Both score exactly, and the slots all
    come back."""
    if guard.stepper is None:
        pytest.skip("no static steps")
    stepper = guard.stepper
    guard.prefixes.clear()
    prompt = real_rows[5]["prompt"][:120]
    guard.stream(prompt=prompt)
    free = stepper.free_slots
    reply = real_rows[5]["response"][:80]
    taker = guard.stream(prompt=prompt)
    assert taker.tokens_fed == 0 and taker._active.slot is not None
    assert stepper.free_slots == free - 1
    assert taker.append(reply).score == pytest.approx(full(guard, prompt, reply), abs=TOL)
    held = [stepper.acquire() for _ in range(stepper.free_slots)]
    eager = guard.stream(prompt=prompt)
    assert eager.tokens_fed == 0 and eager._active.slot is None
    assert eager.append(reply).score == pytest.approx(full(guard, prompt, reply), abs=TOL)
    for slot in held:
        stepper.release(slot)
    del taker, eager
    assert stepper.free_slots == free


def test_an_entry_costs_two_window_copies_however_long_the_prompt(guard, real_rows, monkeypatch):
    """The last window and the one before it are copied once each, not every window the
    prefill completes, nor twice."""
    from guard.session import _Window

    guard.prefixes.clear()
    copies = []
    original = _Window.copy
    monkeypatch.setattr(_Window, "copy", lambda self: copies.append(self.start) or original(self))
    prompt = " ".join(row["prompt"][:100] for row in real_rows[:6])
    session = guard.stream(prompt=prompt)
    windows = len(guard.plan.spans(len(session._ids)))
    assert len(copies) == min(windows, 2) and len(guard.prefixes) == 1
    if guard.max_length < 100:
        assert windows > 10


def test_the_same_prompt_again_runs_nothing(guard, real_rows):
    guard.prefixes.clear()
    prompt = real_rows[1]["prompt"][:90]
    first = guard.stream(prompt=prompt)
    hits = guard.prefixes.hits  # counters are totals (the proxy's metrics): clear() keeps them
    second = guard.stream(prompt=prompt)
    assert second.score == first.score
    assert second.tokens_fed == 0 and guard.prefixes.hits == hits + 1


def test_an_entry_is_a_copy_that_later_steps_cannot_change(guard, real_rows):
    """Sessions that took an entry go on appending (and rolling back) in their own
    copies; the entry still scores the prompt exactly for the next session."""
    guard.prefixes.clear()
    prompt = real_rows[2]["prompt"][:80]
    guard.stream(prompt=prompt)
    takers = [guard.stream(prompt=prompt) for _ in range(3)]
    append_all([(s, real_rows[k]["response"][:120]) for k, s in enumerate(takers)])
    takers[0].set_response("")  # a rollback into the prompt's window
    takers[0].set_response("Sure.")
    later = guard.stream(prompt=prompt)
    assert later.score == pytest.approx(full(guard, prompt), abs=TOL)
    assert later.append(" No.").score == pytest.approx(full(guard, prompt, " No."), abs=TOL)


def test_salts_partition_the_cache(guard, real_rows):
    """A session takes only entries that sessions with its own salt left (the proxy salts
    by API key): the same prompt under another salt, or none, runs in full; the salt's own
    next turn continues from its entry. Each salt keeps its own entry of the same tokens."""
    guard.prefixes.clear()
    prompt = real_rows[4]["prompt"][:90]
    alice = guard.stream(prompt=prompt, cache_salt="alice")
    hits = guard.prefixes.hits
    bob = guard.stream(prompt=prompt, cache_salt="bob")
    anyone = guard.stream(prompt=prompt)
    assert guard.prefixes.hits == hits  # neither took alice's entry
    assert bob.tokens_fed == anyone.tokens_fed == alice.tokens_fed > 0
    assert bob.score == anyone.score == pytest.approx(alice.score, abs=TOL)
    assert len(guard.prefixes) == 3
    turn = prompt + " Thanks, and one more question."
    again = guard.stream(prompt=turn, cache_salt="alice")
    assert guard.prefixes.hits == hits + 1
    assert again.score == pytest.approx(full(guard, turn), abs=TOL)
    assert again.tokens_fed < alice.tokens_fed


def test_a_session_without_a_prompt_can_take_but_does_not_put(guard, real_rows):
    guard.prefixes.clear()
    session = guard.stream()
    session.append(real_rows[0]["response"][:100])
    assert len(guard.prefixes) == 0
    guard.stream(prompt=real_rows[0]["response"][:100])  # the response as another's prompt
    taker = guard.stream()
    result = taker.append(real_rows[0]["response"][:100] + " More.")
    assert result.score == pytest.approx(full(guard, None, real_rows[0]["response"][:100] + " More."), abs=TOL)


def test_a_failed_prefill_leaves_no_entry_and_the_next_session_is_exact(guard, real_rows, monkeypatch):
    guard.prefixes.clear()
    prompt = real_rows[3]["prompt"][:150]

    def failing(feeds):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(guard, "feed_rows", failing)
    if guard.stepper is not None:
        monkeypatch.setattr(guard.stepper, "feed", lambda *a, **k: failing(None))
    with pytest.raises(RuntimeError, match="out of memory"):
        guard.stream(prompt=prompt)
    monkeypatch.undo()
    assert len(guard.prefixes) == 0
    assert guard.stream(prompt=prompt).score == pytest.approx(full(guard, prompt), abs=TOL)


def test_an_entry_holds_its_tokens_not_a_windows_room(guard, real_rows):
    """An entry's windows are never stepped (a session steps `continued()` copies, given
    room for a whole window's rows there), so they hold the KV cache and rows of their own
    tokens: a short prompt's entry costs in proportion to its tokens, not the 2 MiB of
    rows a full window of the shipped head has room for. A session continuing it appends
    past the entry's length and stays exact."""
    guard.prefixes.clear()
    prompt = real_rows[0]["prompt"][:60]  # over MIN_REUSE tokens; with max_length 12, two windows
    guard.stream(prompt=prompt)
    [entry] = guard.prefixes._entries.values()
    assert any(window.n < guard.max_length for window in entry.windows)
    for window in entry.windows:
        assert window.rows.shape[0] == window.n
        assert all(layer.keys.shape[-2] == window.n for layer in window.cache.layers)
    kv = sum(t.numel() * t.element_size() for w in entry.windows for layer in w.cache.layers
             for t in (layer.keys, layer.values))
    assert entry.nbytes == 64 * len(entry.ids) + kv + sum(w.n * w.rows.shape[1] * 4 for w in entry.windows)
    session = guard.stream(prompt=prompt)
    assert session.tokens_fed == 0
    reply = real_rows[0]["response"][:40]
    assert session.append(reply).score == pytest.approx(full(guard, prompt, reply), abs=TOL)


def test_bounded_by_bytes_least_recently_used_out_first(artifact_factory, real_rows):
    folder = artifact_factory("prefixes-lru", pooling="mlp_mean", layers=[1, 2], max_length=512)
    guard = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, prefix_cache_mb=0.5)
    cache = guard.prefixes
    prompts = [row["prompt"][:60] for row in real_rows[:12]]
    sizes = []
    for prompt in prompts:
        guard.stream(prompt=prompt)
        sizes.append(cache.nbytes)
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) < len(prompts)  # some went out
    first, last = guard.stream(prompt=prompts[0]), guard.stream(prompt=prompts[-1])
    assert first.tokens_fed > 0 and last.tokens_fed == 0  # the oldest went first
    # one entry over the whole budget is not kept
    tiny = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, prefix_cache_mb=0.01)
    tiny.stream(prompt=real_rows[0]["prompt"][:400])
    assert len(tiny.prefixes) == 0 and tiny.prefixes.nbytes == 0
    off = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, prefix_cache_mb=0)
    assert off.prefixes is None
    assert off.stream(prompt=prompts[0]).score == pytest.approx(full(guard, prompts[0]), abs=TOL)
    for bad in (-1, math.inf):  # infinity was an OverflowError from int() ("unbounded" is not a bound)
        with pytest.raises(ValueError, match="prefix_cache_mb"):
            SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, prefix_cache_mb=bad)
    for g in (guard, tiny, off):
        g.close()
