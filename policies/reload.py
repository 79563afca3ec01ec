"""The config currently serving, and swapping in a new one only when it is valid.

A request reads `holder.current` once when it starts and keeps that `Config` to the end,
so a reload never changes the policy of a request in flight. `reload()` parses the file
and swaps only on success; a bad file is logged (the `ConfigError` names file, key and
line, never a secret) and the old config keeps serving. The swap is one attribute
assignment, atomic under the GIL; a lock keeps two reloads from interleaving.

`changed()` is the poll behind "reload on file change": cheap `stat` first, then a hash
of the content so a touch without an edit is not a reload. A change counts once the
file's `stat` has held for a whole poll: a file rewritten in place (truncated, then
written) can be read half-written, and half a config may still parse (one cut before its
`api_keys` turns auth off). The fingerprint is updated by every reload attempt, good or
bad, so a bad file is reported once, not at every poll.

Policies, routes, upstreams and the per-request `server` settings take effect on reload;
the listening address, the shutdown grace period, the log level, the audit file and
`guard` are read at start-up,
and `restart_needed(old, new)` names those that differ so the proxy can log it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from operator import attrgetter
from pathlib import Path

from policies.config import Config, load_config, parse_config
from policies.errors import ConfigError

logger = logging.getLogger(__name__)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class ConfigHolder:
    """Holds the serving `Config`; `current` is always a complete, valid config."""

    def __init__(self, config: Config, *, path: str | None = None, env: Mapping[str, str] | None = None) -> None:
        self._current = config
        self._started = config  # what start-up-only settings stay at until a restart
        self.path = path if path is not None else config.path
        self._env = env
        self._lock = threading.Lock()
        self._stat = _stat(self.path) if self.path else None  # what the last read saw
        self._seen = self._stat  # what the last poll saw
        self._digest = self._hash() if self.path else None

    @classmethod
    def load(cls, path: str, *, env: Mapping[str, str] | None = None) -> ConfigHolder:
        """Load the first config; a bad file here is a `ConfigError` (nothing to fall back on)."""
        return cls(load_config(path, env=env), path=path, env=env)

    @property
    def current(self) -> Config:
        return self._current

    def _hash(self) -> str | None:
        try:
            return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()
        except OSError:
            return None

    def changed(self) -> bool:
        """Whether the file differs from what the last load or reload attempt read, and
        has stayed as it is since the last poll."""
        if not self.path:
            return False
        stat, seen = _stat(self.path), self._seen
        self._seen = stat
        if stat is None or stat == self._stat or stat != seen:  # unchanged, or still changing
            return False
        digest = self._hash()
        if digest == self._digest:
            self._stat = stat
            return False
        return True

    def reload(self, path: str | None = None) -> bool:
        """Parse the file and swap it in; False (old config kept, error logged) if invalid."""
        path = path or self.path
        if path is None:
            raise ValueError("this holder has no config file to reload")
        with self._lock:
            self.path = path
            self._stat = self._seen = _stat(path)
            try:
                data = Path(path).read_bytes()
                self._digest = hashlib.sha256(data).hexdigest()
                new = parse_config(data.decode("utf-8"), path=path,
                                   env=os.environ if self._env is None else self._env)
            except (OSError, UnicodeDecodeError) as exc:
                logger.error("config reload rejected, keeping the old config: %s: cannot read: %s", path, exc)
                return False
            except ConfigError as exc:
                logger.error("config reload rejected, keeping the old config: %s", exc)
                return False
            stale = restart_needed(self._started, new)
            if stale:
                logger.warning("config reloaded; changes to %s take effect only after a restart", ", ".join(stale))
            else:
                logger.info("config reloaded from %s", path)
            self._current = new
            return True


# Read once, at start-up: the listening socket, the shutdown grace period (uvicorn's), the
# log, the audit file and the loaded guard. The rest of `server` (keys, body and stream
# limits, the request deadline) is read by each request, so a reload rotates keys and
# changes limits at once.
STARTUP_ONLY = ("server.host", "server.port", "server.shutdown_timeout", "server.audit_log", "server.log_level",
                "guard")


def restart_needed(old: Config, new: Config) -> tuple[str, ...]:
    """The settings that differ but are only read at start-up (`STARTUP_ONLY`)."""
    return tuple(name for name in STARTUP_ONLY if attrgetter(name)(old) != attrgetter(name)(new))
