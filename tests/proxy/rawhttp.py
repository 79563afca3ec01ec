"""Loopback peers that speak HTTP/1.1 byte by byte, for what httpx cannot send or serve.

`exchange()` is a client that writes the request exactly as given (any method token,
any request target, any header bytes) and reads the answer with `http.client`. httpx
normalises paths (`..` segments are removed before sending) and refuses non-ASCII
header values, so it cannot probe the proxy's front door.

`RawUpstream` is a server on a plain socket whose answer is a script of byte writes,
pauses and endings (FIN, or RST through SO_LINGER 0): faults that an ASGI server never
produces, such as a reset mid-body, a half-written chunk or no status line at all.

`PathLog` wraps any ASGI app and records every request's raw path before the app sees it.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def exchange(port: int, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]] = (),
             body: bytes = b"", *, timeout: float = 20.0) -> Reply:
    """One request on a fresh connection, written byte for byte; the whole answer."""
    head = [method + b" " + target + b" HTTP/1.1", b"host: 127.0.0.1", b"connection: close"]
    head += [name + b": " + value for name, value in headers]
    if body or method.upper() in (b"POST", b"PUT", b"PATCH"):
        head.append(b"content-length: " + str(len(body)).encode())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        response = http.client.HTTPResponse(sock, method=method.decode("latin-1"))
        try:
            response.begin()
            data = response.read()
        finally:
            response.close()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)


class PathLog:
    """ASGI middleware: every HTTP request's raw path (bytes), in arrival order.

    Each response also gets an `x-upstream: 1` header, so a client of the proxy can tell
    an upstream's own answer (a 500 passed through) from one the proxy made.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.paths: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.paths.append(scope.get("raw_path") or scope["path"].encode())

        async def marked(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-upstream", b"1")]}
            await send(message)

        await self.app(scope, receive, marked)


# A script is a list of steps: bytes to write, a float to sleep, or one of the endings.
RST, FIN = "rst", "fin"
Step = bytes | float | str


@dataclass
class Served:
    """What one connection of a RawUpstream saw: the request head, and how it ended."""

    request: bytes = b""
    ended: str = ""  # "script" (all steps written), "client-closed" (write failed)


@dataclass
class RawUpstream:
    """A one-thread HTTP upstream on loopback; `scripts(request_head) -> steps`."""

    scripts: Callable[[bytes], list[Step]]
    served: list[Served] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> RawUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        with socket.create_connection(("127.0.0.1", self.port)):
            pass  # wakes accept()
        self._thread.join(timeout=10)
        self.sock.close()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            if self._stop:
                conn.close()
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        record = Served()
        self.served.append(record)
        with conn:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(rest) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rest += chunk
            record.request = head
            try:
                for step in self.scripts(head):
                    if isinstance(step, float):
                        time.sleep(step)
                    elif step == RST:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        break
                    elif step == FIN:
                        conn.shutdown(socket.SHUT_WR)
                        break
                    else:
                        conn.sendall(step)
                record.ended = "script"
            except OSError:
                record.ended = "client-closed"


def sse_head(*, chunked: bool = True) -> bytes:
    lines = [b"HTTP/1.1 200 OK", b"content-type: text/event-stream", b"cache-control: no-cache"]
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"
