"""OpenAI shapes the proxy reads or writes itself: refusals, cut chunks, usage, a whole
reply's choices, and a steered request (and the Anthropic Messages API's, `messages`).

Each endpoint that carries generated text has three forms here: a whole refused
response (the prompt stage answered without calling the upstream), the same in stream
form, and the final chunk that ends one choice of a stream that was cut. All of them
say `finish_reason: "content_filter"` (Responses: `status: "incomplete"` with
`incomplete_details.reason: "content_filter"`), as OpenAI and Azure OpenAI do, so
clients that already handle provider-side filtering handle ours. An Anthropic message
says `stop_reason: "refusal"`, as Anthropic's API does when its own classifiers stop a
reply; the refusal is a text block of its own.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Mapping

from policies.errors import RequestShapeError
from policies.extract import (completion_prompts, response_text_chat, response_text_completion, response_text_messages,
                              response_text_responses)

from .sse import DONE, encode_event, encode_json

CONTENT_FILTER = "content_filter"
REFUSAL = "refusal"  # Anthropic's stop_reason


def _id(prefix: str) -> str:
    return f"{prefix}-siren-{uuid.uuid4().hex[:24]}"


def _choices(endpoint: str, request: Mapping) -> int:
    """How many choices the upstream would have sent: n per prompt (a completions request
    may have several prompts)."""
    n = request.get("n", 1)
    n = n if isinstance(n, int) and 1 <= n <= 128 else 1
    return n * len(completion_prompts(request)) if endpoint == "completions" else n


def _usage(prompt_tokens: int = 0, completion_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_usage(output_tokens: int = 0) -> dict:
    """A Responses `usage` with the details OpenAI's schema requires."""
    return {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": output_tokens}


def wants_usage(request: Mapping) -> bool:
    options = request.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def refused_json(endpoint: str, request: Mapping, refusal: str, *, choices: int | None = None) -> dict:
    """The whole refused response; chat and completions have `choices` choices (the
    request's `n` by default)."""
    model = request.get("model") if isinstance(request.get("model"), str) else "unknown"
    created = int(time.time())
    if endpoint == "messages":
        return {"id": _id("msg"), "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": refusal}], "stop_reason": REFUSAL, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}
    if endpoint == "responses":
        return {"id": _id("resp"), "object": "response", "created_at": created, "model": model,
                "status": "incomplete", "incomplete_details": {"reason": CONTENT_FILTER},
                "output": [{"id": _id("msg"), "type": "message", "role": "assistant", "status": "incomplete",
                            "content": [{"type": "output_text", "text": refusal, "annotations": []}]}],
                "usage": response_usage()}
    prefix, kind = ("cmpl", "text_completion") if endpoint == "completions" else ("chatcmpl", "chat.completion")
    return {"id": _id(prefix), "object": kind, "created": created, "model": model,
            "choices": [refused_choice(endpoint, i, refusal)
                        for i in range(_choices(endpoint, request) if choices is None else choices)],
            "usage": _usage()}


def refused_choice(endpoint: str, index: int, refusal: str) -> dict:
    """A chat or completions choice that is the refusal, finish_reason content_filter."""
    text = {"text": refusal} if endpoint == "completions" else {"message": {"role": "assistant", "content": refusal}}
    return {"index": index, **text, "logprobs": None, "finish_reason": CONTENT_FILTER}


def refused_stream(endpoint: str, request: Mapping, refusal: str) -> bytes:
    """The whole refused response in stream form, ending as the upstream's would."""
    whole = refused_json(endpoint, request, refusal)
    if endpoint == "messages":
        return message_cut_events(MessageOutput(), refusal, start=whole)
    if endpoint == "responses":
        return response_cut_events({**whole, "output": []}, refusal, item_id=whole["output"][0]["id"], created=True)
    out = []
    for choice in whole["choices"]:
        base = {k: whole[k] for k in ("id", "created", "model")}
        if endpoint == "completions":
            out.append(encode_json({**base, "object": "text_completion",
                                    "choices": [{**choice}]}))
        else:
            out.append(encode_json({**base, "object": "chat.completion.chunk", "choices": [
                {"index": choice["index"], "delta": {"role": "assistant", "content": ""},
                 "finish_reason": None, "logprobs": None}]}))
            out.append(cut_chunk(endpoint, whole, choice["index"], refusal))
    if wants_usage(request):
        out.append(usage_chunk(endpoint, whole, _usage()))
    return b"".join(out) + DONE


def cut_chunk(endpoint: str, template: Mapping, index: int, refusal: str) -> bytes:
    """The last chunk of a cut choice: the refusal text and finish_reason content_filter."""
    base = {k: template[k] for k in ("id", "created", "model") if k in template}
    if endpoint == "completions":
        choice = {"index": index, "text": refusal, "finish_reason": CONTENT_FILTER, "logprobs": None}
        return encode_json({**base, "object": "text_completion", "choices": [choice]})
    choice = {"index": index, "delta": {"content": refusal}, "finish_reason": CONTENT_FILTER, "logprobs": None}
    return encode_json({**base, "object": "chat.completion.chunk", "choices": [choice]})


def usage_chunk(endpoint: str, template: Mapping, usage: Mapping) -> bytes:
    base = {k: template[k] for k in ("id", "created", "model") if k in template}
    obj = "text_completion" if endpoint == "completions" else "chat.completion.chunk"
    return encode_json({**base, "object": obj, "choices": [], "usage": dict(usage)})


def response_cut_events(response: Mapping, refusal: str, *, item_id: str | None = None, output_index: int = 0,
                        sequence: int = 0, created: bool = False) -> bytes:
    """Responses API: the refusal as a message item of its own (added, its text, done), then
    `response.incomplete` with that item after `response`'s output. With `created`,
    `response.created` comes first (a response refused before the upstream was called).
    The item goes at `output_index`, after the items the client already has, and events
    are numbered on from `sequence`, so a client that rebuilds the response from its
    events (the openai SDK's `responses.stream()`) takes them as OpenAI's own."""
    item_id = item_id or _id("msg")
    part = {"type": "output_text", "text": refusal, "annotations": []}
    message = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    done = {**message, "status": "incomplete", "content": [part]}
    where = {"item_id": item_id, "output_index": output_index, "content_index": 0}
    final = {**response, "status": "incomplete", "incomplete_details": {"reason": CONTENT_FILTER},
             "output": [*(response.get("output") or []), done]}
    events = [("response.output_item.added", {"output_index": output_index, "item": message}),
              ("response.content_part.added", {**where, "part": {**part, "text": ""}}),
              ("response.output_text.delta", {**where, "delta": refusal, "logprobs": []}),
              ("response.output_text.done", {**where, "text": refusal, "logprobs": []}),
              ("response.content_part.done", {**where, "part": part}),
              ("response.output_item.done", {"output_index": output_index, "item": done}),
              ("response.incomplete", {"response": final})]
    if created:
        events.insert(0, ("response.created", {"response": {**response, "status": "in_progress", "output": []}}))
    return b"".join(_typed_event({"type": kind, **data, "sequence_number": sequence + i})
                    for i, (kind, data) in enumerate(events))


# Responses events that add to an item's text: the field they add to, and where it lies.
_ITEM_DELTAS = {"response.output_text.delta": ("content", "text"), "response.refusal.delta": ("content", "refusal"),
                "response.reasoning_text.delta": ("content", "text"),
                "response.reasoning_summary_text.delta": ("summary", "text"),
                "response.function_call_arguments.delta": (None, "arguments"),
                "response.mcp_call_arguments.delta": (None, "arguments"),
                "response.custom_tool_call_input.delta": (None, "input"),
                "response.code_interpreter_call_code.delta": (None, "code")}
_PARTS_ADDED = {"response.content_part.added": "content", "response.reasoning_summary_part.added": "summary"}


class ResponseOutput:
    """The output items of a Responses stream as far as its client has been sent them,
    rebuilt from the released events the way the openai SDK's accumulator rebuilds them:
    an item from its `output_item.added`, grown by its parts and deltas, replaced whole by
    its `output_item.done`. A cut stream's `response.incomplete` lists these (an item cut
    mid-way with the text released of it, status `incomplete`) before the refusal, so a
    client reading only the final event sees what the others saw."""

    def __init__(self) -> None:
        self.items: dict[int, dict] = {}
        self.done: set[int] = set()
        self.created = False  # the client was sent `response.created`

    def apply(self, event: Mapping) -> None:
        kind, index = event.get("type"), event.get("output_index")
        self.created = self.created or kind == "response.created"
        if not isinstance(index, int) or isinstance(index, bool):
            return
        if kind in ("response.output_item.added", "response.output_item.done"):
            if isinstance(event.get("item"), Mapping):
                self.items[index] = copy.deepcopy(dict(event["item"]))
                self.done.discard(index)
                if kind == "response.output_item.done":
                    self.done.add(index)
            return
        item = self.items.get(index)
        if item is None or index in self.done:
            return
        if kind in _PARTS_ADDED and isinstance(event.get("part"), Mapping):
            parts = item.get(_PARTS_ADDED[kind])
            part = copy.deepcopy(dict(event["part"]))
            item[_PARTS_ADDED[kind]] = [*(parts if isinstance(parts, list) else []), part]
        elif kind in _ITEM_DELTAS and isinstance(event.get("delta"), str):
            where, key = _ITEM_DELTAS[kind]
            target = item if where is None else self._part(item, where, event)
            if target is not None:
                text = target.get(key)
                target[key] = (text if isinstance(text, str) else "") + event["delta"]

    @staticmethod
    def _part(item: dict, where: str, event: Mapping) -> dict | None:
        """The part a delta adds to: the one at its content (summary) index, else the last
        (vLLM numbers a reasoning item's one part 0 or 1)."""
        parts = item.get(where)
        if not isinstance(parts, list) or not parts:
            return None
        position = event.get("summary_index" if where == "summary" else "content_index")
        part = parts[position] if isinstance(position, int) and 0 <= position < len(parts) else parts[-1]
        return part if isinstance(part, dict) else None

    def output(self) -> list[dict]:
        """The items in order; those not done are marked `incomplete`."""
        return [item if index in self.done or "status" not in item else {**item, "status": "incomplete"}
                for index, item in sorted(self.items.items())]

    @property
    def next_index(self) -> int:
        return max(self.items, default=-1) + 1


class MessageOutput:
    """The content blocks of an Anthropic Messages stream that its client has been sent
    (from the released events): which are still open, and the index a new one takes. A
    cut closes the open ones, so the client's accumulator (the anthropic SDK's
    `messages.stream()`) keeps what it was sent, then adds the refusal as a block."""

    def __init__(self) -> None:
        self.open: list[int] = []
        self.next_index = 0
        self.started = False  # the client was sent `message_start`

    def apply(self, event: Mapping) -> None:
        self.started = self.started or event.get("type") == "message_start"
        index = event.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            return
        if event.get("type") == "content_block_start":
            self.open.append(index)
            self.next_index = max(self.next_index, index + 1)
        elif event.get("type") == "content_block_stop" and index in self.open:
            self.open.remove(index)


def message_cut_events(output: MessageOutput, refusal: str, *, output_tokens: int = 0,
                       start: Mapping | None = None) -> bytes:
    """The end of a cut Anthropic Messages stream: each open block stopped, the refusal as
    a text block, `message_delta` with `stop_reason: "refusal"`, `message_stop`. Where the
    client was sent no `message_start` (a stream refused before the upstream was called,
    or one whose `message_start` held text and was dropped by the cut), one opens it,
    with `start`'s id, model and usage, as the SDK's accumulator needs."""
    index = output.next_index
    events = [] if output.started else [
        {"type": "message_start", "message": {**(start or {}), "content": [], "stop_reason": None}}]
    events += [{"type": "content_block_stop", "index": i} for i in output.open]
    events += [{"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
               {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": refusal}},
               {"type": "content_block_stop", "index": index},
               {"type": "message_delta", "delta": {"stop_reason": REFUSAL, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens}},
               {"type": "message_stop"}]
    return b"".join(_typed_event(event) for event in events)


def _typed_event(obj: Mapping) -> bytes:
    """A Responses API (or Anthropic Messages) event: `event: <type>` and the JSON, as
    OpenAI (Anthropic) sends them."""
    return encode_event(json.dumps(obj, ensure_ascii=False, separators=(",", ":")), event=obj["type"])


def steered(endpoint: str, payload: dict, message: str) -> dict:
    """The request with the policy's safety instruction first in its system prompt, or as
    its system prompt where it has none: never a second system turn beside the client's,
    which chat templates that take one leading system message refuse. (`completions` has
    no system prompt: the message goes before each prompt.)"""
    payload = dict(payload)
    if endpoint == "chat/completions":
        messages = list(payload.get("messages") or [])
        content = _system_content(messages[0] if messages else None, message, "text")
        if content is not None:
            messages[0] = {**messages[0], "content": content}
        else:
            messages.insert(0, {"role": "system", "content": message})
        payload["messages"] = messages
    elif endpoint == "completions" and isinstance(payload.get("prompt"), str):
        payload["prompt"] = f"{message}\n\n{payload['prompt']}"
    elif endpoint == "completions" and isinstance(payload.get("prompt"), list):  # several prompts: each
        payload["prompt"] = [f"{message}\n\n{p}" if isinstance(p, str) else p for p in payload["prompt"]]
    elif endpoint == "responses":
        instructions, items = payload.get("instructions"), payload.get("input")
        first = items[0] if isinstance(items, list) and items else None
        # Servers put `instructions` before the input as a system message of its own; without
        # them, a leading system item is the system prompt (a message item may omit `type`).
        leading = first if isinstance(first, dict) and first.get("type", "message") == "message" else None
        content = None if isinstance(instructions, str) else _system_content(leading, message, "input_text")
        if content is not None:
            payload["input"] = [{**first, "content": content}, *items[1:]]
        else:
            payload["instructions"] = f"{message}\n\n{instructions}" if isinstance(instructions, str) else message
    elif endpoint == "messages":
        system = payload.get("system")
        if isinstance(system, list):
            payload["system"] = _before_parts(system, message, "text")
        else:
            payload["system"] = f"{message}\n\n{system}" if isinstance(system, str) and system else message
    return payload


def _system_content(first: object, message: str, part_type: str) -> str | list | None:
    """The content of `first`, a system (or developer) message, with `message` in front
    (`message` alone where it has none: null, or no `content`); None where `first` is not
    one, or its content is neither a string nor a list of parts."""
    if not isinstance(first, dict) or first.get("role") not in ("system", "developer"):
        return None
    content = first.get("content")
    if content is None:
        return message
    if isinstance(content, str):
        return f"{message}\n\n{content}"
    return _before_parts(content, message, part_type) if isinstance(content, list) else None


def _before_parts(parts: list, message: str, part_type: str) -> list:
    """`message` as a text part of its own before `parts`, followed by the blank line a
    string system prompt gets: the client's parts are left as they came (a server that
    joins parts with "\\n" adds one more line break), and no server that joins them with
    nothing runs the two texts together."""
    return [{"type": part_type, "text": f"{message}\n\n" if parts else message}, *parts]


def choice_texts(endpoint: str, body: Mapping) -> list[tuple[int, str]] | None:
    """(index, generated text) of each choice of a whole reply; None if `body` is not a
    completion of `endpoint`'s shape, or its text is not where the guard reads text (a
    choice or content part that is not an object, a text that is not a string): text it
    could not score, which the client may be shown all the same. Otherwise one pair per
    choice, in the reply's order, so position k is `choices[k]` (safest-of-n returns
    the candidate at the position it ranks)."""
    try:
        if endpoint == "responses":
            return [(0, response_text_responses(body))] if isinstance(body.get("output"), list) else None
        if endpoint == "messages":
            return [(0, response_text_messages(body))] if isinstance(body.get("content"), list) else None
        choices = body.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            return None
        read = response_text_completion if endpoint == "completions" else response_text_chat
        return [(c.get("index", i), read(c)) for i, c in enumerate(choices)]
    except RequestShapeError:
        return None


def refuse_choice(endpoint: str, request: Mapping, refusal: str, body: dict, index: int) -> None:
    """Replace choice `index` of a whole reply with `refusal`, in place, keeping nothing of
    the choice but its index (a Responses reply becomes the refused response, keeping its
    id, times, model and usage)."""
    if endpoint in ("responses", "messages"):
        body.update(refused_json(endpoint, request, refusal) | {
            k: body[k] for k in ("id", "created_at", "model", "usage") if k in body})
        return
    for i, choice in enumerate(body["choices"]):
        if isinstance(choice, dict) and choice.get("index", i) == index:
            # Rebuilt, not edited: its log-probabilities, vLLM's `token_ids` and the like
            # spell out the text it replaces.
            body["choices"][i] = refused_choice(endpoint, choice.get("index", i), refusal)
