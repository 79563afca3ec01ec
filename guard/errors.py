"""The guard's one exception tree.

    GuardError                      anything the guard raises on purpose
    ├── ArtifactError (ValueError)  a siren_config.json / siren.safetensors that is refused
    ├── BackboneError               the backbone cannot be found or loaded (guard.backbone)
    ├── ScoringError                the model failed while scoring (cause chained)
    ├── QueueFull                   the worker already holds `max_queue` pending items
    ├── WorkerClosed                the worker (or the guard) was closed before it could answer
    └── Abandoned                   everyone waiting for a scoring gave up; it stopped

The proxy fails closed on any `GuardError`, so a model failure must reach the awaiting
caller as one of these, never as a bare torch or tokenizer exception.
"""

from __future__ import annotations


class GuardError(Exception):
    """Base class of every error the guard raises on purpose."""


class ArtifactError(GuardError, ValueError):
    """An artifact field is missing, unknown or unsupported; the message names it."""


class BackboneError(GuardError, RuntimeError):
    """The backbone named by an artifact or option cannot be found or loaded."""


class ScoringError(GuardError, RuntimeError):
    """The backbone or head raised while scoring; the original is the `__cause__`."""


class QueueFull(GuardError):
    """The worker's queue is full; raised at once rather than blocking the caller."""


class WorkerClosed(GuardError):
    """The worker (or `SirenGuard`) was closed; pending and later requests get this."""


class Abandoned(GuardError):
    """A scoring stopped part-way because no caller waits for it any more."""
