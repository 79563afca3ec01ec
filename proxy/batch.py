"""vLLM's batch chat completions (`POST chat/completions/batch`), guarded per conversation.

vLLM (0.32) takes `messages` as a list of conversations and answers one chat completion
whose choice i is conversation i's reply; it is never streamed, and `n` is 1. Each
conversation is guarded as a chat request of its own would be, and each keeps its own
verdict, so one harmful conversation does not cost the others their answers:

- The prompt stage scores every conversation's prompt (on guard sessions, which the
  worker packs into shared forwards and which leave each prompt in the guard's prefix
  cache for the response stage). A refused conversation is not sent: its choice is the
  policy's refusal, `finish_reason: "content_filter"`. A steered one is sent with the
  safety message. The rest are sent as they came, in order, and the upstream's choices are
  put back at their conversations' indexes. If none goes on, the upstream is not called.
- `block`, or a guard failure where the policy fails closed, answers the whole request
  with that error (`param: "messages[i]"`): one response has one status.
- `mode: parallel` sends the whole batch at once and keeps that reply when every
  conversation goes on unchanged; otherwise it is cancelled and the conversations that go
  on are sent instead.
- The response stage scores each choice as `prompt_i + "\\n" + text` (`include_prompt`)
  and replaces one that crosses with the refusal, as a whole chat reply's choices are.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

import httpx
from starlette.responses import Response

from policies.config import Policy
from policies.decisions import (BLOCK, CUT, GUARD_ERROR, STEER, Decision, decide_response, flag_headers,
                                headers_for, merged_headers)
from policies.errors import RequestShapeError
from policies.extract import batch_prompt_texts, response_text_chat

from .errors import BadGateway, BadRequest, ContentFiltered, GuardUnavailable
from .guarding import check_prompt_sizes, discard, failed_closed, prompt_decision, prompt_score, reads_prompt
from .records import AuditLog, Exchange
from .relay import RelayResponse, raw_body
from .scorer import Scorer
from .shapes import refused_choice, refused_json, steered
from .upstream import response_headers
from .whole import gather_groups, read_whole, score_pairs

logger = logging.getLogger(__name__)

ENDPOINT = "chat/completions/batch"


class BatchCall:
    """One guarded batch request: decides per conversation, calls the upstream with those
    that go on, and guards each reply."""

    def __init__(self, *, scorer: Scorer | None, audit: AuditLog | None, payload: dict, policy: Policy,
                 exchange: Exchange, cache_salt: str | None = None, max_prompt_bytes: int | None = None) -> None:
        if payload.get("stream") is True:
            raise BadRequest("batch chat completions are not streamed (vLLM refuses 'stream' here); send each "
                             "conversation to chat/completions to stream it", param="stream")
        n = payload.get("n")
        if n is not None and (type(n) is not int or n != 1):
            raise BadRequest("'n' must be 1 for batch chat completions: each conversation has one choice",
                             param="n")
        try:
            self.prompts = batch_prompt_texts(payload, policy.prompt.scope)
        except RequestShapeError as exc:
            raise BadRequest(exc.message, param=exc.param) from None
        if reads_prompt(policy):
            check_prompt_sizes(self.prompts, max_prompt_bytes, lambda i: f"messages[{i}]")
        self.scorer = scorer
        self.audit = audit
        self.payload = payload
        self.policy = policy
        self.exchange = exchange
        self.cache_salt = cache_salt

    async def run(self, send_upstream, body: bytes) -> Response:
        """`send_upstream(body) -> httpx.Response` opens the upstream request."""
        try:
            return await self._run(send_upstream, body)
        finally:
            self._write_audit()

    async def _run(self, send_upstream, body: bytes) -> Response:
        conversations = self.payload["messages"]
        if self.policy.prompt.action == "off":
            decisions = [None] * len(conversations)
            response = await send_upstream(body)
        else:
            pending = asyncio.create_task(send_upstream(body)) if self.policy.prompt.mode == "parallel" else None
            try:
                decisions = await self._prompt_stage()
            except BaseException:
                await discard(pending)
                raise
            changed = any(d.action == STEER or not d.forwards for d in decisions)
            if changed:
                await discard(pending)
                pending = None
            sent = [steered("chat/completions", {"messages": c}, self.policy.prompt.steer_message)["messages"]
                    if d.action == STEER else c for c, d in zip(conversations, decisions) if d.forwards]
            if not sent:
                refused = refused_json("chat/completions", self.payload, self.policy.refusal,
                                       choices=len(conversations))
                return self._json_response(refused, flag_headers(decisions, policy=self.policy.name))
            if changed:
                body = json.dumps({**self.payload, "messages": sent}, ensure_ascii=False).encode()
            response = await pending if pending is not None else await send_upstream(body)
        kept = [i for i, d in enumerate(decisions) if d is None or d.forwards]
        return await self._response_stage(response, kept, flag_headers(decisions, policy=self.policy.name))

    async def _prompt_stage(self) -> list[Decision]:
        started = time.perf_counter()
        decided: list[tuple[Decision, float]] = await gather_groups(
            lambda prompt: prompt_decision(self.scorer, self.policy, prompt, self._scorer_of(prompt)), self.prompts)
        self.exchange.timed("prompt", time.perf_counter() - started)
        for i, (decision, ms) in enumerate(decided):
            self.exchange.decided(decision, ms, choice=i)
        decisions = [decision for decision, _ in decided]
        for i, decision in enumerate(decisions):
            where = f"conversation {i} (messages[{i}])"
            if decision.action == BLOCK:
                raise ContentFiltered(f"the prompt of {where} was blocked by the safety policy",
                                      param=f"messages[{i}]",
                                      headers=headers_for(decision, policy=self.policy.name))
            if decision.action == GUARD_ERROR:
                raise failed_closed(decision, f"the safety guard is unavailable for {where} and this route fails "
                                    "closed", param=f"messages[{i}]")
        return decisions

    def _scorer_of(self, prompt: str):
        """A conversation's prompt scored on a guard session of its own, closed at once:
        its prefill stays in the guard's prefix cache, where the response stage's session
        for the same conversation continues from it."""
        return None if self.scorer is None else functools.partial(prompt_score, self.scorer, prompt, self.cache_salt)

    async def _response_stage(self, response: httpx.Response, kept: list[int], headers: dict[str, str]) -> Response:
        passthrough = response.headers.multi_items()
        whole = len(kept) == len(self.prompts)  # sent as it came: the reply's indexes are the client's
        if response.status_code != 200 or (whole and self.policy.response.action == "off"):
            return RelayResponse(raw_body(response), response.status_code,
                                 response_headers(passthrough, keep_length=True, guarded=True) + list(headers.items()),
                                 on_close=response.aclose)
        data = await read_whole(response)
        reply = _reply(data, len(kept))
        if reply is None and not whole:
            # The refused conversations' choices cannot be put back into it: the upstream's
            # fault whatever the response stage says, and never the guard's.
            raise BadGateway("the upstream's reply is not a batch chat completion with one choice per "
                             "conversation sent, so the proxy cannot answer each conversation")
        if reply is None:  # sent as it came: the response stage's to judge, as a chat reply's
            decision = decide_response(self.policy.response, None, on_guard_error=self.policy.on_guard_error,
                                       error="the upstream response is not a batch chat completion")
            self.exchange.decided(decision, 0.0)
            if decision.action == GUARD_ERROR:
                raise GuardUnavailable("the upstream response could not be checked by the safety guard")
            return self._json_response(data, headers, passthrough)
        for choice in reply["choices"]:
            choice["index"] = kept[choice["index"]]
        if self.policy.response.action != "off":
            headers = await self._guard_replies(reply, headers)
        refused = sorted(set(range(len(self.prompts))) - set(kept))
        reply["choices"] = sorted(reply["choices"] + [refused_choice("chat/completions", i, self.policy.refusal)
                                                     for i in refused], key=lambda c: c["index"])
        return self._json_response(reply, headers, passthrough)

    async def _guard_replies(self, reply: dict, headers: dict[str, str]) -> dict[str, str]:
        """Each choice scored with its own conversation's prompt; one that crosses is
        replaced by the refusal. Returns the prompt stage's `headers` merged with the
        response stage's, as a chat reply's are (`merged_headers`)."""
        stage = self.policy.response
        choices = reply["choices"]
        started = time.perf_counter()
        scores, error = [None] * len(choices), None
        try:
            include = stage.include_prompt  # each reply with its own conversation's prompt
            scores = await score_pairs(self.scorer, [(self.prompts[c["index"]] if include else None,
                                                      response_text_chat(c)) for c in choices], self.cache_salt)
        except Exception as exc:  # noqa: BLE001 - every guard failure meets on_guard_error
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("guard failed on a batch reply: %s", error)
        ms = (time.perf_counter() - started) * 1000
        self.exchange.timed("response", ms / 1000)
        decisions: list[Decision] = []
        for position, (choice, score) in enumerate(zip(choices, scores)):
            decision = decide_response(stage, score, on_guard_error=self.policy.on_guard_error, error=error)
            decisions.append(decision)
            self.exchange.decided(decision, ms, choice=choice["index"])
            if decision.action == GUARD_ERROR:
                raise GuardUnavailable("the safety guard failed while checking the batch's replies")
            if decision.action == CUT:
                choices[position] = refused_choice("chat/completions", choice["index"], self.policy.refusal)
        return merged_headers(headers, flag_headers(decisions, policy=self.policy.name))

    def _json_response(self, content: dict | bytes, headers: dict[str, str], passthrough=()) -> Response:
        data = content if isinstance(content, bytes) else json.dumps(content, ensure_ascii=False).encode()
        return Response(data, status_code=200, media_type="application/json",
                        headers=dict(response_headers(passthrough, keep_length=False, guarded=True)) | headers)

    def _write_audit(self) -> None:
        if self.audit is not None:
            self.audit.write(self.exchange)


def _reply(data: bytes, sent: int) -> dict | None:
    """The upstream's batch reply, if it is a chat completion whose choices are indexed
    0 .. `sent` - 1, once each (vLLM's); else None."""
    try:
        reply = json.loads(data)
    except ValueError:
        return None
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        return None
    indexes = [c.get("index") for c in choices]
    if not all(type(i) is int for i in indexes) or sorted(indexes) != list(range(sent)):
        return None
    return reply

