"""The ASGI application: health, readiness, and every other path through the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .cors import Cors
from .errors import BadRequest, NotFound, anthropic_path, error_response
from .handler import Proxy
from .metrics import Metrics
from .records import AuditLog
from .scorer import Scorer
from .upstream import UpstreamPool

logger = logging.getLogger(__name__)

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def build_app(holder, scorer: Scorer | None = None) -> Starlette:
    """`holder.current` is the live Config; `scorer` is None, or not started, while no route
    scores text."""
    pool = UpstreamPool()
    audit_path = holder.current.server.audit_log
    audit = AuditLog(audit_path) if audit_path else None
    metrics = Metrics()
    proxy = Proxy(holder, pool, scorer, audit, metrics)
    if scorer is not None and hasattr(scorer, "watch"):
        scorer.watch(metrics)  # the guard worker reports batch sizes and queue depth

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        config = holder.current
        checks = await asyncio.gather(*(upstream_reachable(pool, u) for u in config.upstreams.values()))
        upstreams = dict(zip(config.upstreams, checks))
        if scorer is None or not getattr(scorer, "started", True):  # no route scores text
            guard = "absent"
        elif scorer.ready:
            guard = "ready"
        else:
            guard = "failed" if getattr(scorer, "error", None) is not None else "loading"
        ready = all(checks) and guard in ("ready", "absent")
        body = {"ready": ready, "upstreams": upstreams, "guard": guard}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        try:
            yield
        finally:
            await pool.aclose()
            if audit is not None:
                audit.close()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """What the router itself refuses (a method it does not route, a path it cannot
        match) in OpenAI's format (Anthropic's under `/v1/messages`) too."""
        kind = NotFound if exc.status_code == 404 else BadRequest
        error = kind(exc.detail if isinstance(exc.detail, str) else "request not routable")
        error.status = exc.status_code
        response = error_response(error, anthropic=anthropic_path(request.url.path))
        response.headers.update(exc.headers or {})
        return response

    app = Starlette(
        exception_handlers={HTTPException: http_error},
        middleware=[Middleware(Cors, origins=lambda: holder.current.server.cors_origins)],
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/{path:path}", proxy.handle, methods=METHODS),
        ],
        lifespan=lifespan,
    )
    app.state.proxy = proxy  # `serve` tells it when shutdown begins (`Proxy.drain`)
    app.state.server = lambda: holder.current.server  # the front door's bounds (`proxy.front`)
    app.state.metrics = metrics  # and what it counts
    return app


async def upstream_reachable(pool: UpstreamPool, upstream) -> bool:
    """Any HTTP answer from `GET {base_url}/models` counts: the server is there."""
    try:
        response = await pool.send(upstream, "GET", upstream.base_url + "/models", [], b"",
                                   read_timeout=min(upstream.read_timeout, 2.0))
        await response.aclose()
        return True
    except httpx.HTTPError:
        return False
