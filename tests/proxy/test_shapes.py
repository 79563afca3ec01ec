"""`proxy.shapes.ResponseOutput`: a Responses stream's output items, as far as they were
sent; `proxy.shapes.steered`: where the safety message goes in each endpoint's request."""

from __future__ import annotations

import copy
import json

import pytest
from openai.types.responses import ResponseUsage

from proxy.shapes import ResponseOutput, refused_json, refused_stream, steered
from proxy.sse import SSEDecoder


def events(*pairs):
    return [{"type": f"response.{kind}", **data} for kind, data in pairs]


def test_items_are_rebuilt_from_their_parts_and_deltas():
    """vLLM's reasoning item comes without `content` and numbers its one part 1; a function
    call grows by its argument deltas; a finished item is taken whole from its `.done`."""
    output = ResponseOutput()
    for event in events(
            ("output_item.added", {"output_index": 0, "item": {"id": "rs", "type": "reasoning", "summary": [],
                                                              "status": "in_progress"}}),
            ("content_part.added", {"output_index": 0, "content_index": 1, "part": {"type": "reasoning_text",
                                                                                  "text": ""}}),
            ("reasoning_text.delta", {"output_index": 0, "content_index": 1, "delta": "think "}),
            ("reasoning_text.delta", {"output_index": 0, "content_index": 1, "delta": "more"}),
            ("output_item.done", {"output_index": 0, "item": {
                "id": "rs", "type": "reasoning", "summary": [], "status": "completed",
                "content": [{"type": "reasoning_text", "text": "think more"}]}}),
            ("output_item.added", {"output_index": 1, "item": {"id": "fc", "type": "function_call", "call_id": "c",
                                                              "name": "f", "arguments": "", "status": "in_progress"}}),
            ("function_call_arguments.delta", {"output_index": 1, "delta": '{"a": '}),
            ("output_item.added", {"output_index": 2, "item": {"id": "m", "type": "message", "role": "assistant",
                                                              "content": [], "status": "in_progress"}}),
            ("content_part.added", {"output_index": 2, "content_index": 0, "part": {"type": "output_text",
                                                                                  "text": "", "annotations": []}}),
            ("output_text.delta", {"output_index": 2, "content_index": 0, "delta": "half"}),
            ("output_text.delta", {"output_index": 7, "content_index": 0, "delta": "no such item"}),
            ("reasoning_summary_text.delta", {"output_index": 2, "summary_index": 0, "delta": "no summary"})):
        output.apply(event)
    reasoning, call, message = output.output()
    assert reasoning["status"] == "completed" and reasoning["content"][0]["text"] == "think more"
    assert call["arguments"] == '{"a": ' and call["status"] == "incomplete"
    assert message["content"] == [{"type": "output_text", "text": "half", "annotations": []}]
    assert message["status"] == "incomplete"
    assert output.next_index == 3


def test_summary_parts_and_a_fresh_stream():
    output = ResponseOutput()
    assert output.output() == [] and output.next_index == 0
    for event in events(
            ("output_item.added", {"output_index": 0, "item": {"id": "rs", "type": "reasoning", "summary": []}}),
            ("reasoning_summary_part.added", {"output_index": 0, "summary_index": 0,
                                              "part": {"type": "summary_text", "text": ""}}),
            ("reasoning_summary_text.delta", {"output_index": 0, "summary_index": 0, "delta": "in short"}),
            ("output_item.added", {"output_index": True, "item": {"id": "x", "type": "message"}})):
        output.apply(event)
    assert output.output() == [{"id": "rs", "type": "reasoning", "summary": [{"type": "summary_text",
                                                                               "text": "in short"}]}]


SAFE = "Be careful."
USER = {"role": "user", "content": "hi"}
BOB = [{"type": "text", "text": "You are Bob."}]

# (endpoint, the request's fields, the steered request's): the safety message goes first in
# the system prompt there is (a string gets it and "\n\n" in front; a list of parts or
# blocks a text part of its own, `SAFE + "\n\n"`, first), and is the system prompt where
# there is none. Never a second system turn: templates that take one leading system
# message refuse two.
STEERED = [
    ("chat/completions", {"messages": [USER]}, {"messages": [{"role": "system", "content": SAFE}, USER]}),
    ("chat/completions", {"messages": [{"role": "system", "content": "You are Bob."}, USER]},
     {"messages": [{"role": "system", "content": "Be careful.\n\nYou are Bob."}, USER]}),
    ("chat/completions", {"messages": [{"role": "system", "content": BOB}, USER]},
     {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be careful.\n\n"}, *BOB]}, USER]}),
    ("chat/completions", {"messages": [{"role": "developer", "content": BOB, "name": "d"}, USER]},
     {"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be careful.\n\n"}, *BOB],
                    "name": "d"}, USER]}),
    ("chat/completions", {"messages": [{"role": "system", "content": []}, USER]},
     {"messages": [{"role": "system", "content": [{"type": "text", "text": SAFE}]}, USER]}),
    # a leading system message without content (null, or none at all) is still the system
    # prompt: a second one went in front of it
    ("chat/completions", {"messages": [{"role": "system", "content": None}, USER]},
     {"messages": [{"role": "system", "content": SAFE}, USER]}),
    ("chat/completions", {"messages": [{"role": "system"}, USER]},
     {"messages": [{"role": "system", "content": SAFE}, USER]}),
    ("responses", {"input": [{"role": "developer", "content": None}, USER]},
     {"input": [{"role": "developer", "content": SAFE}, USER]}),
    ("completions", {"prompt": "Once"}, {"prompt": "Be careful.\n\nOnce"}),
    ("completions", {"prompt": ["a", "b"]}, {"prompt": ["Be careful.\n\na", "Be careful.\n\nb"]}),
    ("responses", {"input": "hi"}, {"input": "hi", "instructions": SAFE}),
    ("responses", {"input": "hi", "instructions": "You are Bob."},
     {"input": "hi", "instructions": "Be careful.\n\nYou are Bob."}),
    ("responses", {"input": [{"role": "system", "content": "You are Bob."}, USER]},
     {"input": [{"role": "system", "content": "Be careful.\n\nYou are Bob."}, USER]}),
    ("responses", {"input": [{"type": "message", "role": "developer",
                              "content": [{"type": "input_text", "text": "You are Bob."}]}, USER]},
     {"input": [{"type": "message", "role": "developer",
                 "content": [{"type": "input_text", "text": "Be careful.\n\n"},
                             {"type": "input_text", "text": "You are Bob."}]}, USER]}),
    ("responses", {"input": [USER, {"role": "system", "content": "late"}]},  # not leading: instructions lead
     {"input": [USER, {"role": "system", "content": "late"}], "instructions": SAFE}),
    ("responses", {"input": [{"role": "system", "content": "You are Bob."}], "instructions": "Terse."},
     {"input": [{"role": "system", "content": "You are Bob."}], "instructions": "Be careful.\n\nTerse."}),
    ("messages", {"messages": [USER]}, {"messages": [USER], "system": SAFE}),
    ("messages", {"messages": [USER], "system": "You are Bob."},
     {"messages": [USER], "system": "Be careful.\n\nYou are Bob."}),
    ("messages", {"messages": [USER], "system": BOB},
     {"messages": [USER], "system": [{"type": "text", "text": "Be careful.\n\n"}, *BOB]}),
]


@pytest.mark.parametrize(("endpoint", "request_", "expected"), STEERED)
def test_steered_puts_the_safety_message_first_in_the_one_system_prompt(endpoint, request_, expected):
    sent = copy.deepcopy(request_)
    assert steered(endpoint, sent, SAFE) == expected
    assert sent == request_  # the client's request is not edited in place


USAGE_ZERO = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
              "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}


def test_refused_response_usage_has_the_details_openai_requires():
    """OpenAI's schema requires both `*_tokens_details` in a Responses `usage` (and, in the
    openai SDK installed here, `cache_write_tokens` among the input details); the SDK's
    model, validated strictly, is the oracle."""
    usage = refused_json("responses", {"model": "m"}, "No.")["usage"]
    assert usage == USAGE_ZERO
    ResponseUsage.model_validate(usage, strict=True)


@pytest.mark.parametrize("kind", ["response.created", "response.incomplete"])
def test_refused_response_stream_carries_the_same_usage(kind):
    decoder = SSEDecoder()
    events = decoder.feed(refused_stream("responses", {"model": "m", "stream": True}, "No."))
    final = [json.loads(e.data) for e in events if e.event == kind]
    assert len(final) == 1 and final[0]["response"]["usage"] == USAGE_ZERO
