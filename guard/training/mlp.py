"""The MLP head: fitted on standardised features, shipped on raw ones.

The runtime feeds the MLP raw pooled neurons times layer weights (no normaliser exists
in the llm-siren format). Training standardises inputs for conditioning, then folds the
standardisation into the first linear layer, and Platt scaling into the last one, so
the shipped state_dict computes exactly: calibrated logits of raw features.
Layout matches the reference `_AdaptiveMLPClassifier` (`network.0.weight`, ...).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from guard.head import SirenHead


@dataclass(frozen=True)
class HeadSpec:
    hidden: tuple[int, ...]
    dropout: float
    weight_decay: float
    lr: float = 1e-3


@dataclass(frozen=True)
class FittedHead:
    spec: HeadSpec
    state_dict: dict[str, torch.Tensor]  # raw-feature, calibrated; reference layout
    val_loss: float  # balanced cross-entropy on validation at the best epoch
    epochs: int


def build_mlp(input_dim: int, hidden: Sequence[int], dropout: float) -> SirenHead:
    """The runtime's head module (reference layout: Linear, ReLU, [Dropout] per hidden layer)."""
    return SirenHead(input_dim, list(hidden), [dropout] * len(hidden), num_classes=2)


def _balanced_weights(y: np.ndarray) -> torch.Tensor:
    counts = np.bincount(y, minlength=2).astype(np.float64)
    return torch.tensor(len(y) / (2 * np.maximum(counts, 1)), dtype=torch.float32)


def train_one(
    spec: HeadSpec,
    x_train: np.ndarray,  # (n_train, dim) standardised
    y_train: np.ndarray,
    x_val: np.ndarray,  # (n_val, dim) standardised
    y_val: np.ndarray,
    *,
    seed: int,
    max_epochs: int = 60,
    patience: int = 6,
    batch_size: int = 128,
    sample_weight: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[SirenHead, float, int]:
    """Class-balanced training with early stopping on validation loss.

    `sample_weight` (train, validation) replaces the class weights with one weight per
    row (the loss is the weighted mean); the class weights are the special case
    ``weight[i] = class_weight[y[i]]``. `bench/head_variants.py` uses it to re-weight sources.
    """
    torch.manual_seed(seed)
    net = build_mlp(x_train.shape[1], spec.hidden, spec.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    xt = torch.from_numpy(x_train)  # (n_train, dim)
    yt = torch.from_numpy(y_train.astype(np.int64))  # (n_train,)
    xv = torch.from_numpy(x_val)  # (n_val, dim)
    yv = torch.from_numpy(y_val.astype(np.int64))  # (n_val,)
    if sample_weight is None:
        train_loss = nn.CrossEntropyLoss(weight=_balanced_weights(y_train))
        val_loss = nn.CrossEntropyLoss(weight=_balanced_weights(y_val))

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            return train_loss(net(xt[idx]), yt[idx])
    else:
        wt, wv = (torch.as_tensor(np.asarray(w, dtype=np.float32)) for w in sample_weight)
        if wt.shape != yt.shape or wv.shape != yv.shape:
            raise ValueError("sample_weight needs one weight per training and per validation row")
        per_row = nn.CrossEntropyLoss(reduction="none")

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            return (per_row(net(xt[idx]), yt[idx]) * wt[idx]).sum() / wt[idx].sum()

        def val_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (per_row(logits, y) * wv).sum() / wv.sum()
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, since = float("inf"), None, 0, 0
    for epoch in range(1, max_epochs + 1):
        net.train()
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            batch_loss(idx).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            loss = float(val_loss(net(xv), yv))
        if loss < best - 1e-4:
            best, best_state, best_epoch, since = loss, copy.deepcopy(net.state_dict()), epoch, 0
        else:
            since += 1
            if since >= patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    return net, best, best_epoch


def search(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
    *, grid: Sequence[HeadSpec], seed: int,
) -> tuple[SirenHead, HeadSpec, float, int]:
    """The grid's best network by validation loss (ties: first in grid order)."""
    best = None
    for spec in grid:
        net, loss, epochs = train_one(spec, x_train, y_train, x_val, y_val, seed=seed)
        if best is None or loss < best[2] - 1e-6:
            best = (net, spec, loss, epochs)
    return best


def ensemble(
    spec: HeadSpec, first: SirenHead, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
    y_val: np.ndarray, *, members: int, seed: int,
    sample_weight: tuple[np.ndarray, np.ndarray] | None = None,
) -> SirenHead:
    """`first` and `members - 1` more fits of `spec` (seeds seed+1, ...), merged into one head."""
    nets = [first] + [train_one(spec, x_train, y_train, x_val, y_val, seed=seed + k, sample_weight=sample_weight)[0]
                      for k in range(1, members)]
    return merge(nets, spec.dropout) if len(nets) > 1 else first


@torch.no_grad()
def merge(nets: Sequence[SirenHead], dropout: float) -> SirenHead:
    """One wider head whose logits are the mean of `nets`' logits, exactly.

    The members run side by side: the first layers' rows are stacked (every member reads
    the same input), deeper hidden layers are block-diagonal, and the last layer
    concatenates the members' inputs with its weights divided by their number. So an
    ensemble ships in the llm-siren format as an ordinary MLP `len(nets)` times as wide.
    """
    linears = [[m for m in net.network if isinstance(m, nn.Linear)] for net in nets]
    first = linears[0]
    widths = [lin.out_features * len(nets) for lin in first[:-1]]
    merged = build_mlp(first[0].in_features, widths, dropout)  # dropout: recorded, inert at inference
    out = [m for m in merged.network if isinstance(m, nn.Linear)]
    for i, lin in enumerate(out):
        parts = [member[i] for member in linears]
        if i == len(out) - 1:  # logits: the mean of the members'
            weights = [p.weight for p in parts]
            lin.weight.copy_(torch.stack(weights).mean(dim=0) if i == 0 else torch.cat(weights, dim=1) / len(nets))
            lin.bias.copy_(torch.stack([p.bias for p in parts]).mean(dim=0))
        else:  # the first layer reads the shared input; deeper ones only their member's units
            weights = [p.weight for p in parts]
            lin.weight.copy_(torch.cat(weights, dim=0) if i == 0 else torch.block_diag(*weights))
            lin.bias.copy_(torch.cat([p.bias for p in parts]))
    return merged.eval()


def default_grid() -> list[HeadSpec]:
    return [HeadSpec(hidden=(h,), dropout=d, weight_decay=wd)
            for h, d, wd in itertools.product((128, 256), (0.3, 0.5), (1e-2,))]


@torch.no_grad()
def logit_margin(net: SirenHead, x: np.ndarray) -> np.ndarray:
    """l1 - l0 per row: the score's logit, since softmax(l)[1] = sigmoid(l1 - l0)."""
    logits = net(torch.from_numpy(x))  # (n, 2)
    return (logits[:, 1] - logits[:, 0]).numpy()


@torch.no_grad()
def fold(net: SirenHead, mu: np.ndarray, sd: np.ndarray, platt_a: float, platt_b: float
         ) -> dict[str, torch.Tensor]:
    """The state_dict of `net` rewritten to take raw inputs and emit calibrated logits.

    net(standardise(z)) with standardise(z) = (z - mu) / sd becomes net'(z): the first
    layer's W, b -> W / sd, b - W @ (mu / sd). Platt scaling sigmoid(a·m + b) of the
    margin m = l1 - l0 becomes the last layer's rows scaled by a and b added to class 1.
    """
    state = {k: v.detach().clone().to(torch.float32) for k, v in net.state_dict().items()}
    linear_keys = sorted({k.rsplit(".", 1)[0] for k in state}, key=lambda k: int(k.split(".")[-1]))
    first, last = linear_keys[0], linear_keys[-1]
    mu_t = torch.from_numpy(mu.astype(np.float64))  # (dim,)
    sd_t = torch.from_numpy(sd.astype(np.float64))  # (dim,)
    w = state[f"{first}.weight"].to(torch.float64)  # (hidden, dim)
    b = state[f"{first}.bias"].to(torch.float64)  # (hidden,)
    state[f"{first}.weight"] = (w / sd_t).to(torch.float32)
    state[f"{first}.bias"] = (b - w @ (mu_t / sd_t)).to(torch.float32)
    state[f"{last}.weight"] = state[f"{last}.weight"] * platt_a
    bias = state[f"{last}.bias"] * platt_a
    bias[1] += platt_b
    state[f"{last}.bias"] = bias
    return state
