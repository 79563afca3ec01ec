"""Labelled rows from JSONL files in the shared data schema, and the training split.

Schema (one object a line): ``id``, ``prompt``, ``response`` (str or null), ``label``
(0/1; for response-level files it judges the response). A row's scored string is
``guard.text.model_text(prompt=..., response=...)``: the prompt alone for prompt-level
rows, ``prompt + "\\n" + response`` for response-level rows, exactly what serving sees.

Leakage rule: a training row whose normalised prompt occurs in any evaluation file is
dropped before splitting, so no evaluation prompt is ever fitted on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard.text import model_text

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


@dataclass(frozen=True)
class Row:
    dataset: str  # file stem, e.g. "xstest_prompts"
    id: str
    prompt: str
    response: str | None
    label: int  # 1 = harmful

    @property
    def text(self) -> str:
        """The exact string the backbone reads for this row (shared with serving)."""
        return model_text(prompt=self.prompt, response=self.response)

    @property
    def level(self) -> str:
        return "response" if self.response is not None else "prompt"


def normalize_prompt(prompt: str) -> str:
    """Lower case, punctuation and white space folded: the key for leakage checks."""
    return _NON_WORD.sub(" ", prompt.lower()).strip()


def dataset_name(path: str | Path) -> str:
    return Path(path).name.removesuffix(".jsonl")


class DataError(ValueError):
    """A data file that cannot be read, or a line of it outside the schema (the message
    names the file and the line), or data no head can be fitted on; `siren-proxy
    train`/`eval`/`generate` print it as one line and exit with status 2."""


def json_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file. Lines are decoded
    one at a time, so an error names the line it is on."""
    try:
        f = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
            except (ValueError, RecursionError):
                raise DataError(f"{path}:{lineno}: not valid JSON") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: a row must be a JSON object")
            yield lineno, obj


def load_rows(path: str | Path, *, limit: int | None = None, seed: int = 0) -> list[Row]:
    """Rows of one JSONL file; `limit` keeps a seeded random subset (file order kept).

    Rows with no usable label (preference pairs, `label: null`) are refused: they have
    no place in a classifier's training or evaluation set. So are a prompt that is not a
    string (or null) and a response that is not a string or null: `DataError`.
    """
    path = Path(path)
    name = dataset_name(path)
    rows: list[Row] = []
    for lineno, obj in json_objects(path):
        label = obj.get("label")
        if label not in (0, 1) or isinstance(label, bool):  # true could as well mean "safe"
            raise DataError(f"{path}:{lineno}: label must be 0 or 1, got {label!r}")
        for key, kind in (("prompt", "a string"), ("response", "a string or null")):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise DataError(f"{path}:{lineno}: {key!r} must be {kind}, got {type(obj[key]).__name__}")
        rows.append(Row(dataset=name, id=str(obj.get("id", lineno)),
                        prompt=obj.get("prompt") or "", response=obj.get("response"),
                        label=int(label)))
    if limit is not None and len(rows) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False))
        rows = [rows[i] for i in keep]
    return rows


def load_pairs(path: str | Path, *, limit: int | None = None, seed: int = 0) -> list[tuple[Row, Row]]:
    """Single-turn preference pairs (hh-rlhf schema) as (less harmful, more harmful) rows.

    Only pairs whose context is one human turn are kept: a multi-turn context is longer
    than the head's `max_length` often enough that truncation would cut both responses
    away and leave two identical texts.
    """
    path = Path(path)
    pairs: list[tuple[Row, Row]] = []
    for lineno, obj in json_objects(path):
        try:
            context, prompt = obj["context"], obj["first_human_turn"]
            chosen, rejected = obj["chosen_response"], obj["rejected_response"]
        except KeyError as exc:
            raise DataError(f"{path}:{lineno}: a preference pair needs {exc.args[0]!r}") from None
        if not all(isinstance(v, str) for v in (context, prompt, chosen, rejected)):
            raise DataError(f"{path}:{lineno}: a preference pair's context, turn and responses must be strings")
        if context.count("Human:") != 1 or not obj.get("same_context", True):
            continue
        rid = str(obj.get("id", lineno))
        pairs.append((Row(path.stem, rid + ":chosen", prompt, chosen, 0),
                      Row(path.stem, rid + ":rejected", prompt, rejected, 1)))
    if limit is not None and len(pairs) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=limit, replace=False))
        pairs = [pairs[i] for i in keep]
    return pairs


def parse_data_spec(spec: str) -> tuple[str, int | None, int | None]:
    """``FILE``, ``FILE:N`` (a seeded random N rows) or ``FILE:N:SEED`` (drawn with SEED).

    Two specs of one file with different seeds give overlapping samples; training
    de-duplicates rows by scored text, so their union is what is trained on.
    """
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and parts[0] and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], int(parts[1]), int(parts[2])
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and head:
        return head, int(tail), None
    return spec, None, None


def load_spec(spec: str, seed: int) -> list[Row]:
    """The rows a ``FILE[:N[:SEED]]`` spec names (`seed` draws ``FILE:N``). A spec that
    keeps no row (an empty file, ``FILE:0``) is a `DataError`: it is a mistake, and left
    alone it would fail later, inside numpy, after the backbone has loaded."""
    path, limit, sample_seed = parse_data_spec(spec)
    rows = load_rows(path, limit=limit, seed=seed if sample_seed is None else sample_seed)
    if not rows:
        raise DataError(f"{spec}: no rows")
    return rows


def drop_leaked(rows: Iterable[Row], eval_prompts: set[str]) -> tuple[list[Row], int]:
    """Rows whose normalised prompt is not an evaluation prompt, and how many were dropped."""
    rows = list(rows)
    kept = [r for r in rows if normalize_prompt(r.prompt) not in eval_prompts]
    return kept, len(rows) - len(kept)


def eval_prompt_keys(paths: Iterable[str | Path]) -> set[str]:
    keys: set[str] = set()
    for path in paths:
        keys.update(normalize_prompt(r.prompt) for r in load_rows(path))
    return keys


# SORRY-Bench writes each of its 450 questions in ten styles (paraphrases, dialects,
# persuasion frames); no two share a prompt verbatim. Its ids number them style by style,
# `sorrybench-0001-base` ... `sorrybench-0450-base`, `sorrybench-0451-technical_terms` (the
# first question again) ..., so question = (number - 1) mod 450.
_SORRY_BENCH_ID = re.compile(r"sorrybench-(\d+)-")
_SORRY_BENCH_QUESTIONS = 450


def group_keys(rows: Sequence[Row]) -> list[str]:
    """The key a row splits by: its normalised prompt, or, for a prompt that is a
    SORRY-Bench question in one of its styles, that question's id. Rows of other files
    with the same normalised prompt (generated answers to it) take the same key."""
    base: dict[str, str] = {}
    for r in rows:
        m = _SORRY_BENCH_ID.search(r.id)
        if m:
            base[normalize_prompt(r.prompt)] = f"sorrybench-q{(int(m.group(1)) - 1) % _SORRY_BENCH_QUESTIONS + 1}"
    return [base.get(k, k) for k in map(normalize_prompt, (r.prompt for r in rows))]


def split_indices(rows: Sequence[Row], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A validation split stratified by (dataset, label), grouped by `group_keys`.

    Rows sharing a prompt (response-level rows do), or asking one SORRY-Bench question in
    different styles, land on the same side, so validation never sees a training prompt.
    """
    rng = np.random.default_rng(seed)
    keys = group_keys(rows)
    groups: dict[tuple[str, int], dict[str, list[int]]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.dataset, r.label), {}).setdefault(keys[i], []).append(i)
    train: list[int] = []
    val: list[int] = []
    for key in sorted(groups):
        prompts = sorted(groups[key])
        order = rng.permutation(len(prompts))
        n_val = int(round(val_fraction * len(prompts)))
        for rank, j in enumerate(order):
            (val if rank < n_val else train).extend(groups[key][prompts[j]])
    # A group can sit in several (dataset, label) strata: keep it on one side only.
    val_keys = {keys[i] for i in val}
    moved = [i for i in train if keys[i] in val_keys]
    moved_set = set(moved)
    train = [i for i in train if i not in moved_set]
    val.extend(moved)
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)
