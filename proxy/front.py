"""The front door: uvicorn's httptools protocol with the request head bounded in size.

uvicorn's httptools server (what `http="auto"` picks) keeps every byte of a request head
until its blank line comes: one client sending header lines without end grew the proxy
by what it sent (61 MB for 61 MB, measured), before any route, key or limit of the proxy's
could see the request. A head (request line and headers) over `MAX_HEAD` bytes is
answered 431 in OpenAI's envelope and its connection closed (after `LINGER` seconds in
which what the client still sends is read and dropped, so that closing with its bytes
unread does not reset the connection under the answer before the client reads it). h11's server, uvicorn's
other one, bounds a head too (16 KiB); this one stays on httptools, the faster parser.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .errors import HeadTooLarge, body_of

# nginx's largest default head is 4 x 8 KiB buffers; clients send well under 8 KiB.
MAX_HEAD = 64 * 1024
LINGER = 2.0


class FrontDoor(HttpToolsProtocol):
    """Counts the bytes of each request head as they arrive.

    A head is counted from the read that starts it to the read that ends it. The read in
    which one message ends and the next head begins is not counted (where the split
    falls is the parser's to know), so a head is refused at most one read (64-256 KiB)
    past `MAX_HEAD`: a bound, which is what the count is for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_head = True  # waiting for (the rest of) a request head
        self.head_bytes = 0
        self.lingering = False

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # refused: read and dropped until the close
            return
        counted = self.in_head
        super().data_received(data)
        if counted and self.in_head and not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self.refuse(HeadTooLarge(f"the request line and headers are over {MAX_HEAD // 1024} KiB"))

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head, self.head_bytes = True, 0

    def refuse(self, exc: HeadTooLarge) -> None:
        """Answer `exc` and close; only closed while an earlier response is still going
        (a pipelining client), which the answer's bytes would run into."""
        if self.cycle is None or self.cycle.response_complete:
            body = json.dumps(body_of(exc)).encode()
            head = [STATUS_LINE[exc.status]]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                     b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
            self.transport.write_eof()
            self.lingering = True
            self.loop.call_later(LINGER, self.transport.close)
        else:
            self.transport.close()
        self.logger.warning("%s", exc)
