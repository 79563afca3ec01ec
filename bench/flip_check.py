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

from typing import Callable

from bench.garak_check import load_sets, run_table, table_arguments

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
    ap = table_arguments(__doc__)
    ap.add_argument("--mode", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args()

    def mode(flip) -> Callable:
        def write(i: int, row) -> tuple[str, str, str]:
            flipped = in_turn(flip(row.prompt))
            return in_turn(row.prompt), flipped, flipped
        return write

    variants = {name: mode(MODES[name]) for name in args.mode}
    run_table("mode", variants, load_sets(args.data, args.limit, args.seed), args.artifact)


if __name__ == "__main__":
    main()
