"""Reading back a stored Responses reply, guarded: `GET responses/{id}` (whole, or replayed
as a stream with `stream=true`) and `POST responses/{id}/cancel` (answered with the
output so far).

A reply the upstream stored is text the model generated earlier, outside the request
that guarded it, and a background request (`background: true`, not streamed) is answered
"queued": its output is read only this way. So the response stage reads it here, as it
reads the reply to a POST:

- a reply the proxy cut (`proxy.memory` remembers it) is the policy's refusal again,
  unscored: the upstream kept its whole text, and a score of the whole need not cross
  where a check of one of its prefixes did;
- any other is scored, after the conversation the proxy remembers for it (the prompt
  the response stage reads with `include_prompt`), or alone for an id it does not
  remember; one that crosses is cut, as a reply to a POST is, and remembered as cut;
- a reply the proxy had not read to its end (a background one, a stream whose client
  left), read whole now and passing, becomes a turn like any other: a request may chain
  from it.

A replay that resumes (`starting_after=n`) is asked of the upstream from its start, and
its events up to n are read but not sent (`StreamGuard`'s `skip_through`): the guard
reads the text the client was sent before, not only what follows it.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl, urlencode

import httpx
from starlette.responses import Response

from policies.config import Policy
from policies.decisions import CUT, FLAG, Decision, decide_withheld, headers_for
from policies.extract import conversation_text

from .endpoints import folded, segments
from .errors import BadRequest
from .memory import MemoryView, Remembered
from .records import AuditLog, Exchange
from .relay import RelayResponse, cleanup, is_event_stream, relay
from .scorer import Scorer
from .shapes import refused_json, refuse_choice, response_cut_events
from .stream_guard import StreamGuard
from .upstream import response_headers
from .whole import UNFINISHED, WholeReply, read_whole

ENDPOINT = "responses/retrieve"  # as the audit log and the decision log name it
WITHHELD = "stored_response_cut"  # the reason of a decision on a reply the proxy cut


def retrieved(method: str, url: str) -> str | None:
    """The id of the stored response `method url` reads back, or None: `GET responses/{id}`
    or `POST responses/{id}/cancel` (known as endpoints are: any case, without matrix
    parameters; the id as the upstream reads it)."""
    path = folded(url)
    if method == "GET" and len(path) >= 2 and path[-2] == "responses":
        return segments(url)[-1]
    if method == "POST" and len(path) >= 3 and path[-3] == "responses" and path[-1] == "cancel":
        return segments(url)[-2]
    return None


def replays(method: str, path: str, query: str) -> bool:
    """Whether a request asks for a stored response replayed as a stream (`GET
    responses/{id}?stream=true`, true as FastAPI reads a bool): it takes a stream slot."""
    return method == "GET" and retrieved(method, "http://h" + path) is not None and any(
        key == "stream" and value.strip().lower() in ("true", "1", "yes", "on", "t", "y")
        for key, value in parse_qsl(query, keep_blank_values=True))


def resumed(query: str) -> tuple[str, int | None]:
    """`query` without `starting_after`, and the sequence number it named (None without):
    the upstream replays from the start, and the proxy leaves out what the client has."""
    pairs = parse_qsl(query, keep_blank_values=True)
    values = [value for key, value in pairs if key == "starting_after"]
    if not values:
        return query, None
    if len(values) > 1 or not re.fullmatch(r"-?[0-9]{1,9}", values[0]):
        raise BadRequest("'starting_after' must be one integer, the sequence number of the last event received",
                         param="starting_after")
    return urlencode([(key, value) for key, value in pairs if key != "starting_after"]), int(values[0])


class Retrieval:
    """One guarded read of a stored response. It quacks as `proxy.guarding.GuardedCall`
    does where `WholeReply` reads a reply: one prompt (`prompt`), no session of its own."""

    endpoint = "responses"
    payload: dict = {}
    prompts = None

    def __init__(self, *, scorer: Scorer | None, audit: AuditLog | None, policy: Policy, exchange: Exchange,
                 response_id: str, memory: MemoryView | None, skip_through: int | None = None,
                 cache_salt: str | None = None) -> None:
        self.scorer = scorer
        self.audit = audit
        self.policy = policy
        self.exchange = exchange
        self.response_id = response_id
        self.memory = memory
        self.skip_through = skip_through
        self.cache_salt = cache_salt
        # Remembered under the id as sent, or as an upstream that strips matrix parameters
        # (Tomcat, Spring) reads it; a cut wins
        self.remembered_as: str = response_id
        self.entry: Remembered | None = None
        for candidate in dict.fromkeys((response_id, response_id.split(";", 1)[0])) if memory is not None else ():
            entry = memory.get(candidate)
            if entry is not None and (self.entry is None or entry.withheld == "cut"):
                self.remembered_as, self.entry = candidate, entry
        # What the response stage reads before the reply: the turns that led to it
        self.prompt = conversation_text(self.entry.conversation[:-1], policy.prompt.scope) \
            if self.entry is not None and self.entry.conversation else None

    def shares_prompt(self) -> bool:
        return False  # each score on a session of its own (`whole.score_pairs`), from the prefix cache

    def choice_prompt(self, index: int) -> str | None:
        return self.prompt or None

    def take_session(self):
        return None

    def write_audit(self) -> None:
        if self.audit is not None:
            self.audit.write(self.exchange)

    async def run(self, send, body: bytes) -> Response:
        response = await send(body)
        if response.status_code != 200:  # not found, an error: nothing generated to read
            self.write_audit()
            return relay(response, self.exchange.metrics, watch=True, guarded=True)
        if self.entry is not None and self.entry.withheld == "cut":
            decision = decide_withheld(self.policy.response, WITHHELD)
            self.exchange.decided(decision, 0.0)
            if decision.action == CUT:
                return await self._refused(response, decision)
            self.write_audit()  # flag, shadow: it goes on as it came, the decision said (unscored)
            headers = headers_for(decision, policy=self.policy.name) if decision.action == FLAG else {}
            return relay(response, self.exchange.metrics, headers=list(headers.items()), watch=True, guarded=True)
        if is_event_stream(response.headers.get("content-type", "")):
            return self._stream(response)
        return await self._whole(response)

    async def _refused(self, response: httpx.Response, decision: Decision) -> Response:
        """The policy's refusal in place of a reply the proxy cut, keeping the upstream's
        id, times, model and usage where it sent them whole."""
        self.write_audit()
        headers = dict(response_headers(response.headers.multi_items(), keep_length=False, guarded=True))
        headers |= headers_for(decision, policy=self.policy.name)
        refusal = self.policy.refusal
        if is_event_stream(response.headers.get("content-type", "")):
            with cleanup():
                await response.aclose()
            whole = refused_json("responses", {}, refusal) | {"id": self.response_id}
            events = response_cut_events({**whole, "output": []}, refusal, item_id=whole["output"][0]["id"],
                                         created=True)
            return Response(events, media_type="text/event-stream", headers=headers)
        data = await read_whole(response)
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {"id": self.response_id}
        refuse_choice("responses", {}, refusal, body, 0)
        headers.pop("content-type", None)
        return Response(json.dumps(body, ensure_ascii=False).encode(), media_type="application/json",
                        headers=headers)

    async def _whole(self, response: httpx.Response) -> Response:
        data = await read_whole(response)
        reply = WholeReply(self)
        content, verdict_headers = await reply.guard(data)
        self.write_audit()
        if reply.texts:
            finished = reply.body.get("status") not in UNFINISHED
            self._settle(reply.texts[0][1], "cut" if reply.cut else "whole" if finished else None)
        headers = dict(response_headers(response.headers.multi_items(), keep_length=False, guarded=True))
        return Response(content, status_code=200, headers=headers | verdict_headers)

    def _stream(self, response: httpx.Response) -> Response:
        guard = StreamGuard(endpoint="responses", request={"stream": True}, policy=self.policy,
                            scorer=self.scorer, prompt=self.prompt or None, exchange=self.exchange,
                            cache_salt=self.cache_salt, skip_through=self.skip_through,
                            on_end=lambda guard, how: self._settle(guard.text_read(), how))

        async def on_close() -> None:
            await response.aclose()
            await guard.aclose()
            self.write_audit()

        return RelayResponse(guard.relay(response), 200,
                             response_headers(response.headers.multi_items(), keep_length=False, guarded=True),
                             on_close=on_close)

    def _settle(self, output: str, how: str | None) -> None:
        """What the memory keeps after this read: a reply cut now is remembered as cut
        (under an id it did not know too, so a chain from it is refused); one it had not
        read to its end, read whole now and passed, as a turn like any other."""
        if self.memory is None or not self.memory.limit:
            return
        entry = self.entry
        if how == "cut":
            conversation = (*entry.conversation[:-1], ("assistant", output)) if entry is not None else ()
            self.memory.remember(self.remembered_as, Remembered(conversation, "cut"))
        elif how == "whole" and entry is not None and entry.settles:
            self.memory.remember(self.remembered_as, Remembered((*entry.conversation[:-1], ("assistant", output))))
