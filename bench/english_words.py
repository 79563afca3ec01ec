"""Write `guard/english.txt`: the English words and word pairs `guard.flipped` finds text
written backwards by.

Counted over the training files of ../shared/data (role A in its README; none of the
development sets the tables report), each line's words lower-cased and letters only:

- words: the 3,000 commonest of two letters or more; flipped, those whose flipped form
  is seen at least 20 times less often (``tahw`` for "what"; not ``pets`` for "step");
- pairs: the 6,000 commonest pairs of adjacent words seen 20 times or more and at least
  5 times as often (plus one) as the other way round (``of the``, ``how to``).

    PYTHONPATH=. python bench/english_words.py [--data DIR] [--out guard/english.txt]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter

TRAINING = ("alpaca_harmless_instructions", "advbench_harmful_behaviors", "sorry_bench", "trivia_qa_prompts",
            "toxicchat0124_train_human", "trustllm_misuse", "trustllm_jailbreak", "malicious_instruct",
            "guardreasoner_train_prompt_sample5k", "toxigen_seed_statements", "dices_990")
_NOT_LETTER = re.compile("[^a-z]")


def count(folder: str) -> tuple[Counter, Counter]:
    words: Counter = Counter()
    pairs: Counter = Counter()
    for name in TRAINING:
        with open(f"{folder}/{name}.jsonl") as f:
            for line in f:
                row = json.loads(line)
                for text in (row["prompt"], row.get("response") or ""):
                    for text_line in text.lower().split("\n"):
                        keys = [w for w in (_NOT_LETTER.sub("", t) for t in text_line.split()) if w]
                        words.update(keys)
                        pairs.update(zip(keys, keys[1:]))
    return words, pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="guard/english.txt")
    args = ap.parse_args()
    words, pairs = count(args.data)
    common = [w for w, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])) if len(w) >= 2][:3000]
    flippable = {w for w in common if w[::-1] != w and 20 * words.get(w[::-1], 0) <= words[w]}
    one_way = [(pair, n) for pair, n in pairs.items()
               if n >= 20 and pair[0] != pair[1] and n + 1 >= 5 * (pairs.get(pair[::-1], 0) + 1)]
    one_way.sort(key=lambda item: (-item[1], item[0]))
    with open(args.out, "w") as f:
        f.write("# English words and one-way word pairs, from the training files of siren-proxy's data\n"
                "# (bench/english_words.py says how). Used by guard/flipped.py. A word marked - is one\n"
                "# whose flipped form is a word too.\n[words]\n")
        f.writelines(f"{w}\n" if w in flippable else f"{w} -\n" for w in common)
        f.write("[pairs]\n")
        f.writelines(f"{a} {b}\n" for (a, b), _ in one_way[:6000])
    print(f"{len(common)} words ({len(flippable)} flippable), {min(len(one_way), 6000)} of {len(one_way)} "
          f"one-way pairs written to {args.out}")


if __name__ == "__main__":
    main()
