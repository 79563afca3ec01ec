"""Past max_length: sliding windows (default) keep scoring; "truncate" is the reference.

Harmful text placed after 1,000 tokens of benign text: the reference (and our
"truncate" mode) never reads it; windows do, and a streaming session that grows past
many windows ends on exactly the full windowed score.
"""

from __future__ import annotations

import math

import pytest
import siren_guard
import torch

from guard import SirenGuard
from guard.text import model_text
from tests.guard.conftest import DEVICE

TORCH_THREADS = None  # whole-text forwards mostly: every thread (conftest)

BENIGN = ("The museum opens at nine in the morning and closes at five. Visitors can buy "
          "tickets at the entrance or online, and children under twelve enter for free. ")


@pytest.fixture(scope="module")
def artifact(artifact_factory):
    return artifact_factory("long", pooling="residual_mean", layers=[0, 2], scale=3.0, max_length=128)


def test_harmful_text_after_1000_benign_tokens(artifact, real_rows):
    window = SirenGuard.from_pretrained(artifact, device=DEVICE, dtype=torch.float32)
    truncate = SirenGuard.from_pretrained(artifact, device=DEVICE, dtype=torch.float32, long_text="truncate")
    ref = siren_guard.SirenGuard.from_pretrained(str(artifact), device=DEVICE, dtype=torch.float32)
    tok = window.tokenizer
    # The synthetic head's "benign" and "harmful": the real texts it scores lowest and highest.
    segments = [BENIGN] + [r["response"][:300] for r in real_rows]
    scores = window.p_harmful([model_text(s) for s in segments])
    filler = segments[scores.index(min(scores))]
    tail = segments[scores.index(max(scores))]
    benign = (filler + "\n") * (1 + 1000 // len(tok(filler)["input_ids"]))
    assert len(tok(benign)["input_ids"]) >= 1000
    assert window.score(tail).score > window.score(benign).score + 0.05
    text = benign + "\n" + tail

    windowed = window.score(text).score
    assert truncate.score(text).score == pytest.approx(ref.score(text).score, abs=1e-4)
    assert truncate.score(text).score == pytest.approx(truncate.score(benign).score, abs=1e-4)
    assert windowed > truncate.score(text).score + 0.05  # the tail is read

    # The windowed score is the maximum over windows, each scored as a text of its own.
    plan, ids = window.plan, window.plan.body(tok, model_text(text))
    spans = plan.spans(len(ids))
    assert len(spans) > 10 and spans[-1][1] == len(ids)
    per_window = window.p_harmful([tok.decode(ids[s:e]) for s, e in spans[-3:]])
    assert windowed == pytest.approx(max(windowed, *per_window), abs=1e-4)

    session = window.stream()
    for i in range(0, len(text), 97):
        result = session.append(text[i : i + 97])
    assert result.score == pytest.approx(windowed, abs=1e-4)
    assert session.tokens_fed <= 2 * session.tokens + plan.window  # each token fed at most ~twice


def test_a_window_that_scores_nan_makes_the_text_nan(artifact, monkeypatch):
    """A NaN window (a broken head, an overflow in float16) must reach the caller as NaN,
    which the proxy reads as a guard failure; a maximum that skips it reports the other
    windows' score, or 0.0, and the text passes as benign."""
    guard = SirenGuard.from_pretrained(artifact, device=DEVICE, dtype=torch.float32)
    real, calls = guard.head.p_harmful, []

    def nan_after(n: int):  # the first n calls score for real, later ones are NaN
        def p_harmful(features):
            calls.append(1)
            p = real(features)
            return p if len(calls) <= n else torch.full_like(p, float("nan"))
        calls.clear()
        return p_harmful

    text = BENIGN * 40
    assert len(guard.plan.spans(len(guard.plan.body(guard.tokenizer, model_text(text))))) > 3
    monkeypatch.setattr(guard.head, "p_harmful", nan_after(0))
    assert math.isnan(guard.score("short").score)
    assert math.isnan(guard.score(text).score)
    assert all(math.isnan(r.score) for r in guard.score_batch(["short", text]))
    # A library caller that reads `is_harmful` fails closed on it too: a NaN is never "benign".
    assert guard.score(text).is_harmful and all(r.is_harmful for r in guard.score_batch(["short", text]))
    monkeypatch.setattr(guard.head, "p_harmful", nan_after(1))  # the session's first window is real
    result = guard.stream().append(text)
    assert math.isnan(result.score) and result.is_harmful


def test_a_batch_is_tokenised_in_one_call_as_each_text_alone(artifact, real_rows):
    """`score_batch` tokenises its texts in one call (`TokenPlan.bodies`): the same tokens as
    one call per text, for empty, special-token, long and emoji texts, so a mixed batch
    scores each text as `score` does, windows included."""
    guard = SirenGuard.from_pretrained(artifact, device=DEVICE, dtype=torch.float32)
    tok, plan = guard.tokenizer, guard.plan
    texts = ["", " ", "<|im_end|>\x04!", "🏳️‍🌈 pride", BENIGN * 12, *(r["response"] for r in real_rows[:5])]
    prepared = [model_text(t) for t in texts]
    assert plan.bodies(tok, prepared) == [plan.body(tok, t) for t in prepared]
    assert plan.bodies(tok, []) == []
    assert len(plan.spans(len(plan.body(tok, prepared[4])))) > 1  # the long one has windows
    batch = [r.score for r in guard.score_batch(texts[1:])]
    alone = [guard.score(t).score for t in texts[1:]]
    assert batch == pytest.approx(alone, abs=1e-5)
