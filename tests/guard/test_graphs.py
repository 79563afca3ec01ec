"""Static streaming steps (`guard.graphs`): the forward that CUDA graphs capture.

On CPU the steps run without capture, so these tests check everything but the capture
itself: the forward over the model's own modules equals the eager `Readout.rows` for
each supported block family (GQA, Qwen3's q/k norms, Qwen2's attention biases, the
post-norm top layer, MLP outputs), padding to step sizes and crops never leak into a
window, slots are handed back, and unsupported backbones fall back to eager steps.
With SIREN_TEST_DEVICE=cuda the same tests run with capture (README, "On a GPU").
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from guard import SirenGuard
from guard.artifact import ArtifactConfig
from guard.errors import BackboneError
from guard.graphs import STEP_SIZES, StaticStepper, unsupported_reason
from guard.head import SirenHead
from guard.readout import Readout
from guard.text import model_text
from tests.guard.conftest import DEVICE

TOL = 1e-4
HIDDEN = 64
COMMON = dict(vocab_size=512, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, max_position_embeddings=2048)
FAMILIES = {
    "llama-gqa": dict(model_type="llama", num_key_value_heads=2),
    "qwen2-bias": dict(model_type="qwen2", num_key_value_heads=2, use_sliding_window=False),
    "qwen3-qk-norm": dict(model_type="qwen3", num_key_value_heads=1, head_dim=32),
    "mistral": dict(model_type="mistral", num_key_value_heads=4, sliding_window=None),
}
READS = {
    # name: (pooling, layers): the last block of 4 is read post-norm in residual_mean
    "residual-top-normed": ("residual_mean", [0, 3]),
    "residual-raw": ("residual_mean", [1, 2]),
    "mlp": ("mlp_mean", [0, 2]),
}


def tiny_model(family: str) -> torch.nn.Module:
    spec = dict(FAMILIES[family])
    config = AutoConfig.for_model(spec.pop("model_type"), **COMMON, **spec)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(DEVICE).eval()


def artifact_config(pooling: str, layers: list[int], max_length: int) -> ArtifactConfig:
    gen = torch.Generator().manual_seed(1)
    return ArtifactConfig.from_dict({
        "task": "content",
        "base_model": {"model_id": "tiny", "revision": None},
        "siren_module": {
            "pooling_type": pooling, "selected_layers": layers,
            "layer_weights": {str(layer): 0.5 + 0.1 * layer for layer in layers},
            "selected_neurons_dict": {f"layer{layer}": torch.randperm(HIDDEN, generator=gen)[:5].tolist()
                                      for layer in layers},
        },
        "mlp": {"input_dim": 5 * len(layers), "layer_dims": [8], "dropout_rates": [0.0], "num_classes": 2},
        "inference": {"max_length": max_length, "default_threshold": 0.5},
    })


def head_for(config: ArtifactConfig) -> SirenHead:
    torch.manual_seed(2)
    head = SirenHead(config.input_dim, config.layer_dims, config.dropout_rates)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(4.0)
    return head.to(DEVICE).eval()


@pytest.mark.parametrize("read", sorted(READS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_steps_equal_the_eager_forward(family, read):
    pooling, layers = READS[read]
    max_length = 300
    config = artifact_config(pooling, layers, max_length)
    model = tiny_model(family)
    assert unsupported_reason(model, max_length) is None
    readout = Readout(model, config)
    head = head_for(config)
    rng = random.Random(family + read)
    ids = [rng.randrange(COMMON["vocab_size"]) for _ in range(max_length)]
    before = readout.rows(torch.tensor([ids], device=DEVICE))[0]  # (n, F)
    stepper = StaticStepper(readout, head, max_length, slots=2)  # fuses q/k/v, gate/up in place
    eager = readout.rows(torch.tensor([ids], device=DEVICE))[0]
    assert torch.equal(eager, before)  # the eager path reads the very same weights

    def expected(n: int) -> float:
        pooled = eager[:n].sum(dim=0, keepdim=True) / n * readout.weights
        return float(head.p_harmful(pooled)[0])

    slot = stepper.acquire()
    other = stepper.acquire()
    stepper.feed(other, 0, ids[::-1][:200])  # a neighbour slot's writes must not leak in
    n, checks, sizes = 0, 0, set()
    while n < max_length:
        if n > 10 and rng.random() < 0.3:  # a rollback: crop, then feed again
            n -= rng.randint(1, 7)
            assert abs(stepper.rescore(slot, n) - expected(n)) <= TOL
        m = 150 if n == 0 else min(rng.choice([1, 2, 3, 5, 16, 23, 40]), max_length - n)  # 150: a split feed
        sizes.add(next(b for b in STEP_SIZES if b >= min(m, STEP_SIZES[-1])))
        score = stepper.feed(slot, n, ids[n : n + m])
        n += m
        checks += 1
        assert abs(score - expected(n)) <= TOL, (n, score, expected(n))
    base = slot * stepper.length
    assert torch.allclose(stepper.rows[base : base + n], eager, atol=TOL, rtol=0)
    assert len(sizes) >= 4 and checks >= 8  # several padded step sizes
    with pytest.raises(ValueError, match="at most 300 tokens"):
        stepper.feed(slot, max_length, [1])
    with pytest.raises(ValueError, match="nothing to feed"):
        stepper.feed(slot, n, [])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_several_slots_step_together_as_each_alone(family):
    """`feed_many`: feeds of different lengths (one split past 128 tokens) at different
    starts of several slots, in one step padded to a batch size, score as each slot fed
    alone does, and leave the same rows."""
    pooling, layers = READS["residual-top-normed"]
    max_length = 300
    config = artifact_config(pooling, layers, max_length)
    readout = Readout(tiny_model(family), config)
    head = head_for(config)
    together = StaticStepper(readout, head, max_length, slots=5)
    alone = StaticStepper(readout, head, max_length, slots=5)
    assert together.batches == (1, 2, 4, 5)
    rng = random.Random(family)
    texts = [[rng.randrange(COMMON["vocab_size"]) for _ in range(max_length)] for _ in range(5)]
    a = [together.acquire() for _ in range(5)]
    b = [alone.acquire() for _ in range(5)]
    done = [0] * 5
    for lengths in ([150, 3, 40, 1, 0], [16, 16, 0, 9, 100], [1, 30, 77, 2, 5]):
        feeds = [(k, lengths[k]) for k in range(5) if lengths[k]]
        scores = together.feed_many([(a[k], done[k], texts[k][done[k] : done[k] + m]) for k, m in feeds])
        for (k, m), score in zip(feeds, scores):
            assert score == pytest.approx(alone.feed(b[k], done[k], texts[k][done[k] : done[k] + m]), abs=TOL)
            done[k] += m
    for k in range(5):
        x, y = a[k] * together.length, b[k] * alone.length
        assert torch.allclose(together.rows[x : x + done[k]], alone.rows[y : y + done[k]], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="one feed per step"):
        together.feed_many([(a[0], done[0], [1]), (a[0], done[0] + 1, [2])])
    with pytest.raises(ValueError, match="does not fit a slot"):  # a cache of other blocks
        together.load(a[0], [], together.rows[:3])


def test_unsupported_backbones_are_named():
    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    assert "gpt2" in unsupported_reason(gpt2, 256)
    sliding = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("mistral", **COMMON, num_key_value_heads=4, sliding_window=128))
    assert unsupported_reason(sliding, 256) == "sliding-window attention"
    assert unsupported_reason(sliding, 64) is None  # a window no text reaches changes nothing
    dynamic = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", **COMMON, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))
    assert "RoPE" in unsupported_reason(dynamic, 256)


@pytest.fixture(scope="module")
def small_artifact(artifact_factory):
    return artifact_factory("static-steps", pooling="mlp_mean", layers=[0, 2], max_length=64, scale=3.0)


def test_asking_for_static_steps_on_an_unsupported_backbone_is_an_error(small_artifact, monkeypatch):
    monkeypatch.setattr("guard.graphs.SUPPORTED", ("gemma",))
    with pytest.raises(BackboneError, match="cannot take static steps: model_type 'llama'"):
        SirenGuard.from_pretrained(small_artifact, device=DEVICE, dtype=torch.float32, static_steps=True)
    with pytest.raises(ValueError, match="stream_slots must be at least 1, got 0"):
        SirenGuard.from_pretrained(small_artifact, device=DEVICE, dtype=torch.float32, stream_slots=0)
    auto = SirenGuard.from_pretrained(small_artifact, device=DEVICE, dtype=torch.float32)
    assert auto.stepper is None  # auto falls back to eager steps, on any device
    assert auto.stream(prompt="hi").append("there").score >= 0.0


def test_sessions_beyond_the_slots_step_eagerly_and_slots_come_back(small_artifact, real_rows):
    guard = SirenGuard.from_pretrained(small_artifact, device=DEVICE, dtype=torch.float32,
                                       static_steps=True, stream_slots=1)
    off = SirenGuard.from_pretrained(small_artifact, device=DEVICE, dtype=torch.float32, static_steps=False)
    assert off.stepper is None
    stepper = guard.stepper
    row = real_rows[0]
    prompt, response = row["prompt"][:40], row["response"][:300]  # > 64 tokens: windows roll over
    first, second = guard.stream(prompt=prompt), guard.stream(prompt=prompt)
    assert first._active.slot == 0 and second._active.slot is None and stepper.free_slots == 0
    for cut in range(0, len(response), 37):
        full = guard.p_harmful([model_text(prompt=prompt, response=response[: cut + 37])])[0]
        a = first.append(response[cut : cut + 37]).score
        b = second.append(response[cut : cut + 37]).score
        assert abs(a - full) <= TOL and abs(b - full) <= TOL
    assert first.tokens > 64
    del first
    assert stepper.free_slots == 1  # a dropped session's window hands its slot back
    assert guard.stream(prompt=prompt)._active.slot == 0


def test_compiled_steps_trace_as_one_graph_and_stay_exact():
    """`compile_steps`: torch.compile(fullgraph=True) must trace the whole step; the
    "eager" backend checks the tracing on CPU in seconds (inductor on a GPU: README)."""
    max_length = 200
    config = artifact_config("residual_mean", [1, 3], max_length)
    readout = Readout(tiny_model("qwen3-qk-norm"), config)
    head = head_for(config)
    plain = StaticStepper(readout, head, max_length, slots=1, capture=False)
    traced = StaticStepper(readout, head, max_length, slots=1, capture=False, compile="eager")
    ids = list(range(7, 7 + max_length))
    a, b = plain.acquire(), traced.acquire()
    for start, end in ((0, 130), (130, 147), (147, 148), (140, 200)):  # 128 + 2, 32, 1, a crop and 64
        assert plain.feed(a, start, ids[start:end]) == pytest.approx(traced.feed(b, start, ids[start:end]), abs=1e-6)
    assert traced._compiled_step is not None


def test_warm_up_leaves_live_sessions_exact(small_artifact, real_rows):
    guard = SirenGuard.from_pretrained(small_artifact, device=DEVICE, dtype=torch.float32, static_steps=True,
                                       compile_steps="eager" if DEVICE == "cpu" else False)
    prompt, response = real_rows[2]["prompt"][:40], real_rows[2]["response"][:200]
    session = guard.stream(prompt=prompt)
    session.append(response[:100])
    assert guard.warm_up() > 0.0  # every step size ran on the scratch slot (traced on CPU)
    if guard.stepper.capture:
        assert sorted(guard.stepper._graphs) == sorted(guard.stepper._inputs)  # every (batch, step size)
        assert {size for _, size in guard.stepper._graphs} == set(STEP_SIZES)
    full = guard.p_harmful([model_text(prompt=prompt, response=response)])[0]
    assert session.append(response[100:]).score == pytest.approx(full, abs=TOL)
    off = SirenGuard.from_pretrained(small_artifact, device=DEVICE, dtype=torch.float32, static_steps=False)
    assert off.warm_up() == 0.0


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graph capture needs SIREN_TEST_DEVICE=cuda")
def test_on_cuda_steps_replay_captured_graphs(small_artifact, real_rows):
    guard = SirenGuard.from_pretrained(small_artifact, device=DEVICE, dtype=torch.float32)
    assert guard.stepper is not None and guard.stepper.capture  # auto: on for CUDA
    session = guard.stream(prompt="hello")
    response = real_rows[1]["response"][:200]
    for cut in range(0, len(response), 9):
        full = guard.p_harmful([model_text(prompt="hello", response=response[: cut + 9])])[0]
        assert abs(session.append(response[cut : cut + 9]).score - full) <= TOL
    assert len(guard.stepper._graphs) >= 2
