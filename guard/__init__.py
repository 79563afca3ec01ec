"""The SIREN guard: a frozen causal LM's pooled safety neurons, scored by a small MLP.

A library of its own (no HTTP): `from guard import SirenGuard, ScoreResult` is a drop-in
for `from siren_guard import SirenGuard, ScoreResult`. Errors: see `guard.errors` (one
tree under `GuardError`). `SirenGuard` is imported lazily, so importing `guard` or
`guard.errors` does not import torch.
"""

from __future__ import annotations

from guard.errors import (
    ArtifactError, BackboneError, GuardError, QueueFull, ScoringError, WorkerClosed,
)
from guard.result import ScoreResult

__all__ = [
    "SirenGuard", "ScoreResult", "GuardError", "ArtifactError", "BackboneError",
    "ScoringError", "QueueFull", "WorkerClosed",
]


def __getattr__(name: str):
    if name == "SirenGuard":
        from guard.siren import SirenGuard

        return SirenGuard
    raise AttributeError(f"module 'guard' has no attribute {name!r}")
