"""What is scored: the text pulled out of OpenAI request and response bodies.

Pure functions over already-decoded JSON. The prompt is taken per `scope`:
    last_user                 the last message whose role is "user" (or any role but the
                              assistant's, system's and tools' ones, in any case)
    conversation              every message as "role: text", lines joined with "\\n",
                              without system/developer messages (vLLM's RAG `documents`
                              first, as "document: text")
    conversation_with_system  the same with them (and the Responses `instructions` first),
                              after the request's tool descriptions as "tools: name: text"

Content is a string or a list of parts whose text parts (`text`, `input_text`,
`output_text`, and `refusal`, `thinking` and `tool_reference` (its `name`) parts, which
vLLM writes into the message as text) are joined with "\\n"; other parts (images, audio,
files) carry no text.
Assistant tool calls' names and arguments are text too: they can carry anything. In a response, a
reasoning model's reasoning (chat `reasoning`/`reasoning_content`, Responses reasoning
items) is scored with the answer: the client receives it too.

The Anthropic Messages API (`messages`) is read the same way: its `system` is the system
message, a user message's `tool_result` blocks are "tool" lines, and an assistant's
`thinking` and `tool_use` input (as JSON) are its text, as are text `document` blocks.

`prompt_text` returns None when the prompt is not scoreable: a `/v1/completions` prompt
given as token ids or as vLLM's `prompt_embeds` alone, a message (chat, Responses input,
a batch's conversation) holding a `prompt_embeds` part, or a Responses request without
`input` or stored-prompt `variables`. None is not "safe": the proxy
passes it to `decide_prompt` as a score of None, which counts as a guard failure, so a
fail-closed policy does not let token ids slip past the guard. A request with no user
message at all has an empty prompt "" (there is nothing a user said).

Shapes the OpenAI API would reject raise `RequestShapeError` with an OpenAI `param`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from policies.errors import RequestShapeError

ENDPOINTS = ("chat/completions", "completions", "responses", "messages")
_SYSTEM_ROLES = ("system", "developer", "tools")  # "tools": the request's tool descriptions
# Roles whose text is not the user's turn. vLLM renders any role string through the chat
# template, so "User", " user" or "human" reach the model as the user's words: every
# other role is read as the user's (`_user_side`).
_NOT_USER = frozenset({"assistant", "model", "system", "developer", "tool", "tools", "function", "ipython",
                       "document"})
_TEXT_PARTS = ("text", "input_text", "output_text")
# Other parts vLLM writes into the message as text, by the field that holds it (a
# `thinking` part in a user's message is read as the user's words)
_FIELD_PARTS = {"refusal": "refusal", "thinking": "thinking", "tool_reference": "name"}
_REASONING_KEYS = ("reasoning", "reasoning_content")
_RESPONSES_TEXT_DELTAS = ("response.output_text.delta", "response.refusal.delta",
                          "response.function_call_arguments.delta", "response.reasoning_text.delta",
                          "response.reasoning_summary_text.delta", "response.custom_tool_call_input.delta",
                          "response.mcp_call_arguments.delta", "response.code_interpreter_call_code.delta")
# Responses output items whose text is the model's own, by the field that holds it
_RESPONSES_TOOL_TEXT = {"function_call": "arguments", "custom_tool_call": "input", "mcp_call": "arguments",
                        "code_interpreter_call": "code"}
_TOOL_OUTPUTS = ("function_call_output", "custom_tool_call_output")
# Responses input items read by their type (`_responses_items`), not as messages
_ITEM_TYPES = frozenset({"reasoning", "item_reference", *_RESPONSES_TOOL_TEXT, *_TOOL_OUTPUTS})
# Responses `.done` events that repeat a part's text whole, by the field that holds it
_RESPONSES_PART_TEXT = {"response.output_text.done": "text", "response.refusal.done": "refusal",
                        "response.reasoning_text.done": "text", "response.reasoning_summary_text.done": "text",
                        "response.function_call_arguments.done": "arguments",
                        "response.custom_tool_call_input.done": "input",
                        "response.mcp_call_arguments.done": "arguments",
                        "response.code_interpreter_call_code.done": "code"}
# Anthropic Messages stream deltas: the field of each delta type that holds new text
_MESSAGES_DELTAS = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def content_text(content: Any, *, param: str) -> str:
    """A message content (None, a string, or a list of parts) as text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not _is_list(content):
        raise RequestShapeError(f"'{param}' must be a string or a list of content parts", param=param)
    texts = []
    for i, part in enumerate(content):
        if isinstance(part, str):  # Responses accepts bare strings in a few SDKs; harmless
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise RequestShapeError(f"'{param}[{i}]' must be an object", param=f"{param}[{i}]")
        if part.get("type") in _TEXT_PARTS or ("type" not in part and "text" in part):
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestShapeError(f"'{param}[{i}].text' must be a string", param=f"{param}[{i}].text")
            texts.append(text)
        elif part.get("type") in _FIELD_PARTS and isinstance(part.get(_FIELD_PARTS[part["type"]]), str):
            texts.append(part[_FIELD_PARTS[part["type"]]])
    return "\n".join(texts)


def _tool_calls_text(message: Mapping, *, param: str) -> list[str]:
    """The names and arguments of a message's tool calls (and its legacy `function_call`):
    both are what the model wrote, since vLLM's tool parsers pass on any name."""
    calls = message.get("tool_calls") or []
    if not _is_list(calls):
        raise RequestShapeError(f"'{param}.tool_calls' must be a list", param=f"{param}.tool_calls")
    functions = [call.get("function") for call in calls if isinstance(call, Mapping)]
    functions.append(message.get("function_call"))
    return [text for function in functions if isinstance(function, Mapping)
            for text in (function.get("name"), function.get("arguments")) if isinstance(text, str) and text]


def _message_text(message: Mapping, *, param: str) -> str:
    """A chat message's text: its `name` (any string the client writes, which templates
    that render a speaker put into the prompt), its reasoning (an assistant's, sent back
    by the client or generated), content and tool calls."""
    name = message.get("name") if isinstance(message.get("name"), str) else ""
    parts = [name, reasoning_text(message), content_text(message.get("content"), param=f"{param}.content")]
    return "\n".join(p for p in parts + _tool_calls_text(message, param=param) if p)


def _embeds_in(content: Any) -> bool:
    """Whether message content holds a `prompt_embeds` part (typed, or known by its key as
    vLLM knows untyped parts): embeddings vLLM splices in where text would be, which
    can stand for any text and which the guard cannot read."""
    return _is_list(content) and any(
        isinstance(part, Mapping) and (part.get("type") == "prompt_embeds"
                                       or ("type" not in part and "prompt_embeds" in part))
        for part in content)


def _user_side(role: str) -> bool:
    return role.strip().lower() not in _NOT_USER


def _user_turn(role: str, text: str) -> str:
    """A user-side turn's text as the model reads it: a role other than a known name is
    text too, which the template writes into the prompt before the content (ChatML:
    `<|im_start|>` + role + "\n" + content), so "user\n<a request>" is read whole."""
    known = role.strip().lower() == "user"
    return text if known else "\n".join(p for p in (role.strip(), text) if p)


def _render(messages: list[tuple[str, str]], scope: str) -> str:
    """last_user → the last user text; conversation scopes → "role: text" lines."""
    if scope == "last_user":
        return next((_user_turn(role, text) for role, text in reversed(messages) if _user_side(role)), "")
    keep_system = scope == "conversation_with_system"
    return "\n".join(
        f"{role}: {text}" for role, text in messages
        if text and (keep_system or role not in _SYSTEM_ROLES)
    )


def conversation_text(turns: Sequence[tuple[str, str]], scope: str) -> str:
    """(role, text) turns as a prompt is rendered under `scope` (`prompt_text`'s form):
    the turns a remembered Responses reply answered (`proxy.retrieval`)."""
    return _render(list(turns), scope)


def _tools(body: Mapping) -> list[tuple[str, str]]:
    """The descriptions of the tools a request offers the model ("name: description" lines;
    chat `tools[].function`, legacy `functions`, Responses `tools[]`): text the model reads
    as it reads a system prompt, and what an untrusted tool server writes. Malformed
    entries are the upstream's to refuse."""
    entries = []
    for key in ("tools", "functions"):
        tools = body.get(key)
        for tool in tools if _is_list(tools) else []:
            if isinstance(tool, Mapping):
                entries.append(tool.get("function") if isinstance(tool.get("function"), Mapping) else tool)
    lines = []
    for tool in entries:
        text = tool.get("description") or tool.get("server_description")  # an MCP server's
        if isinstance(text, str) and text:
            lines.append(f"{tool.get('name') or tool.get('server_label') or 'tool'}: {text}")
    return [("tools", "\n".join(lines))] if lines else []


def _documents(body: Mapping) -> list[tuple[str, str]]:
    """vLLM's `documents` (RAG: a template renders each document's "title" and "text" into
    the prompt): retrieved text, read like a tool's output."""
    documents = body.get("documents")
    out = []
    for document in documents if _is_list(documents) else []:
        if isinstance(document, Mapping):
            text = "\n".join(v for v in document.values() if isinstance(v, str) and v)
            out.append(("document", text))
    return out


def _each_message(body: Mapping, where: str = "messages") -> Iterator[tuple[Mapping, str]]:
    """Each of `body["messages"]` (chat or Anthropic), checked to be an object with a
    string role, with its `param` name (under `where`: one conversation of a batch)."""
    messages = body.get("messages")
    if messages is None:
        raise RequestShapeError("Missing required parameter: 'messages'.", param="messages")
    if not _is_list(messages):
        raise RequestShapeError(f"'{where}' must be a list", param=where)
    for i, message in enumerate(messages):
        param = f"{where}[{i}]"
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise RequestShapeError(f"'{param}' must be an object with a string 'role'", param=param)
        yield message, param


def _chat_messages(body: Mapping, where: str = "messages") -> list[tuple[str, str]]:
    """Each message as (role, text), after the tools it offers where it offers some (vLLM
    takes `tools` on a developer message, which harmony templates render there)."""
    return [entry for message, param in _each_message(body, where)
            for entry in (*_tools(message), (message["role"], _message_text(message, param=param)))]


def _completion_prompt(body: Mapping) -> str | None:
    prompt = body.get("prompt")
    if prompt is None:
        if body.get("prompt_embeds") is not None:
            return None  # vLLM's `prompt_embeds` alone: embeddings, not scoreable
        raise RequestShapeError("Missing required parameter: 'prompt'.", param="prompt")
    suffix = _suffix(body)
    if isinstance(prompt, str):
        return prompt + suffix
    if _is_list(prompt):
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(p + suffix for p in prompt)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt) or all(
            _is_list(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt
        ):
            return None  # token ids: not scoreable (see module docstring)
    raise RequestShapeError("'prompt' must be a string, a list of strings, or token ids", param="prompt")


def _suffix(body: Mapping) -> str:
    """A completions `suffix` (insertion: the text after the completion) as it is read
    with each prompt: the model conditions on it as it does on the prompt."""
    suffix = body.get("suffix")
    if suffix is None or suffix == "":
        return ""
    if not isinstance(suffix, str):
        raise RequestShapeError("'suffix' must be a string", param="suffix")
    return "\n" + suffix


def completion_prompts(body: Mapping) -> list[str | None]:
    """The prompts of a `/completions` request, each completed on its own (a list of
    strings, or of token-id lists, is several: choice i answers prompt i // n): each one's
    text, or None for token ids. vLLM's `prompt_embeds` (one or a list) are prompts too,
    before those of `prompt`, and not scoreable. A request of one prompt has one."""
    embeds = body.get("prompt_embeds")
    embedded = [] if embeds is None else [None] * (len(embeds) if _is_list(embeds) else 1)
    joined = _completion_prompt(body)  # checks the shape
    prompt = body.get("prompt")
    if prompt is None:
        return embedded or [None]
    if _is_list(prompt) and prompt and all(isinstance(p, str) for p in prompt):
        return embedded + [p + _suffix(body) for p in prompt]
    if _is_list(prompt) and prompt and all(_is_list(p) for p in prompt):
        return embedded + [None] * len(prompt)
    return embedded + [joined]


def _responses_items(body: Mapping) -> list[tuple[str, str]] | None:
    items = body.get("input")
    if items is None:
        return None
    if isinstance(items, str):
        return [("user", items)]
    if not _is_list(items):
        raise RequestShapeError("'input' must be a string or a list of items", param="input")
    out = []
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise RequestShapeError(f"'{param}' must be an object", param=param)
        kind = item.get("type", "message")
        # The type decides: servers read a function call's arguments or a tool's output
        # whatever `role` the item also carries (vLLM does), so a role alone does not make
        # it a message. An item of a type not known here that has a role is read as one.
        if kind == "message" or ("role" in item and kind not in _ITEM_TYPES):
            if not isinstance(item.get("role"), str):
                raise RequestShapeError(f"'{param}.role' must be a string", param=f"{param}.role")
            out.append((item["role"], content_text(item.get("content"), param=f"{param}.content")))
        elif kind in _TOOL_OUTPUTS:  # a string, or content parts (`input_text`, images, ...)
            out.append(("tool", content_text(item.get("output"), param=f"{param}.output")))
        else:  # an earlier turn's reasoning or tool call, sent back
            out.append(("assistant", _output_item_text(item)))
    return out


def _prompt_variables(body: Mapping) -> str:
    """The text a Responses request fills a stored prompt template with (`prompt.variables`:
    strings, or content parts such as `input_text`). The template is the developer's,
    stored upstream and unseen here; what fills it is the client's."""
    prompt = body.get("prompt")
    if prompt is None:
        return ""
    if not isinstance(prompt, Mapping):
        raise RequestShapeError("'prompt' must be an object (a stored prompt's id and variables)", param="prompt")
    variables = prompt.get("variables")
    if variables is None:
        return ""
    if not isinstance(variables, Mapping):
        raise RequestShapeError("'prompt.variables' must be an object", param="prompt.variables")
    texts = []
    for name, value in variables.items():
        if isinstance(value, Mapping) and value.get("type") in _TEXT_PARTS:
            value = value.get("text")
            if not isinstance(value, str):
                param = f"prompt.variables.{name}.text"
                raise RequestShapeError(f"'{param}' must be a string", param=param)
        if isinstance(value, str) and value:  # else an image or a file: no text
            texts.append(value)
    return "\n".join(texts)


def _anthropic_system(body: Mapping) -> list[tuple[str, str]]:
    system = body.get("system")
    if system is None:
        return []
    if not isinstance(system, str) and not _is_list(system):
        raise RequestShapeError("'system' must be a string or a list of text blocks", param="system")
    return [("system", block_text(system, param="system")[0])]


def _anthropic_messages(body: Mapping) -> list[tuple[str, str]]:
    """(role, text) per Anthropic message; a user message's tool results come first, as
    "tool" entries (what a tool wrote, not what the user said)."""
    out = []
    for message, param in _each_message(body):
        text, tool_results = block_text(message.get("content"), param=f"{param}.content")
        out += [("tool", t) for t in tool_results]
        if text or not tool_results:  # a message of tool results alone is no turn of its role
            out.append((message["role"], text))
    return out


def _tool_use_text(block: Mapping) -> str:
    """A `tool_use` block's name and its input (as JSON): both are what the model wrote."""
    name = block.get("name") if isinstance(block.get("name"), str) else ""
    return "\n".join(t for t in (name, json.dumps(block["input"], ensure_ascii=False) if block.get("input") else "")
                     if t)


def block_text(content: Any, *, param: str) -> tuple[str, list[str]]:
    """Anthropic content (a string or a list of blocks) as text, and the text of its
    `tool_result` blocks apart. Text, thinking, tool-use input (as JSON) and text
    documents are text; images, redacted thinking and signatures are not."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not _is_list(content):
        raise RequestShapeError(f"'{param}' must be a string or a list of content blocks", param=param)
    texts, results = [], []
    for i, block in enumerate(content):
        where = f"{param}[{i}]"
        if not isinstance(block, Mapping):
            raise RequestShapeError(f"'{where}' must be an object", param=where)
        kind = block.get("type")
        if kind in ("text", "thinking"):
            text = block.get(kind)
            if not isinstance(text, str):
                raise RequestShapeError(f"'{where}.{kind}' must be a string", param=f"{where}.{kind}")
            texts.append(text)
        elif kind in ("tool_use", "server_tool_use"):
            texts.append(_tool_use_text(block))
        elif kind == "tool_result":
            results.append(block_text(block.get("content"), param=f"{where}.content")[0])
        elif kind == "document" and isinstance(block.get("source"), Mapping):
            source = block["source"]
            if source.get("type") == "text" and isinstance(source.get("data"), str):
                texts.append(source["data"])
            elif source.get("type") == "content":
                texts.append(block_text(source.get("content"), param=f"{where}.source.content")[0])
    return "\n".join(t for t in texts if t), results


def responses_turn(body: Mapping) -> list[tuple[str, str]] | None:
    """What a Responses request adds to its conversation, as (role, text): its input items,
    a stored prompt's `variables` in its user turn. Not its `instructions` or tools, which
    a later request that chains from this one (`previous_response_id`) does not inherit.
    None where there is nothing scoreable: no input and no variables (a stored prompt
    alone), or a `prompt_embeds` part."""
    items = _responses_items(body)
    if _is_list(body.get("input")) and any(
            isinstance(item, Mapping) and _embeds_in(item.get("content")) for item in body["input"]):
        return None
    variables = _prompt_variables(body)
    if items is None and not variables:
        return None  # a stored prompt alone, or no input: nothing of the client's to read
    items = items or []
    if variables:  # the client's words in the stored prompt: part of its turn
        if items and items[-1][0] == "user":
            items[-1] = ("user", f"{items[-1][1]}\n{variables}")
        else:
            items.append(("user", variables))
    return items


def prompt_text(endpoint: str, body: Mapping, scope: str, *,
                context: Sequence[tuple[str, str]] = ()) -> str | None:
    """The prompt text to score for `endpoint` ("chat/completions", "completions",
    "responses", "messages"). `context` (Responses only): the turns the request continues
    (`previous_response_id`), as (role, text), read before its input and after its
    `instructions` and tools, as the model reads them."""
    if not isinstance(body, Mapping):
        raise RequestShapeError("the request body must be a JSON object")
    if endpoint == "chat/completions":
        text = _render(_tools(body) + _documents(body) + _chat_messages(body), scope)
        return None if any(_embeds_in(m.get("content")) for m, _ in _each_message(body)) else text
    if endpoint == "completions":
        return _completion_prompt(body)
    if endpoint == "responses":
        turn = responses_turn(body)
        if turn is None:
            return None
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise RequestShapeError("'instructions' must be a string", param="instructions")
        items = [*context, *turn]
        if instructions:
            items = [("system", instructions), *items]
        return _render(_tools(body) + items, scope)
    if endpoint == "messages":
        return _render(_tools(body) + _anthropic_system(body) + _anthropic_messages(body), scope)
    raise ValueError(f"not a guarded endpoint: {endpoint!r} (expected one of {ENDPOINTS})")


def batch_prompt_texts(body: Mapping, scope: str) -> list[str | None]:
    """vLLM's batch chat completions (`chat/completions/batch`): `messages` is a list of
    conversations, each read as one chat request's `messages` (with the request's tools
    and documents, which every conversation shares); None for one holding prompt embeds."""
    if not isinstance(body, Mapping):
        raise RequestShapeError("the request body must be a JSON object")
    conversations = body.get("messages")
    if conversations is None:
        raise RequestShapeError("Missing required parameter: 'messages'.", param="messages")
    if not _is_list(conversations) or not conversations:
        raise RequestShapeError("'messages' must be a non-empty list of conversations (lists of messages)",
                                param="messages")
    shared = _tools(body) + _documents(body)
    texts = []
    for i, conversation in enumerate(conversations):
        where = f"messages[{i}]"
        if not _is_list(conversation) or not conversation:
            raise RequestShapeError(f"'{where}' must be a non-empty list of messages", param=where)
        text = _render(shared + _chat_messages({"messages": conversation}, where), scope)
        texts.append(None if any(_embeds_in(m.get("content")) for m in conversation if isinstance(m, Mapping))
                     else text)
    return texts


def reasoning_text(message: Mapping) -> str:
    """A chat message's or delta's reasoning: `reasoning` (current vLLM, OpenRouter) or
    `reasoning_content` (llama.cpp, DeepSeek's API, older vLLM). A server keeping the old
    name beside the new may send both with the same text; it is read once."""
    texts = [message.get(key) for key in _REASONING_KEYS]
    texts = [t for t in texts if isinstance(t, str)]
    return texts[0] if len(texts) == 2 and texts[0] == texts[1] else "".join(texts)


def response_text_chat(choice: Mapping) -> str:
    """A non-streamed chat choice: reasoning, message content, refusal and tool-call arguments."""
    message = choice.get("message") or {}
    if not isinstance(message, Mapping):
        return ""
    texts = [_message_text(message, param="message")]
    if isinstance(message.get("refusal"), str):
        texts.append(message["refusal"])
    return "\n".join(t for t in texts if t)


def response_text_completion(choice: Mapping) -> str:
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def response_text_responses(body: Mapping) -> str:
    """A non-streamed Responses object: its output messages' text, reasoning items' text and
    summaries, and what the model wrote into tool calls (function and MCP arguments, custom
    tool input, code interpreter code)."""
    texts = [_output_item_text(item) for item in body.get("output") or [] if isinstance(item, Mapping)]
    return "\n".join(t for t in texts if t)


def response_text_messages(body: Mapping) -> str:
    """A non-streamed Anthropic message: its text, thinking and tool-use input blocks."""
    text, _ = block_text(body.get("content"), param="content")
    return text


def _output_item_text(item: Mapping) -> str:
    """The text of a Responses output item other than a message (a reasoning item's summary
    and content, a tool item's model-written field), or a message's content."""
    kind = item.get("type")
    if kind == "reasoning":
        parts = [*_list_or_empty(item.get("summary")), *_list_or_empty(item.get("content"))]
        return "\n".join(p["text"] for p in parts if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    if kind == "message":
        return content_text(item.get("content"), param="output.content")
    return "\n".join(_tool_item_texts(item))


def _tool_item_texts(item: Mapping) -> list[str]:
    """What the model wrote into a Responses tool item: its name (any string a tool parser
    passed on) and its model-written field."""
    kind = item.get("type")
    field = _RESPONSES_TOOL_TEXT.get(kind) if isinstance(kind, str) else None
    if field is None:
        return []
    return [item[key] for key in ("name", field) if isinstance(item.get(key), str) and item[key]]


def _list_or_empty(value: Any) -> list:
    return value if _is_list(value) else []


def _opening_blocks(content: Any) -> str | None:
    """The text of content blocks a Messages stream's `message_start` already holds; an
    unreadable list is scored as its JSON (its text is the client's to read all the same)."""
    if not content:
        return None
    try:
        return block_text(content, param="message.content")[0]
    except RequestShapeError:
        return json.dumps(content, ensure_ascii=False)


def whole_texts(event: Mapping) -> list[tuple[int, str]]:
    """The text a Responses stream event carries whole rather than as a delta, by output
    index: an output item (`output_item.added`, `.done`), a part (`content_part.*`,
    `reasoning_summary_part.*`), a part's finished text (`output_text.done` ...), or a
    response's output (`response.created` ... `response.completed`). A server that
    streams repeats its deltas here; one that does not sends the text here alone, and
    the client's SDK shows it all the same."""
    if isinstance(event.get("response"), Mapping):
        output = event["response"].get("output")
        return [(i, text) for i, item in enumerate(_list_or_empty(output)) if isinstance(item, Mapping)
                for text in _item_texts(item)]
    index, kind = event.get("output_index"), event.get("type")
    if not isinstance(index, int) or isinstance(index, bool):
        return []
    if isinstance(event.get("item"), Mapping):
        texts = _item_texts(event["item"])
    elif isinstance(event.get("part"), Mapping):
        texts = _part_texts(event["part"])
    elif kind in _RESPONSES_PART_TEXT:
        texts = [event.get(_RESPONSES_PART_TEXT[kind])]
    else:
        return []
    return [(index, text) for text in texts if isinstance(text, str) and text]


def _part_texts(part: Any) -> list[str]:
    if isinstance(part, str):
        return [part]
    if not isinstance(part, Mapping):
        return []
    return [part[key] for key in ("text", "refusal") if isinstance(part.get(key), str)]


def _item_texts(item: Mapping) -> list[str]:
    """Each text of a Responses output item: a message's parts, a reasoning item's summary
    and content parts, a tool item's model-written field."""
    kind = item.get("type")
    if kind == "reasoning":
        return [t for p in [*_list_or_empty(item.get("summary")), *_list_or_empty(item.get("content"))]
                for t in _part_texts(p)]
    if kind == "message":
        content = item.get("content")
        return _part_texts(content) if isinstance(content, str) else \
            [t for p in _list_or_empty(content) for t in _part_texts(p)]
    return _tool_item_texts(item)


def delta_text(endpoint: str, chunk: Mapping) -> dict[int, str]:
    """New text per choice index in one streamed chunk (Responses: one event, index 0).

    Chat: `delta.reasoning` (or `reasoning_content`), `delta.content`, `delta.refusal` and
    tool-call (and legacy `function_call`) names and argument fragments. Completions: `text`.
    Responses: the output text, refusal, reasoning text and summary, function-call and MCP
    argument, custom tool input and code interpreter code delta events (the text its other
    events carry whole is `whole_texts`'). Messages (Anthropic, one event, index 0): text,
    thinking and tool-input JSON deltas, and what a block or the message opens with.
    Anything else carries no text. A reasoning model's thinking streams to the client like its
    answer, so it is scored like its answer.
    """
    if endpoint == "responses":
        if chunk.get("type") in _RESPONSES_TEXT_DELTAS and isinstance(chunk.get("delta"), str):
            return {0: chunk["delta"]}
        return {}
    if endpoint == "messages":
        if chunk.get("type") == "content_block_delta" and isinstance(chunk.get("delta"), Mapping):
            part = chunk["delta"]
            text = part.get(_MESSAGES_DELTAS.get(part.get("type"), ""))
        elif chunk.get("type") == "content_block_start" and isinstance(chunk.get("content_block"), Mapping):
            # A text or thinking block may open with text, and a tool-use block with its
            # input whole (Anthropic's opens with `{}` and streams it; not every server does)
            part = chunk["content_block"]
            if part.get("type") in ("text", "thinking"):
                text = part.get(part["type"])
            elif part.get("type") in ("tool_use", "server_tool_use"):
                text = _tool_use_text(part)
            else:
                text = None
        elif chunk.get("type") == "message_start" and isinstance(chunk.get("message"), Mapping):
            text = _opening_blocks(chunk["message"].get("content"))  # Anthropic's opens with none
        else:
            text = None
        return {0: text} if isinstance(text, str) and text else {}
    out: dict[int, str] = {}
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, Mapping) or not isinstance(choice.get("index", 0), int):
            continue
        if endpoint == "completions":
            text = response_text_completion(choice)
        else:
            delta = choice.get("delta") or {}
            if not isinstance(delta, Mapping):
                continue
            calls = [call.get("function") for call in _list_or_empty(delta.get("tool_calls"))
                     if isinstance(call, Mapping)]
            calls.append(delta.get("function_call"))  # the legacy `functions` API's one call
            pieces = [reasoning_text(delta), delta.get("content"), delta.get("refusal"),
                      *(piece for f in calls if isinstance(f, Mapping) for piece in (f.get("name"), f.get("arguments")))]
            text = "".join(p for p in pieces if isinstance(p, str))
        if text:
            index = choice.get("index", 0)
            out[index] = out.get(index, "") + text
    return out
