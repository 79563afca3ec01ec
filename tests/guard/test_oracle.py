"""The reference runtime `siren_guard` (PyPI llm-siren) is the oracle for our scores.

Synthetic artifacts (seeded random heads, a few layers and neurons) over the SmolLM2
backbone as a Hugging Face directory; both runtimes in float32 on CPU; every score must
agree within 1e-4, single and batched (packed, and padded), for texts of 1 to 600
tokens. The three configurations cover a top layer below the last block (blocks dropped
at load, raw residual), the last block as top layer (the reference reads the post-norm
state there), MLP-output pooling, and truncation at max_length.
"""

from __future__ import annotations

import pytest
import siren_guard
import torch

from guard import SirenGuard
from guard.text import model_text
from tests.guard.conftest import DEVICE

TOL = 1e-4
TORCH_THREADS = None  # whole-text forwards only: every thread (conftest)
TOKEN_COUNTS = (1, 17, 64, 200, 600)
SINGLE = (0, 2, 4)  # indices of TOKEN_COUNTS also scored one at a time

CONFIGS = {
    "residual-last-layer": dict(pooling="residual_mean", layers=[3, 11, 29], max_length=640, scale=3.0),
    "mlp": dict(pooling="mlp_mean", layers=[5, 17], max_length=640, scale=3.0),
    "residual-truncated": dict(pooling="residual_mean", layers=[4, 12, 20], max_length=512, scale=1.5),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, artifact_factory):
    spec = CONFIGS[request.param]
    folder = artifact_factory(request.param, **spec)
    ref = siren_guard.SirenGuard.from_pretrained(str(folder), device=DEVICE, dtype=torch.float32)
    # "truncate" so a 600-token text is read as the reference reads it when max_length=512.
    ours = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, long_text="truncate")
    ours.padded = SirenGuard.from_pretrained(folder, device=DEVICE, dtype=torch.float32, long_text="truncate",
                                             packed_steps=False)  # padded batches (a GPU's, other backbones')
    yield ref, ours
    ref.close()
    ours.padded.close()
    ours.close()
    del ref, ours


@pytest.fixture(scope="module")
def texts(pair, real_rows) -> list[str]:
    _, ours = pair
    tok = ours.tokenizer
    long = "\n\n".join(r["prompt"] + "\n" + r["response"] for r in real_rows)
    ids = tok(long, add_special_tokens=False)["input_ids"]
    out = [tok.decode(ids[:n]) for n in TOKEN_COUNTS]
    out[0] = "Hi"
    lengths = [len(ours.plan.body(tok, model_text(t))) for t in out]
    assert lengths[0] == 1 and max(lengths) >= 595, lengths
    return out


def test_single_scores_match_reference(pair, texts):
    ref, ours = pair
    for text in (texts[i] for i in SINGLE):
        assert ours.score(text).score == pytest.approx(ref.score(text).score, abs=TOL)


def test_batched_scores_match_reference(pair, texts):
    """On CPU `ours` packs the batch's windows (`guard.packing`); `ours.padded` pads them."""
    ref, ours = pair
    expected = [r.score for r in ref.score_batch(texts)]
    got = [r.score for r in ours.score_batch(texts)]
    assert got == pytest.approx(expected, abs=TOL)
    assert [r.score for r in ours.padded.score_batch(texts)] == pytest.approx(expected, abs=TOL)
    assert max(got) - min(got) > 0.01  # the head is not saturated: scores really move


def test_prompt_response_and_streaming_entry_points_match(pair, real_rows):
    ref, ours = pair
    row = real_rows[3]
    prompt, response = "  " + row["prompt"] + "<|im_end|>\n\n\n", row["response"][:300]
    for kwargs in ({"prompt": prompt, "response": response}, {"prompt": prompt}, {"response": response}):
        assert ours.score(**kwargs).score == pytest.approx(ref.score(**kwargs).score, abs=TOL)
    expected = ref.score_streaming(response, threshold=0.3)
    got = ours.score_streaming(response, threshold=0.3)
    assert got.score == pytest.approx(expected.score, abs=TOL)
    assert (got.is_harmful, got.threshold) == (expected.is_harmful, expected.threshold)
    assert ours.score("").score == pytest.approx(ref.score("").score, abs=TOL)


@pytest.mark.parametrize("threshold", [float("nan"), -0.1, 1.5, True, "0.5"])
def test_a_threshold_no_score_could_mean_is_refused(pair, threshold):
    """The reference takes these (a NaN threshold flags nothing); ours says so. 0 and 1 are
    thresholds."""
    _, ours = pair
    for call in (lambda: ours.score("hi", threshold=threshold), lambda: ours.score_batch(["hi"], threshold),
                 lambda: ours.score_streaming("hi", threshold), lambda: ours.stream(threshold=threshold)):
        with pytest.raises(ValueError, match="threshold must be a number in"):
            call()
    assert ours.score("hi", threshold=0).is_harmful and ours.score("hi", threshold=1).threshold == 1.0
