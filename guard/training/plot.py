"""Precision, recall and F1 against the threshold, one panel per dataset.

For users choosing a threshold per route: two-class sets show the harmful class's
precision, recall and F1 and the macro F1; harmful-only sets show recall; benign-only
sets show the false-positive rate. The lexical baseline's F1 (or recall/FPR) is dashed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from guard.training.metrics import at_threshold, threshold_grid


def plot_curves(curves: dict[str, dict], default_threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = threshold_grid()
    n = len(curves)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, c) in zip(axes.flat, curves.items()):
        y = c["labels"]
        pts = [at_threshold(y, c["siren"], t) for t in grid]
        has_pos, has_neg = bool((y == 1).any()), bool((y == 0).any())
        if has_pos and has_neg:
            ax.plot(grid, [p.precision if p.precision is not None else np.nan for p in pts], label="precision")
            ax.plot(grid, [p.recall for p in pts], label="recall")
            ax.plot(grid, [p.f1 for p in pts], label="F1")
            ax.plot(grid, [p.macro_f1 for p in pts], label="macro F1")
            key = "macro_f1"
        elif has_pos:
            ax.plot(grid, [p.recall for p in pts], label="recall")
            key = "recall"
        else:
            ax.plot(grid, [p.fpr for p in pts], label="false-positive rate")
            key = "fpr"
        if c.get("lexical") is not None:
            base = [getattr(at_threshold(y, c["lexical"], t), key) for t in grid]
            ax.plot(grid, base, "k--", linewidth=1, label=f"lexical {key}")
        ax.axvline(default_threshold, color="grey", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("threshold")
        ax.legend(fontsize=6, loc="lower left")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
