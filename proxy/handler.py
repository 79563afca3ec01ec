"""The request pipeline: authenticate, read, route, (guard), forward.

Every failure before the response starts is a `ProxyError`, answered in OpenAI's error
format; nothing here lets a traceback reach the client. The config is read once per
request (`holder.current`), so a reload never changes the policy of a request in flight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import httpx
from starlette.requests import Request
from starlette.responses import Response

from policies.auth import authenticate
from policies.config import Config
from policies.errors import UnsafePathError
from policies.routing import RouteMatch, match_route

from .errors import (BadRequest, NotFound, PayloadTooLarge, ProxyError, Unauthorized,
                     UpstreamUnreachable, error_event, error_response)
from .guarding import GuardedCall, guarded_endpoint
from .records import AuditLog, Exchange
from .relay import RelayResponse, open_upstream, raw_body
from .scorer import Scorer
from .sse import SSEDecoder, SSEError
from .upstream import UpstreamPool, request_headers, response_headers, upstream_url

logger = logging.getLogger(__name__)

# Endpoints whose body is a JSON object: a body that does not parse is a 400 here,
# rather than an upstream's guess.
JSON_ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses", "moderations")
# One SSE event larger than this is an upstream fault, not a reason to grow memory.
MAX_EVENT_BYTES = 4 << 20


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def json_endpoint(path: str, method: str) -> bool:
    return method == "POST" and path.rstrip("/").endswith(JSON_ENDPOINTS)


def parse_json_object(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}"[:300]) from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


class Proxy:
    def __init__(self, holder, pool: UpstreamPool, scorer: Scorer | None = None,
                 audit: AuditLog | None = None) -> None:
        self.holder = holder
        self.pool = pool
        self.scorer = scorer
        self.audit = audit

    async def handle(self, request: Request) -> Response:
        config: Config = self.holder.current
        try:
            return await self._handle(request, config)
        except ProxyError as exc:
            return error_response(exc)

    async def _handle(self, request: Request, config: Config) -> Response:
        key_name = None
        if config.server.auth_required:
            key_name = authenticate(config, request.headers.get("authorization"))
            if key_name is None:
                raise Unauthorized("missing or invalid API key for this proxy")
        # The raw path, so that encoded dots and slashes are seen (and refused) as sent.
        path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
        body = await read_body(request, config.server.max_body_bytes)
        payload = parse_json_object(body) if json_endpoint(path, request.method) else None
        model = payload.get("model") if payload is not None else None
        try:
            match = match_route(config, path, model=model if isinstance(model, str) else None,
                                headers=request.headers, api_key_name=key_name)
        except UnsafePathError as exc:
            raise BadRequest(str(exc)) from None
        if match is None:
            raise NotFound(f"no route for {request.method} {path}")
        endpoint = guarded_endpoint(request.method, match.upstream_path)
        policy = match.policy
        if endpoint is None or (policy.prompt.action == "off" and policy.response.action == "off"):
            return await self.forward(request, config, match, body)
        exchange = Exchange(route=match.route.name, policy=policy.name, endpoint=endpoint,
                            stream=payload.get("stream") is True)
        call = GuardedCall(scorer=self.scorer, audit=self.audit, endpoint=endpoint, payload=payload,
                           policy=policy, exchange=exchange)
        client = self.pool.client(match.upstream)
        url = upstream_url(match.upstream, match.upstream_path, request.url.query)
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        # Identity encoding: the guard reads the response, so it must not arrive compressed.
        headers = request_headers(raw, match.upstream, identity_encoding=True,
                                  drop_authorization=config.server.auth_required)

        async def send(content: bytes) -> httpx.Response:
            return await open_upstream(client, client.build_request(request.method, url, headers=headers,
                                                                    content=content))

        return await call.run(send, body)

    async def forward(self, request: Request, config: Config, match: RouteMatch, body: bytes) -> Response:
        client = self.pool.client(match.upstream)
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        upstream_request = client.build_request(
            request.method,
            upstream_url(match.upstream, match.upstream_path, request.url.query),
            headers=request_headers(raw, match.upstream, drop_authorization=config.server.auth_required),
            content=body,
        )
        response = await open_upstream(client, upstream_request)
        if is_event_stream(response):
            return RelayResponse(sse_passthrough(response, MAX_EVENT_BYTES),
                                 response.status_code,
                                 response_headers(response.headers.multi_items(), keep_length=False))
        return RelayResponse(raw_body(response), response.status_code,
                             response_headers(response.headers.multi_items(), keep_length=True))


def is_event_stream(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


async def sse_passthrough(response: httpx.Response, max_event_bytes: int) -> AsyncIterator[bytes]:
    """Forward whole events as they complete; the bytes are the upstream's, unchanged.

    Going event by event (not chunk by chunk) costs nothing in latency, since a client
    can act only on complete events, and it means a failure mid-stream can always be
    reported as one well-formed error event instead of being glued to half an event.
    """
    decoder = SSEDecoder(max_event_bytes=max_event_bytes)
    try:
        async for chunk in response.aiter_raw():
            events = decoder.feed(chunk)
            if events:
                yield b"".join(event.raw for event in events)
        tail = decoder.close()
        if tail:
            yield b"".join(event.raw for event in tail)
    except (httpx.HTTPError, SSEError) as exc:
        logger.warning("upstream stream broke off: %s", type(exc).__name__)
        yield error_event(UpstreamUnreachable(f"the upstream stream broke off ({type(exc).__name__})"))
    finally:
        await response.aclose()
