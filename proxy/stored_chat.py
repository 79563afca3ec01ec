"""Stored chat completions read back, guarded: `GET chat/completions/{id}`, `POST
chat/completions/{id}` (a metadata update, answered with the completion) and `GET
chat/completions` (a page of them, under `data`).

OpenAI keeps a chat completion made with `store: true` and hands it back whole through
these endpoints: text the model generated, read outside the request that guarded it,
and whole even where the proxy cut its stream. So the response stage reads them as it
reads a reply to a POST:

- a completion the proxy cut (made with `store: true` through it: `proxy.memory`
  remembers its id) has every choice replaced by the policy's refusal, unscored, as
  `proxy.retrieval` does for a Responses reply;
- any other completion's choices are scored, alone: the request that made it is not in
  the stored object (its messages are another read), so a score here is the one
  `include_prompt: false` would give, and one that crosses is replaced by the refusal and
  remembered as cut;
- a list is read item by item, its texts scored in one batch.

`GET chat/completions/{id}/messages` (the request's own messages, the client's input)
and `DELETE` are forwarded as any request. vLLM keeps no chat completions (it answers
404), which is relayed as it came.
"""

from __future__ import annotations

import json
import time

from starlette.responses import Response

from policies.config import Policy
from policies.decisions import CUT, GUARD_ERROR, decide_response, decide_withheld, flag_headers

from .endpoints import folded
from .errors import GuardUnavailable
from .memory import MemoryView, Remembered
from .records import AuditLog, Exchange
from .relay import relay
from .scorer import Scorer
from .shapes import choice_texts, refuse_choice
from .upstream import response_headers
from .whole import read_whole, score_pairs

ENDPOINT = "chat/completions/stored"  # as the audit log and the decision log name it
WITHHELD = "stored_completion_cut"  # the reason of a decision on a completion the proxy cut


def stored(method: str, url: str) -> str | None:
    """"list" (`GET chat/completions`), "one" (`GET chat/completions/{id}`, or `POST` to
    a stored completion's id) or None, known as endpoints are (any case, without matrix
    parameters). A `POST` to `chat/completions/batch` is vLLM's batch chat, not this."""
    path = folded(url)
    if method == "GET" and path[-2:] == ("chat", "completions"):
        return "list"
    if len(path) >= 3 and path[-3:-1] == ("chat", "completions") and (
            method == "GET" or method == "POST" and path[-1].startswith("chatcmpl-")):
        return "one"
    return None


class StoredChat:
    """One guarded read of stored chat completions."""

    def __init__(self, *, scorer: Scorer | None, audit: AuditLog | None, policy: Policy, exchange: Exchange,
                 kind: str, memory: MemoryView | None, cache_salt: str | None = None) -> None:
        self.scorer = scorer
        self.audit = audit
        self.policy = policy
        self.exchange = exchange
        self.kind = kind
        self.memory = memory
        self.cache_salt = cache_salt
        self.decisions: list = []  # one a choice, for the `x-siren-*` headers of a flag

    def write_audit(self) -> None:
        if self.audit is not None:
            self.audit.write(self.exchange)

    async def run(self, send, body: bytes) -> Response:
        response = await send(body)
        if response.status_code != 200:  # not found (vLLM keeps none), an error: nothing generated to read
            self.write_audit()
            return relay(response, self.exchange.metrics, watch=True, guarded=True)
        data = await read_whole(response)
        headers = dict(response_headers(response.headers.multi_items(), keep_length=False, guarded=True))
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
        items = [parsed] if self.kind == "one" else parsed.get("data") if isinstance(parsed, dict) else None
        texts = [choice_texts("chat/completions", item) if isinstance(item, dict) else None
                 for item in items] if isinstance(items, list) else None
        if texts is None or None in texts:  # not stored completions the guard can read
            self._unreadable()
            self.write_audit()
            return Response(data, status_code=200, headers=headers)
        changed = await self._guard(items, texts)
        self.write_audit()
        if changed:
            data = json.dumps(parsed, ensure_ascii=False).encode()
            headers.pop("content-type", None)
        return Response(data, status_code=200, media_type="application/json",
                        headers=headers | flag_headers(self.decisions, policy=self.policy.name))

    async def _guard(self, items: list[dict], texts: list[list[tuple[int, str]]]) -> bool:
        """Decide every choice of every item, replacing those that cross in place; whether
        any was replaced."""
        stage, changed = self.policy.response, False
        cut = [self._remembered_cut(item) for item in items]
        for item, was_cut, choices in zip(items, cut, texts):
            if was_cut:  # refused again, unscored
                decision = decide_withheld(stage, WITHHELD)
                for index, _ in choices:
                    self.exchange.decided(decision, 0.0, choice=index)
                    if decision.action == CUT:
                        refuse_choice("chat/completions", {}, self.policy.refusal, item, index)
                        changed = True
                self.decisions.append(decision)
        pending = [(k, index, text) for k, (was_cut, choices) in enumerate(zip(cut, texts)) if not was_cut
                   for index, text in choices]
        started = time.perf_counter()
        scores, error = [None] * len(pending), None
        try:
            if pending:
                scores = await score_pairs(self.scorer, [(None, text) for _, _, text in pending], self.cache_salt)
        except Exception as exc:  # noqa: BLE001 - a guard failure meets on_guard_error
            error = f"{type(exc).__name__}: {exc}"
        ms = (time.perf_counter() - started) * 1000
        self.exchange.timed("response", ms / 1000)
        for (k, index, _), score in zip(pending, scores):
            decision = decide_response(stage, score, on_guard_error=self.policy.on_guard_error, error=error)
            self.exchange.decided(decision, ms, choice=index)
            if decision.action == GUARD_ERROR:
                raise GuardUnavailable("the safety guard failed while checking stored chat completions")
            if decision.action == CUT:
                refuse_choice("chat/completions", {}, self.policy.refusal, items[k], index)
                remember_cut(self.memory, items[k].get("id"))
                changed = True
            self.decisions.append(decision)
        return changed

    def _remembered_cut(self, item: dict) -> bool:
        completion_id = item.get("id")
        if self.memory is None or not self.memory.limit or not isinstance(completion_id, str):
            return False
        entry = self.memory.get(completion_id)
        return entry is not None and entry.withheld == "cut"

    def _unreadable(self) -> None:
        """A 200 that is not stored completions (or not ones the guard can read) may carry
        text it would never score: a guard failure, which meets `on_guard_error`."""
        decision = decide_response(self.policy.response, None, on_guard_error=self.policy.on_guard_error,
                                   error="the upstream reply is not stored chat completions the guard can read")
        self.exchange.decided(decision, 0.0)
        if decision.action == GUARD_ERROR:
            raise GuardUnavailable("the upstream reply could not be checked by the safety guard")


def remember_cut(memory: MemoryView | None, completion_id: object) -> None:
    """A chat completion the proxy cut, remembered by id, so that reading it back stored
    (whole upstream) is refused again."""
    if memory is not None and memory.limit and isinstance(completion_id, str) and completion_id:
        memory.remember(completion_id, Remembered((), "cut"))
