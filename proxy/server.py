"""`siren-proxy serve`: load the config, start the guard, run uvicorn, reload on change.

The port opens at once; the guard loads on a worker thread meanwhile, and `/readyz`
says 503 until it has. Until then a guarded request meets the policy's
`on_guard_error` (fail closed by default), never an unguarded pass. A config whose
routes score nothing loads no guard, until a reload makes one score.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import sys
from collections.abc import Callable

import uvicorn

from policies.config import Config, upstream_base_url, without_userinfo
from policies.errors import ConfigError
from policies.reload import ConfigHolder
from policies.routing import guard_needed

from .app import build_app
from .embedded import LoadingScorer
from .front import FrontDoor

logger = logging.getLogger(__name__)

def reload_poll_seconds(environ=os.environ) -> float:
    """How often the config file is checked for changes (SIGHUP reloads at once, any time):
    `SIREN_PROXY_RELOAD_POLL_SECONDS`, 2 when unset; a `ValueError` unless a finite number
    > 0 (0 or less would poll without pause on the event loop, NaN or infinity never)."""
    raw = environ.get("SIREN_PROXY_RELOAD_POLL_SECONDS", "2")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"must be a finite number of seconds > 0; got {raw!r}")
    return seconds


def with_overrides(config: Config, upstream: str | None) -> Config:
    """`config` with every upstream's base_url replaced by `upstream`, which `serve` has
    checked as a config file's `base_url` is (`upstream_base_url`)."""
    if upstream is None:
        return config
    base = upstream_base_url(upstream)
    upstreams = {name: dataclasses.replace(u, base_url=base) for name, u in config.upstreams.items()}
    return dataclasses.replace(config, upstreams=upstreams)


class OverridingHolder(ConfigHolder):
    """A ConfigHolder that re-applies the command line's `--upstream` after each reload,
    then calls `on_reload(config)` if set."""

    def __init__(self, config: Config, *, path: str, upstream: str | None,
                 on_reload: Callable[[Config], None] | None = None) -> None:
        self._upstream = upstream
        self.on_reload = on_reload
        super().__init__(with_overrides(config, upstream), path=path)

    def reload(self, path: str | None = None) -> bool:
        ok = super().reload(path)
        if ok:
            self._current = with_overrides(self._current, self._upstream)
            if self.on_reload is not None:
                self.on_reload(self._current)
        return ok


def load_when_needed(scorer: LoadingScorer) -> Callable[[Config], None]:
    """After a reload: a proxy that started with no route scoring loaded no guard; load it
    now that a route scores, so the route is guarded once it has loaded (until then its
    requests meet `on_guard_error`), with no restart."""

    def check(config: Config) -> None:
        if guard_needed(config) and scorer.start():
            logger.warning("a route now scores text: loading the guard (until it is ready, guarded "
                           "requests meet their policy's on_guard_error)")

    return check


async def watch_config(holder: ConfigHolder, poll: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, holder.reload)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no SIGHUP
        pass
    while True:
        await asyncio.sleep(poll)
        try:
            if holder.changed():
                holder.reload()
        except Exception:  # noqa: BLE001 - a reload's bug must not end the watch for good
            logger.exception("config reload failed, keeping the old config")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which tells the proxy when shutdown begins. uvicorn stops taking
    connections and gives the requests in flight `timeout_graceful_shutdown` seconds,
    then cancels them: a stream cut so reaches its client as a broken body, a request not
    answered yet as a bare 500. A request still going shortly before then is ended by the
    proxy instead (`Proxy.drain`): a 503 `server_shutting_down` before the answer began, a
    stream with that error in-band and `[DONE]`."""

    async def shutdown(self, sockets=None) -> None:
        grace = self.config.timeout_graceful_shutdown or 0.0
        self.config.app.state.proxy.drain(max(0.0, grace - min(1.0, grace / 2)))
        await super().shutdown(sockets=sockets)


def serve(config_path: str, *, host: str | None = None, port: int | None = None,
          upstream: str | None = None, log_level: str | None = None) -> int:
    from policies.config import check_paths, load_config

    if upstream is not None:
        try:
            upstream_base_url(upstream)
        except ValueError as exc:  # as the file's `base_url` would be refused, before anything starts
            print(f"siren-proxy: invalid --upstream: {exc}; got {without_userinfo(upstream)!r}", file=sys.stderr)
            return 2
    try:
        poll = reload_poll_seconds()
    except ValueError as exc:
        print(f"siren-proxy: invalid SIREN_PROXY_RELOAD_POLL_SECONDS: {exc}", file=sys.stderr)
        return 2
    try:
        config = load_config(config_path)
        check_paths(config)
    except ConfigError as exc:
        print(f"siren-proxy: invalid config: {exc}", file=sys.stderr)
        return 2
    level = (log_level or config.server.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every upstream request at INFO: a line per request, and their URLs.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    scorer = LoadingScorer(config.guard, start=guard_needed(config))
    holder = OverridingHolder(config, path=config_path, upstream=upstream, on_reload=load_when_needed(scorer))
    app = build_app(holder, scorer)
    server = DrainingServer(uvicorn.Config(
        app, host=host or config.server.host, port=config.server.port if port is None else port,
        log_level=level.lower(), lifespan="on", timeout_graceful_shutdown=config.server.shutdown_timeout,
        loop="auto", http=FrontDoor))

    async def main() -> None:
        watcher = asyncio.create_task(watch_config(holder, poll))
        try:
            await server.serve()
        finally:
            watcher.cancel()
            scorer.close()

    try:
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:  # uvloop when installed
            runner.run(main())
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    return 0
