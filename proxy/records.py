"""What the proxy remembers of each guarded exchange: log lines and the audit file.

One INFO line per decision (route, policy, stage, score, action, milliseconds), never
the prompt or response text. The optional audit log (`server.audit_log`) gets one JSON
line per request with every decision and, for streams, each choice's score trajectory
(`[tokens, score]` at every check), so a stricter threshold can be replayed offline.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

from policies.decisions import Decision

from .metrics import Metrics

logger = logging.getLogger(__name__)
decisions_logger = logging.getLogger("siren_proxy.decisions")


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
        decisions_logger.info("route=%s policy=%s stage=%s score=%s action=%s crossed=%s ms=%.1f%s%s",
                    self.route, self.policy, decision.stage, score, decision.action,
                    decision.crossed, ms, "" if choice is None else f" choice={choice}",
                    "" if decision.reason is None else f" reason={decision.reason}")
        if self.metrics is not None:
            self.metrics.decisions.labels(decision.stage, decision.action).inc()
        self.decisions.append({"stage": decision.stage, "action": decision.action, "score": decision.score,
                               "threshold": decision.threshold, "crossed": decision.crossed,
                               "guard_error": decision.guard_error, "ms": round(ms, 2),
                               **({} if choice is None else {"choice": choice}),
                               **({} if decision.reason is None else {"reason": decision.reason})})

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
    """Append-only JSONL; one line per exchange, written whole under a lock.

    A line that cannot be written (a full disk, a quota, an I/O error) is lost and never
    fails the request it records: by then the guard has decided and the client's answer
    is made (each such request was a 500, or a traceback after its stream). The first loss
    is logged at ERROR, and how many were lost once lines are written again. Lines go
    straight to the file (`os.write`, no buffer), so a lost line is not written later by
    the next one or at close (which raised at shutdown), and a line cut short by a full
    disk is ended before the next, so every other line still parses. A line written after
    `close` (a response uvicorn cancelled, cleaned up as the app stops) is lost too, never
    written through a descriptor number the process may have given to another file.

    Lines go to the file `path` names when written: a file moved away (logrotate's
    default, move then create) or removed is let go and `path` opened (created) anew, as
    `logging.handlers.WatchedFileHandler` does; before, every later line went on into the
    moved file, or into a removed one and so nowhere. One `stat` a line.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = -1
        self._cut_short = False  # the last line written to this file stopped before its newline
        self._open()
        self._lost = 0  # lines lost since the last one written

    def write(self, exchange: Exchange) -> None:
        line = (json.dumps(exchange.to_json(), ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            written = 0
            try:
                if self._fd < 0:  # closed with the app: its number may be another file's now
                    raise OSError(errno.EBADF, "the audit log is closed")
                if self._moved():
                    self._open()
                if self._cut_short:
                    line = b"\n" + line
                while written < len(line):
                    written += os.write(self._fd, line[written:])
            except OSError as exc:
                self._cut_short = self._cut_short or 0 < written
                if not self._lost:
                    logger.error("audit log %s: cannot write (%s); lines are lost until it can", self.path,
                                 exc.strerror or exc)
                self._lost += 1
                return
            self._cut_short = False
            if self._lost:
                logger.warning("audit log %s: writing again; %d line(s) were lost", self.path, self._lost)
                self._lost = 0

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._cut_short = fd, False
        st = os.fstat(fd)
        self._id = (st.st_dev, st.st_ino)

    def _moved(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._id

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
