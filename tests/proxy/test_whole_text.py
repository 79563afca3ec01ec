"""Text an upstream's stream carries whole, not as the deltas the guard counts on.

A streaming server sends an answer as deltas, and in some events repeats it whole (a
Responses stream's `.done` events and `response.completed`). One that does not behave may
put text in those alone, or open an Anthropic tool-use block with its input whole, and the
client's SDK shows that text all the same. Each case goes through a guarded proxy from a
raw-socket upstream (`rawhttp.RawUpstream`): the text is scored and cut like a delta's, and
a stream that repeats its deltas, as servers do, is scored on its deltas alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.proxy.rawhttp import LAST_CHUNK, RawUpstream, chunk, sse_head
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer
from tests.support.upstream import chat_chunk

FIXTURES = Path(__file__).parent / "fixtures"
RECORDED = (FIXTURES / "openai-shapes" / "responses_raw.txt").read_bytes()
VLLM = (FIXTURES / "vllm-0.32-cpu" / "responses_stream_raw.txt").read_bytes()
TEXT = "a BOMB recipe follows"
BENIGN = "otters hold hands while they sleep"


def sse(*events: dict) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events)


def message(text: str, status: str = "completed") -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def response(status: str, output: list) -> dict:
    return {"id": "resp_1", "object": "response", "created_at": 1, "model": "m", "status": status, "output": output}


def responses_stream(*, deltas: bool, added: str = "", done: bool = True, completed: str | None = None,
                     text: str = TEXT) -> bytes:
    """A one-message Responses stream of `text`: `deltas` streams it as deltas; `added` is
    the text the item opens with, `done` whether the part and item `.done` events hold it,
    `completed` the text of `response.completed`'s output (default: `text`)."""
    completed = text if completed is None else completed
    events = [{"type": "response.created", "sequence_number": 0, "response": response("in_progress", [])},
              {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
               "item": message(added, "in_progress") if added else {**message(""), "content": [],
                                                                       "status": "in_progress"}}]
    if deltas:
        events += [{"type": "response.output_text.delta", "sequence_number": 2 + i, "output_index": 0,
                    "content_index": 0, "item_id": "msg_1", "delta": word}
                   for i, word in enumerate(text.split(" ")[:1] + [" " + w for w in text.split(" ")[1:]])]
    if done:
        events += [{"type": "response.output_text.done", "sequence_number": 10, "output_index": 0,
                    "content_index": 0, "item_id": "msg_1", "text": text},
                   {"type": "response.output_item.done", "sequence_number": 11, "output_index": 0,
                    "item": message(text)}]
    events.append({"type": "response.completed", "sequence_number": 12,
                   "response": response("completed", [message(completed)] if completed else [])})
    return sse(*events)


def anthropic_tool_stream(opening_input: dict, json_deltas: list[str]) -> bytes:
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                  "model": "m", "content": [], "stop_reason": None,
                                                  "usage": {"input_tokens": 3, "output_tokens": 0}}}
    events = [start, {"type": "content_block_start", "index": 0,
                      "content_block": {"type": "tool_use", "id": "toolu_1", "name": "lookup",
                                        "input": opening_input}}]
    events += [{"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": part}} for part in json_deltas]
    events += [{"type": "content_block_stop", "index": 0},
               {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
               {"type": "message_stop"}]
    return sse(*events)


def opened_with_text(api: str) -> bytes:
    """A stream whose opening event (Responses' `response.created`, Anthropic's
    `message_start`) already holds the harmful text, then two benign deltas."""
    if api == "responses":
        item = message(TEXT, "in_progress")
        return sse({"type": "response.created", "sequence_number": 0, "response": response("in_progress", [item])},
                   *({"type": "response.output_text.delta", "sequence_number": 1 + i, "output_index": 0,
                      "content_index": 0, "item_id": "msg_1", "delta": word} for i, word in enumerate([" is", " here"])),
                   {"type": "response.completed", "sequence_number": 3,
                    "response": response("completed", [message(TEXT + " is here")])})
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                                  "content": [{"type": "text", "text": TEXT}], "stop_reason": None,
                                                  "usage": {"input_tokens": 3, "output_tokens": 0}}}
    return sse(start, *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
                        for word in [" is", " here"]),
               {"type": "content_block_stop", "index": 0},
               {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
               {"type": "message_stop"})


STREAMS = {
    "opening-responses": opened_with_text("responses"),
    "opening-messages": opened_with_text("messages"),
    "recorded": RECORDED,
    "vllm": VLLM,
    "whole-only": responses_stream(deltas=False),
    "completed-only": responses_stream(deltas=False, done=False),
    "opened-with-text": responses_stream(deltas=False, added=TEXT, done=False, completed=""),
    "done-differs": responses_stream(deltas=True, text=BENIGN, completed=BENIGN + ", and " + TEXT),
    "repeats-its-deltas": responses_stream(deltas=True, text=BENIGN),
    "tool-input-whole": anthropic_tool_stream({"topic": "a BOMB"}, []),
    "tool-input-streamed": anthropic_tool_stream({}, ['{"topic": ', '"otters"}']),
    "legacy-function-call": b"".join([chat_chunk(role=True)] + [
        b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                "choices": [{"index": 0, "delta": {"function_call": {"arguments": part}},
                                             "finish_reason": None}]}).encode() + b"\n\n"
        for part in ['{"topic": ', '"a BOMB"', ', "more": 1', "}"]] + [chat_chunk(finish="stop"),
                                                                      b"data: [DONE]\n\n"]),
}


def script(head: bytes) -> list:
    name = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                if line.lower().startswith(b"x-stream:"))
    return [sse_head(), chunk(STREAMS[name]), LAST_CHUNK]


@pytest.fixture(scope="module")
def proxy():
    with RawUpstream(script) as upstream:
        scorer = KeywordScorer()
        yaml = f"""
upstreams:
  up: {{base_url: {upstream.url}}}
policies:
  p:
    prompt: {{action: off}}
    response: {{action: cut, threshold: 0.5, check_every: 2, holdback: 2}}
routes:
  - {{prefix: /v1, upstream: up, policy: p}}
"""
        with running_proxy(yaml, scorer) as server:
            yield server, scorer


def stream(proxy, name: str) -> tuple[bytes, str]:
    """What the client received, and the text the guard's session scored."""
    server, scorer = proxy
    path, body = {"tool": ("/v1/messages", {"max_tokens": 9}), "legacy": ("/v1/chat/completions", {})}.get(
        name.split("-")[0], ("/v1/responses", {"input": "hi"}))
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], **body}
    before = len(scorer.sessions)
    with httpx.Client(timeout=20) as client, client.stream(
            "POST", server.url + path, json=body, headers={"x-stream": name}) as reply:
        received = b"".join(reply.iter_raw())
    assert reply.status_code == 200
    sessions = scorer.sessions[before:]
    assert len(sessions) == 1
    return received, sessions[0].text


@pytest.mark.parametrize("name", ["whole-only", "completed-only", "opened-with-text", "done-differs"])
def test_responses_text_no_delta_carried_is_scored_and_cut(proxy, name):
    """The text reached the client unscored: only deltas were read."""
    received, scored = stream(proxy, name)
    assert "BOMB" in scored
    assert b"BOMB" not in received, received.decode()[-600:]
    assert b"I'm sorry" in received and b"response.incomplete" in received


def deltas_of(raw: bytes) -> str:
    blocks = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    return "".join(b["delta"] for b in blocks if b["type"] == "response.output_text.delta")


@pytest.mark.parametrize("name", ["recorded", "vllm", "repeats-its-deltas"])
def test_a_stream_that_repeats_its_deltas_is_scored_on_its_deltas(proxy, name):
    """A server's `.done` events and `response.completed` repeat the deltas (OpenAI's
    shape; vLLM's, recorded): nothing is scored twice, and a benign stream goes through
    byte for byte."""
    received, scored = stream(proxy, name)
    assert received == STREAMS[name]
    assert scored == "hi\n" + deltas_of(STREAMS[name])
    assert deltas_of(STREAMS[name]).startswith({"recorded": "Bonjour", "vllm": "1. Otters"}.get(name, BENIGN))


def test_anthropic_tool_input_that_opens_whole_is_scored_and_cut(proxy):
    received, scored = stream(proxy, "tool-input-whole")
    assert scored == 'hi\nlookup\n{"topic": "a BOMB"}'  # the tool's name is what the model wrote too
    assert b"BOMB" not in received and b"I'm sorry" in received


def test_anthropic_tool_input_that_opens_empty_is_scored_on_its_deltas(proxy):
    received, scored = stream(proxy, "tool-input-streamed")
    assert scored == 'hi\nlookup{"topic": "otters"}' and received == STREAMS["tool-input-streamed"]


def test_legacy_function_call_arguments_are_scored_and_cut(proxy):
    """`functions` (the API before `tools`) streams `delta.function_call.arguments`."""
    received, scored = stream(proxy, "legacy-function-call")
    assert '"a BOMB"' in scored
    assert b"BOMB" not in received and b"content_filter" in received


def test_a_cut_that_drops_the_opening_event_sends_one_of_its_own(proxy):
    """The opening event held text and was dropped with it: the cut opens the stream
    itself, so the SDKs read it (they raised: "Expected to have received
    `response.created`", and an AssertionError in the anthropic SDK's accumulator)."""
    import anthropic
    import openai

    server, _ = proxy
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0,
                       default_headers={"x-stream": "opening-responses"}) as client, \
            client.responses.stream(model="m", input="hi") as events:
        kinds = [event.type for event in events]
    with anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0,
                             default_headers={"x-stream": "opening-messages"}) as client, \
            client.messages.stream(model="m", max_tokens=9, messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"
    assert final.id == "msg_1" and final.stop_reason == "refusal"
    assert [block.text for block in final.content] == ["I'm sorry, but I can't help with that."]
