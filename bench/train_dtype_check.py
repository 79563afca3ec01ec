"""Does the shipped head (fitted on float32 features) score the same on a bfloat16 backbone?

Scores a seeded sample of development rows with our runtime in float32 and in bfloat16
and prints the largest and mean absolute score difference, the decisions that flip at the
default threshold, and the wall time of each. Usage:

    PYTHONPATH=. python bench/train_dtype_check.py ../shared/data/xstest_prompts.jsonl:60 ...
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from guard import SirenGuard
from guard.training.data import load_rows, parse_data_spec


def main(specs: list[str]) -> None:
    torch.set_num_threads(2)
    rows = []
    for spec in specs:
        path, limit, seed = parse_data_spec(spec)
        rows += load_rows(path, limit=limit, seed=seed or 0)
    texts = [r.text for r in rows]
    scores, seconds = {}, {}
    for dtype in ("float32", "bfloat16"):
        guard = SirenGuard.from_pretrained(None, device="cpu", dtype=dtype, long_text="truncate")
        start = time.monotonic()
        out = []
        for i in range(0, len(texts), 16):
            out += [r.score for r in guard.score_batch(texts[i:i + 16])]
        seconds[dtype] = round(time.monotonic() - start, 1)
        scores[dtype] = np.array(out)
        threshold = guard.default_threshold
        guard.close()
    diff = np.abs(scores["float32"] - scores["bfloat16"])
    flips = int(np.sum((scores["float32"] >= threshold) != (scores["bfloat16"] >= threshold)))
    print(json.dumps({"rows": len(rows), "max_abs_diff": round(float(diff.max()), 4),
                      "mean_abs_diff": round(float(diff.mean()), 4), "decision_flips": flips,
                      "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
