"""`siren-proxy eval`: metrics checked against hand-computed values, and the end-to-end
report (JSON, PNG, lexical baseline) checked against counts made here from scores of the
reference runtime `siren_guard`, an independent scoring path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import siren_guard
import torch
from sklearn.metrics import roc_auc_score

from guard.training import mlp
from guard.training.cli import register
from guard.training.data import load_rows
from guard.training.evaluate import EvalOptions, evaluate, table
from guard.training.metrics import at_threshold, auroc, best_threshold, report
from guard.training.train import TrainOptions, train

FIXTURES = Path(__file__).parent / "fixtures"
TRAIN = FIXTURES / "train_small.jsonl"
HELDOUT = FIXTURES / "train_heldout.jsonl"

# A tiny fixture, worked by hand below.
LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
SCORES = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05, 0.5]


def test_metrics_at_default_threshold_by_hand():
    m = at_threshold(LABELS, SCORES, 0.5)
    # flagged (>= 0.5): harmful 0.9 0.8 0.6, benign 0.7 0.5
    assert (m.tp, m.fn, m.fp, m.tn) == (3, 1, 2, 4)
    assert m.precision == pytest.approx(3 / 5)
    assert m.recall == pytest.approx(3 / 4)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.fpr == pytest.approx(2 / 6)
    # benign class: precision 4/5, recall 4/6, F1 8/11; macro = (2/3 + 8/11) / 2
    assert m.macro_f1 == pytest.approx((2 / 3 + 8 / 11) / 2)
    assert m.accuracy == pytest.approx(0.7)


def test_auroc_by_hand():
    # harmful 0.9 and 0.8 beat all 6 benign, 0.6 beats 5, 0.3 beats 3: 20 of 24 pairs
    assert auroc(LABELS, SCORES) == pytest.approx(20 / 24)
    assert auroc([1, 0], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert auroc([1, 1], [0.2, 0.9]) is None


def test_best_threshold_by_hand():
    # For t in (0.5, 0.6]: tp 3, fp 1, fn 1, tn 5 -> F1 3/4 and 5/6, the best macro F1.
    best = best_threshold(LABELS, SCORES)
    assert best.threshold == 0.51
    assert best.macro_f1 == pytest.approx((3 / 4 + 5 / 6) / 2)


def test_single_class_sets_report_recall_or_fpr_only():
    harmful = report("h", [1, 1, 1, 1], [0.9, 0.2, 0.6, 0.5], 0.5)
    assert harmful.default.recall == pytest.approx(3 / 4)
    assert harmful.default.fpr is None and harmful.default.macro_f1 is None
    assert harmful.auroc is None and harmful.best is None
    benign = report("b", [0, 0, 0, 0, 0], [0.9, 0.2, 0.6, 0.1, 0.3], 0.5)
    assert benign.default.fpr == pytest.approx(2 / 5)
    assert benign.default.recall is None and benign.default.precision == 0.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-artifact") / "head"
    train(TrainOptions(data=(str(TRAIN),), out=out, exclude=(str(HELDOUT),), seed=0,
                       extract_layers=8, n_layers=4, max_neurons=16, probe_c=0.5,
                       grid=(mlp.HeadSpec(hidden=(32,), dropout=0.1, weight_decay=1e-3),),
                       cache_root=tmp_path_factory.getbasetemp() / "siren-features", progress=False))
    return out


def test_eval_report_matches_counts_from_reference_scores(trained, tmp_path, backbone_dir, tmp_path_factory):
    harmful_only = tmp_path / "harmful_only.jsonl"
    harmful_only.write_text("".join(line for line in HELDOUT.read_text().splitlines(keepends=True)
                                    if json.loads(line)["label"] == 1))
    out = evaluate(EvalOptions(artifact=trained, data=(str(HELDOUT), str(harmful_only)),
                               report=tmp_path / "report.json", plot=tmp_path / "curves.png",
                               cache_root=tmp_path_factory.getbasetemp() / "siren-features",
                               progress=False))
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(out))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = json.loads((trained / "siren_config.json").read_text())
    config["base_model"]["model_id"] = str(backbone_dir)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    (ref_dir / "siren_config.json").write_text(json.dumps(config))
    (ref_dir / "siren.safetensors").write_bytes((trained / "siren.safetensors").read_bytes())
    ref = siren_guard.SirenGuard.from_pretrained(str(ref_dir), device="cpu", dtype=torch.float32)
    rows = load_rows(HELDOUT)
    try:
        scores = [r.score for r in ref.score_batch([row.text for row in rows])]
    finally:
        ref.close()
    labels = [r.label for r in rows]
    got = out["datasets"]["train_heldout"]["siren"]
    tp = sum(1 for y, s in zip(labels, scores) if y == 1 and s >= 0.5)
    fp = sum(1 for y, s in zip(labels, scores) if y == 0 and s >= 0.5)
    n_pos = sum(labels)
    assert (got["default"]["tp"], got["default"]["fp"]) == (tp, fp)
    assert got["default"]["recall"] == pytest.approx(tp / n_pos)
    assert got["default"]["fpr"] == pytest.approx(fp / (len(labels) - n_pos))
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)

    only = out["datasets"]["harmful_only"]
    assert only["siren"]["default"]["recall"] == pytest.approx(tp / n_pos)
    assert only["siren"]["default"]["macro_f1"] is None
    # the baseline is refitted on the artifact's recorded training split
    assert out["baseline"]["train_rows"] + out["baseline"]["val_rows"] == 80
    assert 0.0 <= out["datasets"]["train_heldout"]["lexical"]["auroc"] <= 1.0
    assert "| train_heldout | lexical |" in table(out)


def test_cli_registers_train_and_eval():
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--data", "a.jsonl", "b.jsonl:10", "--no-baseline"])
    assert args.data == ["a.jsonl", "b.jsonl:10"] and args.no_baseline and callable(args.func)
    args = parser.parse_args(["train", "--data", "x.jsonl", "--out", "o", "--seed", "3"])
    assert args.seed == 3 and args.out == Path("o") and callable(args.func)
