"""`proxy.h1`, the transport to plain-http upstreams, against loopback servers of our own.

An asyncio server that keeps connections alive (and counts them) checks reuse, the
retry of a connection dropped while idle, the pool bound and early closes; the
raw-socket `RawUpstream` plays byte scripts for bodies delimited by length, by chunks
and by the end of the connection, informational responses, resets and garbage. The
proxy-level behaviour of the same faults is in test_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from proxy.h1 import HIGH_WATER, H1Transport, handles
from tests.proxy.rawhttp import FIN, LAST_CHUNK, RST, RawUpstream, chunk

TIMEOUT = {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}


def request(url: str, method: str = "POST", body: bytes = b"{}", timeout: dict = TIMEOUT, **headers) -> httpx.Request:
    return httpx.Request(method, url, content=body, headers=headers, extensions={"timeout": timeout})


async def fetch(transport: H1Transport, url: str, **kwargs) -> tuple[httpx.Response, bytes]:
    response = await transport.handle_async_request(request(url, **kwargs))
    try:
        body = b"".join([piece async for piece in response.aiter_raw()])
    finally:
        await response.aclose()
    return response, body


class KeepAlive:
    """Answers every request on a connection with `body`, until the client leaves.

    `close_after=N`: the connection is closed right after N answers (a server ending a
    connection that then sits idle); `ignore_after=N`: the next request after N answers
    is read and the connection closed without an answer (the same close, racing the
    client's next request).
    """

    def __init__(self, body: bytes = b"hello", close_after: int | None = None, ignore_after: int | None = None,
                 delay: float = 0.0, extra_header: bytes = b"", trailing: bytes = b"") -> None:
        self.body, self.close_after, self.ignore_after, self.delay = body, close_after, ignore_after, delay
        self.extra_header, self.trailing = extra_header, trailing
        self.connections = 0
        self.requests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                if served == self.ignore_after:
                    break
                await asyncio.sleep(self.delay)
                writer.write(b"HTTP/1.1 200 OK\r\n%scontent-length: %d\r\n\r\n%s"
                             % (self.extra_header, len(self.body), self.body) + (b"" if served else self.trailing))
                await writer.drain()
                served += 1
                if served == self.close_after:
                    break
        except asyncio.IncompleteReadError:  # the client closed the connection
            pass
        except asyncio.CancelledError:  # the test's loop is ending with the connection open
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def keepalive_server(handler: KeepAlive):
    server = await asyncio.start_server(handler.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        server.close()


@contextlib.asynccontextmanager
async def keepalive_transport(handler: KeepAlive, **options):
    """A `keepalive_server` and an `H1Transport(**options)`, closed before the server."""
    async with keepalive_server(handler) as url:
        transport = H1Transport(**options)
        try:
            yield transport, url
        finally:
            await transport.aclose()


@contextlib.asynccontextmanager
async def scripted_transport(script: list):
    """A `RawUpstream` playing `script` to every request, and an `H1Transport` to it."""
    with RawUpstream(lambda head: script) as upstream:
        transport = H1Transport()
        try:
            yield transport, upstream.url
        finally:
            await transport.aclose()


def test_connections_are_kept_alive_and_reused():
    async def main():
        handler = KeepAlive()
        async with keepalive_transport(handler) as (transport, url):
            for _ in range(5):
                response, body = await fetch(transport, url + "?q=1", body=b'{"x": 1}', authorization="Bearer k")
                assert (response.status_code, body) == (200, b"hello")
        assert handler.connections == 1
        head = handler.requests[0]
        assert head.startswith(b"POST /v1/chat/completions?q=1 HTTP/1.1\r\n")
        assert b"\r\nauthorization: Bearer k\r\n" in head
        assert head.endswith(b'\r\n\r\n{"x": 1}') and b"content-length: 8" in head.lower()

    asyncio.run(main())


def test_concurrent_requests_open_connections_that_later_requests_reuse():
    async def main():
        handler = KeepAlive(delay=0.05)
        async with keepalive_transport(handler) as (transport, url):
            for _ in range(3):
                results = await asyncio.gather(*(fetch(transport, url) for _ in range(8)))
                assert [body for _, body in results] == [b"hello"] * 8
        assert handler.connections == 8

    asyncio.run(main())


NOT_REUSED = {
    "the answer says connection: close": dict(extra_header=b"connection: close\r\n"),
    "the upstream closes it while idle": dict(close_after=1),
}


@pytest.mark.parametrize("case", sorted(NOT_REUSED))
def test_connections_that_cannot_serve_again_are_not_reused(case):
    async def main():
        handler = KeepAlive(**NOT_REUSED[case])
        async with keepalive_transport(handler) as (transport, url):
            for _ in range(3):
                assert (await fetch(transport, url))[1] == b"hello"
                await asyncio.sleep(0.05)  # a close from the upstream reaches the idle connection
        assert handler.connections == 3

    asyncio.run(main())


TRAILING = {  # bytes a faulty upstream writes after its first answer, in the same write
    "a whole second response": b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL",
    "the start of one": b"HTTP/1.1 200 OK\r\ncontent-le",
    "garbage": b"garbage\r\n",
}


@pytest.mark.parametrize("case", sorted(TRAILING))
def test_bytes_after_the_end_of_a_response_are_not_read_as_any_response(case):
    """The answer ends where its length says; what follows it on the wire belongs to no
    request, so it is neither added to this answer nor read as the next one: the
    connection is closed."""
    async def main():
        handler = KeepAlive(trailing=TRAILING[case])
        async with keepalive_transport(handler) as (transport, url):
            for _ in range(2):
                response, body = await fetch(transport, url)
                assert (response.status_code, response.headers.raw, body) == (
                    200, [(b"content-length", b"5")], b"hello")
        assert handler.connections == 2

    asyncio.run(main())


def test_a_connection_closed_under_a_request_with_no_answer_is_retried_on_a_new_one():
    async def main():
        handler = KeepAlive(ignore_after=1)
        async with keepalive_transport(handler) as (transport, url):
            await fetch(transport, url)
            response, body = await fetch(transport, url, body=b'{"n": 2}')
            assert (response.status_code, body) == (200, b"hello")
        assert handler.connections == 2
        assert [r.endswith(b'{"n": 2}') for r in handler.requests] == [False, True, True]

    asyncio.run(main())


def test_the_pool_bounds_requests_in_flight_and_times_out_waiting():
    async def main():
        handler = KeepAlive(delay=0.3)
        async with keepalive_transport(handler, max_connections=1) as (transport, url):
            first = await transport.handle_async_request(request(url))
            with pytest.raises(httpx.PoolTimeout):
                await transport.handle_async_request(request(url, timeout={**TIMEOUT, "pool": 0.1}))
            waiting = asyncio.ensure_future(fetch(transport, url))
            await asyncio.sleep(0.05)
            assert not waiting.done()  # the one slot is still held by the open response
            await first.aread()
            await first.aclose()
            _, body = await waiting
            assert body == b"hello"
        assert handler.connections == 1

    asyncio.run(main())


class EarlyAnswer:
    """Answers a request whose body is over 1 MB after its head alone (a 413 from a server
    with a body limit), then reads no more of that connection; smaller ones normally."""

    def __init__(self, close: bool) -> None:
        self.close = close
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                if length <= 1 << 20:
                    await reader.readexactly(length)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    continue
                writer.write(b"HTTP/1.1 413 Payload Too Large\r\n%scontent-length: 8\r\n\r\ntoo big!"
                             % (b"connection: close\r\n" if self.close else b""))
                await asyncio.sleep(30)
        except (asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("close", [True, False], ids=["connection-close", "keep-alive"])
def test_an_answer_before_the_whole_body_is_sent_is_the_response(close):
    """An upstream may answer before it has read the whole request body (RFC 9112 §9.5: a
    client should watch for it while it sends); its answer is the response, rather than a
    write timeout once the upstream stops reading, and the rest of the body is never sent:
    the connection is not reused."""
    async def main():
        handler = EarlyAnswer(close)
        server = await asyncio.start_server(handler.serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/files"
        transport = H1Transport()
        try:
            started = asyncio.get_running_loop().time()
            response, body = await fetch(transport, url, body=b"x" * (64 << 20))
            assert (response.status_code, body) == (413, b"too big!")
            assert asyncio.get_running_loop().time() - started < TIMEOUT["write"]
            response, body = await fetch(transport, url)
            assert (response.status_code, body) == (200, b"ok")
            assert handler.connections == 2
            assert not transport._open - {c for idle in transport._idle.values() for c in idle}
        finally:
            await transport.aclose()
            server.close()

    asyncio.run(main())


def test_an_upstream_that_stops_reading_the_body_without_an_answer_is_a_write_timeout():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(30)
        writer.close()

    async def main():
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/files"
        transport = H1Transport()
        try:
            with pytest.raises(httpx.WriteTimeout):
                await transport.handle_async_request(
                    request(url, body=b"x" * (64 << 20), timeout={**TIMEOUT, "write": 0.3, "read": 5.0}))
            assert transport._slots._value == transport.max_connections and not transport._open
        finally:
            await transport.aclose()
            server.close()

    asyncio.run(main())


def test_a_request_cancelled_as_a_slot_comes_free_is_cancelled():
    """A request waiting for a pool slot is cancelled (its client left, its deadline
    passed) in the same turn of the loop as the slot comes free. `asyncio.wait_for` (3.11)
    then returned the slot and swallowed the cancellation: the request went on upstream
    for nobody, holding the slot, and its caller (`until_disconnect` gathers the pipeline
    and drops its result) never closed the response."""
    async def main():
        handler = KeepAlive()
        async with keepalive_transport(handler, max_connections=1) as (transport, url):
            first = await transport.handle_async_request(request(url))
            waiting = asyncio.ensure_future(fetch(transport, url))
            await asyncio.sleep(0.05)  # waiting for the one slot
            await first.aclose()  # frees it...
            waiting.cancel()  # ...as the waiting request is cancelled
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert transport._slots._value == 1
            assert len(handler.requests) == 1  # the cancelled request never went out
            assert (await fetch(transport, url))[1] == b"hello"

    asyncio.run(main())


def test_a_response_closed_before_its_end_closes_its_connection():
    async def main():
        handler = KeepAlive(body=b"x" * 200_000)
        async with keepalive_transport(handler) as (transport, url):
            response = await transport.handle_async_request(request(url))
            await response.aclose()  # body not read
            await asyncio.sleep(0.1)
            response, body = await fetch(transport, url)
            assert len(body) == 200_000
        assert handler.connections == 2

    asyncio.run(main())


def test_a_large_body_streams_whole_through_the_read_pause():
    async def main():
        data = bytes(range(256)) * (3 * HIGH_WATER // 256 + 7)
        handler = KeepAlive(body=data)
        async with keepalive_transport(handler) as (transport, url):
            response = await transport.handle_async_request(request(url))
            await asyncio.sleep(0.2)  # let the socket fill the buffer past its high water
            conn = response.stream.conn
            assert conn.paused and conn.buffered <= HIGH_WATER + 65536 * 4
            body = b"".join([piece async for piece in response.aiter_raw()])
            await response.aclose()
            assert body == data

    asyncio.run(main())


SCRIPTS = {
    "content-length": ([b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"], b"hello"),
    "chunked": ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", chunk(b"hel"), 0.05, chunk(b"lo"),
                 LAST_CHUNK], b"hello"),
    "until-close": ([b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nhel", 0.05, b"lo", FIN], b"hello"),
    "100-continue-first": ([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"],
                           b"hello"),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_bodies_delimited_every_way_arrive_whole(name):
    script, expected = SCRIPTS[name]

    async def main():
        async with scripted_transport(script) as (transport, url):
            response, body = await fetch(transport, url + "/x")
            assert (response.status_code, body) == (200, expected)

    asyncio.run(main())



def test_trailer_fields_are_not_response_headers():
    """A chunked body's trailer section comes after the body: its fields are no part of
    the head the response was built from, even when they arrive in the same read as it
    (httpx drops them too). Passed on as headers, an upstream's trailer would reach the
    client as a header it never sent there (a `set-cookie`, say)."""
    script = [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"hello")
              + b"0\r\nx-checksum: 1\r\nset-cookie: a=1\r\n\r\n"]

    async def main():
        async with scripted_transport(script) as (transport, url):
            for _ in range(2):  # and the connection serves the next response
                response, body = await fetch(transport, url)
                assert (response.headers.raw, body) == ([(b"transfer-encoding", b"chunked")], b"hello")

    asyncio.run(main())

CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
FAULTS = {  # script, the error, the bytes that arrive before it
    "reset-mid-body": ([b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nhel", 0.05, RST], httpx.ReadError, b"hel"),
    "close-mid-body": ([b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nhel", FIN], httpx.RemoteProtocolError,
                       b"hel"),
    "half-chunk": ([CHUNKED, chunk(b"hel"), b"40\r\nabc", FIN], httpx.RemoteProtocolError, b"helabc"),
    "bad-chunk-size": ([CHUNKED, chunk(b"hel"), 0.05, b"zz\r\nabc\r\n"], httpx.RemoteProtocolError, b"hel"),
    "stalls-mid-body": ([b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nhel", 1.0, FIN], httpx.ReadTimeout, b"hel"),
}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_faults_in_the_body_raise_httpx_errors_after_the_bytes_before_them(name):
    script, error, before = FAULTS[name]

    async def main():
        async with scripted_transport(script) as (transport, url):
            response = await transport.handle_async_request(request(url, timeout={**TIMEOUT, "read": 0.4}))
            assert response.status_code == 200
            got = b""
            with pytest.raises(error):
                async for piece in response.aiter_raw():
                    got += piece
            await response.aclose()
            assert got == before

    asyncio.run(main())


HEAD_FAULTS = {
    "reset": ([RST], httpx.ReadError),
    "close": ([FIN], httpx.RemoteProtocolError),
    "not-http": ([b"SPDY/9 banana\r\n\r\n", FIN], httpx.RemoteProtocolError),
    "silent": ([1.0], httpx.ReadTimeout),
    # A transfer coding other than chunked (httpx refuses it too): the body would go on to
    # the client still coded, with the header that says so dropped as hop-by-hop.
    "gzip-transfer-coding": ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n\x1f\x8b", FIN],
                             httpx.RemoteProtocolError),
    "gzip-then-chunked": ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", chunk(b"\x1f\x8b"),
                           LAST_CHUNK], httpx.RemoteProtocolError),
    "chunked-in-two-fields": ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n",
                               chunk(b"\x1f\x8b"), LAST_CHUNK], httpx.RemoteProtocolError),
    "switches-protocols": ([b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n", 0.5,
                            FIN], httpx.RemoteProtocolError),
}


@pytest.mark.parametrize("name", sorted(HEAD_FAULTS))
def test_faults_before_the_headers_raise_httpx_errors(name):
    script, error = HEAD_FAULTS[name]

    async def main():
        async with scripted_transport(script) as (transport, url):
            with pytest.raises(error):
                await transport.handle_async_request(request(url, timeout={**TIMEOUT, "read": 0.4}))
            assert transport._slots._value == transport.max_connections  # the slot came back

    asyncio.run(main())


HEADS = {  # a response head past 100 KiB (httpcore's bound) is refused before it fills memory
    "many headers": ([b"HTTP/1.1 200 OK\r\n" + b"x-a: %s\r\n" % (b"a" * 1000) * 150, b"content-length: 2\r\n\r\nok"],
                     httpx.RemoteProtocolError),
    "one header that never ends": ([b"HTTP/1.1 200 OK\r\nx-a: " + b"a" * 300_000, 3.0], httpx.RemoteProtocolError),
    "big but under the bound": ([b"HTTP/1.1 200 OK\r\n" + b"x-a: %s\r\n" % (b"a" * 1000) * 90,
                                 b"content-length: 2\r\n\r\nok"], None),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_response_heads_are_bounded(name):
    script, error = HEADS[name]

    async def main():
        async with scripted_transport(script) as (transport, url):
            if error is None:
                response, body = await fetch(transport, url)
                assert (len(response.headers), body) == (91, b"ok")
            else:
                with pytest.raises(error, match="100 KiB"):
                    await transport.handle_async_request(request(url))

    asyncio.run(main())


def test_connect_failures_and_unsendable_headers():
    async def main():
        transport = H1Transport()
        with RawUpstream(lambda head: []) as upstream:
            port = upstream.port
        with pytest.raises(httpx.ConnectError):  # nothing listens there any more
            await transport.handle_async_request(request(f"http://127.0.0.1:{port}/v1"))
        bad = httpx.Request("POST", f"http://127.0.0.1:{port}/v1", content=b"",
                            headers=[(b"x-evil", b"a\r\nhost: elsewhere")], extensions={"timeout": TIMEOUT})
        with pytest.raises(httpx.LocalProtocolError):
            await transport.handle_async_request(bad)
        await transport.aclose()

    asyncio.run(main())


def test_what_the_lean_transport_handles():
    assert handles(request("http://127.0.0.1:8000/v1/chat/completions"))
    assert not handles(request("https://api.openai.com/v1/chat/completions"))
    assert not handles(request("http://127.0.0.1:8000/v1/models", method="HEAD", body=b""))
    assert not handles(request("http://127.0.0.1:8000/v1/files", expect="100-continue"))
