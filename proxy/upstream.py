"""Outgoing requests: one pooled httpx client per upstream, and header hygiene.

The request body is forwarded as the bytes the client sent; headers are forwarded
unchanged except the hop-by-hop set (RFC 9110 §7.6.1, plus those named in
`Connection`), `Host` (httpx sets the upstream's) and `Content-Length` (recomputed from
the same bytes). When the upstream has its own API key it replaces the client's
`Authorization`, so the proxy's key never reaches the upstream and the upstream's never
reaches the client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

import httpx

from policies.config import Upstream

from .endpoints import cached_by_url
from .h1 import H1Transport, handles

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})


def hop_by_hop(headers: Iterable[tuple[str, str]]) -> set[str]:
    names = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == "connection":
            names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return names


def request_headers(raw: Iterable[tuple[str, str]], upstream: Upstream, *,
                    identity_encoding: bool = False,
                    proxy_key: Callable[[str], bool] | None = None) -> list[tuple[str, str]]:
    """Headers for the upstream request, in the client's order.

    `identity_encoding` asks for an uncompressed body when the proxy must read it (a
    guarded response); pass-through traffic keeps the client's Accept-Encoding.
    `proxy_key` is given when the proxy has keys of its own, and tells whether a value is
    one: the client's `Authorization` then never travels on to the upstream, nor an
    `x-api-key` holding a proxy key (beside `Authorization` too: a client may send its
    key in both). An upstream with a key of its own gets that key in place of the
    client's, whichever header carried them.
    """
    raw = list(raw)
    drop = hop_by_hop(raw) | {"host", "content-length"}
    if upstream.api_key is not None:
        drop |= {"authorization", "x-api-key"}
    if proxy_key is not None:
        drop.add("authorization")
        raw = [(k, v) for k, v in raw if k.lower() != "x-api-key" or not proxy_key(v)]
    if identity_encoding:
        drop.add("accept-encoding")
    # A field value has no leading or trailing white space (RFC 9110 5.5); the server's
    # parser may leave some on, and httpx's h11 transport (HEAD) refuses to send it.
    out = [(k, v.strip(" \t")) for k, v in raw if k.lower() not in drop]
    if upstream.api_key is not None:
        out.append(("authorization", f"Bearer {upstream.api_key}"))
    if identity_encoding:
        out.append(("accept-encoding", "identity"))
    return out


def response_headers(raw: Iterable[tuple[str, str]], *, keep_length: bool,
                     guarded: bool = False) -> list[tuple[str, str]]:
    """Upstream response headers for the client: hop-by-hop removed.

    Content-Length survives only when the body is forwarded unchanged; a body the proxy
    rewrites gets its own. `Date` and `Server` are the proxy's own (its server adds them),
    so the client never gets two of each. On a `guarded` route (its policy scores) the
    `x-siren-*` headers are the proxy's own too: an upstream's (a second siren-proxy
    behind this one) would sit beside them, or speak for a decision this proxy made.
    """
    raw = list(raw)
    drop = hop_by_hop(raw) | {"date", "server"}
    if not keep_length:
        drop |= {"content-length", "content-encoding"}
    return [(k, v) for k, v in raw if k.lower() not in drop and not (guarded and k.lower().startswith("x-siren-"))]


class UpstreamPool:
    """Pooled transports per upstream, created lazily and closed together.

    Requests go straight to a transport (httpx's public `handle_async_request` API), not
    through an `AsyncClient`: a client would add its own default headers (`User-Agent`,
    `Accept`, `Accept-Encoding`), keep upstream cookies and replay them for the next
    client, and run auth, redirect and event-hook machinery that a proxy must not have,
    at about 0.2 ms of CPU a request (measured against llm-katan). A plain-http upstream
    (vLLM, llama.cpp on the same host or network) goes through `proxy.h1`'s leaner
    transport; https:// and what `h1.handles` leaves go through httpx's.
    """

    def __init__(self) -> None:
        self._transports: dict[tuple, tuple[H1Transport, httpx.AsyncHTTPTransport]] = {}

    def transports(self, upstream: Upstream) -> tuple[H1Transport, httpx.AsyncHTTPTransport]:
        # Keyed by the settings too, so a reloaded config with a new pool size gets
        # fresh transports while requests in flight keep the ones they started with.
        key = (upstream.name, upstream.base_url, upstream.max_connections)
        pair = self._transports.get(key)
        if pair is None:
            keepalive = min(upstream.max_connections, 256)
            pair = (H1Transport(max_connections=upstream.max_connections, max_keepalive=keepalive),
                    httpx.AsyncHTTPTransport(
                        limits=httpx.Limits(max_connections=upstream.max_connections,
                                            max_keepalive_connections=keepalive),
                        trust_env=False))
            self._transports[key] = pair
        return pair

    async def send(self, upstream: Upstream, method: str, url: str, headers: list[tuple[bytes, bytes]],
                   content: bytes, *, read_timeout: float | None = None) -> httpx.Response:
        """Open a request; the response's body is streamed (close it when done)."""
        read = upstream.read_timeout if read_timeout is None else read_timeout
        timeout = {"connect": upstream.connect_timeout, "read": read, "write": read,
                   "pool": upstream.connect_timeout}
        request = httpx.Request(method, parsed_url(url), headers=headers, content=content,
                                extensions={"timeout": timeout})
        lean, general = self.transports(upstream)
        return await (lean if handles(request) else general).handle_async_request(request)

    async def aclose(self) -> None:
        pairs, self._transports = list(self._transports.values()), {}
        for pair in pairs:
            for transport in pair:
                await transport.aclose()


@cached_by_url
def parsed_url(url: str) -> httpx.URL:
    """`url` parsed, once: httpx's parser (pure Python) took 4% of an unguarded request's
    CPU, for the same few URLs every time. An `httpx.URL` is immutable, so one can serve
    every request to it; a failure (`httpx.InvalidURL`) is raised again each time, not cached."""
    return httpx.URL(url)


def client_location(location: str, base_url: str, prefix: str) -> str:
    """A redirect's `Location` as the client reaches it: one into the upstream's base URL
    (absolute, or a path from its root) names the route's prefix in its place, as nginx's
    `proxy_redirect default` does; a path-only reference, so `Host` is never echoed. An
    upstream's server redirects at its own address (Starlette's trailing-slash 307), which
    a client that follows redirects would reach straight, past the proxy and its guard
    (`//host/path` too, which the client resolves against its own scheme). Elsewhere, or
    relative to the request's own path (the same through the proxy): as sent."""
    base, target = urlsplit(base_url), urlsplit(location)
    # A network-path reference (`//host/path`) has the scheme of the request it answers.
    if target.netloc and ((target.scheme.lower() or base.scheme), target.netloc.lower()) != \
            (base.scheme, base.netloc.lower()):
        return location
    if not target.path.startswith("/"):
        return location
    base_path = base.path.rstrip("/")
    if not (target.path == base_path or target.path.startswith(base_path + "/")):
        return location
    path = prefix.rstrip("/") + target.path[len(base_path):]
    return urlunsplit(("", "", path or "/", target.query, target.fragment))


def upstream_url(upstream: Upstream, upstream_path: str, query: str) -> str:
    url = upstream.base_url + upstream_path
    return f"{url}?{query}" if query else url


def header(headers: Mapping[str, str] | Iterable[tuple[str, str]], name: str) -> str | None:
    items = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in items:
        if key.lower() == name:
            return value
    return None
