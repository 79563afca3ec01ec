"""Packed streaming steps (`guard.packing`): several windows' new tokens in one forward.

For each supported block family and each way of reading states, caches of different
lengths (an empty one included) are fed in rounds of uneven sizes, once through one
transformers forward per window (`Readout.rows` with a `DynamicCache`) and once packed:
every round's rows must agree, so the packed path also writes each cache as the model
would (a wrong cache would show in the next round).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from guard import SirenGuard
from guard.errors import BackboneError, WorkerClosed
from guard.packing import PackedStep
from guard.readout import Readout
from guard.text import model_text
from tests.guard.conftest import DEVICE
from tests.guard.test_graphs import COMMON, FAMILIES, READS, artifact_config, tiny_model

TOL = 1e-5


@pytest.mark.parametrize("read", sorted(READS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_rows_equal_one_forward_per_window(family, read):
    pooling, layers = READS[read]
    model = tiny_model(family)
    readout = Readout(model, artifact_config(pooling, layers, 300))
    packer = PackedStep(readout)
    rng = random.Random(family + read)
    prefixes = [0, 1, 9, 40]  # cached tokens before the first round: one window starts empty
    one, packed = [DynamicCache(config=model.config) for _ in prefixes], [DynamicCache(config=model.config) for _ in prefixes]
    for n, a, b in zip(prefixes, one, packed):
        if n:
            ids = torch.tensor([[rng.randrange(COMMON["vocab_size"]) for _ in range(n)]], device=DEVICE)
            readout.rows(ids, None, a)
            readout.rows(ids, None, b)
    for _ in range(3):
        feeds = [[rng.randrange(COMMON["vocab_size"]) for _ in range(rng.choice([1, 3, 16, 23]))] for _ in prefixes]
        expected = [readout.rows(torch.tensor([ids], device=DEVICE), None, cache)[0] for ids, cache in zip(feeds, one)]
        got = packer.rows(list(zip(packed, feeds)))
        for e, g in zip(expected, got):
            assert g.shape == e.shape and g.dtype == torch.float32
            assert torch.allclose(g, e, atol=TOL, rtol=0), (g - e).abs().max()
    assert [c.get_seq_length() for c in packed] == [c.get_seq_length() for c in one]


def test_packed_steps_refuse_what_they_cannot_do(artifact_factory, monkeypatch):
    readout = Readout(tiny_model("llama-gqa"), artifact_config("mlp_mean", [0, 2], 300))
    packer = PackedStep(readout)
    cache = DynamicCache(config=readout.model.config)
    with pytest.raises(ValueError, match="at least one token"):
        packer.rows([(cache, [])])
    with pytest.raises(ValueError, match="at least one token"):
        packer.rows([])
    with pytest.raises(ValueError, match="one feed per packed step"):
        packer.rows([(cache, [1, 2]), (cache, [3])])
    assert cache.get_seq_length() == 0  # refused before anything was written

    folder = artifact_factory("packed-unsupported", pooling="mlp_mean", layers=[0, 2], max_length=64)
    monkeypatch.setattr("guard.graphs.SUPPORTED", ("gemma",))
    with pytest.raises(BackboneError, match="cannot take packed steps: model_type 'llama'"):
        SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, packed_steps=True)
    auto = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32)
    assert auto.packer is None  # falls back to one transformers forward per window
    assert auto.stream(prompt="hi").append("there").score >= 0.0


def test_full_text_scores_are_packed_on_cpu(artifact_factory, real_rows, monkeypatch):
    """`p_harmful` (score, score_batch, the worker's batches) packs every window's tokens
    on CPU, no padding, and scores as the padded batches do; chunks of at most
    MAX_BATCH_TOKENS tokens, a longer window alone. On a GPU it keeps padded batches."""
    folder = artifact_factory("packed-full-text", pooling="mlp_mean", layers=[1, 2], max_length=24, scale=3.0)
    packed = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32)
    padded = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, packed_steps=False)
    texts = ["Hi"] + [model_text(prompt=r["prompt"][:n]) for r, n in zip(real_rows, (5, 40, 90, 200, 400, 900))]
    expected = padded.p_harmful(texts)
    assert max(expected) - min(expected) > 0.01  # the scores really move
    if DEVICE == "cpu":  # padded batches go through Readout.rows: packed ones never do
        monkeypatch.setattr(packed.readout, "rows", lambda *a, **k: pytest.fail("a padded forward ran"))
    assert packed.p_harmful(texts) == pytest.approx(expected, abs=TOL)
    forwards = []
    rows = packed.packer.rows
    monkeypatch.setattr(packed.packer, "rows", lambda feeds: forwards.append([len(ids) for _, ids in feeds])
                        or rows(feeds))
    monkeypatch.setattr("guard.siren.MAX_BATCH_TOKENS", 30)
    assert packed.p_harmful(texts) == pytest.approx(expected, abs=TOL)
    if DEVICE == "cpu":
        assert len(forwards) > 3 and all(sum(f) <= 30 or len(f) == 1 for f in forwards)
    else:
        assert forwards == []  # padded batches (tests/guard/test_worker.py)
    packed.close()
    padded.close()


@pytest.mark.parametrize("packed_steps", [True, False])
def test_a_closed_guard_refuses_to_score(artifact_factory, packed_steps):
    """`close()` removes the readout's hooks: a padded forward then died in a bare
    `KeyError: 0` (on a GPU, the only path), and a packed one scored on as if open."""
    folder = artifact_factory("closed", pooling="mlp_mean", layers=[1, 2], max_length=24)
    guard = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, packed_steps=packed_steps)
    guard.close()
    for call in (lambda: guard.score("hi"), lambda: guard.score_batch(["hi", "there"]),
                 lambda: guard.stream(prompt="hi")):
        with pytest.raises(WorkerClosed, match="this guard is closed"):
            call()
    guard.close()  # twice is fine
