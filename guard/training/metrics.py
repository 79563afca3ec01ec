"""Threshold metrics for one dataset's scores, computed by hand (no hidden averaging).

Conventions, so that single-class sets are reported meaningfully:
- a row is flagged when ``score >= threshold`` (the runtime's rule);
- ``precision``/``recall``/``f1`` are for the harmful class (label 1); ``macro_f1`` is the
  mean of the harmful and benign classes' F1 and is reported only when both classes are
  present, as are ``auroc`` and the best threshold;
- ``fpr`` (benign rows flagged) is reported whenever benign rows exist, ``recall``
  whenever harmful rows exist; a precision with nothing flagged is None, not 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class AtThreshold:
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    precision: float | None
    recall: float | None
    f1: float | None
    fpr: float | None
    macro_f1: float | None
    accuracy: float


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def _f1(p: float | None, r: float | None) -> float | None:
    if p is None or r is None:
        return None
    return 2 * p * r / (p + r) if p + r else 0.0


def at_threshold(labels: Sequence[int], scores: Sequence[float], threshold: float) -> AtThreshold:
    y = np.asarray(labels, dtype=np.int64)
    flagged = np.asarray(scores, dtype=np.float64) >= threshold
    tp = int(np.sum(flagged & (y == 1)))
    fp = int(np.sum(flagged & (y == 0)))
    tn = int(np.sum(~flagged & (y == 0)))
    fn = int(np.sum(~flagged & (y == 1)))
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    f1 = _f1(precision, recall)
    macro = None
    if tp + fn and tn + fp:
        f1_neg = _f1(_div(tn, tn + fn), _div(tn, tn + fp))
        macro = ((f1 or 0.0) + (f1_neg or 0.0)) / 2
    return AtThreshold(threshold=float(threshold), tp=tp, fp=fp, tn=tn, fn=fn,
                       precision=precision, recall=recall, f1=f1 if tp + fn else None,
                       fpr=_div(fp, fp + tn), macro_f1=macro, accuracy=(tp + tn) / len(y))


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """P(score of a harmful row > score of a benign row), ties counted one half."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order), dtype=np.float64)
    values = np.concatenate([pos, neg])[order]
    # average ranks over ties
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = ranks[: len(pos)].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


CURVE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def threshold_grid() -> np.ndarray:
    return np.round(np.linspace(0.01, 0.99, 99), 2)


def best_threshold(labels: Sequence[int], scores: Sequence[float]) -> AtThreshold | None:
    """The grid threshold with the highest macro F1 (lowest threshold on ties)."""
    rows = [at_threshold(labels, scores, t) for t in threshold_grid()]
    rows = [r for r in rows if r.macro_f1 is not None]
    if not rows:
        return None
    return max(rows, key=lambda r: (r.macro_f1, -r.threshold))


@dataclass(frozen=True)
class DatasetReport:
    dataset: str
    n: int
    n_harmful: int
    n_benign: int
    auroc: float | None
    default: AtThreshold
    best: AtThreshold | None
    curve: tuple[AtThreshold, ...] = ()  # at 0.1, 0.2, ..., 0.9, for choosing a route's threshold

    def to_dict(self) -> dict:
        return asdict(self)


def report(dataset: str, labels: Sequence[int], scores: Sequence[float], threshold: float) -> DatasetReport:
    y = np.asarray(labels)
    return DatasetReport(dataset=dataset, n=len(y), n_harmful=int((y == 1).sum()),
                         n_benign=int((y == 0).sum()), auroc=auroc(labels, scores),
                         default=at_threshold(labels, scores, threshold),
                         best=best_threshold(labels, scores),
                         curve=tuple(at_threshold(labels, scores, t) for t in CURVE_THRESHOLDS))


def pairwise_accuracy(safer: Sequence[float], worse: Sequence[float]) -> float | None:
    """P(the less harmful response of a pair scores lower), ties counted one half."""
    a = np.asarray(safer, dtype=np.float64)
    b = np.asarray(worse, dtype=np.float64)
    if not len(a):
        return None
    return float(((a < b).sum() + 0.5 * (a == b).sum()) / len(a))
