"""The guarded path: prompt stage before (or beside) the upstream call, response stage after.

Endpoints that carry generated text are guarded: `chat/completions`, `completions`,
`responses` and Anthropic's `/v1/messages` (POST, however the route mounts them:
`proxy.endpoints`). Those that
generate text in shapes the guard does not read are refused; the rest (models,
embeddings, files, ...) carry no generated text and are forwarded unguarded. The README
lists them all.

Prompt stage, `mode: sequential`: score, decide, then call the upstream (or not).
`mode: parallel`: call the upstream at once and score meanwhile; the upstream response
is held until the verdict, and closed unread if the prompt is refused, so the added time
to first token is about max(0, guard time - upstream time to first token).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import httpx
from starlette.responses import Response

from policies.config import MAX_CHOICES, Policy
from policies.decisions import (BLOCK, FLAG, GUARD_ERROR, REFUSE, STEER, Decision, decide_continuation, decide_prompt,
                                headers_for, merged_headers)
from policies.errors import RequestShapeError
from policies.extract import completion_prompts, prompt_text, responses_turn

from .errors import BadRequest, ContentFiltered, Forbidden, GuardUnavailable, Overloaded, ProxyError
from .memory import Chain, MemoryView, Remembered, look_up
from .stored import remember_cut
from .records import AuditLog, Exchange
from . import rerank
from .relay import RelayResponse, cleanup, is_event_stream, relay
from .scorer import Scorer, ScorerBusy, StreamSession
from .shapes import refused_json, refused_stream, steered
from .stream_guard import StreamGuard
from .upstream import response_headers
from .whole import UNFINISHED, WholeReply, gather_groups, read_whole

logger = logging.getLogger(__name__)

MAX_N = MAX_CHOICES
QUEUE_FULL = "the guard's queue is full"  # a guard failure the client may retry soon


def failed_closed(decision: Decision, message: str, *, param: str | None = None) -> ProxyError:
    """What a prompt decision of `guard_error` answers: 503 `overloaded` with Retry-After
    when the guard's queue was full (the client should retry shortly), else 503
    `guard_unavailable`."""
    if decision.guard_error == QUEUE_FULL:
        return Overloaded("the safety guard is saturated; retry shortly", param=param, headers={"retry-after": "1"})
    return GuardUnavailable(message, param=param)


async def prompt_decision(scorer: Scorer | None, policy: Policy, prompt: str | None,
                          score_prompt: Callable[[], Awaitable[float]] | None = None) -> tuple[Decision, float]:
    """The prompt stage's decision and its time; `score_prompt` replaces
    `scorer.score(prompt=prompt)` (the response's session opened early, `GuardedCall`)."""
    started = time.perf_counter()
    score, error = None, None
    if prompt is None:
        error = "the prompt cannot be scored (token ids or no input)"
    elif scorer is None:
        error = "no guard is configured"
    else:
        try:
            score = await (score_prompt() if score_prompt is not None else scorer.score(prompt=prompt))
        except ScorerBusy:  # decided, logged and audited as any guard failure (`failed_closed`)
            error = QUEUE_FULL
        except Exception as exc:  # noqa: BLE001 - every guard failure meets on_guard_error
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("guard failed on a prompt: %s", error)
    decision = decide_prompt(policy.prompt, score, on_guard_error=policy.on_guard_error, error=error)
    return decision, (time.perf_counter() - started) * 1000


# The field a prompt-size error names, per endpoint.
PROMPT_PARAMS = {"chat/completions": "messages", "completions": "prompt", "responses": "input", "messages": "messages"}


def check_prompt_sizes(texts, limit: int | None, param) -> None:
    """400 `prompt_too_long` if a text the guard would read as a prompt is over `limit`
    UTF-8 bytes (`server.max_prompt_bytes`): the guard reads a few hundred tokens a
    second on 2 CPU cores, and one huge prompt would hold it for every other request.
    `param(i)` names the field of text i."""
    if limit is None:
        return
    for i, text in enumerate(texts):
        if text is None or len(text) * 4 <= limit:  # at most 4 bytes a character
            continue
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise BadRequest(f"the prompt the safety guard would read is {size} bytes, over this proxy's limit of "
                             f"{limit} (server.max_prompt_bytes); shorten it, or ask the operator to raise the "
                             "limit", param=param(i), code="prompt_too_long")


def reads_prompt(policy: Policy) -> bool:
    """Whether the guard reads a request's prompt under `policy` (either stage)."""
    response = policy.response
    return policy.prompt.action != "off" or (response.action != "off" and response.include_prompt)


def cache_salt(scope: str, key_name: str | None, payload: Mapping) -> str | None:
    """The guard prefix cache's partition for a request: its proxy API key's name unless
    `scope` is `shared`, and its own `cache_salt` (vLLM's request field, forwarded as
    sent) when that is a non-empty string. None, the partition of requests with neither."""
    parts = {}
    if scope == "key" and key_name is not None:
        parts["key"] = key_name
    salt = payload.get("cache_salt")
    if isinstance(salt, str) and salt:
        parts["salt"] = salt
    return json.dumps(parts, sort_keys=True) if parts else None


def enforces(policy: Policy) -> bool:
    """Whether a stage of `policy` stops anything (`flag` and `shadow` stop nothing)."""
    return policy.prompt.action in ("refuse", "block", "steer") or policy.response.action == "cut"


def refusal_response(endpoint: str, payload: Mapping, policy: Policy, headers: dict[str, str]) -> Response:
    if payload.get("stream") is True:
        return Response(refused_stream(endpoint, payload, policy.refusal), media_type="text/event-stream",
                        headers={"cache-control": "no-cache", **headers})
    return Response(json.dumps(refused_json(endpoint, payload, policy.refusal)).encode(),
                    media_type="application/json", headers=headers)


class GuardedCall:
    """One guarded request: decides, calls the upstream, and guards what comes back."""

    def __init__(self, *, scorer: Scorer | None, audit: AuditLog | None, endpoint: str, payload: dict,
                 policy: Policy, exchange: Exchange, cache_salt: str | None = None,
                 max_prompt_bytes: int | None = None, memory: MemoryView | None = None,
                 conversation: tuple[tuple[str, str], ...] | None = None) -> None:
        self.scorer = scorer
        self.cache_salt = cache_salt  # the guard's prefix cache partition (`cache_salt()`)
        self.audit = audit
        self.endpoint = endpoint
        self.payload = payload
        self.policy = policy
        self.exchange = exchange
        n = payload.get("n", 1)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N):
            # OpenAI's own bound; each choice of a guarded stream has its own session.
            raise BadRequest(f"'n' must be an integer from 1 to {MAX_N}", param="n")
        # Responses: the turns the upstream stored that this request continues (`proxy.memory`)
        self.memory = memory
        # (and those of a `conversation`, where they were read: `proxy.conversations`)
        self.chain = look_up(memory, payload, conversation) if endpoint == "responses" else Chain()
        if self.chain.unknown is not None and policy.unknown_previous_response == "block" and enforces(policy):
            raise Forbidden(f"'{self.chain.unknown}' continues turns stored upstream that this proxy did not guard "
                            "or no longer remembers, so its guard cannot read them and policy "
                            f"{policy.name!r} refuses the request. Send the conversation as 'input' instead, or "
                            "set `unknown_previous_response: forward` on the policy.",
                            param=self.chain.unknown, code="unknown_previous_response")
        try:
            self.prompt = prompt_text(endpoint, payload, policy.prompt.scope, context=self.chain.context)
            prompts = completion_prompts(payload) if endpoint == "completions" else [self.prompt]
        except RequestShapeError as exc:
            raise BadRequest(exc.message, param=exc.param) from None
        self.n = n or 1  # choices per prompt
        if reads_prompt(policy):
            check_prompt_sizes(prompts, max_prompt_bytes, lambda i: PROMPT_PARAMS.get(endpoint, "prompt"))
        if len(prompts) * self.n > MAX_N:
            raise BadRequest(f"a guarded completions request has at most {MAX_N} choices (prompts x n); this one "
                             f"has {len(prompts)} prompts x n = {self.n}", param="prompt")
        # Several prompts (a completions list), each completed and scored on its own: choice
        # i answers prompts[i // n]. None where the request has one prompt (`self.prompt`).
        self.prompts: list[str | None] | None = prompts if len(prompts) > 1 else None
        self.session: StreamSession | None = None  # the response's session, opened by the prompt stage
        self.reranking = rerank.applies(policy, endpoint, payload)  # safest-of-n: n candidates, read whole

    async def run(self, send_upstream, body: bytes) -> Response:
        """`send_upstream(body) -> httpx.Response` opens the upstream request."""
        try:
            return await self._run(send_upstream, body)
        finally:
            if self.session is not None:  # opened by the prompt stage and not handed on
                with cleanup():
                    await self.take_session().aclose()

    async def _run(self, send_upstream, body: bytes) -> Response:
        headers: dict[str, str] = {}
        if self.reranking:
            body = self._upstream_body(self.payload)
        stage = self.policy.prompt
        if stage.action == "off":
            if self.shares_prompt():
                self._open_early()
            response = await send_upstream(body)
        else:
            response, decision, body = await self._prompt_stage(send_upstream, body)
            if decision.action == FLAG:
                headers = headers_for(decision, policy=self.policy.name)
            if response is None:
                return self._answer_refused(decision)
        if self.reranking:
            return await WholeReply(self).rank(response, headers)
        return await self._response_stage(response, headers)

    def _upstream_body(self, payload: Mapping) -> bytes:
        """`payload` as sent upstream: with safest-of-n, asking for the n candidates, not
        streamed (a steered request too, or the upstream would answer the client's `n` and
        `stream`)."""
        return rerank.upstream_body(payload, self.policy.rerank) if self.reranking else json.dumps(payload).encode()

    def shares_prompt(self) -> bool:
        """Whether the response stage will score `prompt + "\\n" + response` with a session."""
        response = self.policy.response
        return self.scorer is not None and bool(self.prompt) and response.action != "off" \
            and response.include_prompt and self.prompts is None  # an empty prompt has no prefill (it scores as " ")

    def choice_prompt(self, index: int) -> str | None:
        """The prompt choice `index` answers."""
        return self.prompt if self.prompts is None else self.prompts[index // self.n]

    async def _prompt_by_session(self, *, keep: bool) -> float:
        """The prompt's score, read off the prefill of a guard session.

        `keep`: the response's session, which the response stage then takes over, so the
        prompt's tokens run once per request, not once for the prompt stage and again for
        the response. Otherwise (no response session) a session of its own, closed at
        once, which continues from the guard's cached prefix and leaves its own there
        (`guard.prefixes`), instead of a full-text score: a conversation's turn starts
        with the last turn's prompt, and a retried or regenerated prompt is one the guard
        has read. A session that failed is closed, never kept (the response stage opens a
        fresh one)."""
        session = self.scorer.stream(self.prompt, cache_salt=self.cache_salt)
        kept = False
        try:
            score = await session.prompt_score()
            if keep:
                self.session, kept = session, True
            return score
        finally:
            if not kept:
                with cleanup():
                    await session.aclose()

    async def _each_prompt(self) -> float:
        """A completions request's several prompts, each scored on its own: each is
        completed apart, and a harmful one is not to be diluted by the others in one mean.
        The request's score is the highest; each prompt stays in the guard's prefix cache
        for its choices' sessions."""
        return max(await gather_groups(functools.partial(prompt_score, self.scorer, cache_salt=self.cache_salt),
                                       self.prompts))

    def _open_early(self) -> None:
        """No prompt stage: open the response's session now, so that its prefill runs
        while the upstream works on its first token, not at the first check."""
        try:
            self.session = self.scorer.stream(self.prompt, cache_salt=self.cache_salt)
        except Exception as exc:  # noqa: BLE001 - the first check opens one and meets on_guard_error
            logger.warning("guard session did not open early: %s: %s", type(exc).__name__, exc)

    def take_session(self) -> StreamSession | None:
        session, self.session = self.session, None
        return session

    async def _prompt_stage(self, send_upstream, body: bytes):
        parallel = self.policy.prompt.mode == "parallel"
        pending = asyncio.create_task(send_upstream(body)) if parallel else None
        prompt = self.prompt
        if self.prompts is not None:  # scored one by one; a prompt of token ids is not scoreable
            prompt = None if None in self.prompts else self.prompt
            score_prompt = self._each_prompt if self.scorer is not None else None
        elif self.shares_prompt():
            score_prompt = functools.partial(self._prompt_by_session, keep=True)
        elif self.scorer is not None and self.prompt:
            score_prompt = functools.partial(self._prompt_by_session, keep=False)
        else:
            score_prompt = None
        try:
            if self.chain.reason is not None:  # it continues a reply the proxy withheld: not scored
                decision, ms = decide_continuation(self.policy.prompt, self.chain.reason), 0.0
            else:
                decision, ms = await prompt_decision(self.scorer, self.policy, prompt, score_prompt)
        except BaseException:
            await discard(pending)
            raise
        self.exchange.decided(decision, ms)
        self.exchange.timed("prompt", ms / 1000)
        if not decision.forwards:
            await discard(pending)
            return None, decision, body
        if decision.action == STEER:
            await discard(pending)  # the request already sent lacks the safety message
            body = self._upstream_body(steered(self.endpoint, self.payload, self.policy.prompt.steer_message))
            pending = None
        response = await pending if pending is not None else await send_upstream(body)
        return response, decision, body

    def _answer_refused(self, decision: Decision) -> Response:
        self.write_audit()
        headers = headers_for(decision, policy=self.policy.name)
        if decision.action == REFUSE:
            return refusal_response(self.endpoint, self.payload, self.policy, headers)
        if decision.action == BLOCK:
            if decision.reason is not None:
                raise ContentFiltered("the request continues a response that the safety policy cut "
                                      f"({decision.reason})", param="previous_response_id", headers=headers)
            raise ContentFiltered("the prompt was blocked by the safety policy", headers=headers)
        assert decision.action == GUARD_ERROR
        raise failed_closed(decision, "the safety guard is unavailable and this route fails closed")

    async def _response_stage(self, response: httpx.Response, headers: dict[str, str]) -> Response:
        stage = self.policy.response
        passthrough = response.headers.multi_items()
        if stage.action == "off" or response.status_code != 200:
            self.write_audit()
            return relay(response, self.exchange.metrics, anthropic=self.endpoint == "messages",
                         headers=list(headers.items()), watch=True, guarded=True)
        if is_event_stream(response.headers.get("content-type", "")):
            guard = StreamGuard(endpoint=self.endpoint, request=self.payload, policy=self.policy,
                                scorer=self.scorer, prompt=self.prompt, prompts=self.prompts, exchange=self.exchange,
                                session=self.take_session(), cache_salt=self.cache_salt,
                                on_end=self._stream_ended if self.endpoint == "responses"
                                else self._chat_stream_ended if self.memory is not None else None)

            async def on_close() -> None:  # after the relay's own `finally`, or instead of it
                await response.aclose()
                await guard.aclose()
                self.write_audit()

            return RelayResponse(guard.relay(response), 200,
                                 response_headers(passthrough, keep_length=False, guarded=True) + list(headers.items()),
                                 on_close=on_close)
        data = await read_whole(response)
        reply = WholeReply(self)
        content, verdict_headers = await reply.guard(data)
        self.write_audit()
        if self.endpoint == "responses" and reply.texts:
            body = reply.body  # parsed once, by `reply.guard`: `reply.texts` were read from it
            # A background response's output comes later, through GET responses/{id}, unread
            withheld = "cut" if reply.cut else "unread" if body.get("status") in UNFINISHED else None
            self.remember(body.get("id"), reply.texts[0][1], withheld)
        elif reply.cut:  # a chat completion stored upstream (`store: true`: else no memory here)
            remember_cut(self.memory, reply.body.get("id"))
        return Response(content, status_code=200, headers=dict(response_headers(passthrough, keep_length=False, guarded=True))
                        | merged_headers(headers, verdict_headers))

    def write_audit(self) -> None:
        if self.audit is not None:
            self.audit.write(self.exchange)

    def _stream_ended(self, guard: StreamGuard, how: str | None) -> None:
        withheld = None if how == "whole" else "cut" if how == "cut" else "unread"
        self.remember(guard.template.get("id"), guard.text_read(), withheld)

    def _chat_stream_ended(self, guard: StreamGuard, how: str | None) -> None:
        """A chat stream cut with `store: true`: its completion is stored whole upstream,
        and reading it back is refused again (`proxy.stored`)."""
        if how == "cut":
            remember_cut(self.memory, guard.template.get("id"))

    def remember(self, response_id: object, output: str, withheld: str | None) -> None:
        """A Responses reply the response stage read (`output`, all the guard read of it)
        remembered under its id, after the conversation the guard read for it, so that a
        request chaining from it is scored with that conversation (`proxy.memory`). Not
        when the client said `store: false` (the upstream keeps nothing to chain from), or
        when the guard could not read its input. A reply that continues one the proxy
        withheld is withheld too: the upstream's context still holds that reply."""
        if self.memory is None or not self.memory.limit or self.payload.get("store") is False \
                or not isinstance(response_id, str) or not response_id:
            return
        turn = responses_turn(self.payload)
        if turn is None:
            return
        conversation = (*self.chain.context, *turn, ("assistant", output))
        self.memory.remember(response_id, Remembered(conversation, self.chain.withheld or withheld,
                                                     settles=self.chain.withheld is None and withheld == "unread"))


async def prompt_score(scorer: Scorer, prompt: str, cache_salt: str | None) -> float:
    """`prompt`'s score, read off the prefill of a guard session closed at once, which
    leaves the prompt in the guard's prefix cache for the sessions that answer it (an
    empty prompt has no prefill: a full-text score)."""
    if not prompt:
        return await scorer.score(prompt=prompt)
    session = scorer.stream(prompt, cache_salt=cache_salt)
    try:
        return await session.prompt_score()
    finally:
        with cleanup():
            await session.aclose()


async def discard(task: asyncio.Task | None) -> None:
    """Cancel an upstream call started in parallel; close its response if it came."""
    if task is None:
        return
    task.cancel()
    # `wait`, not `await task`: a cancellation of this task then goes on up, where
    # awaiting the task itself raised it as the task's own, and it was swallowed.
    await asyncio.wait((task,))
    if task.cancelled() or task.exception() is not None:  # nothing to close
        return
    await task.result().aclose()
