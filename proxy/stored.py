"""Stored generated text read back, guarded: OpenAI's stored chat completions (`GET
chat/completions/{id}`, `POST chat/completions/{id}`, a metadata update answered with the
completion, and `GET chat/completions`, a page of them under `data`) and a conversation's
items (`GET conversations/{id}/items[/{item}]`, the Conversations API's store of a
Responses conversation).

OpenAI keeps a chat completion made with `store: true`, and a conversation's turns, and
hands them back whole: text the model generated, read outside the request that guarded
it, and whole even where the proxy cut its stream. So the response stage reads them as it
reads a reply to a POST:

- a completion the proxy cut (made with `store: true` through it: `proxy.memory`
  remembers its id) has every choice replaced by the policy's refusal, unscored, as
  `proxy.retrieval` does for a Responses reply;
- any other completion's choices, and each item the model wrote (an assistant message,
  a reasoning item, a tool call's arguments; not the client's own turns), are scored
  alone: the request that made them is not in the stored object, so a score here is the
  one `include_prompt: false` would give. One that crosses is replaced by the refusal
  and remembered as cut, so a later read is refused unscored;
- a list is read item by item, its texts scored in one batch.

`GET chat/completions/{id}/messages` (the request's own messages, the client's input),
`DELETE` and the writes that add a client's items are forwarded as any request. vLLM
keeps neither (it answers 404), which is relayed as it came.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import Response

from policies.config import Policy
from policies.decisions import CUT, GUARD_ERROR, decide_response, decide_withheld, flag_headers
from policies.errors import RequestShapeError
from policies.extract import response_text_responses

from .endpoints import folded
from .errors import GuardUnavailable
from .memory import MemoryView, Remembered
from .records import AuditLog, Exchange
from .relay import relay
from .scorer import Scorer
from .shapes import choice_texts, refuse_choice, refused_json
from .upstream import response_headers
from .whole import WholeReply, read_whole, score_pairs


def completion_texts(item: dict) -> list[tuple[int, str]] | None:
    """(index, text) of each choice of a stored chat completion; None if it is none."""
    return choice_texts("chat/completions", item)


def refuse_completion(item: dict, index: int, refusal: str) -> None:
    refuse_choice("chat/completions", {}, refusal, item, index)


# A conversation's items the client wrote (its own turns, its tools' outputs): not read
CLIENT_ROLES = ("user", "system", "developer")
CLIENT_ITEMS = ("function_call_output", "custom_tool_call_output", "computer_call_output",
                "local_shell_call_output", "mcp_approval_response", "item_reference")


def item_texts(item: dict) -> list[tuple[int, str]] | None:
    """[(0, text)] for a conversation item the model wrote, as a Responses reply's output
    item is read; [] for one the client wrote; None if it cannot be read."""
    if not isinstance(item.get("type"), str):
        return None
    if item["type"] in CLIENT_ITEMS or item["type"] == "message" and item.get("role") in CLIENT_ROLES:
        return []
    try:
        return [(0, response_text_responses({"output": [item]}))]
    except RequestShapeError:
        return None


def refuse_item(item: dict, index: int, refusal: str) -> None:
    """The item becomes the refusal: an assistant message under the same id."""
    item_id = item.get("id")
    item.clear()
    item.update(refused_json("responses", {}, refusal)["output"][0])
    if item_id is not None:
        item["id"] = item_id


@dataclass(frozen=True)
class Store:
    """One kind of stored text: how the audit names a read of it, a decision on an item the
    proxy cut, and how an item's generated texts are read and refused."""

    endpoint: str
    withheld: str
    texts: Callable[[dict], list[tuple[int, str]] | None]
    refuse: Callable[[dict, int, str], None]


COMPLETIONS = Store("chat/completions/stored", "stored_completion_cut", completion_texts, refuse_completion)
ITEMS = Store("conversations/items", "stored_item_cut", item_texts, refuse_item)


def stored(method: str, url: str) -> tuple[Store, str] | None:
    """What a request reads back, and whether as a "list" or "one", or None; known as
    endpoints are (any case, without matrix parameters). Chat: `GET chat/completions` (a
    list), `GET chat/completions/{id}` or `POST` to a stored completion's id (`POST
    chat/completions/batch` is vLLM's batch chat, not this). A conversation's items: `GET
    conversations/{id}/items[/{item}]`."""
    path = folded(url)
    if method == "GET" and path[-2:] == ("chat", "completions"):
        return COMPLETIONS, "list"
    if len(path) >= 3 and path[-3:-1] == ("chat", "completions") and (
            method == "GET" or method == "POST" and path[-1].startswith("chatcmpl-")):
        return COMPLETIONS, "one"
    if method == "GET" and len(path) >= 3 and path[-3] == "conversations" and path[-1] == "items":
        return ITEMS, "list"
    if method == "GET" and len(path) >= 4 and path[-4] == "conversations" and path[-2] == "items":
        return ITEMS, "one"
    return None


class StoredRead:
    """One guarded read of stored text."""

    def __init__(self, *, scorer: Scorer | None, audit: AuditLog | None, policy: Policy, exchange: Exchange,
                 store: Store, kind: str, memory: MemoryView | None, cache_salt: str | None = None) -> None:
        self.scorer = scorer
        self.audit = audit
        self.policy = policy
        self.exchange = exchange
        self.store = store
        self.kind = kind
        self.memory = memory
        self.cache_salt = cache_salt
        self.decisions: list = []  # for the `x-siren-*` headers of a flag

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
        texts = [self.store.texts(item) if isinstance(item, dict) else None
                 for item in items] if isinstance(items, list) else None
        if texts is None or None in texts:  # not stored text the guard can read: `on_guard_error`
            WholeReply(self).unreadable()
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
        """Decide every text of every item, replacing those that cross in place; whether
        any was replaced."""
        stage, refusal, changed = self.policy.response, self.policy.refusal, False
        cut = [bool(choices) and self._remembered_cut(item) for item, choices in zip(items, texts)]
        for item, was_cut, choices in zip(items, cut, texts):
            if was_cut:  # refused again, unscored
                decision = decide_withheld(stage, self.store.withheld)
                for index, _ in choices:
                    self.exchange.decided(decision, 0.0, choice=index)
                    if decision.action == CUT:
                        self.store.refuse(item, index, refusal)
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
                raise GuardUnavailable("the safety guard failed while checking stored text")
            if decision.action == CUT:
                item_id = items[k].get("id")
                self.store.refuse(items[k], index, refusal)
                remember_cut(self.memory, item_id)
                changed = True
            self.decisions.append(decision)
        return changed

    def _remembered_cut(self, item: dict) -> bool:
        item_id = item.get("id")
        if self.memory is None or not self.memory.limit or not isinstance(item_id, str):
            return False
        entry = self.memory.get(item_id)
        return entry is not None and entry.withheld == "cut"


def remember_cut(memory: MemoryView | None, item_id: object) -> None:
    """A chat completion (or a conversation item) the proxy cut, remembered by id, so that
    reading it back stored (whole upstream) is refused again."""
    if memory is not None and memory.limit and isinstance(item_id, str) and item_id:
        memory.remember(item_id, Remembered((), "cut"))
