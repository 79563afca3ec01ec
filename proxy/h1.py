"""HTTP/1.1 to plain-http upstreams: an asyncio protocol fed to httptools' parser.

The hop to the upstream is one request and one response on a kept-alive connection,
thousands of times a minute. With httpx's own transport (httpcore, h11, anyio) the
proxy spent 1.41 ms of CPU per request, about 30% of it in that client (py-spy); this
one is built the way uvicorn builds its server side, an `asyncio.Protocol` whose bytes
go to httptools' C parser, and with it the proxy spends 0.71 ms (`bench/proxy_overhead.py`). It is an `httpx.AsyncBaseTransport`: it returns
`httpx.Response`s whose body streams, and fails with httpx's exception classes, so
nothing above it changes. `UpstreamPool` keeps httpx's transport for https:// upstreams
and for the requests this one leaves alone (`handles`).

Connections: at most `max_connections` requests in flight (a slot is held from the
request until its response is closed; waiting for one is bounded by the pool timeout);
an idle connection is reused last-in first-out for `keepalive_expiry` seconds. A reused
connection that closes before a single response byte arrives (the server dropped it
while it sat idle) is retried once on a new connection, whatever its method (README,
*Forwarding*: a POST the upstream worked on and dropped without a byte runs twice).
A response closed before its end closes its connection, so the upstream sees the
client's disconnect at once. Bytes after the end of a response belong to no request: they
are neither part of it nor read as the next one, and its connection is closed.
"""

from __future__ import annotations

import asyncio
import collections
import time

import httptools
import httpx

# Body bytes buffered ahead of the reader before the socket stops being read.
HIGH_WATER = 1 << 20
# A response head (status lines of 1xx answers included) past this is refused, as httpcore
# (h11) refuses one: httptools alone would keep every header an upstream sends.
MAX_HEAD = 100 * 1024


def handles(request: httpx.Request) -> bool:
    """HEAD (a body-less response the parser cannot know of) and `Expect` stay on httpx."""
    return (request.url.scheme == "http" and request.method != "HEAD"
            and "expect" not in request.headers)


def serialize(request: httpx.Request) -> bytes:
    head = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name or b":" in name:
            raise httpx.LocalProtocolError(f"header {name!r} cannot be sent")
        head += (name, b": ", value, b"\r\n")
    head.append(b"\r\n")
    return b"".join(head) + request.content


class Connection(asyncio.Protocol):
    """One TCP connection to the upstream and the parser of its responses."""

    def __init__(self, origin: tuple[str, int]) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.busy = False
        self.idle_since = 0.0
        self.writable = True  # asyncio's write buffer is under its high water
        self.start()

    def start(self) -> None:
        """Fresh state for the next response on this connection."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = self.complete = self.informational = self.keep_alive = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = self.received = self.head_size = 0
        self.error: httpx.TransportError | None = None
        self.waiter: asyncio.Future | None = None
        self.paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # an idle connection has nothing to say: drop it
            self.transport.close()
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.error is None and not self.complete:  # bytes after the end leave the answer whole
                self.error = httpx.RemoteProtocolError(f"malformed response from the upstream: {exc}")
            self.keep_alive = False
            self.transport.close()
        if not self.headers_done and self.received > MAX_HEAD and self.error is None:  # a head that never ends
            self.error = head_too_large()
            self.transport.close()
        if self.buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable = True
        if self.busy and not self.complete and self.error is None:
            if exc is None and self.headers_done and self.until_close():
                self.complete = True  # a body delimited by the end of the connection
            elif exc is not None:  # a reset
                self.error = httpx.ReadError(f"the upstream connection broke: {exc}")
            elif self.received == 0:
                self.error = httpx.RemoteProtocolError("the upstream closed the connection without a response")
            else:
                self.error = httpx.RemoteProtocolError(
                    "the upstream closed the connection before the end of its response")
        self.wake()

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self.wake()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # more after the answer, which no request asked for: stop reading
            raise httptools.HttpParserError("bytes after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:  # a trailer field, after the body: no part of the head (httpx drops them too)
            return
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD:
            self.error = head_too_large()
            raise httptools.HttpParserError("response head too large")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status == 101:  # no request asks to switch (Upgrade is hop-by-hop, never sent)
            self.error = httpx.RemoteProtocolError("the upstream switched protocols, which no request asks for")
            return
        if 100 <= self.status < 200:
            self.informational = True  # 100 Continue, 103 Early Hints: the answer follows
            return
        codings = [coding.strip().lower() for name, value in self.headers if name.lower() == b"transfer-encoding"
                   for coding in value.split(b",")]
        if codings and codings != [b"chunked"]:  # gzip, say: the body would go on still coded, its header dropped
            self.error = httpx.RemoteProtocolError("the upstream used a transfer coding other than chunked")
            raise httptools.HttpParserError("transfer coding other than chunked")
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            self.headers = []
            return
        self.keep_alive = self.parser.should_keep_alive()  # the parser forgets it after this callback
        self.complete = True

    # for the transport

    def until_close(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float | None, error: type[httpx.TimeoutException] = httpx.ReadTimeout) -> None:
        """Until the parser or the socket has news; `error` after `timeout` s."""
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, expire, waiter, error)
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def take(self) -> bytes:
        """The next piece of body as the parser cut it: one piece per chunk of a chunked
        body (as h11 gives them), which for an SSE upstream is usually one event."""
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered <= HIGH_WATER // 2:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        return (self.complete and self.keep_alive and not self.closed and self.error is None and not self.chunks
                and not self.transport.get_write_buffer_size())  # a request not all sent: an early answer


def head_too_large() -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError(f"the upstream's response head is over {MAX_HEAD // 1024} KiB")


def expire(waiter: asyncio.Future, error: type[httpx.TimeoutException]) -> None:
    if not waiter.done():
        waiter.set_exception(error("the upstream took no more of the request within the write timeout"
                                   if error is httpx.WriteTimeout else
                                   "the upstream sent nothing within the read timeout"))


class Body(httpx.AsyncByteStream):
    """A response body read from its connection; closing it frees the connection."""

    def __init__(self, pool: H1Transport, conn: Connection, read_timeout: float | None) -> None:
        self.pool = pool
        self.conn = conn
        self.read_timeout = read_timeout
        self.done = False

    async def __aiter__(self):
        conn = self.conn
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.error is not None:
                raise conn.error
            elif conn.complete:
                break
            else:
                await conn.wait(self.read_timeout)
        await self.aclose()

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.pool.release(self.conn, reuse=self.conn.reusable())


class H1Transport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int = 100, max_keepalive: int = 20,
                 keepalive_expiry: float = 5.0) -> None:
        self.max_connections = max_connections
        self.max_keepalive = max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self._slots: asyncio.Semaphore | None = None
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._open: set[Connection] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        payload = serialize(request)
        origin = (request.url.host, request.url.port or 80)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        if self._slots.locked():
            try:
                # Not `wait_for`, whose task of its own (3.11) can take the slot as this request
                # is cancelled, and then return it, the cancellation lost.
                async with asyncio.timeout(timeout.get("pool")):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no upstream connection came free within the pool timeout") from None
        else:
            await self._slots.acquire()
        conn = None
        try:
            conn = self._reuse(origin)
            if conn is not None:
                try:
                    await self._exchange(conn, payload, timeout)
                except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                    if conn.received:
                        raise
                    self._close(conn)  # dropped while idle: once more on a new connection
                    conn = None
            if conn is None:
                conn = await self._connect(origin, timeout.get("connect"))
                await self._exchange(conn, payload, timeout)
        except BaseException:
            if conn is not None:
                self._close(conn)
            self._slots.release()
            raise
        return httpx.Response(conn.status, headers=conn.headers, stream=Body(self, conn, timeout.get("read")),
                              extensions={"http_version": b"HTTP/1.1"})

    async def _exchange(self, conn: Connection, payload: bytes, timeout: dict) -> None:
        """Send the request and wait for the response's headers.

        The headers may come while the body is still going out: an upstream may answer
        before it has read it all (a 413), and then perhaps read no more. That answer is
        the response (RFC 9112 §9.5), where waiting for the body to drain first would end
        in a write timeout; the connection is then not reused, and the rest is not sent.
        """
        conn.busy = True
        if conn.closed:
            raise httpx.WriteError("the upstream connection is closed")
        conn.transport.write(payload)
        while not conn.headers_done:
            if conn.error is not None:
                raise conn.error
            if conn.writable:
                await conn.wait(timeout.get("read"))
            else:
                await conn.wait(timeout.get("write"), httpx.WriteTimeout)

    async def _connect(self, origin: tuple[str, int], timeout: float | None) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):  # not `wait_for`, which (3.11) can swallow a cancellation
                _, conn = await loop.create_connection(lambda: Connection(origin), *origin)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {origin[0]}:{origin[1]} within the connect timeout") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {origin[0]}:{origin[1]}: {exc}") from None
        self._open.add(conn)
        return conn

    def _reuse(self, origin: tuple[str, int]) -> Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_expiry:
                conn.start()
                return conn
            self._close(conn)
        return None

    def release(self, conn: Connection, *, reuse: bool) -> None:
        """The response is done with; its slot is free, its connection idle or closed."""
        conn.busy = False
        idle = self._idle.setdefault(conn.origin, [])
        if reuse and len(idle) < self.max_keepalive:
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            self._close(conn)
        self._slots.release()

    def _close(self, conn: Connection) -> None:
        conn.busy = False
        self._open.discard(conn)
        if conn.transport is not None and not conn.closed:
            if conn.transport.get_write_buffer_size():
                conn.transport.abort()  # close() would first send the rest of a request already answered
            else:
                conn.transport.close()

    async def aclose(self) -> None:
        for conn in list(self._open):
            self._close(conn)
        self._idle.clear()
