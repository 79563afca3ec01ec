"""What the proxy remembers of each guarded exchange: log lines and the audit file.

One INFO line per decision (route, policy, stage, score, action, milliseconds), never
the prompt or response text. The optional audit log (`server.audit_log`) gets one JSON
line per request with every decision and, for streams, each choice's score trajectory
(`[tokens, score]` at every check), so a stricter threshold can be replayed offline.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from policies.decisions import Decision

from .metrics import Metrics

logger = logging.getLogger("siren_proxy.decisions")


@dataclass
class Exchange:
    """The record of one request, filled in as it is served."""

    route: str
    policy: str
    endpoint: str
    stream: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.time)
    decisions: list[dict] = field(default_factory=list)
    trajectories: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    leaked_tokens: dict[int, int] = field(default_factory=dict)
    metrics: Metrics | None = field(default=None, repr=False)

    def decided(self, decision: Decision, ms: float, *, choice: int | None = None) -> None:
        score = "-" if decision.score is None else f"{decision.score:.4f}"
        logger.info("route=%s policy=%s stage=%s score=%s action=%s crossed=%s ms=%.1f%s",
                    self.route, self.policy, decision.stage, score, decision.action,
                    decision.crossed, ms, "" if choice is None else f" choice={choice}")
        if self.metrics is not None:
            self.metrics.decisions.labels(decision.stage, decision.action).inc()
        self.decisions.append({"stage": decision.stage, "action": decision.action, "score": decision.score,
                               "threshold": decision.threshold, "crossed": decision.crossed,
                               "guard_error": decision.guard_error, "ms": round(ms, 2),
                               **({} if choice is None else {"choice": choice})})

    def scored(self, choice: int, tokens: int, score: float) -> None:
        self.trajectories.setdefault(choice, []).append((tokens, round(score, 6)))

    def timed(self, stage: str, seconds: float, *, tokens: int = 0) -> None:
        """One guard call's latency (and, for stream checks, the tokens it scored)."""
        if self.metrics is not None:
            self.metrics.guard_latency.labels(stage).observe(seconds)
            if tokens:
                self.metrics.tokens_scored.inc(tokens)

    def leaked(self, choice: int, tokens: int) -> None:
        self.leaked_tokens[choice] = tokens
        if self.metrics is not None and tokens:
            self.metrics.tokens_leaked.inc(tokens)

    def to_json(self) -> dict:
        return {"id": self.id, "time": round(self.started, 3), "route": self.route, "policy": self.policy,
                "endpoint": self.endpoint, "stream": self.stream, "decisions": self.decisions,
                "trajectories": {str(k): v for k, v in self.trajectories.items()},
                "leaked_tokens": {str(k): v for k, v in self.leaked_tokens.items()}}


class AuditLog:
    """Append-only JSONL; one line per exchange, written whole under a lock."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives with the app

    def write(self, exchange: Exchange) -> None:
        line = json.dumps(exchange.to_json(), ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)

    def close(self) -> None:
        with self._lock:
            self._file.close()
