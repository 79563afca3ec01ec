"""Per-layer L1 probes: which layers know about harm, and which neurons carry it.

For each layer an L1-regularised logistic regression is fitted on standardised pooled
features of the training split and scored (AUROC) on the validation split. The layer's
safety neurons are its non-zero probe weights, largest |weight| first, at most
`max_neurons`; the kept layers are the `n_layers` best by validation AUROC, and each
kept layer's weight is its AUROC rescaled so the best layer has weight 1 (a layer
at chance, AUROC 0.5, would get 0).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from guard.training.data import DataError


@dataclass(frozen=True)
class LayerProbe:
    layer: int
    val_auroc: float
    neurons: tuple[int, ...]  # largest |coef| first, all non-zero


@dataclass(frozen=True)
class Selection:
    layers: tuple[int, ...]  # ascending
    neurons: dict[int, tuple[int, ...]]  # layer -> indices into the hidden dimension, ascending
    weights: dict[int, float]  # layer -> feature weight in (0, 1]
    probes: tuple[LayerProbe, ...]  # every layer probed, for the training report


def fit_layer_probe(
    layer: int,
    x_train: np.ndarray,  # (n_train, hidden)
    y_train: np.ndarray,  # (n_train,)
    x_val: np.ndarray,  # (n_val, hidden)
    y_val: np.ndarray,  # (n_val,)
    *,
    c: float,
    max_neurons: int,
    seed: int,
) -> LayerProbe:
    mu = x_train.mean(axis=0)
    sd = x_train.std(axis=0) + 1e-6
    clf = LogisticRegression(l1_ratio=1.0, C=c, solver="liblinear", class_weight="balanced",
                             max_iter=200, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((x_train - mu) / sd, y_train)
    coef = clf.coef_[0]  # (hidden,)
    auroc = float(roc_auc_score(y_val, clf.decision_function((x_val - mu) / sd)))
    nonzero = np.flatnonzero(coef)
    ranked = nonzero[np.argsort(-np.abs(coef[nonzero]), kind="stable")][:max_neurons]
    return LayerProbe(layer=layer, val_auroc=auroc, neurons=tuple(int(i) for i in ranked))


def select(
    features_train: np.ndarray,  # (n_train, n_layers, hidden)
    y_train: np.ndarray,
    features_val: np.ndarray,  # (n_val, n_layers, hidden)
    y_val: np.ndarray,
    *,
    candidate_layers: Sequence[int],
    n_layers: int,
    max_neurons: int,
    c: float,
    seed: int,
) -> Selection:
    probes = [
        fit_layer_probe(layer, features_train[:, layer], y_train, features_val[:, layer], y_val,
                        c=c, max_neurons=max_neurons, seed=seed)
        for layer in candidate_layers
    ]
    if not any(p.neurons for p in probes):
        raise DataError(f"no layer's probe kept a neuron at --probe-c {c:g}: the L1 penalty is too "
                        "strong for this data; raise --probe-c")
    usable = [p for p in probes if p.neurons and p.val_auroc > 0.5]
    best = sorted(usable, key=lambda p: (-p.val_auroc, p.layer))[:n_layers]
    if not best:
        raise DataError("no layer's probe beat chance (validation AUROC above 0.5): the labels do "
                        "not follow the text the backbone reads, or the validation split is too small")
    top = max(p.val_auroc for p in best)
    return Selection(
        layers=tuple(sorted(p.layer for p in best)),
        neurons={p.layer: tuple(sorted(p.neurons)) for p in best},
        weights={p.layer: round((p.val_auroc - 0.5) / (top - 0.5), 6) for p in best},
        probes=tuple(probes),
    )


def gather(features: np.ndarray, selection: Selection, *, weighted: bool = True) -> np.ndarray:
    """(n, input_dim) raw selected features times layer weights, in artifact order.

    This is exactly what the runtime feeds the MLP: for each selected layer (ascending),
    the pooled vector's selected neurons (ascending), times the layer weight
    (`weighted=False`: the neurons alone, which training standardises before weighting).
    """
    parts = [features[:, layer][:, list(selection.neurons[layer])] * (selection.weights[layer] if weighted else 1.0)
             for layer in selection.layers]
    return np.concatenate(parts, axis=1).astype(np.float32)


def neuron_weights(selection: Selection) -> np.ndarray:
    """(input_dim,) each selected neuron's layer weight, in artifact order."""
    return np.concatenate([np.full(len(selection.neurons[layer]), selection.weights[layer], dtype=np.float32)
                           for layer in selection.layers])
