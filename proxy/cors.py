"""CORS at the proxy, for browser pages that call it across origins (`server.cors_origins`).

Without it (the default) the proxy adds no CORS headers and forwards a preflight
(`OPTIONS` with `Access-Control-Request-Method`) as any request, so the upstream's
policy applies; but a preflight carries no credentials, so with `server.api_keys` set it
met the proxy's 401 and a browser page could not call a keyed proxy at all.

With `server.cors_origins` set, the proxy is the one CORS policy (as LiteLLM's and vLLM's
servers are their own, through Starlette's `CORSMiddleware`):

- a preflight from an origin on the list is answered here, before keys and routes, and
  never forwarded: 204 with the method and headers it asked for, `Max-Age` 600 s; from
  any other origin, 403 `cors_origin_not_allowed` in the envelope;
- any other request from a listed origin is answered with `Access-Control-Allow-Origin`
  (the origin, or `*` where the list has `*`) and `Access-Control-Expose-Headers: *`, so
  the page can read the proxy's `x-siren-*` decision headers, errors included;
- the upstream's own `Access-Control-*` headers are dropped from every answer: a vLLM
  started with `--allowed-origins '["*"]'` sends `Access-Control-Allow-Origin: *`, which
  would let any page read what the list is meant to keep from it.

A request without `Origin` (every non-browser client) is served as before. The list is
read from the live config on every request, so a reload changes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import Forbidden, anthropic_body_of, anthropic_path, body_of

METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
MAX_AGE = "600"


def allowed_origin(origin: str, origins: tuple[str, ...]) -> str | None:
    """The `Access-Control-Allow-Origin` value for a request from `origin`, or None when
    the list does not allow it. Origins are compared without regard to case, as their
    scheme and host are."""
    if "*" in origins:
        return "*"
    return origin if origin.lower() in origins else None


class Cors:
    """Pure ASGI middleware (streams pass through untouched but for their first message)."""

    def __init__(self, app: ASGIApp, origins: Callable[[], tuple[str, ...]]) -> None:
        self.app = app
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origins = self.origins()
        if not origins:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        allow = None if origin is None else allowed_origin(origin, origins)
        if scope["method"] == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            await self.preflight(scope, headers, allow, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer = MutableHeaders(scope=message)
                for name in {name for name in answer.keys() if name.startswith("access-control-")}:
                    del answer[name]
                if allow is not None:
                    answer["access-control-allow-origin"] = allow
                    answer["access-control-expose-headers"] = "*"
                    if allow != "*":
                        answer.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def preflight(self, scope: Scope, headers: Headers, allow: str | None, send: Send) -> None:
        if allow is None:
            exc = Forbidden(f"origin {headers['origin'][:200]!r} is not allowed to call this proxy "
                            "(server.cors_origins)", code="cors_origin_not_allowed")
            anthropic = anthropic_path(scope.get("path", ""))
            body = json.dumps(anthropic_body_of(exc) if anthropic else body_of(exc)).encode()
            answer = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": exc.status, "headers": answer})
            await send({"type": "http.response.body", "body": body})
            return
        answer = MutableHeaders({
            "access-control-allow-origin": allow,
            "access-control-allow-methods": METHODS,
            "access-control-max-age": MAX_AGE,
        })
        requested = headers.get("access-control-request-headers")
        if requested:
            answer["access-control-allow-headers"] = requested
        answer["vary"] = "Origin, Access-Control-Request-Headers"  # what the answer is made of
        await send({"type": "http.response.start", "status": 204, "headers": answer.raw})
        await send({"type": "http.response.body", "body": b""})
