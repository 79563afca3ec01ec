"""Guarding a streamed response: score each choice as it grows, release what was scored.

Upstream bytes are decoded into SSE items; each item waits in one FIFO queue until it
may be released, then goes out as the upstream's own bytes (so a stream the guard never
touches is byte-identical to a direct one). Per choice:

- a token is one upstream delta carrying text for that choice (vLLM and OpenAI send one
  token a delta; reasoning, content, refusal and tool-call argument fragments all count
  as text: `policies.extract.delta_text`);
- every `check_every` tokens, and when the choice finishes, the new text goes to that
  choice's incremental guard session, which returns the score of prompt + response so
  far at the cost of the new tokens only;
- an item is released once every choice it carries text for has been scored up to it,
  or has at least `holdback` newer tokens behind it. So with `holdback >= check_every`
  no text reaches the client before it has been scored, and "leaked" tokens (released
  past the last check that scored under the threshold) stay at 0;
- a crossing with `action: cut` drops the choice's held items, sends one chunk with the
  refusal and `finish_reason: "content_filter"`, and ignores the choice from then on.
  When no live choice is left the upstream response is closed (vLLM stops generating),
  a usage chunk is synthesised if the client asked for one, then `data: [DONE]`.

A Responses stream (and an Anthropic Messages stream, `messages`) is one choice whose
events are typed; a cut ends it as that API ends a stopped reply (`shapes`), after the
items (blocks) the client was already sent.

The relay awaits each check before reading on, so back-pressure, not memory, absorbs a
slow guard; concurrent streams are batched by the guard's worker.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import httpx

from policies.config import Policy
from policies.decisions import CUT, GUARD_ERROR, Decision, decide_response
from policies.extract import delta_text, whole_texts

from .errors import GuardUnavailable, error_event
from .relay import MAX_EVENT_BYTES, TruncatedStream, broken_stream, check_complete, cleanup
from .records import Exchange
from .scorer import Scorer, StreamSession
from .shapes import (MessageOutput, ResponseOutput, cut_chunk, message_cut_events, response_cut_events,
                     response_usage, usage_chunk, wants_usage)
from .sse import DONE, Event, SSEDecoder, SSEError, encode_json

logger = logging.getLogger(__name__)

# A Responses stream ends with one of these. The `.done` events of each output item (a
# reasoning item, a message, a function call) come before the next item starts, and
# repeat the item's whole text: they are checked at, so they need not wait for the next
# check, but the choice goes on.
_RESPONSES_END = ("response.completed", "response.incomplete", "response.failed")
_RESPONSES_PART_DONE = ("response.output_text.done", "response.function_call_arguments.done",
                        "response.reasoning_text.done", "response.reasoning_summary_text.done",
                        "response.custom_tool_call_input.done", "response.mcp_call_arguments.done",
                        "response.code_interpreter_call_code.done", "response.content_part.done",
                        "response.output_item.done")
# Endpoints whose streams are one choice of typed events
_TYPED = ("responses", "messages")


@dataclass
class Choice:
    index: int
    session: StreamSession | None = None
    text: str = ""  # the response so far, checked or not: what a fresh session reads
    pending_text: str = ""
    tokens: int = 0  # text deltas seen
    scored: int = 0  # tokens covered by the last check
    safe: int = 0  # tokens covered by the last check under the threshold
    released: int = 0
    cut: bool = False
    finished: bool = False
    guard_ms: float = 0.0
    decision: Decision | None = None  # the last check's; logged once when the stream ends


@dataclass
class Held:
    raw: bytes
    reach: dict[int, int] = field(default_factory=dict)  # choice -> token position it carries up to
    payload: dict | None = None  # parsed JSON, kept to rewrite multi-choice chunks on a cut


def readable(endpoint: str, payload) -> bool:
    """Whether a stream event's JSON is one the guard reads for `endpoint`: a chunk with a
    `choices` list of objects with integer indexes (chat, completions), a typed event
    (Responses, Messages), or an error (`{"error": ...}`; older vLLM: `"object": "error"`),
    which carries no generated text."""
    if not isinstance(payload, dict):
        return False
    if "error" in payload or payload.get("object") == "error":
        return True
    if endpoint in _TYPED:
        return isinstance(payload.get("type"), str)
    choices = payload.get("choices")
    return isinstance(choices, list) and all(isinstance(c, dict) and isinstance(c.get("index", 0), int)
                                             for c in choices)


def _outranks(decision: Decision, kept: Decision | None) -> bool:
    """Whether a check's decision replaces the one kept for a choice's log line: the first
    crossing (even after a failed check, under `on_guard_error: allow`), else the first
    failure, else the last check."""
    if kept is None or decision.crossed and not kept.crossed:
        return True
    return not (kept.crossed or kept.guard_error)


class StreamCut(Exception):
    """Internal: the stream must end now (every choice cut, or the guard failed closed)."""


class StreamGuard:
    def __init__(self, *, endpoint: str, request: Mapping, policy: Policy, scorer: Scorer,
                 prompt: str | None, exchange: Exchange, session: StreamSession | None = None,
                 cache_salt: str | None = None, prompts: list[str | None] | None = None,
                 on_end: Callable[[StreamGuard, str | None], None] | None = None,
                 skip_through: int | None = None) -> None:
        """`session`: choice 0's, already prefilled with `prompt` by the prompt stage;
        `cache_salt`: the partition of the guard's prefix cache the choices' sessions use;
        `prompts`: a completions request's several prompts, n choices each (choice i
        answers prompts[i // n]), where it has more than one; `on_end(self, how)`: called once,
        as soon as the relay knows how the stream ends (before its last bytes go out, so
        that a client that reads them and chains on finds the turn remembered): "whole"
        (read and scored to its end), "cut" (a choice was cut), None (it broke off, failed
        closed, or its client left); `skip_through` (Responses): events up to this sequence
        number are read and scored but not sent (a replay the client resumes:
        `proxy.retrieval`)."""
        self.endpoint = endpoint
        self.request = request
        self.policy = policy
        self.stage = policy.response
        self.scorer = scorer
        self.prompt = prompt if self.stage.include_prompt else None
        self.prompts = prompts
        self.exchange = exchange
        self.cache_salt = cache_salt
        n = request.get("n", 1)
        self.n = 1 if endpoint in _TYPED or not isinstance(n, int) or n < 1 else n  # per prompt
        # Every choice the upstream sends has its own session: prompts x n <= MAX_N (checked)
        self.choices = {i: Choice(i) for i in range(self.n * len(prompts or [None]))}
        self.choices[0].session = session
        self.queue: deque[Held] = deque()
        self.template: dict = {}  # id/created/model of the stream, for chunks we write
        # The upstream's last reported `prompt_tokens` per prompt (vLLM's continuous usage
        # is per choice, and a completions list is one request upstream per prompt)
        self.prompt_tokens: dict[int | None, int] = {}
        # ... and `completion_tokens` per choice: a tool-call parser sends many tokens a delta
        self.completion_tokens: dict[int, int] = {}
        self.upstream_done = False
        self.output = ResponseOutput()  # Responses: the output items the client has been sent
        # Responses: the sequence number our own events start at (after those a resumed replay skips)
        self.next_sequence = 0 if skip_through is None else max(0, skip_through + 1)
        self.streamed: dict = {}  # Responses: the text each output item's deltas carried
        self.blocks = MessageOutput()  # Messages: the content blocks the client has been sent
        self.anthropic = endpoint == "messages"  # errors in Anthropic's shape
        self.unreadable = False  # an event the guard cannot read has been seen
        self.on_end = on_end
        self.skip_through = skip_through
        self.ended = False

    # -- the relay ---------------------------------------------------------------------

    async def relay(self, response: httpx.Response) -> AsyncIterator[bytes]:
        decoder = SSEDecoder(max_event_bytes=MAX_EVENT_BYTES)
        try:
            # Decompressed: the guard asks for `identity`, but an upstream may compress anyway
            async for chunk in response.aiter_bytes():
                out = await self._items(decoder.feed(chunk))
                if out:
                    yield out
            out = await self._items(check_complete(decoder.close()))
            await self._finish_all()
            out += self._release()
            self._ended("cut" if self._cut_indices() else "whole")
            if out:
                yield out
        except StreamCut as end:
            self._ended("cut" if self._cut_indices() else None)
            tail = end.args[0] if end.args else b""
            if tail:
                yield tail
        except (httpx.HTTPError, SSEError, TruncatedStream) as exc:
            # Only what was already scored safe goes out before the error: never held text.
            yield self._release() + broken_stream(exc, anthropic=self.anthropic)
        finally:
            self._ended(None)
            for choice in self.choices.values():
                if choice.decision is not None:
                    self.exchange.decided(choice.decision, choice.guard_ms, choice=choice.index)
                if choice.cut:
                    self.exchange.leaked(choice.index, max(0, choice.released - choice.safe))
            with cleanup():
                await response.aclose()
                await self.aclose()

    def _ended(self, how: str | None) -> None:
        if not self.ended:
            self.ended = True
            if self.on_end is not None:
                self.on_end(self, how)

    def text_read(self, index: int = 0) -> str:
        """The text of choice `index` the guard has read, scored or not."""
        choice = self.choices[index]
        return choice.text + choice.pending_text

    async def aclose(self) -> None:
        """Close the guard sessions (idempotent; the proxy also runs it when the relay
        never started, which leaves a prompt stage's session open)."""
        for choice in self.choices.values():
            await self._close_session(choice)

    async def _close_session(self, choice: Choice) -> None:
        session, choice.session = choice.session, None
        if session is not None:
            try:
                await session.aclose()
            except Exception as exc:  # noqa: BLE001 - the stream is over, or its next check opens another
                logger.warning("closing a guard session failed: %s", exc)

    async def _items(self, items) -> bytes:
        """What `items` release. Each event is taken in and released from in turn, so a
        cut drops only what was not yet scored when it came, however many events one
        read of the upstream held."""
        out: list[bytes] = []
        try:
            for item in items:
                await self._item(item)
                out.append(self._release())
        except StreamCut as end:
            raise StreamCut(b"".join(out) + (end.args[0] if end.args else b"")) from None
        return b"".join(out)

    async def _item(self, item) -> None:
        if not isinstance(item, Event):
            self.queue.append(Held(item.raw))
            return
        if item.is_done:
            await self._finish_all()  # every choice is scored to its end before [DONE]
            self.queue.append(Held(item.raw))
            return
        if not item.data.strip():  # nothing a client could read as text
            self.queue.append(Held(item.raw))
            return
        try:
            payload = item.json()
        except SSEError:
            payload = None
        if not readable(self.endpoint, payload):
            self._unreadable(item.raw)
            return
        await self._event(item.raw, payload)

    def _unreadable(self, raw: bytes) -> None:
        """An event the guard cannot read (not JSON, or not this endpoint's shape: a
        server's own stream format at an OpenAI path, say; or text for a choice index the
        request did not ask for) may carry text it would never score, so it is a guard
        failure and meets `on_guard_error`: failing closed ends the stream with an in-band
        `guard_unavailable`; allowed, it goes out in turn."""
        decision = decide_response(self.stage, None, on_guard_error=self.policy.on_guard_error,
                                   error=f"the upstream sent a stream event the guard cannot read as {self.endpoint}")
        if not self.unreadable:  # one log line and record per stream, however many follow
            self.unreadable = True
            logger.warning("guarded %s stream: an upstream event the guard cannot read (%s)",
                           self.endpoint, decision.action)
            self.exchange.decided(decision, 0.0)
        if decision.action == GUARD_ERROR:
            raise StreamCut(self._release() + error_event(GuardUnavailable(
                "the upstream's stream has an event the safety guard cannot read"), anthropic=self.anthropic))
        self.queue.append(Held(raw))

    async def _event(self, raw: bytes, payload: dict) -> None:
        if not self.template:
            if self.endpoint == "responses" and isinstance(payload.get("response"), dict):
                self.template = dict(payload["response"])
            elif self.endpoint == "messages" and isinstance(payload.get("message"), dict):
                self.template = dict(payload["message"])  # message_start's: a cut may have to repeat it
            elif "id" in payload:
                self.template = {k: payload[k] for k in ("id", "created", "model") if k in payload}
        self._note_usage(payload)
        if self._indices(payload) & self._cut_indices():
            rewritten = self._without_cut_choices(payload)
            if rewritten is None:
                return
            raw, payload = rewritten
        texts = delta_text(self.endpoint, payload)
        whole = self.endpoint == "responses" and self._unstreamed(payload, texts)
        if not texts.keys() <= self.choices.keys():  # text of a choice nobody asked for: never scored
            self._unreadable(raw)
            return
        held = Held(raw, payload=payload)
        for i, text in texts.items():
            choice = self.choices[i]
            choice.tokens += 1
            choice.pending_text += text
            held.reach[i] = choice.tokens
        self.queue.append(held)
        for i in held.reach:
            choice = self.choices[i]
            if choice.tokens - choice.scored >= self.stage.check_every:
                await self._check(choice)
        for i in self._finishing(payload):
            if i in self.choices and not self.choices[i].cut:
                await self._check(self.choices[i])
                self.choices[i].finished = True
        if whole or (self.endpoint == "responses" and payload.get("type") in _RESPONSES_PART_DONE) or (
                self.endpoint == "messages" and payload.get("type") == "content_block_stop"):
            await self._check(self.choices[0])  # (a cut typed choice returned above)

    def _unstreamed(self, payload: dict, texts: dict[int, str]) -> bool:
        """Adds to `texts` what a Responses event carries whole (an item, a part, the
        finished response's output) that no delta of its item carried, and says whether
        there was any. A server that streams repeats its deltas there; one that sends an
        item's text only in its `.done` events or in `response.completed` is scored on
        that text, since the client's SDK shows it all the same."""
        if 0 in texts:
            index = payload.get("output_index")
            self.streamed[index] = self.streamed.get(index, "") + texts[0]
        unseen = []
        for index, text in whole_texts(payload):
            streamed = self.streamed.get(index, "")
            if text not in streamed:
                unseen.append(text)
                self.streamed[index] = streamed + "\n" + text
        if unseen:
            texts[0] = "\n".join([texts[0], *unseen] if 0 in texts else unseen)
        return bool(unseen)

    def _note_usage(self, payload: dict) -> None:
        usage = payload.get("usage")
        if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
            return
        indices = self._indices(payload)
        if len(indices) == 1 and isinstance(usage.get("completion_tokens"), int):
            self.completion_tokens[next(iter(indices))] = usage["completion_tokens"]
        prompts = {i // self.n for i in indices}
        if len(prompts) == 1:
            self.prompt_tokens[prompts.pop()] = usage["prompt_tokens"]
        else:  # the whole request's (a usage chunk with no choice)
            self.prompt_tokens = {None: usage["prompt_tokens"]}

    def _prompt_of(self, index: int) -> str | None:
        """The prompt choice `index` is scored with (None without `include_prompt`)."""
        if self.prompts is None or not self.stage.include_prompt:
            return self.prompt
        return self.prompts[index // self.n]

    def _indices(self, payload: dict) -> set[int]:
        if self.endpoint in _TYPED:
            return {0}
        return {c.get("index", 0) for c in payload.get("choices") or [] if isinstance(c, dict)}

    def _cut_indices(self) -> set[int]:
        return {c.index for c in self.choices.values() if c.cut}

    def _finishing(self, payload: dict) -> list[int]:
        if self.endpoint == "responses":
            return [0] if payload.get("type") in _RESPONSES_END else []
        if self.endpoint == "messages":  # its stop_reason comes in message_delta
            return [0] if payload.get("type") in ("message_delta", "message_stop") else []
        return [c.get("index", 0) for c in payload.get("choices") or []
                if isinstance(c, dict) and c.get("finish_reason") is not None]

    def _without_cut_choices(self, payload: dict) -> tuple[bytes, dict] | None:
        """The chunk without its cut choices; None when nothing of it is left to send."""
        if self.endpoint in _TYPED:
            return None
        cut = self._cut_indices()
        kept = [c for c in payload.get("choices") or [] if not (isinstance(c, dict) and c.get("index", 0) in cut)]
        if not kept and not payload.get("usage"):
            return None
        payload = {**payload, "choices": kept}
        return encode_json(payload), payload  # (a lone surrogate in the others' text stays an escape)

    # -- checks and cuts ---------------------------------------------------------------

    async def _check(self, choice: Choice) -> None:
        if choice.tokens == choice.scored:
            return
        started = time.perf_counter()
        score, error = None, None
        delta, choice.pending_text = choice.pending_text, ""
        choice.text += delta
        try:
            if choice.session is None:  # the first check, or the first since one failed: all the text
                choice.session = self.scorer.stream(self._prompt_of(choice.index), cache_salt=self.cache_salt)
                delta = choice.text
            score = await choice.session.append(delta)
        except Exception as exc:  # noqa: BLE001 - any guard failure meets on_guard_error
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("guard failed on a stream check: %s", error)
            # Whether the session took the text is unknown (a full queue refuses it, a
            # session whose prefill failed fails every append): a later check, under
            # `on_guard_error: allow`, reads prompt + the whole response on a fresh one.
            await self._close_session(choice)
        self.exchange.timed("response", time.perf_counter() - started, tokens=choice.tokens - choice.scored)
        choice.scored = choice.tokens
        decision = decide_response(self.stage, score, on_guard_error=self.policy.on_guard_error, error=error)
        choice.guard_ms += (time.perf_counter() - started) * 1000  # includes the decision, a few µs
        if _outranks(decision, choice.decision):
            choice.decision = decision  # logged once, when the stream ends
        if score is not None:
            self.exchange.scored(choice.index, choice.scored, score)
        if decision.action == GUARD_ERROR:
            raise StreamCut(self._release() + error_event(
                GuardUnavailable("the safety guard failed while scoring this stream"), anthropic=self.anthropic))
        if decision.action == CUT:
            targets = self.choices.values() if self.stage.end_all_choices else [choice]
            for target in targets:
                # The crossing choice even if it had finished: its text after the finish
                # was scored over the threshold too, and must not go out.
                if not target.cut and (target is choice or not target.finished):
                    self._cut(target)
            if all(c.cut or c.finished for c in self.choices.values()):
                raise StreamCut(self._release() + self._close_out())
        elif not decision.crossed:
            choice.safe = choice.scored

    def _cut(self, choice: Choice) -> None:
        choice.cut = True
        kept: deque[Held] = deque()
        for held in self.queue:
            if held.payload is None or choice.index not in self._indices(held.payload):
                kept.append(held)
                continue
            rewritten = self._without_cut_choices(held.payload)
            if rewritten is not None:
                reach = {i: p for i, p in held.reach.items() if i != choice.index}
                kept.append(Held(rewritten[0], reach, rewritten[1]))
        self.queue = kept
        if self.endpoint == "responses":
            # (`created`: where `response.created` held text and was dropped, the cut opens the stream;
            # `usage`: vLLM's and OpenAI's `response.created` have none, it comes at the end)
            usage = self.template.get("usage") or response_usage(output_tokens=choice.tokens)
            raw = response_cut_events({**self.template, "output": self.output.output(), "usage": usage},
                                      self.policy.refusal,
                                      output_index=self.output.next_index, sequence=self.next_sequence,
                                      created=not self.output.created)
        elif self.endpoint == "messages":
            raw = message_cut_events(self.blocks, self.policy.refusal, output_tokens=choice.tokens,
                                     start=self.template)
        else:
            raw = cut_chunk(self.endpoint, self.template, choice.index, self.policy.refusal)
        self.queue.append(Held(raw))

    def _close_out(self) -> bytes:
        """After the last live choice was cut: usage if asked for, then [DONE]."""
        if self.endpoint in _TYPED:
            return b""
        out = b""
        if wants_usage(self.request):
            prompt_tokens = sum(self.prompt_tokens.values())
            completion = sum(max(c.tokens, self.completion_tokens.get(c.index, 0)) for c in self.choices.values())
            out += usage_chunk(self.endpoint, self.template, {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion})
        return out + DONE

    async def _finish_all(self) -> None:
        for choice in self.choices.values():
            if not choice.cut and choice.tokens > choice.scored:
                await self._check(choice)

    def _release(self) -> bytes:
        out = []
        while self.queue:
            held = self.queue[0]
            if not all(self._releasable(i, p) for i, p in held.reach.items()):
                break
            self.queue.popleft()
            for i, p in held.reach.items():
                self.choices[i].released = max(self.choices[i].released, p)
            if self.endpoint == "responses" and held.payload is not None:
                self.output.apply(held.payload)
                number = held.payload.get("sequence_number")
                if isinstance(number, int) and not isinstance(number, bool):
                    self.next_sequence = max(self.next_sequence, number + 1)
                    if self.skip_through is not None and number <= self.skip_through:
                        continue  # the client was sent it before: applied to `output`, not sent again
            elif self.endpoint == "messages" and held.payload is not None:
                self.blocks.apply(held.payload)
            out.append(held.raw)
        return b"".join(out)

    def _releasable(self, index: int, position: int) -> bool:
        choice = self.choices[index]
        return position <= choice.scored or choice.tokens - position >= self.stage.holdback
