from __future__ import annotations

import pytest

from policies.errors import RequestShapeError
from policies.extract import (
    delta_text, prompt_text, response_text_chat, response_text_completion, response_text_responses, responses_turn,
    whole_texts,
)

CHAT = {"messages": [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "first"},
    {"role": "assistant", "content": "reply", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"q\": 1}"}}]},
    {"role": "tool", "tool_call_id": "c", "content": "tool out"},
    {"role": "developer", "content": [{"type": "text", "text": "dev rule"}]},
    {"role": "user", "content": [
        {"type": "text", "text": "look at"},
        {"type": "image_url", "image_url": {"url": "data:..."}},
        {"type": "text", "text": "this"}]},
]}
RESPONSES_ITEMS = {"instructions": "Be brief.", "input": [
    {"role": "system", "content": "sys"},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
    {"type": "function_call", "call_id": "x", "name": "f", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "x", "output": "42"},
    {"role": "user", "content": "bye"},
    {"type": "item_reference", "id": "msg_1"},
]}

# (endpoint, body, scope, text)
PROMPTS = [
    ("chat/completions", CHAT, "last_user", "look at\nthis"),
    ("chat/completions", CHAT, "conversation",
     "user: first\nassistant: reply\nf\n{\"q\": 1}\ntool: tool out\nuser: look at\nthis"),
    ("chat/completions", CHAT, "conversation_with_system",
     "system: Be nice.\nuser: first\nassistant: reply\nf\n{\"q\": 1}\ntool: tool out\n"
     "developer: dev rule\nuser: look at\nthis"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "last_user", "hi"),
    ("chat/completions", {"messages": [{"role": "system", "content": "s"}]}, "last_user", ""),
    # vLLM renders any role through the chat template: "User" or "human" is the user's turn
    ("chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "User", "content": "b"}]},
     "last_user", "b"),
    ("chat/completions", {"messages": [{"role": " USER ", "content": "b"}]}, "last_user", "b"),
    # a role other than `user` is text the template renders before the content: read with it
    ("chat/completions", {"messages": [{"role": "human", "content": "b"}, {"role": "Assistant", "content": "c"},
                                       {"role": "TOOL", "content": "t"}]}, "last_user", "human\nb"),
    ("chat/completions", {"messages": [{"role": "user\nDo this.", "content": "b"}]}, "last_user", "user\nDo this.\nb"),
    ("responses", {"input": [{"role": " Do this. ", "content": []}]}, "last_user", "Do this."),
    ("chat/completions", {"messages": [{"role": "user", "content": "b"}, {"role": "model", "content": "c"},
                                       {"role": "System", "content": "s"}]}, "last_user", "b"),
    ("chat/completions", {"messages": []}, "conversation", ""),
    ("chat/completions", {"messages": [{"role": "user", "content": None}]}, "last_user", ""),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"text": "untyped"}]}]}, "last_user", "untyped"),
    ("chat/completions", {"messages": [{"role": "assistant", "content": None,
                                        "function_call": {"name": "f", "arguments": "legacy"}}]},
     "conversation", "assistant: f\nlegacy"),
    ("completions", {"prompt": "Once upon"}, "last_user", "Once upon"),
    ("completions", {"prompt": ["a", "b"]}, "conversation", "a\nb"),
    ("completions", {"prompt": []}, "last_user", ""),
    ("completions", {"prompt": [1, 2, 3]}, "last_user", None),
    ("completions", {"prompt": [[1, 2], [3]]}, "last_user", None),
    # an insertion's suffix is read with each prompt: the model conditions on it
    ("completions", {"prompt": "def f(x):", "suffix": "return y"}, "last_user", "def f(x):\nreturn y"),
    ("completions", {"prompt": ["a", "b"], "suffix": "z"}, "conversation", "a\nz\nb\nz"),
    ("completions", {"prompt": "a", "suffix": ""}, "last_user", "a"),
    ("completions", {"prompt": "a", "suffix": None}, "last_user", "a"),
    ("responses", {"input": "just text"}, "last_user", "just text"),
    ("responses", {"input": "just text"}, "conversation", "user: just text"),
    ("responses", {"input": "just text", "instructions": "ins"}, "conversation", "user: just text"),
    ("responses", {"input": "just text", "instructions": "ins"}, "conversation_with_system",
     "system: ins\nuser: just text"),
    ("responses", RESPONSES_ITEMS, "last_user", "bye"),
    ("responses", RESPONSES_ITEMS, "conversation", "user: hi\nassistant: hello\nassistant: f\n{}\ntool: 42\nuser: bye"),
    ("responses", RESPONSES_ITEMS, "conversation_with_system",
     "system: Be brief.\nsystem: sys\nuser: hi\nassistant: hello\nassistant: f\n{}\ntool: 42\nuser: bye"),
    ("responses", {"prompt": {"id": "pmpt_1"}}, "last_user", None),
    # a stored prompt's variables are the client's words, read as part of its turn
    ("responses", {"prompt": {"id": "pmpt_1", "variables": {"q": "how to make a bomb", "n": "3"}}}, "last_user",
     "how to make a bomb\n3"),
    ("responses", {"input": "hi", "prompt": {"id": "p", "variables": {"q": {"type": "input_text", "text": "bomb"},
                                                                    "img": {"type": "input_image", "file_id": "f"}}}},
     "last_user", "hi\nbomb"),
    ("responses", {"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                   "prompt": {"id": "p", "variables": {"q": "bomb"}}}, "conversation", "user: hi\nassistant: yo\nuser: bomb"),
    # tool descriptions are read as a system prompt is: with conversation_with_system only
    ("chat/completions", {"messages": [{"role": "user", "content": "q"}], "tools": [
        {"type": "function", "function": {"name": "f", "description": "Finds things.", "parameters": {}}},
        {"type": "function", "function": {"name": "g"}}, "junk"],
        "functions": [{"name": "old", "description": "Legacy."}]},
     "conversation_with_system", "tools: f: Finds things.\nold: Legacy.\nuser: q"),
    ("chat/completions", {"messages": [{"role": "user", "content": "q"}], "tools": [
        {"type": "function", "function": {"name": "f", "description": "Finds things."}}]}, "conversation", "user: q"),
    ("responses", {"input": "q", "instructions": "ins", "tools": [
        {"type": "function", "name": "f", "description": "Finds."},
        {"type": "mcp", "server_label": "docs", "server_description": "Reads docs."},
        {"type": "web_search"}]},
     "conversation_with_system", "tools: f: Finds.\ndocs: Reads docs.\nsystem: ins\nuser: q"),
    ("responses", {"input": "q", "tools": "not a list"}, "conversation_with_system", "user: q"),
    ("responses", {"input": [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_text", "text": "part one"}, {"type": "input_image", "image_url": "data:"}]}]},
     "conversation", "tool: part one"),
    # vLLM's RAG documents: retrieved text the template puts in the prompt, read as tool output is
    ("chat/completions", {"messages": [{"role": "user", "content": "q"}],
                          "documents": [{"title": "T", "text": "body"}, {"text": ""}, "junk"]},
     "conversation", "document: T\nbody\nuser: q"),
    ("chat/completions", {"messages": [{"role": "user", "content": "q"}], "documents": [{"text": "body"}]},
     "last_user", "q"),
    # an earlier turn's reasoning, sent back (interleaved thinking), is part of the conversation
    ("chat/completions", {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "thought", "content": "a"},
        {"role": "user", "content": "next"}]}, "conversation", "user: q\nassistant: thought\na\nuser: next"),
    ("chat/completions", {"messages": [{"role": "assistant", "reasoning": "r", "reasoning_content": "r"}]},
     "conversation", "assistant: r"),
    ("responses", {"input": [
        {"role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "sum"}],
         "content": [{"type": "reasoning_text", "text": "thought"}]},
        {"type": "reasoning", "id": "rs2", "summary": [], "encrypted_content": "opaque"},
        {"type": "custom_tool_call", "call_id": "c", "name": "sh", "input": "ls"},
        {"type": "custom_tool_call_output", "call_id": "c", "output": "files"},
        {"type": "web_search_call", "id": "ws", "status": "completed"},
        {"role": "user", "content": "next"}]},
     "conversation", "user: q\nassistant: sum\nthought\nassistant: sh\nls\ntool: files\nuser: next"),
    ("responses", {"input": []}, "last_user", ""),
    # vLLM renders `thinking` and `refusal` parts as text, in any message
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "q"}, {"type": "thinking", "thinking": "t"}, {"type": "refusal", "refusal": "r"},
        {"type": "thinking", "thinking": None}]}]}, "last_user", "q\nt\nr"),
    ("responses", {"input": [{"role": "user", "content": [{"type": "thinking", "thinking": "t"}]}]},
     "last_user", "t"),
    # an item is what its type says: a server reads a function call's arguments and a tool's
    # output whatever `role` the item also carries, so a role does not make them a message
    ("responses", {"input": [{"role": "user", "content": "q"},
                             {"type": "function_call_output", "role": "user", "call_id": "c", "output": "out"}]},
     "last_user", "q"),
    ("responses", {"input": [{"role": "user", "content": "q"},
                             {"type": "function_call", "role": "assistant", "call_id": "c", "name": "f",
                              "arguments": "{\"a\": 1}"},
                             {"type": "function_call_output", "role": "user", "call_id": "c", "output": "out"},
                             {"type": "reasoning", "role": "assistant", "summary": [{"type": "summary_text",
                                                                                     "text": "sum"}]}]},
     "conversation", "user: q\nassistant: f\n{\"a\": 1}\ntool: out\nassistant: sum"),
    # an item of a type this proxy does not know, with a role, is read as a message
    ("responses", {"input": [{"type": "input_message", "role": "user", "content": "odd"}]}, "last_user", "odd"),
    # Anthropic Messages: `system` as the system message, tool results as "tool" lines
    ("messages", {"system": "sys", "messages": [{"role": "user", "content": "hi"}]}, "conversation_with_system",
     "system: sys\nuser: hi"),
    ("messages", {"system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                  "messages": [{"role": "user", "content": "hi"}]}, "conversation", "user: hi"),
    ("messages", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image", "source": {}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                          {"type": "redacted_thinking", "data": "opaque"},
                                          {"type": "tool_use", "id": "t", "name": "f", "input": {"x": "é"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "res"},
                                     {"type": "tool_result", "tool_use_id": "u",
                                      "content": [{"type": "text", "text": "r2"}]},
                                     {"type": "text", "text": "next"}]}]},
     "conversation", 'user: q\nassistant: hm\nf\n{"x": "é"}\ntool: res\ntool: r2\nuser: next'),
    ("messages", {"messages": [{"role": "user", "content": "q"},
                               {"role": "user", "content": [{"type": "tool_result", "content": "res"}]}]},
     "last_user", "q"),  # a tool's output is not what the user said
    ("messages", {"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}},
        {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "doc2"}]}},
        {"type": "document", "source": {"type": "base64", "data": "JVBERi0="}}]}]},
     "last_user", "doc\ndoc2"),
    ("messages", {"tools": [{"name": "f", "description": "does f", "input_schema": {}}],
                  "messages": [{"role": "user", "content": "hi"}]}, "conversation_with_system",
     "tools: f: does f\nuser: hi"),
]


@pytest.mark.parametrize(("endpoint", "body", "scope", "text"), PROMPTS)
def test_prompt_text(endpoint, body, scope, text):
    assert prompt_text(endpoint, body, scope) == text


CONTEXT = (("system", "old rules"), ("user", "first"), ("assistant", "reply"))
# (body, scope, text): a Responses request read after the turns it continues
CHAINED = [
    ({"input": "next"}, "last_user", "next"),
    ({"input": "next"}, "conversation", "user: first\nassistant: reply\nuser: next"),
    ({"input": "next", "instructions": "ins", "tools": [{"type": "function", "name": "f", "description": "d"}]},
     "conversation_with_system",
     "tools: f: d\nsystem: ins\nsystem: old rules\nuser: first\nassistant: reply\nuser: next"),
    # no user turn of its own (a tool's output): the last user turn is the one continued
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "42"}]}, "last_user", "first"),
    ({"input": [{"role": "user", "content": [{"type": "prompt_embeds", "data": "x"}]}]}, "conversation", None),
    ({"prompt": {"id": "pmpt_1"}}, "conversation", None),
]


@pytest.mark.parametrize(("body", "scope", "text"), CHAINED)
def test_a_chained_responses_request_is_read_after_its_context(body, scope, text):
    assert prompt_text("responses", body, scope, context=CONTEXT) == text


@pytest.mark.parametrize(("body", "turn"), [
    ({"input": "hi", "instructions": "ins", "tools": [{"name": "f", "description": "d"}]}, [("user", "hi")]),
    ({"input": [{"role": "user", "content": "hi"}], "prompt": {"id": "p", "variables": {"q": "more"}}},
     [("user", "hi\nmore")]),
    ({"prompt": {"id": "p"}}, None),
])
def test_a_responses_turn_is_its_input_without_instructions_or_tools(body, turn):
    """What a turn adds to a conversation: a later turn does not inherit `instructions`."""
    assert responses_turn(body) == turn


# (endpoint, body, OpenAI param named)
BAD = [
    ("chat/completions", [], None),
    ("chat/completions", {}, "messages"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": ["hi"]}, "messages[0]"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, "messages[0]"),
    ("chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": [3]}]}, "messages[0].content[0]"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
     "messages[0].content[0].text"),
    ("chat/completions", {"messages": [{"role": "assistant", "tool_calls": "x"}]}, "messages[0].tool_calls"),
    ("completions", {}, "prompt"),
    ("completions", {"prompt": 3}, "prompt"),
    ("completions", {"prompt": ["a", 1]}, "prompt"),
    ("completions", {"prompt": [True, False]}, "prompt"),
    ("completions", {"prompt": "a", "suffix": ["b"]}, "suffix"),
    ("responses", {"input": 3}, "input"),
    ("responses", {"input": ["hi"]}, "input[0]"),
    ("responses", {"input": [{"type": "message", "content": "x"}]}, "input[0].role"),
    ("responses", {"input": "x", "instructions": 3}, "instructions"),
    ("responses", {"input": "x", "prompt": "pmpt_1"}, "prompt"),
    ("responses", {"input": "x", "prompt": {"id": "p", "variables": ["a"]}}, "prompt.variables"),
    ("responses", {"input": "x", "prompt": {"id": "p", "variables": {"q": {"type": "input_text", "text": 5}}}},
     "prompt.variables.q.text"),
    ("messages", {"messages": "hi"}, "messages"),
    ("messages", {"messages": [{"content": "hi"}]}, "messages[0]"),
    ("messages", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("messages", {"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     "messages[0].content[0].text"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": 3}]}]},
     "messages[0].content[0].content"),
    ("messages", {"system": 3, "messages": []}, "system"),
    ("messages", {"system": [{"type": "text"}], "messages": []}, "system[0].text"),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), BAD)
def test_bad_shapes_raise_request_shape_error(endpoint, body, param):
    with pytest.raises(RequestShapeError) as info:
        prompt_text(endpoint, body, "conversation")
    assert info.value.param == param


@pytest.mark.parametrize(("endpoint", "body", "param"), [
    ("chat/completions", {"model": "m"}, "messages"),
    ("chat/completions", {"messages": None}, "messages"),
    ("completions", {"model": "m"}, "prompt"),
    ("messages", {"model": "m"}, "messages"),
])
def test_a_missing_required_field_is_named_as_missing(endpoint, body, param):
    with pytest.raises(RequestShapeError, match=rf"^Missing required parameter: '{param}'\.$") as info:
        prompt_text(endpoint, body, "last_user")
    assert info.value.param == param


def test_unknown_endpoint_is_a_programming_error():
    with pytest.raises(ValueError, match="not a guarded endpoint"):
        prompt_text("embeddings", {"input": "x"}, "last_user")


@pytest.mark.parametrize(("choice", "text"), [
    ({"index": 0, "message": {"role": "assistant", "content": "hello"}}, "hello"),
    ({"message": {"content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\":1}"}}]}}, "f\n{\"a\":1}"),
    ({"message": {"content": "x", "tool_calls": [{"function": {"arguments": "y"}}]}}, "x\ny"),
    ({"message": {"content": None, "refusal": "I can't."}}, "I can't."),
    ({"message": None}, ""),
    ({}, ""),
    # a reasoning model's thinking comes first, under either name, once when both carry it
    ({"message": {"reasoning": "think", "content": "ok"}}, "think\nok"),
    ({"message": {"reasoning_content": "think", "content": "ok"}}, "think\nok"),
    ({"message": {"reasoning": "think", "reasoning_content": "think", "content": "ok"}}, "think\nok"),
    ({"message": {"reasoning": "a", "reasoning_content": "b", "content": None}}, "ab"),
    ({"message": {"reasoning": None, "content": "ok"}}, "ok"),
])
def test_response_text_chat(choice, text):
    assert response_text_chat(choice) == text


@pytest.mark.parametrize(("choice", "text"), [({"text": "abc"}, "abc"), ({"text": None}, ""), ({}, "")])
def test_response_text_completion(choice, text):
    assert response_text_completion(choice) == text


def test_response_text_responses():
    body = {"output": [
        {"type": "reasoning", "summary": []},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "one"}, {"type": "refusal", "refusal": "no"}]},
        {"type": "function_call", "name": "f", "arguments": "{}"},
        "junk",
    ]}
    assert response_text_responses(body) == "one\nno\nf\n{}"
    assert response_text_responses({}) == ""
    reasoning = {"type": "reasoning", "summary": [{"type": "summary_text", "text": "sum"}],
                 "content": [{"type": "reasoning_text", "text": "think"}, "junk"]}
    assert response_text_responses({"output": [reasoning, *body["output"]]}) == "sum\nthink\none\nno\nf\n{}"
    tools = {"output": [{"type": "custom_tool_call", "name": "sh", "input": "ls"},
                        {"type": "mcp_call", "name": "m", "arguments": "{\"q\":1}"},
                        {"type": "code_interpreter_call", "code": "print(1)"},
                        {"type": "web_search_call", "action": {"query": "not the model's text"}},
                        {"type": "mcp_call", "arguments": None}, {"type": ["junk"], "code": "x"}]}
    assert response_text_responses(tools) == "sh\nls\nm\n{\"q\":1}\nprint(1)"  # names too: what the model wrote


# (endpoint, chunk, text per choice index)
DELTAS = [
    ("chat/completions", {"choices": [{"index": 0, "delta": {"content": "He"}}]}, {0: "He"}),
    ("chat/completions", {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, {}),
    ("chat/completions", {"choices": [{"index": 1, "delta": {"content": "a"}}, {"index": 0, "delta": {"content": "b"}}]},
     {1: "a", 0: "b"}),
    ("chat/completions", {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": "{\"x"}}]}}]}, {0: "{\"x"}),
    ("chat/completions", {"choices": [{"index": 0, "delta": {"refusal": "No"}}]}, {0: "No"}),
    ("chat/completions", {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, {}),
    ("chat/completions", {"choices": [], "usage": {"total_tokens": 3}}, {}),
    ("chat/completions", {"choices": [{"index": 0, "delta": {"reasoning": "hm"}}]}, {0: "hm"}),
    ("chat/completions", {"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]}, {0: "hm"}),
    ("chat/completions", {"choices": [{"index": 0, "delta": {"reasoning": "hm", "reasoning_content": "hm"}}]},
     {0: "hm"}),
    ("chat/completions", {"choices": [{"index": 0, "delta": {"reasoning": ".", "content": "So"}}]}, {0: ".So"}),
    ("completions", {"choices": [{"index": 0, "text": "abc"}]}, {0: "abc"}),
    ("responses", {"type": "response.output_text.delta", "delta": "Hi"}, {0: "Hi"}),
    ("responses", {"type": "response.function_call_arguments.delta", "delta": "{"}, {0: "{"}),
    ("responses", {"type": "response.reasoning_text.delta", "delta": "hm"}, {0: "hm"}),
    ("responses", {"type": "response.reasoning_summary_text.delta", "delta": "sum"}, {0: "sum"}),
    ("responses", {"type": "response.reasoning_text.done", "text": "hm"}, {}),
    ("responses", {"type": "response.custom_tool_call_input.delta", "delta": "ls"}, {0: "ls"}),
    ("responses", {"type": "response.mcp_call_arguments.delta", "delta": "{"}, {0: "{"}),
    ("responses", {"type": "response.code_interpreter_call_code.delta", "delta": "x=1"}, {0: "x=1"}),
    ("responses", {"type": "response.completed", "response": {}}, {}),
    ("messages", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
     {0: "Hi"}),
    ("messages", {"type": "content_block_delta", "index": 1, "delta": {"type": "thinking_delta", "thinking": "hm"}},
     {0: "hm"}),
    ("messages", {"type": "content_block_delta", "index": 2,
                  "delta": {"type": "input_json_delta", "partial_json": "{\"q"}}, {0: "{\"q"}),
    ("messages", {"type": "content_block_delta", "index": 1, "delta": {"type": "signature_delta", "signature": "s"}},
     {}),
    ("messages", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "So"}},
     {0: "So"}),
    ("messages", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, {}),
    ("messages", {"type": "content_block_start", "index": 2,
                  "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}, {0: "f"}),
    ("messages", {"type": "content_block_start", "index": 2,
                  "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {"q": "é"}}}, {0: 'f\n{"q": "é"}'}),
    ("messages", {"type": "message_start", "message": {"content": []}}, {}),
    ("messages", {"type": "message_start", "message": {"content": [{"type": "text", "text": "So"}]}}, {0: "So"}),
    ("messages", {"type": "message_start", "message": {"content": [{"type": "text", "text": 1}]}},
     {0: '[{"type": "text", "text": 1}]'}),  # unreadable: scored as its JSON
    ("messages", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}, {}),
    ("messages", {"type": "content_block_delta", "delta": "junk"}, {}),
    ("chat/completions", {"choices": [{"index": 0, "delta": {"function_call": {"name": "f", "arguments": "{"}}}]},
     {0: "f{"}),
    ("chat/completions", {"choices": [{"index": 0, "delta": {"tool_calls": {"not": "a list"}}}]}, {}),
]

# A Responses event's text carried whole, by output index
WHOLE = [
    ({"type": "response.output_text.delta", "output_index": 0, "delta": "Hi"}, []),
    ({"type": "response.output_text.done", "output_index": 1, "text": "Hi"}, [(1, "Hi")]),
    ({"type": "response.function_call_arguments.done", "output_index": 0, "arguments": "{}"}, [(0, "{}")]),
    ({"type": "response.content_part.done", "output_index": 2, "part": {"type": "refusal", "refusal": "No"}},
     [(2, "No")]),
    ({"type": "response.output_item.added", "output_index": 0,
      "item": {"type": "message", "content": [{"type": "output_text", "text": ""}]}}, []),
    ({"type": "response.output_item.done", "output_index": 0,
      "item": {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}],
               "content": [{"type": "reasoning_text", "text": "r"}]}}, [(0, "s"), (0, "r")]),
    ({"type": "response.output_item.done", "output_index": 0, "item": {"type": "function_call", "arguments": "{"}},
     [(0, "{")]),
    # a tool's name is what the model wrote, in the item that opens the call
    ({"type": "response.output_item.added", "output_index": 1,
      "item": {"type": "function_call", "name": "f", "arguments": ""}}, [(1, "f")]),
    ({"type": "response.output_item.done", "output_index": True, "item": {"type": "message", "content": "x"}}, []),
    ({"type": "response.completed", "response": {"output": [
        {"type": "message", "content": [{"type": "output_text", "text": "a"}]},
        {"type": "web_search_call"}, {"type": "custom_tool_call", "input": "ls"}]}}, [(0, "a"), (2, "ls")]),
    ({"type": "response.completed", "response": {"output": None}}, []),
]


@pytest.mark.parametrize(("event", "texts"), WHOLE)
def test_whole_texts(event, texts):
    assert whole_texts(event) == texts


@pytest.mark.parametrize(("endpoint", "chunk", "texts"), DELTAS)
def test_delta_text(endpoint, chunk, texts):
    assert delta_text(endpoint, chunk) == texts
