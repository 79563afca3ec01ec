"""Relaying an upstream response to the client, and closing it the moment we can.

`RelayResponse` watches for the client's disconnect while it streams, instead of
noticing only at the next write (Starlette's StreamingResponse under ASGI spec 2.4):
with a slow upstream there may be no next write for a long time, and until the upstream
response is closed vLLM keeps generating for nobody. Whatever ends the relay (the end of
the body, a client disconnect, a cut, an error), the body iterator is closed in
`finally`, shielded from cancellation, and the iterator's own `finally` closes the
upstream response. A body iterator that never started (`send` raised before the first
chunk: the client was gone) has no `finally` to run, so whatever must happen at the end
of every response (closing the upstream response and a guarded stream's sessions,
writing its audit line, freeing its stream slot) is an `on_close` callback, run last,
in order, whatever happened. Callbacks may also run after the iterator's own cleanup,
so they are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .errors import ProxyError, UpstreamTimeout, UpstreamUnreachable, error_event
from .metrics import Metrics
from .sse import SSEDecoder, SSEError
from .upstream import response_headers

logger = logging.getLogger(__name__)


class RelayResponse(Response):
    def __init__(self, body: AsyncIterator[bytes], status_code: int,
                 headers: Sequence[tuple[str, str]], *, watch: bool = True,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.body_iterator = body
        self.watch = watch
        self.deadline: float | None = None  # the request's (event loop time), for writes too: `_send`
        self.on_close: list[Callable[[], Awaitable[None]]] = [on_close] if on_close is not None else []
        self.status_code = status_code
        self.background = None
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]

    @property
    def events(self) -> bool:
        """Whether the body is an uncompressed event stream, where an error after the
        headers can go in band."""
        headers = {k: v.decode("latin-1") for k, v in self.raw_headers}
        return in_band_errors(headers.get(b"content-type", ""), headers.get(b"content-encoding", "identity"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.watch:  # a whole body already on its way: a disconnect shows at the next send
            try:
                await self._send_all(send)
            except OSError:
                pass
            finally:
                await self.aclose()
            return
        gone = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            try:
                await self._send_all(send, gone)
            except OSError:  # the client went away between our checks
                pass
            finally:
                await self.aclose()
                tg.cancel_scope.cancel()

    async def aclose(self) -> None:
        """Close the body and run `on_close`: at the end of the response, or instead of it
        when it is never sent."""
        with anyio.CancelScope(shield=True):
            try:
                await self.body_iterator.aclose()
            finally:
                for close in self.on_close:
                    try:
                        await close()
                    except Exception:  # noqa: BLE001 - the others must still run
                        logger.exception("closing a response failed")

    async def _send_all(self, send: Send, gone: anyio.Event | None = None) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                # Once the client is gone uvicorn's `send` returns at once, sending nothing, and
                # anyio cancels a task only while it waits on something not yet done: an
                # upstream with bytes at every turn of the loop would be read on for nobody.
                if gone is not None and gone.is_set():
                    return
                if not await self._send(send, chunk, more=True):
                    return
        except BodyCutShort:
            return  # left unfinished: the server closes the connection, short of the body's end
        await self._send(send, b"", more=False)

    async def _send(self, send: Send, chunk: bytes, *, more: bool) -> bool:
        """Send one piece of the body; False when the request deadline passed first.

        A client that stops reading fills the socket's buffers, and the server's `send`
        then waits for it, with nothing else on the way to notice the deadline: the
        request would hold its stream slot, guard sessions and upstream stream for as
        long as the client stays connected. Past the deadline, a piece that can go at
        once (the in-band error that ends the stream) still goes; one that must wait is
        left unsent, and the server closes the connection short of the body's end.
        """
        message = {"type": "http.response.body", "body": chunk, "more_body": more}
        if self.deadline is None:  # no timeout to arm: 8-20 us a chunk saved (the default)
            await send(message)
            return True
        try:
            async with asyncio.timeout_at(self.deadline):  # a third of an anyio CancelScope's cost
                await send(message)
        except TimeoutError:
            logger.warning("the client read nothing more by the request deadline: the body was cut short")
            return False
        return True


def transport_error(exc: httpx.HTTPError) -> ProxyError:
    """What an httpx failure before the response began means for the client."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"the upstream did not answer in time ({type(exc).__name__})")
    return UpstreamUnreachable(f"the upstream could not be reached ({type(exc).__name__})")


async def open_upstream(pool, upstream, method: str, url: str, headers, content: bytes) -> httpx.Response:
    """The upstream's response, headers read and body pending; a failure is a ProxyError."""
    try:
        return await pool.send(upstream, method, url, headers, content)
    except httpx.HTTPError as exc:
        logger.warning("upstream %s %s failed: %s", method, httpx.URL(url).path, type(exc).__name__)
        raise transport_error(exc) from exc


class BodyCutShort(Exception):
    """A body that is not an event stream broke off after its headers went out (an
    upstream failure, or the request deadline: `proxy.handler`). Such a
    body has no in-band error, so `RelayResponse` leaves the response unfinished: the
    client sees it cut short (short of its Content-Length, or a chunked body without its
    last chunk), as every HTTP client reports; a clean end would pass it off as whole."""


async def raw_body(response: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream body as received (no decoding); closes the response when done.
    A failure mid-body is `BodyCutShort`."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        logger.warning("upstream body broke off: %s", type(exc).__name__)
        raise BodyCutShort(f"the upstream body broke off ({type(exc).__name__})") from None
    finally:
        with cleanup():
            await response.aclose()


def cleanup() -> anyio.CancelScope:
    """A shield for the `finally` of a body generator.

    A client disconnect cancels the relay's scope, and under anyio every later await in
    that scope raises again: without a shield, the first `await` of a cleanup would end
    it, leaving the upstream open, guard sessions alive and decisions unrecorded.
    """
    return anyio.CancelScope(shield=True)


class TruncatedStream(Exception):
    """The upstream's event stream ended in the middle of an event."""


def check_complete(tail: list) -> list:
    """The decoder's last items, refusing an unterminated event (it is never forwarded)."""
    if tail and getattr(tail[-1], "truncated", False):
        raise TruncatedStream("the upstream stream ended in the middle of an event")
    return tail


def broken_stream(exc: Exception, *, anthropic: bool = False) -> bytes:
    """The in-band error event for an upstream stream that broke off after it began."""
    logger.warning("upstream stream broke off: %s", type(exc).__name__)
    if isinstance(exc, httpx.TimeoutException):
        return error_event(UpstreamTimeout("the upstream stopped sending within the read timeout"),
                           anthropic=anthropic)
    return error_event(UpstreamUnreachable(f"the upstream stream broke off ({type(exc).__name__})"),
                       anthropic=anthropic)


def is_event_stream(content_type: str) -> bool:
    """Whether a Content-Type is `text/event-stream` (media types are case-insensitive)."""
    return content_type.lower().startswith("text/event-stream")


def in_band_errors(content_type: str, content_encoding: str) -> bool:
    """Whether a body can end with an in-band error event: an uncompressed event stream."""
    return is_event_stream(content_type) and content_encoding.lower() == "identity"


# One SSE event larger than this is an upstream fault, not a reason to grow memory.
MAX_EVENT_BYTES = 4 << 20


def relay(response: httpx.Response, metrics: Metrics | None = None, *, anthropic: bool = False,
          headers: Sequence[tuple[str, str]] = (), watch: bool = False, guarded: bool = False) -> RelayResponse:
    """A response the guard does not read (unguarded, or past a prompt stage alone), with
    `headers` added: non-streams byte for byte, streams event by event, so that a stream
    that breaks off ends with an in-band error. `watch`: watch for the client's
    disconnect in a body that is not a stream too (streams are always watched). `guarded`:
    the route's policy scores, so an upstream's `x-siren-*` headers are dropped
    (`response_headers`)."""
    passthrough = response.headers.multi_items()
    content_type = response.headers.get("content-type", "")
    if in_band_errors(content_type, response.headers.get("content-encoding", "identity")):
        return RelayResponse(sse_passthrough(response, MAX_EVENT_BYTES, metrics, anthropic=anthropic),
                             response.status_code, response_headers(passthrough, keep_length=False, guarded=guarded) + [*headers],
                             on_close=response.aclose)
    # A compressed stream (a gateway's gzip, for a client that accepts it) is the client's
    # to inflate: relayed as sent, its Content-Encoding kept, like any other body.
    return RelayResponse(raw_body(response), response.status_code,
                         response_headers(passthrough, keep_length=True, guarded=guarded) + [*headers],
                         watch=watch or is_event_stream(content_type),
                         on_close=response.aclose)


async def sse_passthrough(response: httpx.Response, max_event_bytes: int,
                          metrics: Metrics | None = None, *, anthropic: bool = False) -> AsyncIterator[bytes]:
    """Forward whole events as they complete; the bytes are the upstream's, unchanged.

    Going event by event (not chunk by chunk) costs nothing in latency, since a client
    can act only on complete events, and it means a failure mid-stream can always be
    reported as one well-formed error event instead of being glued to half an event.
    """
    decoder = SSEDecoder(max_event_bytes=max_event_bytes)
    started, first = time.perf_counter(), True
    try:
        async for chunk in response.aiter_raw():
            events = decoder.feed(chunk)
            if events:
                if first and metrics is not None:
                    metrics.upstream_ttft.observe(time.perf_counter() - started)
                    first = False
                yield b"".join(event.raw for event in events)
        tail = check_complete(decoder.close())
        if tail:
            yield b"".join(event.raw for event in tail)
    except (httpx.HTTPError, SSEError, TruncatedStream) as exc:
        yield broken_stream(exc, anthropic=anthropic)
    finally:
        with cleanup():
            await response.aclose()
