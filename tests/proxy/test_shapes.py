"""`proxy.shapes.ResponseOutput`: a Responses stream's output items, as far as they were sent."""

from __future__ import annotations

from proxy.shapes import ResponseOutput


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
