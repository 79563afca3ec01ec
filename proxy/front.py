"""The front door: uvicorn's httptools protocol with the request head bounded in size and
time, and the connections one client (or all of them) may hold open bounded in number.

uvicorn's httptools server (what `http="auto"` picks) keeps every byte of a request head
until its blank line comes: one client sending header lines without end grew the proxy
by what it sent (61 MB for 61 MB, measured), before any route, key or limit of the proxy's
could see the request. A head (request line and headers) over `server.max_head_bytes` is
answered 431 in OpenAI's envelope and its connection closed (after `LINGER` seconds in
which what the client still sends is read and dropped, so that closing with its bytes
unread does not reset the connection under the answer before the client reads it). h11's server, uvicorn's
other one, bounds a head too (16 KiB); this one stays on httptools, the faster parser.

uvicorn also waits for a head without end, and any byte stops its keep-alive timer:
connections that send nothing, or a header byte now and then (slowloris), stayed open
for good, each a file descriptor. A head must be whole `server.head_timeout` seconds after the
connection opened or its last response ended: else 408 in the envelope (or, with no byte
of it sent, only the close). A body is not the head's: `server.body_timeout` bounds
the wait for each of its pieces (`proxy.handler.read_body`) and `server.request_timeout`
the whole request; but the rest of a body after its early answer (a 413,
a 401) bounds nothing else, so it is the next head's wait, and closed when that ends.

Nor did uvicorn bound how many connections are open: one client could hold as many as the
process had file descriptors. With `server.max_connections` (all clients) or
`server.max_connections_per_client` (one peer address) set, a connection over the bound
is answered at once, 503 `overloaded` or 429 `too_many_connections` with `Retry-After`
(what the OpenAI SDKs back off and retry on), and closed as a refused head is.

The bounds are the live config's `server` section, read as each connection opens (the
app's `state.server`, set by `proxy.app.build_app`), so a reload applies to new connections.
"""

from __future__ import annotations

import json
from collections import Counter

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from policies.config import ServerConfig

from .errors import HeadTimeout, HeadTooLarge, Overloaded, ProxyError, TooManyConnections, body_of

LINGER = 2.0


def server_config(protocol: HttpToolsProtocol) -> ServerConfig:
    """The live config's `server` section, for an app built by `build_app`; the defaults
    for any other app."""
    current = getattr(getattr(protocol.config.app, "state", None), "server", None)
    return current() if current is not None else ServerConfig()


def app_metrics(protocol: HttpToolsProtocol):
    """The app's `proxy.metrics.Metrics`, or None for an app without them."""
    return getattr(getattr(protocol.config.app, "state", None), "metrics", None)


def open_by_client(server_state) -> Counter:
    """Connections open, by peer address, over the whole server (uvicorn's `ServerState`
    keeps the connections themselves, not their addresses)."""
    counts = getattr(server_state, "open_by_client", None)
    if counts is None:
        counts = server_state.open_by_client = Counter()
    return counts


class FrontDoor(HttpToolsProtocol):
    """Counts the bytes of each request head as they arrive, and the connections open.

    A head is counted from the read that starts it to the read that ends it. The read in
    which one message ends and the next head begins is not counted (where the split
    falls is the parser's to know), so a head is refused at most one read (64-256 KiB)
    past `max_head_bytes`: a bound, which is what the count is for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = server_config(self)
        self.metrics = app_metrics(self)
        self.timeout_keep_alive = self.limits.keep_alive_timeout
        self.counted: str | None = None  # the peer address this connection is counted under
        self.in_head = True  # waiting for (the rest of) a request head
        self.heads = 0  # request heads parsed on this connection
        self.head_bytes = 0
        self.head_begun = False  # a byte of the awaited head has come
        self.lingering = False
        self.head_timer = None
        self.refused: ProxyError | None = None  # to answer once the responses in progress end (`refuse`)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.metrics is not None:
            self.metrics.open_connections.inc()
        self.await_head()
        self.admit()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
        if self.metrics is not None:
            self.metrics.open_connections.dec()
        if self.counted is not None:
            counts = open_by_client(self.server_state)
            counts[self.counted] -= 1
            if counts[self.counted] <= 0:
                del counts[self.counted]
            self.counted = None
        super().connection_lost(exc)

    def admit(self) -> None:
        """Count the connection under its peer's address, and refuse it at once if it is
        over a bound. It is answered before its request comes, as its client will read
        the answer once it has sent the request (or at once, if it reads first); what it
        sends meanwhile is read and dropped (`refuse`)."""
        limits = self.limits
        if self.client is not None:
            self.counted = self.client[0]
            open_by_client(self.server_state)[self.counted] += 1
        per_client = limits.max_connections_per_client
        if limits.max_connections is not None and len(self.server_state.connections) > limits.max_connections:
            self.refuse(Overloaded(f"the proxy has {limits.max_connections} connections open, its limit; "
                                   "retry shortly", headers={"retry-after": "1"}))
        elif per_client is not None and self.counted is not None \
                and open_by_client(self.server_state)[self.counted] > per_client:
            self.refuse(TooManyConnections(f"this client has {per_client} connections open to the proxy, "
                                           "its limit; reuse them, or retry shortly", headers={"retry-after": "1"}))

    def await_head(self) -> None:
        self.stop_head_timer()
        self.head_begun = self.head_bytes > 0
        self.head_timer = self.loop.call_later(self.limits.head_timeout, self.head_timed_out)

    def stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self) -> None:
        """Armed only while idle (`await_head`), so a request under way never meets it; out
        of the head here is a body still arriving after its early answer (a 413, a 401),
        whose bytes would otherwise hold the connection for good: closed, as answered."""
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.in_head and self.head_begun:
            self.refuse(HeadTimeout(f"the request head did not arrive within {self.limits.head_timeout:g}s"))
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.lingering or self.refused is not None:  # refused: read and dropped until the close
            return
        counted, heads = self.in_head, self.heads
        self.head_begun = self.head_begun or counted
        super().data_received(data)
        # A read in which a head ended is not the next head's, even when the whole message
        # came in it: counted, a 64-256 KiB request read at once was answered, then 431.
        if counted and self.in_head and self.heads == heads and not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > self.limits.max_head_bytes:
                self.refuse(HeadTooLarge(f"the request line and headers are over {self.limits.max_head_bytes} bytes"))

    def on_headers_complete(self) -> None:
        self.in_head, self.heads = False, self.heads + 1
        self.stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head, self.head_bytes = True, 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.refused is not None:
            self.refuse(self.refused)
        elif self.timeout_keep_alive_task is not None:  # idle, not answering a pipelined request next
            self.await_head()

    def refuse(self, exc: ProxyError) -> None:
        """Answer `exc` and close. Behind a response still going (a pipelining client),
        whose bytes the answer would run into, reading stops and the answer waits for the
        responses before it to end (`on_response_complete`), so they end whole."""
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.refused = exc
            self.flow.pause_reading()
            return
        self.refused = None
        if self.metrics is not None:
            self.metrics.front_refusals.labels(exc.code).inc()
        body = json.dumps(body_of(exc)).encode()
        head = [STATUS_LINE[exc.status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [f"{name}: {value}\r\n".encode("latin-1") for name, value in exc.headers.items()]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.write_eof()
        self.lingering = True
        self.loop.call_later(LINGER, self.transport.close)
        self.logger.warning("%s", exc)
