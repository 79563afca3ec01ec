"""Refit an artifact's recipe on cached features, with variants, and measure a ceiling.

The shipped head's training options are in its `siren_config.json` (`metadata.training`):
data, exclusions, seed, layers, neurons, ensemble. This script rebuilds that training set,
reads the pooled features from the training cache (`.cache/features`, filled by `train`
and `eval`; what is missing is extracted, slowly), refits the head and scores the
development files (the recorded `exclude` list), printing one line of the README's
variants table. It takes about 80 s from a warm cache.

    PYTHONPATH=. python bench/head_variants.py                       # the recipe as shipped
    PYTHONPATH=. python bench/head_variants.py --weights source      # each source weighs the same
    PYTHONPATH=. python bench/head_variants.py --ceiling             # in-distribution ceiling

`--weights` re-weights training rows: `balanced` (the shipped class weights), `source`
(every (file, label) group the same total weight within its class, so no single-class
file's style dominates), `sqrt` (groups weighted by the square root of their size).

`--ceiling` asks how far this backbone's features can go when the development data's own
distribution is seen in training: for each two-class development set (and for the
harmful-only sets paired with the benign-only ones they are judged with), 5 folds, each
trained on the training mix plus the other 4/5 of that set (rows weighted
`--ceiling-weight`; 3-member ensembles, to keep it to about 17 min) and scored on the
held fifth. It also prints a 5-fold L2 logistic
regression on the set alone over every feature of blocks 12-19. Neither is a head to
ship: both see the evaluation distribution. They bound what the recipe could reach on
this backbone with perfectly matched training data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from guard.artifact import read_artifact
from guard.training import mlp, probe
from guard.training.calibrate import fit_platt
from guard.training.data import parse_data_spec
from guard.training.evaluate import load_eval_sets
from guard.training.metrics import at_threshold, auroc, best_threshold
from guard.training.train import build_dataset, features_for

COLUMNS = (("xstest_prompts", "macro_f1"), ("jailbreakbench_behaviors", "macro_f1"),
           ("harmbench_behaviors_text", "recall"), ("strongreject", "recall"),
           ("alpaca_eval_prompts", "fpr"), ("trustllm_exaggerated_safety", "fpr"),
           ("harmbench_response", "macro_f1"), ("xstest_response_harm", "macro_f1"))
# Harmful-only sets with the benign-only sets their targets are read against (README).
PAIRS = (("harmbench_behaviors_text", "alpaca_eval_prompts"),
         ("strongreject", "trustllm_exaggerated_safety"))
CEILING_MEMBERS = 3  # ensemble size of each ceiling fit (35 fits; the shipped head has 5)


class Fit:
    """The recipe's fitted pieces (as `guard.training.train` fits them): standardisation,
    MLP (ensemble), Platt. `extra` = (features, labels, weights) joins the training split."""

    def __init__(self, feats, y, train, val, weights, sel: probe.Selection, *, members, seed, extra=None):
        self.sel, self.w = sel, probe.neuron_weights(sel)
        raw = probe.gather(feats, sel, weighted=False)
        self.mu, self.sd = raw[train].mean(axis=0), raw[train].std(axis=0) + 1e-6
        x = self.standardise(feats)
        xt, yt, wt = x[train], y[train], weights[0]
        if extra is not None:
            xt = np.concatenate([xt, self.standardise(extra[0])])
            yt = np.concatenate([yt, extra[1]])
            wt = np.concatenate([wt, extra[2]])
        spec = mlp.HeadSpec(hidden=(128,), dropout=0.3, weight_decay=1e-2)  # the shipped grid's winner
        sample_weight = (wt, weights[1])
        first = mlp.train_one(spec, xt, yt, x[val], y[val], seed=seed, sample_weight=sample_weight)[0]
        self.net = mlp.ensemble(spec, first, xt, yt, x[val], y[val], members=members, seed=seed,
                                sample_weight=sample_weight)
        self.platt = fit_platt(mlp.logit_margin(self.net, x[val]), y[val])
        self.val_auroc = auroc(y[val], self.predict(feats[val]))

    def standardise(self, feats: np.ndarray) -> np.ndarray:
        return (self.w * (probe.gather(feats, self.sel, weighted=False) - self.mu) / self.sd).astype(np.float32)

    def predict(self, feats: np.ndarray) -> np.ndarray:
        return self.platt.apply(mlp.logit_margin(self.net, self.standardise(feats)))


def row_weights(rows, idx: np.ndarray, y: np.ndarray, mode: str) -> np.ndarray:
    """One weight per row of `idx`; each class's weights sum to half the rows, shared
    among its groups (one group per class for `balanced`, per (file, class) otherwise)
    in proportion to the group's size, 1, or the square root of its size."""
    groups: dict[tuple[str, int], list[int]] = {}
    for k, i in enumerate(idx):
        groups.setdefault(("" if mode == "balanced" else rows[i].dataset, int(y[i])), []).append(k)
    share = {"balanced": len, "source": lambda g: 1.0, "sqrt": lambda g: np.sqrt(len(g))}[mode]
    w = np.ones(len(idx), dtype=np.float32)
    for label in (0, 1):
        keys = [key for key in groups if key[1] == label]
        total = sum(share(groups[key]) for key in keys)
        for key in keys:
            w[groups[key]] = (len(idx) / 2) * (share(groups[key]) / total) / len(groups[key])
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, default=Path("guard/default"))
    ap.add_argument("--weights", choices=("balanced", "source", "sqrt"), default="balanced")
    ap.add_argument("--members", type=int, default=None, help="ensemble size (default: the artifact's)")
    ap.add_argument("--seed", type=int, default=None, help="default: the artifact's")
    ap.add_argument("--ceiling", action="store_true")
    ap.add_argument("--ceiling-weight", type=float, default=5.0)
    ap.add_argument("--cache", type=Path, default=Path(".cache/features"))
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    config, _ = read_artifact(args.artifact)
    opts = config.metadata["training"]
    seed = opts["seed"] if args.seed is None else args.seed
    members = opts.get("ensemble", 1) if args.members is None else args.members
    feature_opts = dict(backbone=config.source or config.base_model_id,
                        dtype=opts["dtype"], device="cpu", max_length=config.max_length,
                        pooling=config.pooling_type, extract_layers=opts["extract_layers"],
                        cache_root=args.cache, token_budget=4096, progress=False)
    for spec in list(opts["data"]) + list(opts["exclude"]):
        if not Path(parse_data_spec(spec)[0]).exists():
            sys.exit(f"{parse_data_spec(spec)[0]} is missing: run from the repository root, with the shared data "
                     "folder at ../shared and bench/generate_default.sh's rows in .cache/generated")

    started = time.monotonic()
    ds = build_dataset(opts["data"], opts["exclude"], seed, opts["val_fraction"], opts["refusals"], opts["answers"],
                       opts.get("emoji", 0))
    y = np.array([r.label for r in ds.rows], dtype=np.int64)
    feats = features_for([r.text for r in ds.rows], **feature_opts)
    weights = (row_weights(ds.rows, ds.train, y, args.weights), row_weights(ds.rows, ds.val, y, args.weights))
    # The probes see only the training mix, so one selection serves every fit below.
    sel = probe.select(feats[ds.train], y[ds.train], feats[ds.val], y[ds.val], candidate_layers=range(feats.shape[1]),
                       n_layers=opts["n_layers"], max_neurons=opts["max_neurons"], c=opts["probe_c"], seed=seed)
    recipe = dict(sel=sel, members=members, seed=seed)
    dev = load_eval_sets(opts["exclude"], seed)
    dev_feats = {name: features_for([r.text for r in rows], **feature_opts) for name, rows in dev.items()}
    dev_y = {name: np.array([r.label for r in rows], dtype=np.int64) for name, rows in dev.items()}
    result: dict = {"weights": args.weights, "members": members, "seed": seed}

    if not args.ceiling:
        fit = Fit(feats, y, ds.train, ds.val, weights, **recipe)
        figures = {}
        for name in dev:
            p = fit.predict(dev_feats[name])
            m = at_threshold(dev_y[name], p, config.default_threshold)
            figures[name] = {"auroc": auroc(dev_y[name], p), "macro_f1": m.macro_f1, "recall": m.recall,
                             "fpr": m.fpr}
        result["figures"] = figures
        print(f"{len(ds.rows)} rows, validation AUROC {fit.val_auroc:.3f}, "
              f"{time.monotonic() - started:.0f} s; weights {args.weights}, {members} members, seed {seed}")
        print("at the artifact's threshold: " + " | ".join(
            f"{name} {key} {_fmt(figures.get(name, {}).get(key))}" for name, key in COLUMNS))
        print("AUROC: " + " | ".join(f"{name} {_fmt(f['auroc'])}" for name, f in figures.items()
                                     if f["auroc"] is not None))
    else:
        result["ceiling"] = ceiling(ds, feats, y, weights, recipe, dev, dev_feats, dev_y, args.ceiling_weight,
                                    config.default_threshold)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def ceiling(ds, feats, y, weights, recipe, dev, dev_feats, dev_y, extra_weight, threshold) -> dict:
    sets = [(name, [name]) for name in dev if len(set(dev_y[name].tolist())) == 2]
    sets += [(f"{a}+{b}", [a, b]) for a, b in PAIRS if a in dev and b in dev]
    out = {}
    for label, names in sets:
        f = np.concatenate([dev_feats[n] for n in names])
        yd = np.concatenate([dev_y[n] for n in names])
        p = np.zeros(len(yd))
        folds = StratifiedKFold(5, shuffle=True, random_state=0).split(f, yd)
        for tr, te in folds:
            extra = (f[tr], yd[tr], np.full(len(tr), extra_weight, dtype=np.float32))
            p[te] = Fit(feats, y, ds.train, ds.val, weights, extra=extra,
                        **{**recipe, "members": CEILING_MEMBERS}).predict(f[te])
        m = at_threshold(yd, p, threshold)
        best = best_threshold(yd, p)
        x_alone = f[:, 12:20].reshape(len(f), -1)
        lr = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        p_alone = cross_val_predict(lr, x_alone, yd, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                                    method="predict_proba")[:, 1]
        alone = at_threshold(yd, p_alone, 0.5)
        out[label] = {"n": len(yd), "auroc": auroc(yd, p), "macro_f1": m.macro_f1, "recall": m.recall, "fpr": m.fpr,
                      "best_threshold": best.threshold, "best_macro_f1": best.macro_f1,
                      "alone_auroc": auroc(yd, p_alone), "alone_macro_f1": alone.macro_f1}
        r = out[label]
        print(f"{label} ({len(yd)} rows): mix + 4/5 in-distribution: AUROC {r['auroc']:.3f}, at "
              f"{threshold}: macro F1 {r['macro_f1']:.3f} recall {r['recall']:.3f} FPR {r['fpr']:.3f}; "
              f"best macro F1 {r['best_macro_f1']:.3f} at {r['best_threshold']:.2f} | the set alone, "
              f"L2 probe on blocks 12-19: AUROC {r['alone_auroc']:.3f}, macro F1 {r['alone_macro_f1']:.3f}",
              flush=True)
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
