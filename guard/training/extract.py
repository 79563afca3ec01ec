"""Pooled features of every layer for many texts: batched, cached on disk, resumable.

The cache is a directory per (backbone, dtype, pooling, max_length). Work is done in
chunks; each finished chunk is written atomically as ``chunk-<digest>.npz`` holding the
texts' SHA-1 keys and their features ``(n, n_layers, hidden)`` as float32. A run that is
interrupted loses at most the chunk in flight, and the next run (or `siren-proxy eval`
on the same texts) extracts only what no chunk holds yet.

Texts are sorted by token count and batched under a token budget, so padding waste
stays small; features come from `guard.features.pooled_features`, the function serving
uses, so a cached row is exactly what the runtime would pool for the same string.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from guard.features import pooled_features

logger = logging.getLogger(__name__)


def truncate_backbone(model: torch.nn.Module, n_layers: int) -> torch.nn.Module:
    """Keep only the first `n_layers` blocks of a Llama-style LM, in place, for extraction.

    hidden_states[l + 1] (the residual after block l) depends only on blocks 0..l, so
    dropping later blocks changes no feature of a kept layer. The final norm is replaced
    by identity because Hugging Face applies it to the last hidden state returned; with
    it removed, hidden_states[n_layers] is block n_layers-1's raw residual, as in the
    full model. Training never reads a dropped layer, so the artifact it writes selects
    only layers < n_layers.
    """
    inner = model.model
    if n_layers >= len(inner.layers):
        return model
    inner.layers = inner.layers[:n_layers]
    inner.norm = torch.nn.Identity()
    model.config.num_hidden_layers = n_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n_layers]
    return model


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def cache_dir_for(root: str | os.PathLike, backbone_source: str, dtype: str,
                  pooling: str, max_length: int, n_layers: int) -> Path:
    """One directory per setting that changes a feature; the layer count changes the shape."""
    what = f"{backbone_source}|{dtype}|{pooling}|{max_length}|{n_layers}"
    tag = hashlib.sha1(what.encode()).hexdigest()[:12]
    return Path(root) / f"{Path(backbone_source).name}-{dtype}-{pooling}-{max_length}-L{n_layers}-{tag}"


class FeatureCache:
    """{text key: (n_layers, hidden) float32} backed by chunk files in one directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, tuple[Path, int]] = {}
        self._loaded: dict[Path, np.ndarray] = {}
        for path in sorted(self.directory.glob("chunk-*.npz")):
            with np.load(path) as z:
                for row, key in enumerate(z["keys"]):
                    self._where[str(key)] = (path, row)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """(len(keys), n_layers, hidden) float32 features, in the order of `keys`."""
        out = []
        for key in keys:
            path, row = self._where[key]
            if path not in self._loaded:
                with np.load(path) as z:
                    self._loaded[path] = z["features"]
            out.append(self._loaded[path][row])
        return np.stack(out).astype(np.float32)

    def put(self, keys: Sequence[str], features: np.ndarray) -> None:
        """Write one chunk atomically: rename a finished temp file into place."""
        digest = hashlib.sha1("".join(keys).encode()).hexdigest()[:16]
        target = self.directory / f"chunk-{digest}.npz"
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp.npz")
        os.close(fd)
        np.savez(tmp, keys=np.array(keys), features=features.astype(np.float32))
        os.replace(tmp, target)
        for row, key in enumerate(keys):
            self._where[key] = (target, row)


def token_batches(lengths: Sequence[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Indices grouped so each batch's padded size (len × longest) stays under budget.

    Expects indices already sorted by length, longest first, so the first batch (the
    most memory-hungry) fails fast if the budget is too large.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        width = max(longest, n)
        if current and (width * (len(current) + 1) > token_budget or len(current) >= max_batch):
            batches.append(current)
            current, width = [], n
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def extract(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    cache: FeatureCache,
    *,
    max_length: int,
    pooling: str = "residual_mean",
    token_budget: int = 8192,
    max_batch: int = 64,
    chunk_texts: int = 512,
    progress: bool = True,
) -> np.ndarray:
    """(len(texts), n_layers, hidden) float32 pooled features of all layers, via the cache.

    `texts` must already be `guard.text.model_text` strings.
    """
    from tqdm.auto import tqdm

    n_layers = len(model.model.layers) if hasattr(model, "model") else len(model.layers)
    layers = list(range(n_layers))
    keys = [text_key(t) for t in texts]
    todo: dict[str, str] = {}
    for key, text in zip(keys, texts):
        if key not in cache and key not in todo:
            todo[key] = text
    if todo:
        todo_keys = list(todo)
        lengths = [len(ids) for ids in tokenizer([todo[k] for k in todo_keys], truncation=True,
                                                 max_length=max_length)["input_ids"]]
        order = sorted(range(len(todo_keys)), key=lambda i: -lengths[i])
        bar = tqdm(total=sum(lengths), unit="tok", desc="features", disable=not progress)
        for start in range(0, len(order), chunk_texts):
            chunk = order[start:start + chunk_texts]
            feats = np.zeros((len(chunk), n_layers, model.config.hidden_size), dtype=np.float32)
            for batch in token_batches([lengths[i] for i in chunk], token_budget, max_batch):
                batch_texts = [todo[todo_keys[chunk[j]]] for j in batch]
                pooled = pooled_features(model, tokenizer, batch_texts, layers, pooling, max_length)
                stacked = torch.stack([pooled[layer] for layer in layers], dim=1)  # (batch, layers, hidden)
                feats[batch] = stacked.numpy()
                bar.update(sum(lengths[chunk[j]] for j in batch))
            cache.put([todo_keys[i] for i in chunk], feats)
        bar.close()
    return cache.get(keys)
