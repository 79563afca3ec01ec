"""`siren-proxy eval`: score labelled files with an artifact and with the lexical baseline.

The head's scores are computed from the cached pooled features of each row's
`Row.text`, truncated at the artifact's `max_length`: exactly the reference runtime's
(`siren_guard`) score. Our runtime agrees for texts within `max_length` tokens; for
longer texts it takes the maximum over sliding windows (`guard.windows`).
`long_text="window"` scores the rows longer than one window as the runtime does (its
own `p_harmful`, every window read), so the report is what the proxy would decide;
the default, "truncate", is the reference's reading.

`stream_every=N` scores each response-level row as the proxy's response stage acts on
it: an incremental session over `prompt + "\n" + response`, checked every N response
tokens and at the end, the row's score being the highest check (a cut happens at the
first check over the threshold, so "max >= threshold" is "the stream would be cut").

The baseline is refitted on the artifact's own training split (rebuilt from the
artifact's `metadata.training` or from `--train-data`), so it is trained on the same
rows as the head.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from guard.artifact import ArtifactConfig, load_head, read_artifact
from guard.training import metrics
from guard.training.baseline import fit_baseline
from guard.training.data import DataError, Row, dataset_name, load_pairs, load_spec, parse_data_spec
from guard.training.train import build_dataset, features_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    artifact: Path
    data: tuple[str, ...]
    report: Path | None = None
    plot: Path | None = None
    train_data: tuple[str, ...] | None = None  # for the baseline; default: the artifact's
    exclude: tuple[str, ...] | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    backbone: str | None = None  # default: the artifact's base_model.source or model_id
    cache_root: Path = Path(".cache/features")
    baseline: bool = True
    progress: bool = True
    pairs: tuple[str, ...] = ()  # preference-pair files (hh-rlhf schema): a ranking check
    long_text: str = "truncate"  # or "window": rows past one window scored as the runtime does
    stream_every: int = 0  # > 0: response-level rows scored as a stream checked every N tokens


def head_scores(config: ArtifactConfig, state: dict, features: np.ndarray) -> np.ndarray:
    """P(harmful) from (n, n_layers, hidden) pooled features, as the runtime computes it."""
    parts = [features[:, layer][:, list(config.selected_neurons[layer])] * config.layer_weights[layer]
             for layer in config.selected_layers]
    z = torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))  # (n, input_dim)
    return load_head(config, state).p_harmful(z).numpy()


def load_eval_sets(specs: Sequence[str], seed: int) -> dict[str, list[Row]]:
    sets: dict[str, list[Row]] = {}
    for spec in specs:
        sets[_new_name(sets, spec, "--data")] = load_spec(spec, seed)
    return sets


def _new_name(sets: dict, spec: str, option: str) -> str:
    """The report's name for `spec`'s set: its file name, which no earlier spec may have
    (the second would replace the first, whose rows would vanish from the report)."""
    name = dataset_name(parse_data_spec(spec)[0])
    if name in sets:
        raise DataError(f"{spec}: a second {option} spec of the dataset {name!r} "
                        "(the report names a set by its file name)")
    return name


def evaluate(opts: EvalOptions) -> dict:
    started = time.monotonic()
    config, state = read_artifact(opts.artifact)
    training = config.metadata.get("training", {})
    sets = load_eval_sets(opts.data, opts.seed)
    pair_sets = {}
    for spec in opts.pairs:
        path, limit, sample_seed = parse_data_spec(spec)
        pair_sets[_new_name(pair_sets, spec, "--pairs")] = load_pairs(
            path, limit=limit, seed=opts.seed if sample_seed is None else sample_seed)
    all_rows = [r for rows in sets.values() for r in rows]
    all_rows += [r for pairs in pair_sets.values() for pair in pairs for r in pair]
    extract_layers = max(config.top_layer + 1, training.get("extract_layers") or 0)
    from guard.siren import backbone_spec

    feats = features_for([r.text for r in all_rows],
                         backbone=opts.backbone or backbone_spec(config, Path(opts.artifact)),
                         dtype=opts.dtype, device=opts.device, max_length=config.max_length,
                         pooling=config.pooling_type, extract_layers=extract_layers,
                         cache_root=opts.cache_root, token_budget=4096, progress=opts.progress)
    scores = head_scores(config, state, feats)
    rescored = streamed = 0
    if opts.long_text == "window" or opts.stream_every > 0:
        guard = runtime_guard(opts)
        try:
            if opts.long_text == "window":  # response-level rows streamed below need no window pass
                rescored = rescore_long_rows(guard, all_rows, scores, skip_responses=opts.stream_every > 0,
                                             progress=opts.progress)
            if opts.stream_every > 0:
                streamed = rescore_as_streams(guard, all_rows, scores, opts.stream_every, progress=opts.progress)
        finally:
            guard.close()
    baseline_scores = None
    baseline_info = None
    if opts.baseline:
        train_data = opts.train_data or tuple(training.get("data", ()))
        exclude = opts.exclude if opts.exclude is not None else tuple(training.get("exclude", ()))
        missing = [s for s in train_data if not Path(parse_data_spec(s)[0]).is_file()]
        if not train_data or missing:
            logger.warning("no lexical baseline: training data %s not found", missing or "unknown")
        else:
            seed = int(training.get("seed", opts.seed))
            ds = build_dataset(train_data, exclude, seed, float(training.get("val_fraction", 0.15)),
                               int(training.get("refusals") or 0), training.get("answers"))
            texts = [r.text for r in ds.rows]
            y = np.array([r.label for r in ds.rows])
            base = fit_baseline([texts[i] for i in ds.train], y[ds.train],
                                [texts[i] for i in ds.val], y[ds.val], seed)
            baseline_scores = base.scores([r.text for r in all_rows])
            baseline_info = {"train_rows": int(len(ds.train)), "val_rows": int(len(ds.val)),
                             "data": list(train_data)}

    threshold = config.default_threshold
    out: dict = {"artifact": str(opts.artifact), "default_threshold": threshold,
                 "dtype": opts.dtype, "long_text": opts.long_text, "rows_over_one_window": rescored,
                 "stream_every": opts.stream_every or None, "rows_streamed": streamed,
                 "baseline": baseline_info, "datasets": {}}
    curves: dict[str, dict] = {}
    start = 0
    for name, rows in sets.items():
        end = start + len(rows)
        y = np.array([r.label for r in rows])
        entry = {"siren": metrics.report(name, y, scores[start:end], threshold).to_dict()}
        if baseline_scores is not None:
            entry["lexical"] = metrics.report(name, y, baseline_scores[start:end], threshold).to_dict()
        out["datasets"][name] = entry
        curves[name] = {"labels": y, "siren": scores[start:end],
                        "lexical": None if baseline_scores is None else baseline_scores[start:end]}
        start = end
    out["pairs"] = {}
    for name, pairs in pair_sets.items():
        end = start + 2 * len(pairs)
        entry = {"n": len(pairs), "siren": metrics.pairwise_accuracy(scores[start:end:2], scores[start + 1:end:2])}
        if baseline_scores is not None:
            entry["lexical"] = metrics.pairwise_accuracy(baseline_scores[start:end:2],
                                                         baseline_scores[start + 1:end:2])
        out["pairs"][name] = entry
        start = end
    out["seconds"] = round(time.monotonic() - started, 1)
    if opts.report:
        Path(opts.report).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.report).write_text(json.dumps(out, indent=1) + "\n")
    if opts.plot:
        from guard.training.plot import plot_curves

        plot_curves(curves, threshold, Path(opts.plot))
    return out


def runtime_guard(opts: EvalOptions):
    """Our runtime on the artifact, reading long texts by sliding windows as serving does."""
    from guard import SirenGuard

    return SirenGuard.from_pretrained(opts.artifact, device=opts.device, dtype=opts.dtype,
                                      backbone=opts.backbone, long_text="window")


def rescore_long_rows(guard, rows: Sequence[Row], scores: np.ndarray, *, batch: int = 8,
                      skip_responses: bool = False, progress: bool = False) -> int:
    """Replace, in place, the scores of rows longer than one window by the runtime's
    (the maximum over its sliding windows); returns how many there were."""
    plan, tok = guard.plan, guard.tokenizer
    long = [i for i, row in enumerate(rows) if len(plan.body(tok, row.text)) > plan.window
            and not (skip_responses and row.response is not None)]
    logger.info("%d of %d rows are longer than one window: scoring them as the runtime does",
                len(long), len(rows))
    with tqdm(total=len(long), unit="row", desc="windows", disable=not progress) as bar:
        for k in range(0, len(long), batch):
            part = long[k:k + batch]
            scores[part] = guard.p_harmful([rows[i].text for i in part])
            bar.update(len(part))
    return len(long)


def rescore_as_streams(guard, rows: Sequence[Row], scores: np.ndarray, every: int, *,
                       progress: bool = False) -> int:
    """Replace, in place, each response-level row's score by the highest of the checks
    the proxy's response stage makes: every `every` tokens of the response (the
    backbone's tokens standing in for the upstream's deltas) and once at the end.
    Returns how many rows were scored so."""
    picked = [i for i, row in enumerate(rows) if row.response is not None]
    logger.info("scoring %d response-level rows as streams checked every %d tokens", len(picked), every)
    for i in tqdm(picked, unit="row", desc="streams", disable=not progress):
        scores[i] = max(stream_checks(guard, rows[i].prompt, rows[i].response, every))
    return len(picked)


def stream_checks(guard, prompt: str, response: str, every: int) -> list[float]:
    """The scores of one stream's checks: after every `every` response tokens, and at the end."""
    session, tok = guard.stream(prompt=prompt), guard.tokenizer
    ids = tok(response, add_special_tokens=False)["input_ids"]
    checks = [session.set_response(tok.decode(ids[:end])).score for end in range(every, len(ids), every)]
    checks.append(session.set_response(response).score)
    return checks


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def table(result: dict) -> str:
    """A Markdown table: one line per dataset and scorer, default and best threshold."""
    lines = ["| dataset | scorer | n | AUROC | macro F1 | precision | recall | FPR | best thr | macro F1 @best |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in result["datasets"].items():
        for scorer, rep in entry.items():
            d, b = rep["default"], rep["best"]
            lines.append(
                f"| {name} | {scorer} | {rep['n']} | {_fmt(rep['auroc'])} | {_fmt(d['macro_f1'])} | "
                f"{_fmt(d['precision'])} | {_fmt(d['recall'])} | {_fmt(d['fpr'])} | "
                f"{'  -  ' if b is None else b['threshold']} | {_fmt(None if b is None else b['macro_f1'])} |")
    if result.get("pairs"):
        lines += ["", "| preference pairs | n | siren: P(safer scores lower) | lexical |", "|---|---|---|---|"]
        for name, entry in result["pairs"].items():
            lines.append(f"| {name} | {entry['n']} | {_fmt(entry['siren'])} | {_fmt(entry.get('lexical'))} |")
    return "\n".join(lines)
