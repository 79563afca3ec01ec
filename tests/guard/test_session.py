"""Exact incremental streaming: every check of a session equals a full recompute.

Real responses (tests/guard/fixtures) are cut at random character boundaries, with chat
markers and runs of white space added so that cleaning changes earlier text too; after
each append the session's score must equal `p_harmful` of the same text scored from
scratch, within 1e-4 in float32. Two-block backbones (the blocks above layer 1 dropped)
keep thousands of chunkings within minutes; exactness does not depend on depth, the
oracle test covers deep layers, and the prefix, long-text and worker tests' sessions
read layers 0 and 2 (a block between selected layers). A small max_length makes the windows roll over, so
rollbacks reach into completed windows too. Windows step through packed forwards
(`guard.packing`); the "static-" cases take static steps instead (`guard.graphs`, what a
GPU captures as CUDA graphs), run eagerly on CPU, and the "hf-" case one transformers
forward per window (backbones packing does not support). `append_all` runs several
sessions' checks together, and each must still equal its own full recompute.
"""

from __future__ import annotations

import random

import pytest
import torch

from guard import SirenGuard
from guard.session import append_all
from guard.text import model_text
from tests.guard.conftest import DEVICE

TOL = 1e-4

CASES = {
    # name: (artifact spec, with a prompt, chunkings)
    "response-only": (dict(pooling="residual_mean", layers=[0, 1], max_length=512), False, 400),
    "with-prompt-mlp": (dict(pooling="mlp_mean", layers=[0, 1], max_length=512), True, 300),
    "windows": (dict(pooling="residual_mean", layers=[0, 1], max_length=12), True, 300),
    # The same through static steps (`guard.graphs`; on CUDA every case takes them).
    "static-with-prompt-mlp": (dict(pooling="mlp_mean", layers=[0, 1], max_length=512), True, 150),
    "static-windows": (dict(pooling="residual_mean", layers=[0, 1], max_length=12), True, 150),
    # One transformers forward per window: what backbones without packed steps run.
    "hf-windows": (dict(pooling="residual_mean", layers=[0, 1], max_length=12), True, 100),
}


def noisy(text: str, rng: random.Random) -> str:
    """Real text with the things cleaning rewrites: markers, space runs, newline runs."""
    words = text.split(" ")
    for _ in range(3):
        i = rng.randrange(len(words))
        words[i] = words[i] + rng.choice(["  ", " \t ", "\n\n\n\n", "<|im_end|>", "<|im_"])
    return " ".join(words)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, artifact_factory, real_rows):
    spec, with_prompt, chunkings = CASES[request.param]
    folder = artifact_factory("session-" + request.param, scale=3.0, seed=1, **spec)
    static = True if request.param.startswith("static-") else None
    packed = False if request.param.startswith("hf-") else None
    guard = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, static_steps=static,
                                       packed_steps=packed)
    assert (guard.packer is None) == (packed is False)
    rng = random.Random(request.param)
    texts = []
    for row in rng.sample(real_rows, 4):
        prompt = row["prompt"][:60] if with_prompt else None
        texts.append((prompt, noisy(row["response"][:80], rng)))
    yield guard, texts, chunkings, rng
    guard.close()


def test_every_check_equals_a_full_recompute(case):
    guard, texts, chunkings, rng = case
    worst, checks, rolled_back = 0.0, 0, 0
    for prompt, response in texts:
        # Every character prefix once, from scratch: the oracle for every chunking.
        full = guard.p_harmful(
            [model_text(prompt=prompt, response=response[:c]) for c in range(len(response) + 1)]
        )
        for _ in range(chunkings // len(texts)):
            session = guard.stream(prompt=prompt)
            cut = 0
            while cut < len(response):
                step = rng.choice([1, 2, 3, 5, 8, 13, 30])
                delta = response[cut : cut + step]
                cut += len(delta)
                result = session.append(delta)
                worst = max(worst, abs(result.score - full[cut]))
                checks += 1
            rolled_back += session.rolled_back
    assert worst <= TOL, worst
    assert checks > 4 * chunkings  # really incremental: many checks per chunking
    assert rolled_back > 0  # BPE/cleaning rollbacks were exercised
    del session
    if guard.stepper is not None:
        assert guard.stepper.free_slots == guard.stepper.slots  # every window handed its slot back


def test_sessions_stepped_together_equal_full_recomputes(case):
    """`append_all`: the four texts' sessions take their chunks together, each round one
    packed forward (a session that has finished drops out); every score stays exact."""
    guard, texts, chunkings, rng = case
    fulls = [guard.p_harmful([model_text(prompt=p, response=r[:c]) for c in range(len(r) + 1)]) for p, r in texts]
    worst, rounds = 0.0, 0
    for _ in range(max(1, chunkings // 60)):  # rounds of all four texts (test_every_check has 1,400 chunkings)
        sessions = [guard.stream(prompt=prompt) for prompt, _ in texts]
        cuts = [0] * len(texts)
        while True:
            live = [k for k, (_, r) in enumerate(texts) if cuts[k] < len(r)]
            if not live:
                break
            appends = []
            for k in live:
                delta = texts[k][1][cuts[k] : cuts[k] + rng.choice([1, 3, 8, 13, 30])]
                cuts[k] += len(delta)
                appends.append((sessions[k], delta))
            for k, result in zip(live, append_all(appends)):
                worst = max(worst, abs(result.score - fulls[k][cuts[k]]))
                assert result.threshold == guard.default_threshold
            rounds += 1
        for session, (prompt, response) in zip(sessions, texts):
            assert session.response == response
    assert worst <= TOL, worst
    assert rounds > 10


def test_append_all_refuses_mixed_guards_and_repeated_sessions(artifact_factory):
    one, other = (SirenGuard.from_pretrained(artifact_factory(f"session-{name}", pooling="mlp_mean", layers=[1],
                                                              max_length=32), device=DEVICE, dtype=torch.float32)
                  for name in ("one", "other"))
    session = one.stream()
    assert append_all([]) == []
    with pytest.raises(ValueError, match="each session once"):
        append_all([(session, "a"), (session, "b")])
    with pytest.raises(ValueError, match="one guard"):
        append_all([(session, "a"), (other.stream(), "b")])
    assert session.response == ""  # refused before any text was taken


def fail_second_feed(guard, monkeypatch) -> list[int]:
    """From now on the guard's second `feed_rows` call raises; the calls made so far."""
    calls, feed_rows = [], guard.feed_rows

    def failing(feeds):
        calls.append(len(calls) + 1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return feed_rows(feeds)

    monkeypatch.setattr(guard, "feed_rows", failing)
    return calls


def test_a_failed_round_resets_its_sessions_and_the_next_check_is_exact(artifact_factory, real_rows,
                                                                         monkeypatch):
    """A feed that fails mid-round (after earlier rounds of the same update finished
    windows) leaves caches half-written: every session of the round forgets what it had
    cached, and its next check recomputes the whole text, exactly."""
    folder = artifact_factory("session-failure", pooling="residual_mean", layers=[0, 2], max_length=12,
                              scale=3.0, seed=1)
    # no prefix cache: a reset session would start again from its cached prompt (test_prefixes.py)
    guard = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, prefix_cache_mb=0)
    texts = [(r["prompt"][:40], r["response"][:150]) for r in real_rows[:3]]
    sessions = [guard.stream(prompt=p) for p, _ in texts]
    append_all([(s, r[:50]) for s, (_, r) in zip(sessions, texts)])
    calls = fail_second_feed(guard, monkeypatch)
    with pytest.raises(RuntimeError, match="out of memory"):
        append_all([(s, r[50:100]) for s, (_, r) in zip(sessions, texts)])
    assert calls == [1, 2]  # the first round ran, the second failed
    monkeypatch.undo()
    fed = [s.tokens_fed for s in sessions]
    for session, (prompt, response), result, before in zip(
            sessions, texts, append_all([(s, r[100:]) for s, (_, r) in zip(sessions, texts)]), fed):
        assert session.response == response
        assert abs(result.score - guard.p_harmful([model_text(prompt=prompt, response=response)])[0]) <= TOL
        assert session.tokens_fed - before >= session.tokens  # recomputed from scratch
    guard.close()


def test_a_window_finished_by_a_failed_update_is_not_reused(artifact_factory, real_rows, monkeypatch):
    """`set_response` may edit earlier text. An update to an edited text that fails after
    finishing its first window must not leave that window's score behind: when the next
    text returns to the old start, the old start is what gets scored."""
    folder = artifact_factory("session-failure", pooling="residual_mean", layers=[0, 2], max_length=12,
                              scale=3.0, seed=1)
    guard = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32)
    original = real_rows[0]["response"][:120]
    final = original + " and that is all."
    expected = guard.p_harmful([model_text(response=final)])[0]
    # the edit whose first window scores highest: a stale score for it would show
    edit = max((r["response"][:60] + original[60:] for r in real_rows),
               key=lambda t: guard.p_harmful([guard.tokenizer.decode(guard.plan.body(guard.tokenizer, t)[:12])])[0])
    session = guard.stream()
    session.set_response(original)
    calls = fail_second_feed(guard, monkeypatch)
    with pytest.raises(RuntimeError, match="out of memory"):
        session.set_response(edit)
    assert calls == [1, 2]  # the edited first window was fed and finished, then the next feed failed
    monkeypatch.undo()
    assert abs(session.set_response(final).score - expected) <= TOL
    guard.close()


def test_prompt_is_prefilled_once_and_tokens_count(case):
    guard, texts, _, _ = case
    prompt, response = texts[0]
    guard.prefixes.clear()  # the earlier tests left this prompt's prefill there (test_prefixes.py)
    session = guard.stream(prompt=prompt)
    prefilled = session.tokens_fed
    assert (prefilled > 0) == bool(prompt)
    if prompt and guard.stepper is None:  # the same prompt again starts from the cached prefill
        assert guard.stream(prompt=prompt).tokens_fed == 0
    result = session.append(response)
    assert result.score == pytest.approx(guard.score(prompt=prompt, response=response).score, abs=TOL)
    assert session.tokens == len(guard.plan.body(guard.tokenizer, model_text(prompt=prompt, response=response)))
    if guard.max_length >= 512:  # one window: the response cost its own tokens, no more
        assert session.tokens_fed <= session.tokens + 8


def test_surrogates_from_json_escapes_score_like_their_characters(case):
    """A client or upstream can send "\\ud83d\\ude00" split across chunks, or a lone
    "\\ud800": no tokenizer reads those, so cleaning re-pairs or replaces them."""
    guard, _, _, _ = case
    emoji = guard.score(prompt="hi", response="ok \U0001f600 done").score
    split = guard.stream(prompt="hi")
    for delta in ("ok \ud83d", "\ude00 done"):
        result = split.append(delta)
    assert result.score == pytest.approx(emoji, abs=TOL)
    assert guard.score("a\ud800b").score == pytest.approx(guard.score("a\ufffdb").score, abs=TOL)
    assert guard.stream(prompt="x\udc00").append("y").score == pytest.approx(
        guard.score(prompt="x\ufffd", response="y").score, abs=TOL)
