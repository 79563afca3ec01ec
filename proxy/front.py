"""The front door: uvicorn's httptools protocol with the request head bounded in size and time.

uvicorn's httptools server (what `http="auto"` picks) keeps every byte of a request head
until its blank line comes: one client sending header lines without end grew the proxy
by what it sent (61 MB for 61 MB, measured), before any route, key or limit of the proxy's
could see the request. A head (request line and headers) over `MAX_HEAD` bytes is
answered 431 in OpenAI's envelope and its connection closed (after `LINGER` seconds in
which what the client still sends is read and dropped, so that closing with its bytes
unread does not reset the connection under the answer before the client reads it). h11's server, uvicorn's
other one, bounds a head too (16 KiB); this one stays on httptools, the faster parser.

uvicorn also waits for a head without end, and any byte stops its keep-alive timer:
connections that send nothing, or a header byte now and then (slowloris), stayed open
for good, each a file descriptor. A head must be whole `HEAD_TIMEOUT` seconds after the
connection opened or its last response ended: else 408 in the envelope (or, with no byte
of it sent, only the close). A body is not the head's: `server.request_timeout` bounds
it, as it bounds the whole request; but the rest of a body after its early answer (a 413,
a 401) bounds nothing else, so it is the next head's wait, and closed when that ends.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .errors import HeadTimeout, HeadTooLarge, ProxyError, body_of

# nginx's largest default head is 4 x 8 KiB buffers; clients send well under 8 KiB.
MAX_HEAD = 64 * 1024
LINGER = 2.0


class FrontDoor(HttpToolsProtocol):
    """Counts the bytes of each request head as they arrive.

    A head is counted from the read that starts it to the read that ends it. The read in
    which one message ends and the next head begins is not counted (where the split
    falls is the parser's to know), so a head is refused at most one read (64-256 KiB)
    past `MAX_HEAD`: a bound, which is what the count is for."""

    # nginx's client_header_timeout is 60 s; a client has its whole head ready at once.
    HEAD_TIMEOUT = 30.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_head = True  # waiting for (the rest of) a request head
        self.head_bytes = 0
        self.head_begun = False  # a byte of the awaited head has come
        self.lingering = False
        self.head_timer = None
        self.refused: ProxyError | None = None  # to answer once the responses in progress end (`refuse`)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
        super().connection_lost(exc)

    def await_head(self) -> None:
        self.stop_head_timer()
        self.head_begun = self.head_bytes > 0
        self.head_timer = self.loop.call_later(self.HEAD_TIMEOUT, self.head_timed_out)

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
            self.refuse(HeadTimeout(f"the request head did not arrive within {self.HEAD_TIMEOUT:g}s"))
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.lingering or self.refused is not None:  # refused: read and dropped until the close
            return
        counted = self.in_head
        self.head_begun = self.head_begun or counted
        super().data_received(data)
        if counted and self.in_head and not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self.refuse(HeadTooLarge(f"the request line and headers are over {MAX_HEAD // 1024} KiB"))

    def on_headers_complete(self) -> None:
        self.in_head = False
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
        body = json.dumps(body_of(exc)).encode()
        head = [STATUS_LINE[exc.status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.write_eof()
        self.lingering = True
        self.loop.call_later(LINGER, self.transport.close)
        self.logger.warning("%s", exc)
