"""The request pipeline: authenticate, read, route, (guard), forward.

Every failure before the response starts is a `ProxyError`, answered in OpenAI's error
format; nothing here lets a traceback reach the client. The config is read once per
request (`holder.current`), so a reload never changes the policy of a request in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from policies.auth import authenticate
from policies.config import Config, Policy
from policies.errors import RoutingHeaderError, UnsafePathError
from policies.routing import RouteMatch, match_route, model_route_passed_over, normalize_path

from .errors import (BadRequest, BodyTimeout, ClientClosed, Forbidden, NotFound, Overloaded, PayloadTooLarge,
                     ProxyError, RequestTimeout, ShuttingDown, Unauthorized, UnsupportedCoding, anthropic_path,
                     error_event, error_response)
from . import batch, conversations, moderations, retrieval, stored
from .endpoints import folded_path, guarded_endpoint, unread_endpoint
from .metrics import Metrics
from .guarding import GuardedCall, cache_salt
from .memory import MemoryView, ResponsesMemory
from .records import AuditLog, Exchange
from .relay import BodyCutShort, RelayResponse, cleanup, open_upstream, relay
from .scorer import Scorer
from .upstream import UpstreamPool, client_location, request_headers, upstream_url

logger = logging.getLogger(__name__)

# Endpoints whose body is a JSON object: a body that does not parse is a 400 here,
# rather than an upstream's guess.
JSON_ENDPOINTS = ("chat/completions", "completions", "completions/batch", "embeddings", "responses", "moderations",
                  "v1/messages")


async def read_body(request: Request, limit: int, stall: float | None = None) -> bytes:
    """The whole body, refused past `limit` bytes without reading further, refused when no
    byte of it came for `stall` seconds (nginx's `client_body_timeout`: a client that
    sends a byte now and then held its connection and its task for good), and refused
    unread in a transfer coding other than `chunked`: the server undoes `chunked` alone,
    so a `gzip, chunked` body would go on still gzipped, with no header left to say so
    (the upstream's `Transfer-Encoding` is the proxy's own: RFC 9112 6.1's 501)."""
    codings = [coding.strip().lower() for value in request.headers.getlist("transfer-encoding")
               for coding in value.split(",") if coding.strip()]
    if codings and codings != ["chunked"]:
        raise UnsupportedCoding(f"transfer coding {', '.join(codings)!r} is not supported; send the body "
                                "with Content-Length or Transfer-Encoding: chunked alone")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    pieces = request.stream()
    try:
        while True:
            try:
                async with asyncio.timeout(stall):  # the deadline's and a drain's are the caller's
                    chunk = await anext(pieces)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise BodyTimeout(f"no byte of the request body came for {stall:g}s",
                                  headers={"connection": "close"}) from None
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientClosed("the client closed the connection before the end of its body") from None
    return b"".join(chunks)


def json_endpoint(path: str, method: str) -> bool:
    """Known as the guard knows endpoints (`folded_path`: any case, matrix parameters left out),
    so that a stream to `chat/completions;x=1` takes a stream slot as the guard reads it."""
    return method == "POST" and "/".join(folded_path(path)).endswith(JSON_ENDPOINTS)


# How a compressed body starts (no JSON text can): gzip, zstd, and zlib's usual header.
COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x78\x01", "deflate"),
                    (b"\x78\x5e", "deflate"), (b"\x78\x9c", "deflate"), (b"\x78\xda", "deflate"))


def parse_json_object(body: bytes) -> dict:
    """The body of a JSON endpoint. A compressed body (`Content-Encoding: gzip`) is refused,
    not inflated: the guard must read what the upstream reads, and inflating would let a
    few kilobytes past `max_body_bytes` grow without bound. Told apart only once the body
    fails to parse, so no JSON body is ever taken for a compressed one."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        coding = next((name for magic, name in COMPRESSED_MAGIC if body.startswith(magic)), None)
        if coding is not None:
            raise BadRequest(f"request body is compressed ({coding}); this endpoint does not accept compressed "
                             "request bodies: send the JSON uncompressed, without Content-Encoding") from None
        if isinstance(exc, UnicodeDecodeError):
            raise BadRequest("request body is not valid UTF-8") from None
        raise BadRequest(f"request body is not valid JSON: {exc}"[:300]) from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


def routing_payload(config: Config, payload: dict | None, body: bytes) -> dict | None:
    """The body, for `model` route conditions, where it is a JSON object: any such body,
    as the upstream reads it, not only where the path names an endpoint this proxy parses
    (a route mounted on the endpoint itself, vLLM's `systemone`, `audio/speech`, ...)."""
    if payload is None and body and any(route.model is not None for route in config.routes):
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return None
    return payload if isinstance(payload, dict) else None



class Proxy:
    def __init__(self, holder, pool: UpstreamPool, scorer: Scorer | None = None,
                 audit: AuditLog | None = None, metrics: Metrics | None = None) -> None:
        self.holder = holder
        self.pool = pool
        self.scorer = scorer
        self.audit = audit
        self.metrics = metrics or Metrics()
        self.active_streams = 0
        self.drain_at: float | None = None  # when requests still going end (`drain`)
        self._waits: set[asyncio.Timeout] = set()  # the deadlines a drain moves: bodies and answers awaited
        self._readers: set[asyncio.Task] = set()  # tasks awaiting with no deadline armed (`_until_end`)
        self._woken: set[asyncio.Task] = set()  # those the drain has cancelled (`_wake`)
        self.cache_scope = holder.current.guard.prefix_cache_scope  # read at start-up, as the guard is
        self.memory = ResponsesMemory()  # Responses turns guarded, by id (bounded per request: `MemoryView`)
        self.metrics.watch_memory(self.memory)

    async def handle(self, request: Request) -> Response:
        config: Config = self.holder.current
        request.state.route = "-"
        # Errors in the shape the client's SDK reads: Anthropic's for its Messages API.
        request.state.anthropic = anthropic_path(request.url.path)
        try:
            response = await self._admit(request, config)
        except ProxyError as exc:
            response = error_response(exc, anthropic=request.state.anthropic)
        self.metrics.requests.labels(request.state.route, str(response.status_code)).inc()
        return response

    async def _admit(self, request: Request, config: Config) -> Response:
        """Stream slots and the request deadline around the pipeline."""
        timeout = config.server.request_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        # The raw path, so that encoded dots and slashes are seen (and refused) as sent, with
        # escaped letters and digits decoded: an upstream that decodes its path serves
        # `chat/%63ompletions` as chat, so it is guarded as chat (and forwarded decoded).
        path = normalize_path(request.scope.get("raw_path", b"").decode("latin-1") or request.url.path)
        # On the head, before the body: a client without a key gets no body read or parsed.
        key_name = self._authenticate(request, config)
        try:  # ended as the answer's wait is: at the deadline, or by a drain with a 503
            body = await self._until_end(read_body(request, config.server.max_body_bytes,
                                                   config.server.body_timeout), deadline,
                                         asyncio.current_task())
        except TimeoutError:
            raise self._ended(deadline, timeout) from None
        payload = parse_json_object(body) if json_endpoint(path, request.method) else None
        # Routed before a stream slot is taken: a refused stream is counted under its route,
        # and a client without a key or a route hears so, not that the proxy is busy.
        match = self._route(request, config, path, body, payload, key_name)
        streaming = request.state.streaming = payload is not None and payload.get("stream") is True \
            or retrieval.replays(request.method, path, request.url.query)
        if streaming:
            if self.active_streams >= config.server.max_concurrent_streams:
                raise Overloaded("too many concurrent streams; retry shortly", headers={"retry-after": "1"})
            self.active_streams += 1
            self.metrics.active_streams.inc()
        try:
            async with asyncio.timeout_at(self._end(deadline)) as scope:
                self._waits.add(scope)  # a drain moves its end (`drain`)
                try:
                    response = await self._handle(request, config, match, key_name, path, body, payload)
                finally:
                    self._waits.discard(scope)
        except TimeoutError:
            self._stream_ended(streaming)
            raise self._ended(deadline, timeout) from None
        except BaseException:
            self._stream_ended(streaming)
            raise
        if isinstance(response, RelayResponse):
            response.deadline = deadline
            response.body_iterator = self._finishing(response.body_iterator, deadline, timeout,
                                                     anthropic=request.state.anthropic, events=response.events)

            async def ended() -> None:  # also when the body never started
                self._stream_ended(streaming)

            response.on_close.append(ended)
        else:
            self._stream_ended(streaming)
        return response

    def _stream_ended(self, streaming: bool) -> None:
        if streaming:
            self.active_streams -= 1
            self.metrics.active_streams.dec()

    def drain(self, after: float) -> None:
        """Shutdown has begun (`proxy.server`): a request still going `after` seconds from
        now ends then, before the server's grace period runs out and it cancels what is left
        (which the client sees as a broken body, or a bare 500 before the answer began): a
        request not answered yet (its body still arriving, or its answer awaited) with a 503
        `server_shutting_down`, a body still going as `_finishing` ends it."""
        loop = asyncio.get_running_loop()
        self.drain_at = loop.time() + after
        for scope in self._waits:  # awaited now: a request body, an answer (a 503 then), or a body's next bytes
            if scope.when() is None or self.drain_at < scope.when():
                scope.reschedule(self.drain_at)
        loop.call_at(self.drain_at, self._wake)

    def _wake(self) -> None:
        """The drain's time has come: waits with no deadline armed (`_until_end`) end now."""
        for task in self._readers:
            self._woken.add(task)
            task.cancel()

    async def _until_end(self, step: Awaitable[bytes], deadline: float | None, task: asyncio.Task) -> bytes:
        """`step`'s result, or a `TimeoutError` once the request reaches `_end(deadline)`:
        at its deadline, or when a drain comes meanwhile (`drain` moves an armed timeout,
        `_wake` cancels a wait with none). With neither, no timeout is armed (one costs
        10-20 us, on every piece of every stream). `task` is the current one, looked up
        once per body by the caller rather than once per piece."""
        end = self._end(deadline)
        if end is not None:
            async with asyncio.timeout_at(end) as scope:
                self._waits.add(scope)
                try:
                    return await step
                finally:
                    self._waits.discard(scope)
        self._readers.add(task)
        try:
            return await step
        except asyncio.CancelledError:
            if task not in self._woken or task.cancelling() > 1:  # not the drain's, or not its alone
                raise
            task.uncancel()
            raise TimeoutError from None
        finally:
            self._readers.discard(task)
            self._woken.discard(task)

    def _end(self, deadline: float | None) -> float | None:
        """When a request ends: its deadline, or the drain if shutdown has begun and it
        comes first."""
        if self.drain_at is not None and (deadline is None or self.drain_at < deadline):
            return self.drain_at
        return deadline

    def _ended(self, deadline: float | None, timeout: float | None) -> ProxyError:
        """What a request that reached `_end(deadline)` is told."""
        if self._end(deadline) == deadline:
            return RequestTimeout(f"the request did not complete within {timeout}s")
        return ShuttingDown("the proxy is shutting down; retry the request")

    async def _finishing(self, body: AsyncIterator[bytes], deadline: float | None, timeout: float | None,
                         *, anthropic: bool = False, events: bool = True) -> AsyncIterator[bytes]:
        """The body, ended at the request deadline or at shutdown (the stream slot is freed
        `on_close`): an event stream ends with an in-band error; any other body is cut
        short, since its bytes have no place for one.

        The wait runs in this task (`asyncio.timeout_at`, not `wait_for`, which steps the
        body in a task of its own): a client that leaves cancels this task, and with it the
        body where it waits, so the body is closed, never left running elsewhere."""
        task = asyncio.current_task()
        try:
            while True:
                try:
                    chunk = await self._until_end(anext(body), deadline, task)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    error = self._ended(deadline, timeout)
                    if not events:
                        logger.warning("%s: the body was cut short", error)
                        raise BodyCutShort(str(error)) from None
                    yield error_event(error, anthropic=anthropic)
                    return
                yield chunk
        finally:
            with cleanup():
                await body.aclose()

    def _authenticate(self, request: Request, config: Config) -> str | None:
        """The name of the proxy key the request presented (None when the proxy has none)."""
        if not config.server.auth_required:
            return None
        key_name = authenticate(config, client_key(request.headers))
        if key_name is None:
            raise Unauthorized("missing or invalid API key for this proxy")
        return key_name

    def _route(self, request: Request, config: Config, path: str, body: bytes,
               payload: dict | None, key_name: str | None) -> RouteMatch:
        """The request's route, named in `request.state.route`."""
        routed = routing_payload(config, payload, body)
        model = routed.get("model") if routed is not None and isinstance(routed.get("model"), str) else None
        try:
            match = match_route(config, path, model=model, headers=request.headers, api_key_name=key_name)
        except (UnsafePathError, RoutingHeaderError) as exc:
            raise BadRequest(str(exc)) from None
        if match is None:
            raise NotFound(f"no route for {request.method} {path}")
        # A JSON body without a model (which vLLM serves with the model it serves, and
        # OpenAI refuses) would pass over a route meant for a model: refused as OpenAI does.
        if model is None and routed is not None and model_route_passed_over(
                config, match, path, headers=request.headers, api_key_name=key_name) is not None:
            raise BadRequest("you must provide a model parameter (a string): this proxy chooses its policy by it",
                             param="model")
        request.state.route = match.route.name
        return match

    async def _handle(self, request: Request, config: Config, match: RouteMatch, key_name: str | None,
                      path: str, body: bytes, payload: dict | None) -> Response:
        url = upstream_url(match.upstream, match.upstream_path, request.url.query)
        endpoint = guarded_endpoint(request.method, url)
        # A route mounted on the Messages endpoint itself: its errors are Anthropic's too,
        # as its stream's are (`StreamGuard`), whatever the client's path says.
        request.state.anthropic = request.state.anthropic or endpoint == "messages"
        policy = match.policy
        if policy.moderations == "guard" and moderations.moderation_endpoint(request.method, url):
            exchange = Exchange(route=match.route.name, policy=policy.name, endpoint=moderations.ENDPOINT,
                                stream=False, metrics=self.metrics)
            payload = payload if payload is not None else parse_json_object(body)
            return await until_disconnect(request, moderations.answer(
                self.scorer, payload, policy, exchange, self.audit, config.server.max_prompt_bytes))
        guarded = endpoint is not None and (policy.prompt.action != "off" or policy.response.action != "off")
        if guarded and payload is None:  # a route mounted on the endpoint itself
            payload = parse_json_object(body)
        # A stored Responses reply read back (`proxy.retrieval`): its response stage reads it
        response_id = retrieval.retrieved(request.method, url) if policy.response.action != "off" else None
        skip_through = None
        # Stored chat completions and conversation items read back (`proxy.stored`): so are they
        reads = stored.stored(request.method, url) if policy.response.action != "off" else None
        guarded = guarded or reads is not None
        if response_id is not None:
            guarded = True
            query, skip_through = retrieval.resumed(request.url.query)
            url = upstream_url(match.upstream, match.upstream_path, query)
        if policy.unguarded_endpoints == "block":
            refuse_unguarded(request.method, path, url, policy)
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        # A guarded response is read by the guard, so it must not arrive compressed.
        # Back to bytes as received: httpx would refuse a str value that is not ASCII.
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request_headers(
            raw, match.upstream, identity_encoding=guarded,
            proxy_key=(lambda value: authenticate(config, f"Bearer {value}") is not None)
            if config.server.auth_required else None)]

        async def send(content: bytes) -> httpx.Response:
            started = time.perf_counter()
            response = await open_upstream(self.pool, match.upstream, request.method, url, headers, content)
            if "location" in response.headers:  # the upstream's own address stays behind the proxy
                response.headers["location"] = client_location(response.headers["location"],
                                                               match.upstream.base_url, match.route.prefix)
            self.metrics.upstream_latency.observe(time.perf_counter() - started)
            return response

        if not guarded:
            return relay(await send(body), self.metrics, anthropic=request.state.anthropic)
        memory = MemoryView.of(self.memory, key_name=key_name, upstream=match.upstream.name,
                               megabytes=config.server.responses_memory_mb)
        if response_id is not None:
            exchange = Exchange(route=match.route.name, policy=policy.name, endpoint=retrieval.ENDPOINT,
                                stream=request.state.streaming, metrics=self.metrics)
            reading = retrieval.Retrieval(
                scorer=self.scorer, audit=self.audit, policy=policy, exchange=exchange, response_id=response_id,
                memory=memory, skip_through=skip_through, cache_salt=cache_salt(self.cache_scope, key_name, {}))
            return await until_disconnect(request, reading.run(send, body))
        if reads is not None:
            store, kind = reads
            exchange = Exchange(route=match.route.name, policy=policy.name, endpoint=store.endpoint,
                                stream=False, metrics=self.metrics)
            reading = stored.StoredRead(scorer=self.scorer, audit=self.audit, policy=policy, exchange=exchange,
                                        store=store, kind=kind, memory=memory,
                                        cache_salt=cache_salt(self.cache_scope, key_name, {}))
            return await until_disconnect(request, reading.run(send, body))
        exchange = Exchange(route=match.route.name, policy=policy.name, endpoint=endpoint,
                            stream=payload.get("stream") is True, metrics=self.metrics)
        salt = cache_salt(self.cache_scope, key_name, payload)
        if endpoint == batch.ENDPOINT:
            call = batch.BatchCall(scorer=self.scorer, audit=self.audit, payload=payload, policy=policy,
                                   exchange=exchange, cache_salt=salt,
                                   max_prompt_bytes=config.server.max_prompt_bytes)
        else:
            # Responses turns, to chain from; a chat completion stored upstream, to refuse again if cut
            remembers = endpoint == "responses" or endpoint == "chat/completions" and payload.get("store") is True
            # A conversation's turns, read from the upstream where the prompt's scope reads them
            conversation_id = conversations.named(payload, policy) if endpoint == "responses" else None
            turns = None
            if conversation_id is not None:
                read_headers = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-encoding")]

                async def fetch(items: str) -> httpx.Response:
                    return await open_upstream(self.pool, match.upstream, "GET", items, read_headers, b"")

                turns = await conversations.read(fetch, conversations.items_url(url, conversation_id),
                                                 config.server.max_prompt_bytes)
            call = GuardedCall(scorer=self.scorer, audit=self.audit, endpoint=endpoint, payload=payload,
                               policy=policy, exchange=exchange, cache_salt=salt,
                               max_prompt_bytes=config.server.max_prompt_bytes, memory=memory if remembers else None,
                               conversation=turns)
        return await until_disconnect(request, call.run(send, body))


async def until_disconnect(request: Request, pipeline: Awaitable[Response]) -> Response:
    """`pipeline`'s response, or `ClientClosed` if the client disconnects first: its
    task is cancelled, and with it the guard's work for it (`guard.worker`: a long
    prompt's prefill stops at its next window), so a client that gives up frees the
    guard for the others. Once a response exists, `RelayResponse` watches instead.
    Guarded requests only: an unguarded one waits for nothing but its upstream, and the
    two tasks cost 0.1 ms a request (`bench/proxy_overhead.py`)."""
    task = asyncio.ensure_future(pipeline)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the deadline (or shutdown) cancelled us: the pipeline goes too
        await _discard(task)
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    await _discard(task)
    raise ClientClosed("the client closed the connection before the response began")


async def _discard(task: asyncio.Future[Response]) -> None:
    """Cancel the pipeline and let its cleanup (a session's close) run now. A response it
    made all the same, before the cancellation reached it, is closed: nobody will send it,
    and it holds an upstream stream and a pool slot."""
    task.cancel()
    done, = await asyncio.gather(task, return_exceptions=True)
    if isinstance(done, RelayResponse):
        await done.aclose()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read: ASGI's next message)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def refuse_unguarded(method: str, path: str, url: str, policy: Policy) -> None:
    """Raise `Forbidden` where a request would get generated text past a stage that
    enforces (`flag` and `shadow` stop nothing, so under them it is forwarded): an
    endpoint whose text the guard cannot read (`proxy.endpoints`). (A background Responses
    request's output is read back through `GET responses/{id}`, which is guarded:
    `proxy.retrieval`.)"""
    cuts = policy.response.action == "cut"
    prompt_enforces = policy.prompt.action in ("refuse", "block", "steer")
    if not (cuts or prompt_enforces):  # nothing to refuse: skip the table walk (5% of an unguarded request's CPU)
        return
    unread = unread_endpoint(method, url)
    if unread is None or not (cuts or (unread.stage == "prompt" and prompt_enforces)):
        return
    if unread.stage == "prompt":
        why, instead = ("generates text in a shape this proxy's guard does not read",
                        "Use chat/completions, completions, responses or messages, or set")
    else:
        why, instead = ("returns text the model generated earlier, outside the request that guarded it "
                        "(a response the proxy cut is still whole upstream)", "Set")
    raise Forbidden(f"{method} {path} ({unread.what}) {why}, so policy {policy.name!r} refuses it. {instead} "
                    "`unguarded_endpoints: forward` on the policy to let it through unguarded.",
                    code="unguarded_endpoint")


def client_key(headers) -> str | None:
    """The `Authorization` header a client sent, or its Anthropic-style `x-api-key` (how
    Anthropic's SDK sends a key) as a bearer token when it sent no `Authorization`."""
    authorization = headers.get("authorization")
    if authorization is None and headers.get("x-api-key"):
        return f"Bearer {headers['x-api-key']}"
    return authorization
