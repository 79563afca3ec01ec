"""FlipAttack against the guard: development requests flipped as FlipAttack flips them
(Liu et al., "FlipAttack: Jailbreak LLMs via Flipping", ICML 2025) and set in its user
turn, ``TASK is '...'``, scored as written and under ``emoji: max``.

FlipAttack's modes, as its code writes them (`src/flip_attack.py` in yueliu1999/FlipAttack):

- FWO, flip word order: ``' '.join(text.split()[::-1])``;
- FCW, flip characters in each word: ``' '.join(w[::-1] for w in text.split())``;
- FCS, flip characters in the sentence: ``text[::-1]`` (also the text of its fourth mode,
  FMM, which differs only in its system prompt: the guard's default scope, ``last_user``,
  reads the user turn).

Printed per mode, as `bench/garak_check.py` prints per probe: the share of rows whose
request a reading under ``emoji: max`` recovers (its letters in order; model-free), and
per set the flagged share at the head's threshold (recall on harmful sets, false
positives on benign ones) of the plain request in the same turn, the flipped one as
written, and under ``emoji: max``. A fourth line does the same for each plain request
as written, to show what reading for flips costs text that is not flipped.

    PYTHONPATH=. python bench/flip_check.py [--limit N] [--data FILE ...] [--mode FCS ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.garak_check import DATA, Scorer, read_back
from guard import SirenGuard
from guard.training.data import load_rows

MODES = {
    "FWO": lambda text: " ".join(text.split()[::-1]),
    "FCW": lambda text: " ".join(word[::-1] for word in text.split()),
    "FCS": lambda text: text[::-1],
    "none": lambda text: text,
}


def in_turn(text: str) -> str:
    """FlipAttack's user turn."""
    return f"TASK is '{text}'"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=[f"../shared/data/{name}.jsonl" for name in DATA])
    ap.add_argument("--limit", type=int, default=100, help="a seeded sample of N rows a set (0: every row)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--artifact", default=None, help="artifact directory (default: the shipped head)")
    ap.add_argument("--mode", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    sets = {}
    for path in args.data:
        rows = [r for r in load_rows(path, limit=args.limit or None, seed=args.seed) if r.response is None]
        sets[path.rsplit("/", 1)[-1].removesuffix(".jsonl")] = rows
    guard = SirenGuard.from_pretrained(args.artifact, device="cpu", dtype="float32", long_text="truncate")
    both = SirenGuard.from_pretrained(args.artifact, device="cpu", dtype="float32", long_text="truncate", emoji="max")
    scorer, threshold = Scorer(guard), guard.default_threshold
    started = time.monotonic()
    print(f"shipped head, threshold {threshold}; rows per set: "
          + ", ".join(f"{name} {len(rows)}" for name, rows in sets.items()))
    columns = [(name, label) for name, rows in sets.items() for label in sorted({r.label for r in rows})]
    print("| mode | read back | " + " | ".join(
        f"{name} {'recall' if label else 'FPR'}: plain / as written / max" for name, label in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    checked = False
    for mode in args.mode:
        flip, cells, recovered, total = MODES[mode], [], 0, 0
        for set_name, rows in sets.items():
            plain = [in_turn(row.prompt) for row in rows]
            flipped = [in_turn(flip(row.prompt)) for row in rows]
            recovered += sum(read_back(row.prompt, text) for row, text in zip(rows, flipped))
            total += len(rows)
            if not checked:  # the cached max equals the guard's own
                want = [r.score for r in both.score_batch(flipped[:8])]
                assert np.allclose(scorer.score_max(flipped[:8]), want, atol=1e-5), "scorer differs from the guard"
                checked = True
            scored = [scorer.score(plain), scorer.score(flipped), scorer.score_max(flipped)]
            labels = np.array([r.label for r in rows])
            for column, label in columns:
                if column == set_name:
                    cells.append(" / ".join(f"{np.mean(s[labels == label] >= threshold):.2f}" for s in scored))
        print(f"| {mode} | {recovered}/{total} | " + " | ".join(cells) + " |", flush=True)
    print(f"({time.monotonic() - started:.0f} s)")
    guard.close()
    both.close()


if __name__ == "__main__":
    main()
