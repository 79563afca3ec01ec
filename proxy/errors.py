"""OpenAI-format errors, and the one function that builds their envelope.

    ProxyError                      every error the proxy itself answers with
    ├── BadRequest          400     malformed JSON, wrong shapes, odd paths
    ├── Unauthorized        401     missing or wrong proxy API key
    ├── Forbidden           403     an endpoint the guard cannot read, on a guarded route
    ├── NotFound            404     no route matches the path
    ├── PayloadTooLarge     413     body over server.max_body_bytes
    ├── HeadTooLarge        431     request line and headers over server.max_head_bytes (`proxy.front`)
    ├── UnsupportedCoding   501     a request transfer coding other than chunked
    ├── HeadTimeout         408     a request head not whole within server.head_timeout (`proxy.front`)
    ├── BodyTimeout         408     a request body silent for server.body_timeout
    ├── TooManyConnections  429     a client's connections over server.max_connections_per_client
    ├── ContentFiltered     400     prompt refused with `action: block`
    ├── Overloaded          503     stream, connection or guard-queue limit reached (Retry-After)
    ├── RequestTimeout      504     server.request_timeout passed
    ├── ShuttingDown        503     the proxy is stopping (in band: a stream it had to end)
    ├── GuardUnavailable    503     the guard failed and the policy fails closed
    ├── UpstreamUnreachable 502     connect failed, reset before the response began
    ├── BadGateway          502     an upstream reply the proxy must rewrite and cannot read
    ├── UpstreamTimeout     504     connect or read timeout before the response began
    └── ClientClosed        499     the client left before the response began (nobody reads
                                    it; the status is for logs and metrics, as nginx's 499)

Before response headers go out an error is a real status code with the JSON envelope;
after they have gone out it is an in-band SSE event followed by ``data: [DONE]``, which
is what vLLM does for errors inside a stream.

A request to the Anthropic Messages API (`/v1/messages`, `anthropic_path`) gets the same
errors in Anthropic's shape, so its SDK raises them as it raises Anthropic's own:
``{"type": "error", "error": {"type": ..., "message": ...}}``, and inside a stream an
``event: error`` with that body (an Anthropic stream has no ``[DONE]``).
"""

from __future__ import annotations

import json

from starlette.responses import Response

from .endpoints import folded_path
from .sse import DONE, encode_event, encode_json


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequest(ProxyError):
    status, type = 400, "invalid_request_error"


class Unauthorized(ProxyError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(ProxyError):
    status, type = 403, "invalid_request_error"


class NotFound(ProxyError):
    status, type, code = 404, "invalid_request_error", "not_found"


class PayloadTooLarge(ProxyError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class HeadTooLarge(ProxyError):
    status, type, code = 431, "invalid_request_error", "request_head_too_large"


class UnsupportedCoding(ProxyError):
    status, type, code = 501, "invalid_request_error", "unsupported_transfer_coding"


class HeadTimeout(ProxyError):
    status, type, code = 408, "invalid_request_error", "request_head_timeout"


class BodyTimeout(ProxyError):
    status, type, code = 408, "invalid_request_error", "request_body_timeout"


class TooManyConnections(ProxyError):
    status, type, code = 429, "requests", "too_many_connections"


class ContentFiltered(ProxyError):
    status, type, code = 400, "invalid_request_error", "content_filter"


class Overloaded(ProxyError):
    status, type, code = 503, "server_error", "overloaded"


class RequestTimeout(ProxyError):
    status, type, code = 504, "server_error", "request_timeout"


class ShuttingDown(ProxyError):
    status, type, code = 503, "server_error", "server_shutting_down"


class GuardUnavailable(ProxyError):
    status, type, code = 503, "server_error", "guard_unavailable"


class UpstreamUnreachable(ProxyError):
    status, type, code = 502, "server_error", "upstream_unreachable"


class BadGateway(ProxyError):
    status, type, code = 502, "server_error", "bad_upstream_reply"


class UpstreamTimeout(ProxyError):
    status, type, code = 504, "server_error", "upstream_timeout"


class ClientClosed(ProxyError):
    status, type, code = 499, "invalid_request_error", "client_closed"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error envelope; every error the proxy writes goes through here."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def body_of(exc: ProxyError) -> dict:
    return error_body(exc.message, exc.type, exc.param, exc.code)


# Anthropic's error types (its API reference, "Errors") for the statuses the proxy answers
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    504: "timeout_error"}


def anthropic_path(path: str) -> bool:
    """Whether a request path is the Anthropic Messages API's or under it (its token
    counter, its Message Batches API): `v1/messages`, anywhere in the path (a route's
    prefix may come before it), as endpoints are known (`proxy.endpoints.folded_path`: in any
    case, without matrix parameters)."""
    parts = folded_path(path)
    return any(parts[i:i + 2] == ("v1", "messages") for i in range(len(parts) - 1))


def anthropic_body_of(exc: ProxyError) -> dict:
    """The Anthropic error envelope for `exc`; the proxy's own `code`, when it has one,
    rides along (Anthropic's SDK ignores fields it does not know)."""
    kind = "overloaded_error" if isinstance(exc, Overloaded) else _ANTHROPIC_TYPES.get(exc.status, "api_error")
    error = {"type": kind, "message": exc.message}
    if exc.code is not None:
        error["code"] = exc.code
    return {"type": "error", "error": error}


def error_response(exc: ProxyError, *, anthropic: bool = False) -> Response:
    return Response(
        json.dumps(anthropic_body_of(exc) if anthropic else body_of(exc)).encode(),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers,
    )


def error_event(exc: ProxyError, *, anthropic: bool = False) -> bytes:
    """An error after the stream began: one SSE event with the envelope, then [DONE]
    (Anthropic: `event: error`, and no [DONE])."""
    if anthropic:
        return encode_event(json.dumps(anthropic_body_of(exc)), event="error")
    return encode_json(body_of(exc)) + DONE
