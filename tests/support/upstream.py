"""A scripted OpenAI-compatible upstream for what llm-katan does not do.

llm-katan (the default real peer) serves chat completions and models only, and injects
faults before the stream starts. This upstream adds: `/v1/embeddings`,
`/v1/completions`, `/v1/responses`, byte-exact replays of recorded vLLM streams, and
faults inside a stream (a connection cut mid-body, malformed bytes, a stall). It
records how each stream ended, so tests can assert that the proxy closed it.

Behaviour is chosen per request by the `x-script` header:
    replay:<file>        send tests/proxy/fixtures/vllm-0.32-cpu/<file> as an SSE body
                         (chat; `/v1/completions` and `/v1/responses` take it too)
    reset-after:<n>      send n chat chunks, then drop the connection mid-body
    garbage-after:<n>    send n chat chunks, then bytes that are not SSE
    stall-after:<n>      send n chat chunks, then wait (until the client goes away)
    text:<words>         stream (or return) a chat completion whose content is <words>;
                         non-streamed with n > 1, `a|b|c` gives choice i the i-th part
    slowtext:<words>     the same, 10 ms between chunks, as a model generating them
    slowecho:            slowtext of the last user message (plain text content), word by word
    endless:<words>      <words> over and over, 10 ms a chunk, for up to 60 s (a model
                         that would go on generating until it is stopped)
    flood:<kb>           chunks of <kb> KiB of words as fast as they are taken, up to 1 GiB
                         (a stream that fills every buffer between it and a client that
                         does not read)
    think:<r>|<words>    a reasoning model (chat and Responses): the reasoning <r>, then the
                         answer <words>; chat sends the reasoning as `delta.reasoning`
                         (vLLM's field), or in the fields the `x-reasoning-field` header names
                         (comma-separated: a server that sends both)

Non-streamed chat (`text:`) and completion replies carry each word's log-probability and
vLLM's `token_ids` when the request asks for them (`logprobs`, `return_token_ids`), as
vLLM's do: text of their own that a refusal must not leave behind.

Responses streams carry each output item's whole event sequence (added, deltas, `.done`).
Each response has an id of its own (`resp_<n>`), kept with its stream's events unless the
request says `store: false`; a request whose `previous_response_id` names no kept response
gets the 404 OpenAI and vLLM answer, `previous_response_not_found`. `background: true`
(not streamed) is answered "queued" (the response is done at once, and kept). A kept
response is served back as vLLM serves it: `GET /v1/responses/{id}` whole, or its events
again with `?stream=true` (after `starting_after`, if given); `POST .../cancel` whole, as
"cancelled"; `x-script: status:<status>|<words>` on a GET answers it still being
generated, with <words> so far; an id never kept is a 404.

`/completions` (no `/v1`: llama.cpp's own completion format, as its server serves there)
streams `text:<words>` as llama.cpp does, or returns it whole.

`/v1/chat/completions/batch` (vLLM's batch chat) answers conversation i with the i-th
part of `text:a|b|c`, or echoes its last user message; `raw:<body>` sends <body> whole,
`error:<status>` a vLLM error with that status.

`/v1/responses` takes `text:<words>`, `think:<r>|<words>`, `replay:<file>` and
`reset-after:<n>` (streamed: n output text deltas, then the connection drops).

`/v1/messages` (the Anthropic Messages API, in vLLM's event order) takes `text:<words>`,
`think:<r>|<words>` (a thinking block, then the text), `tool:<json>` (a text block "Let
me check.", then a `tool_use` block whose input JSON streams in pieces),
`reset-after:<n>` (n text deltas, then the connection drops), `endless:<words>` (a
text block of <words> over and over, 10 ms a delta, for up to 60 s) and `replay:<file>`
(a recorded vLLM stream, as chat's `replay:`).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

FIXTURES = Path(__file__).resolve().parent.parent / "proxy" / "fixtures" / "vllm-0.32-cpu"


def chat_chunk(content: str | None = None, *, finish: str | None = None, role: bool = False,
               field: str = "content", completion_id: str = "chatcmpl-test") -> bytes:
    delta = {"role": "assistant", "content": ""} if role else (
        {f: content for f in field.split(",")} if content else {})
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": 1, "model": "smollm2",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class Recorder:
    def __init__(self) -> None:
        self.streams: list[str] = []  # "complete" or "closed-early", one per stream
        self.requests: list[dict] = []
        # The Responses kept (`store` not false), by id: the finished response and its stream's events
        self.stored: dict[str, tuple[dict, list[bytes]]] = {}
        # The chat completions kept (`store: true`, `text:` scripts), by id, as OpenAI keeps them
        self.chats: dict[str, dict] = {}
        # The Conversations API's conversations: their items, in order, by conversation id
        self.conversations: dict[str, list[dict]] = {}


def build_upstream(recorder: Recorder) -> Starlette:
    async def received(request: Request) -> dict:
        """The request's JSON body, recorded with its headers, path and query."""
        payload = await request.json()
        recorder.requests.append({"headers": dict(request.headers), "body": payload,
                                  "path": request.url.path, "query": request.url.query})
        return payload

    async def streamed(chunks, tail=None, delay: float = 0.0) -> StreamingResponse:
        async def body():
            finished = False
            try:
                for chunk in chunks:
                    yield chunk
                    await asyncio.sleep(delay)
                if tail is not None:
                    async for chunk in tail():
                        yield chunk
                finished = True
            finally:
                recorder.streams.append("complete" if finished else "closed-early")
        return StreamingResponse(body(), media_type="text/event-stream")

    def token_fields(payload: dict, text: str, *, chat: bool) -> dict:
        """`logprobs` and `token_ids` of a whole reply, one "token" a word, if asked for."""
        words = [w + " " for w in text.split(" ")]
        fields = {"logprobs": None}
        if chat and payload.get("logprobs") is True:
            fields["logprobs"] = {"content": [{"token": w, "logprob": -0.5, "bytes": list(w.encode()),
                                               "top_logprobs": []} for w in words]}
        elif not chat and isinstance(payload.get("logprobs"), int):
            fields["logprobs"] = {"tokens": words, "token_logprobs": [-0.5] * len(words),
                                  "top_logprobs": [{w: -0.5} for w in words],
                                  "text_offset": [sum(map(len, words[:i])) for i in range(len(words))]}
        if payload.get("return_token_ids") is True:
            fields["token_ids"] = [len(w) for w in words]
        return fields

    async def chat(request: Request) -> Response:
        payload = await received(request)
        script = request.headers.get("x-script", "text:hello from the scripted upstream")
        kind, _, arg = script.partition(":")
        if kind == "slowecho":  # the last user message's words (a header cannot carry every character)
            kind, arg = "slowtext", next(m["content"] for m in reversed(payload["messages"]) if m["role"] == "user")
        if kind == "replay":
            raw = (FIXTURES / arg).read_bytes()
            # Odd-sized pieces, so events arrive split across reads.
            return await streamed([raw[i:i + 37] for i in range(0, len(raw), 37)])
        if kind == "endless":
            words = arg.split(" ")

            async def forever():
                for i in range(6000):
                    await asyncio.sleep(0.01)
                    yield chat_chunk(words[i % len(words)] + " ")
            return await streamed([chat_chunk(role=True)], forever)
        if kind == "flood":
            piece = chat_chunk("xxx " * (int(arg) << 8))

            async def flood():
                for _ in range((1 << 20) // int(arg)):
                    await asyncio.sleep(0)  # where the client's disconnect cancels it
                    yield piece
            return await streamed([chat_chunk(role=True)], flood)
        if kind == "think":
            reasoning, _, answer = arg.partition("|")
            field = request.headers.get("x-reasoning-field", "reasoning")
            if not payload.get("stream"):
                return JSONResponse({
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": "smollm2",
                    "choices": [{"index": i, "message": {"role": "assistant", **dict.fromkeys(field.split(","), reasoning),
                                                     "content": answer},
                                 "finish_reason": "stop"} for i in range(payload.get("n") or 1)],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}})
            chunks = [chat_chunk(role=True)] + [chat_chunk(w + " ", field=field) for w in reasoning.split(" ")]
            chunks += [chat_chunk(w + " ") for w in answer.split(" ")]
            return await streamed(chunks + [chat_chunk(finish="stop"), b"data: [DONE]\n\n"])
        if kind in ("text", "slowtext"):
            words = arg.split(" ")
            parts = arg.split("|")
            n = payload.get("n") or 1
            completion_id = f"chatcmpl-kept{len(recorder.chats)}" if payload.get("store") is True else "chatcmpl-test"
            completion = {
                "id": completion_id, "object": "chat.completion", "created": 1, "model": "smollm2",
                "choices": [{"index": i, "message": {"role": "assistant", "content": parts[i % len(parts)]},
                             "finish_reason": "stop", **token_fields(payload, parts[i % len(parts)], chat=True)}
                            for i in range(n)],
                "usage": {"prompt_tokens": 3, "completion_tokens": n * len(words), "total_tokens": 3 + n * len(words)}}
            if payload.get("store") is True:  # kept whole, however much of a stream its client reads
                recorder.chats[completion_id] = {**completion, "metadata": payload.get("metadata") or {}}
            if not payload.get("stream"):
                return JSONResponse(completion)
            chunks = [chat_chunk(role=True, completion_id=completion_id)]
            chunks += [chat_chunk(w + " ", completion_id=completion_id) for w in words]
            return await streamed(chunks + [chat_chunk(finish="stop", completion_id=completion_id),
                                            b"data: [DONE]\n\n"], delay=0.01 if kind == "slowtext" else 0.0)
        count = int(arg or 3)
        head = [chat_chunk(role=True)] + [chat_chunk(f"tok{i} ") for i in range(count)]
        if kind == "reset-after":
            async def boom():
                raise ConnectionResetError("scripted reset")
                yield b""  # pragma: no cover - makes this an async generator
            return await streamed(head, boom)
        if kind == "garbage-after":
            async def garbage():
                yield b"\xff\xfe not an event \x00" * 3 + b"\n\n"
                yield b"data: {not json\n\n"
                yield b"data: [DONE]\n\n"
            return await streamed(head, garbage)
        if kind == "stall-after":
            async def stall():
                await asyncio.sleep(3600)
                yield b""
            return await streamed(head, stall)
        return JSONResponse({"error": {"message": f"unknown script {script}", "type": "test"}}, 400)

    async def embeddings(request: Request) -> Response:
        payload = await request.json()
        inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [float(len(str(t))), 0.5, -0.5]}
                for i, t in enumerate(inputs)]
        return JSONResponse({"object": "list", "data": data, "model": payload.get("model", "m"),
                             "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})

    async def completions(request: Request) -> Response:
        """`text:<words>` for each choice; with several prompts (a list, and vLLM's
        `prompt_embeds` before it) or n > 1, as vLLM does, choice i answers prompt i // n,
        and `text:a|b` gives choice i the i-th part.
        A stream sends the choices' words in turns; `replay:<file>` sends a recorded one."""
        payload = await received(request)
        if request.headers.get("x-script", "").startswith("replay:"):
            raw = (FIXTURES / request.headers["x-script"][len("replay:"):]).read_bytes()
            return await streamed([raw[i:i + 37] for i in range(0, len(raw), 37)])
        parts = request.headers.get("x-script", "text: and then some")[len("text:"):].split("|")
        prompt, embeds = payload.get("prompt"), payload.get("prompt_embeds")
        prompts = (len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else
                   int(prompt is not None)) + (len(embeds) if isinstance(embeds, list) else int(embeds is not None))
        texts = [parts[i % len(parts)] for i in range(prompts * (payload.get("n") or 1))]
        if not payload.get("stream"):
            return JSONResponse({"id": "cmpl-test", "object": "text_completion", "created": 1,
                                 "model": "smollm2",
                                 "choices": [{"index": i, "text": text, "finish_reason": "stop",
                                              **token_fields(payload, text, chat=False)}
                                             for i, text in enumerate(texts)],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        words = [text.split(" ") for text in texts]
        chunks = [b"data: " + json.dumps({"id": "cmpl-test", "object": "text_completion", "created": 1,
                                          "model": "smollm2",
                                          "choices": [{"index": i, "text": choice[k] + " ", "finish_reason": None,
                                                       "logprobs": None}]}).encode() + b"\n\n"
                  for k in range(max(map(len, words))) for i, choice in enumerate(words) if k < len(choice)]
        return await streamed(chunks + [b"data: [DONE]\n\n"])

    async def llamacpp_completion(request: Request) -> Response:
        """llama.cpp's own completion format, which its server speaks at `/completion` and
        `/completions` (its OpenAI one is `/v1/completions`): `content`, no `choices`, and a
        stream of such objects that ends with `"stop": true` and no `[DONE]`."""
        payload = await received(request)
        words = request.headers.get("x-script", "text:native words")[len("text:"):].split(" ")
        if not payload.get("stream"):
            return JSONResponse({"index": 0, "content": " ".join(words), "id_slot": 0, "stop": True,
                                 "tokens_predicted": len(words), "stop_type": "eos"})
        chunks = [b"data: " + json.dumps({"index": 0, "content": w + " ", "tokens": [], "stop": False,
                                          "id_slot": 0}).encode() + b"\n\n" for w in words]
        final = {"index": 0, "content": "", "tokens": [], "stop": True, "id_slot": 0, "stop_type": "eos"}
        return await streamed(chunks + [b"data: " + json.dumps(final).encode() + b"\n\n"])

    async def responses(request: Request) -> Response:
        payload = await received(request)
        previous = payload.get("previous_response_id")
        if previous is not None and previous not in recorder.stored:
            return JSONResponse({"error": {"message": f"Previous response with id '{previous}' not found.",
                                           "type": "invalid_request_error", "param": "previous_response_id",
                                           "code": "previous_response_not_found"}}, 404)
        response_id = f"resp_{len(recorder.requests)}"
        conversation = payload.get("conversation")
        conversation = conversation.get("id") if isinstance(conversation, dict) else conversation
        if conversation is not None and conversation not in recorder.conversations:
            return JSONResponse({"error": {"message": f"Conversation with id '{conversation}' not found.",
                                           "type": "invalid_request_error", "param": "conversation",
                                           "code": None}}, 404)
        kind, _, arg = request.headers.get("x-script", "text:a plain answer").partition(":")
        if kind == "replay":
            raw = (FIXTURES / arg).read_bytes()
            return await streamed([raw[i:i + 37] for i in range(0, len(raw), 37)])
        reasoning, _, text = arg.partition("|") if kind == "think" else ("", "", arg)
        if kind == "reset-after":
            text = " ".join(f"tok{i}" for i in range(int(arg)))
        items = [("message", "msg_1", "output_text", text)]
        if kind == "think":
            items.insert(0, ("reasoning", "rs_1", "reasoning_text", reasoning))
        output = []
        for item_type, item_id, part_type, item_text in items:
            part = {"type": part_type, "text": item_text}
            if item_type == "message":
                output.append({"id": item_id, "type": "message", "role": "assistant", "status": "completed",
                               "content": [{**part, "annotations": []}]})
            else:
                output.append({"id": item_id, "type": "reasoning", "summary": [], "content": [part],
                               "status": "completed"})
        final = {"id": response_id, "object": "response", "created_at": int(time.time()), "status": "completed",
                 "model": payload.get("model", "smollm2"), "output": output}
        chunks = response_events(final, items)
        if conversation is not None:  # its input and output join the conversation, whole, as OpenAI keeps them
            turn = payload.get("input")
            turn = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": turn}]}] \
                if isinstance(turn, str) else list(turn or [])
            kept = recorder.conversations[conversation]
            kept += [{**item, "id": f"msg_{conversation}_{len(kept) + i}"} for i, item in enumerate(turn)]
            kept += [{**item, "id": f"{item['id']}_{response_id}"} for item in output]
        if payload.get("store") is not False:
            recorder.stored[response_id] = (final, chunks)
        if payload.get("background") is True and not payload.get("stream"):  # done at once, read back later
            return JSONResponse({**final, "status": "queued", "output": []})
        if not payload.get("stream"):
            return JSONResponse(final)
        if kind == "reset-after":  # response.created, the item and its part opened, n deltas: then the drop
            async def boom():
                raise ConnectionResetError("scripted reset")
                yield b""  # pragma: no cover - makes this an async generator
            return await streamed(chunks[:3 + int(arg)], boom)
        return await streamed(chunks)

    def response_events(final: dict, items: list) -> list[bytes]:
        """A Responses stream of `final`, whose output items are `items`."""
        output = final["output"]
        sequence = iter(range(10_000))

        def event(name: str, data: dict) -> bytes:
            body = {"type": name, **data, "sequence_number": next(sequence)}
            return f"event: {name}\ndata: {json.dumps(body)}\n\n".encode()
        started = {**final, "status": "in_progress", "output": []}
        chunks = [event("response.created", {"response": started})]
        for position, ((_, item_id, part_type, item_text), item) in enumerate(zip(items, output)):
            where = {"item_id": item_id, "output_index": position, "content_index": 0}
            part = item["content"][0]
            added = {**item, "status": "in_progress", "content": []}
            chunks.append(event("response.output_item.added", {"output_index": position, "item": added}))
            chunks.append(event("response.content_part.added", {**where, "part": {**part, "text": ""}}))
            words = item_text.split(" ")
            for i, word in enumerate(words):
                chunks.append(event(f"response.{part_type}.delta", {
                    **where, "delta": word + (" " if i < len(words) - 1 else ""), "logprobs": []}))
            chunks.append(event(f"response.{part_type}.done", {**where, "text": item_text, "logprobs": []}))
            chunks.append(event("response.content_part.done", {**where, "part": part}))
            chunks.append(event("response.output_item.done", {"output_index": position, "item": item}))
        chunks.append(event("response.completed", {"response": final}))
        return chunks

    async def stored_response(request: Request) -> Response:
        """`GET /v1/responses/{id}` (`?stream=true`: its events again, after `starting_after`)
        and `POST /v1/responses/{id}/cancel`, as vLLM serves them."""
        recorder.requests.append({"headers": dict(request.headers), "body": None, "path": request.url.path,
                                  "query": request.url.query})
        response_id = request.path_params["response_id"]
        if response_id not in recorder.stored:
            return JSONResponse({"error": {"message": f"Response with id '{response_id}' not found.",
                                           "type": "invalid_request_error", "param": "response_id"}}, 404)
        final, chunks = recorder.stored[response_id]
        if request.method == "POST":
            return JSONResponse({**final, "status": "cancelled"})
        kind, _, arg = request.headers.get("x-script", "").partition(":")
        if kind == "status":  # still being generated: `status:in_progress|<words so far>`
            status, _, text = arg.partition("|")
            part = {"type": "output_text", "text": text, "annotations": []}
            return JSONResponse({**final, "status": status, "output": [{
                "id": "msg_1", "type": "message", "role": "assistant", "status": status, "content": [part]}]})
        if request.query_params.get("stream") == "true":
            after = int(request.query_params.get("starting_after", -1))
            return await streamed(chunks[after + 1:])
        return JSONResponse(final)

    async def messages(request: Request) -> Response:
        payload = await received(request)
        kind, _, arg = request.headers.get("x-script", "text:a plain answer").partition(":")
        if kind == "replay":
            raw = (FIXTURES / arg).read_bytes()
            return await streamed([raw[i:i + 37] for i in range(0, len(raw), 37)])
        if kind == "think":
            reasoning, _, answer = arg.partition("|")
            blocks = [("thinking", reasoning), ("text", answer)]
        elif kind == "tool":
            blocks = [("text", "Let me check."), ("tool_use", arg)]
        elif kind == "reset-after":
            blocks = [("text", " ".join(f"tok{i}" for i in range(int(arg))))]
        else:
            blocks = [("text", arg)]
        content = [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": json.loads(text)}
                   if block == "tool_use" else {"type": block, block: text, **({"signature": ""} if block == "thinking" else {})}
                   for block, text in blocks]
        stop = "tool_use" if kind == "tool" else "end_turn"
        final = {"id": "msg_1", "type": "message", "role": "assistant", "model": payload.get("model", "smollm2"),
                 "content": content, "stop_reason": stop, "stop_sequence": None,
                 "usage": {"input_tokens": 5, "output_tokens": 9}}
        if not payload.get("stream"):
            return JSONResponse(final)

        def event(data: dict) -> bytes:
            return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()
        chunks = [event({"type": "message_start", "message": {**final, "content": [], "stop_reason": None,
                                                              "usage": {"input_tokens": 5, "output_tokens": 0}}})]
        for index, (block_kind, text) in enumerate(blocks):
            opened = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}} \
                if block_kind == "tool_use" else {"type": block_kind, block_kind: ""}
            chunks.append(event({"type": "content_block_start", "index": index, "content_block": opened}))
            pieces = [text[i:i + 6] for i in range(0, len(text), 6)] if block_kind == "tool_use" else \
                [w + (" " if i < len(text.split(" ")) - 1 else "") for i, w in enumerate(text.split(" "))]
            delta_type, field = {"text": ("text_delta", "text"), "thinking": ("thinking_delta", "thinking"),
                                 "tool_use": ("input_json_delta", "partial_json")}[block_kind]
            for piece in pieces:
                chunks.append(event({"type": "content_block_delta", "index": index,
                                     "delta": {"type": delta_type, field: piece}}))
            if kind == "endless":
                async def forever():
                    for i in range(6000):
                        await asyncio.sleep(0.01)
                        yield event({"type": "content_block_delta", "index": index,
                                     "delta": {"type": "text_delta", "text": pieces[i % len(pieces)] + " "}})
                return await streamed(chunks, forever)
            if kind == "reset-after":
                async def boom():
                    raise ConnectionResetError("scripted reset")
                    yield b""  # pragma: no cover - makes this an async generator
                return await streamed(chunks, boom)
            chunks.append(event({"type": "content_block_stop", "index": index}))
        chunks.append(event({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                             "usage": {"output_tokens": 9}}))
        chunks.append(event({"type": "message_stop"}))
        return await streamed(chunks)

    async def batch_chat(request: Request) -> Response:
        """vLLM's batch chat completions (never streamed, as vLLM's is not)."""
        payload = await received(request)
        kind, _, arg = request.headers.get("x-script", "echo").partition(":")
        if kind == "raw":
            return Response(arg, media_type="application/json")
        if kind == "error":
            return JSONResponse({"object": "error", "message": "scripted upstream error", "type": "BadRequestError",
                                 "param": None, "code": int(arg)}, status_code=int(arg))
        replies = []
        for i, conversation in enumerate(payload["messages"]):
            last = next(m["content"] for m in reversed(conversation) if m["role"] == "user")
            parts = arg.split("|")
            replies.append(parts[i % len(parts)] if kind == "text" else f"echo: {last}")
        return JSONResponse({
            "id": "chatcmpl-batch", "object": "chat.completion", "created": 1, "model": "smollm2",
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         **token_fields(payload, text, chat=True)} for i, text in enumerate(replies)],
            "usage": {"prompt_tokens": 5 * len(replies), "completion_tokens": 2 * len(replies),
                      "total_tokens": 7 * len(replies)}})

    async def stored_chat(request: Request) -> Response:
        """OpenAI's stored chat completions: one read (`GET`), updated (`POST` of `metadata`)
        or deleted, or the list of them (`x-script: raw:<body>` answers <body> instead)."""
        kind, _, arg = request.headers.get("x-script", "").partition(":")
        if kind == "raw":
            return Response(arg, media_type="application/json")
        completion_id = request.path_params.get("completion_id")
        if completion_id is None:
            data = list(recorder.chats.values())
            return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                 "last_id": data[-1]["id"] if data else None, "has_more": False})
        if completion_id not in recorder.chats:
            return JSONResponse({"error": {"message": f"No chat completion found with id '{completion_id}'.",
                                           "type": "invalid_request_error", "param": None, "code": None}}, 404)
        if request.method == "DELETE":
            del recorder.chats[completion_id]
            return JSONResponse({"object": "chat.completion.deleted", "id": completion_id, "deleted": True})
        if request.method == "POST":
            recorder.chats[completion_id]["metadata"] = (await request.json()).get("metadata") or {}
        return JSONResponse(recorder.chats[completion_id])

    async def conversations(request: Request) -> Response:
        """The Conversations API: `POST conversations` (with `items`), `POST .../items` (the
        client's own), `GET .../items[/{item_id}]` (a list, or one); `x-script: raw:<body>`
        answers a GET with <body> instead."""
        kind, _, arg = request.headers.get("x-script", "").partition(":")
        if request.method == "GET" and kind == "raw":
            return Response(arg, media_type="application/json")
        conversation = request.path_params.get("conversation_id")
        if conversation is None:  # created
            conversation = f"conv_{len(recorder.conversations)}"
            recorder.conversations[conversation] = []
        elif conversation not in recorder.conversations:
            return JSONResponse({"error": {"message": f"Conversation with id '{conversation}' not found.",
                                           "type": "invalid_request_error", "param": None, "code": None}}, 404)
        kept = recorder.conversations[conversation]
        if request.method == "POST":
            added = [{**item, "id": f"msg_{conversation}_{len(kept) + i}"}
                     for i, item in enumerate((await request.json()).get("items") or [])]
            kept += added
            if "items" in request.url.path:
                return JSONResponse({"object": "list", "data": added, "has_more": False,
                                     "first_id": added[0]["id"] if added else None,
                                     "last_id": added[-1]["id"] if added else None})
            return JSONResponse({"id": conversation, "object": "conversation", "created_at": 1, "metadata": {}})
        item_id = request.path_params.get("item_id")
        if item_id is None:  # a page: `order` (asc, OpenAI's default desc), `limit` (20), `after` (an id)
            recorder.requests.append({"headers": dict(request.headers), "body": None, "path": request.url.path,
                                      "query": request.url.query})
            order = kept if request.query_params.get("order") == "asc" else kept[::-1]
            after = request.query_params.get("after")
            start = next((i + 1 for i, item in enumerate(order) if item["id"] == after), 0) if after else 0
            page = order[start:start + int(request.query_params.get("limit", "20"))]
            return JSONResponse({"object": "list", "data": page, "has_more": start + len(page) < len(order),
                                 "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None})
        item = next((item for item in kept if item["id"] == item_id), None)
        if item is None:
            return JSONResponse({"error": {"message": f"Item with id '{item_id}' not found.",
                                           "type": "invalid_request_error", "param": None, "code": None}}, 404)
        return JSONResponse(item)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "smollm2", "object": "model",
                                                          "created": 1, "owned_by": "test"}]})

    async def echo_request(request: Request) -> Response:
        body = await request.body()
        if request.url.path == "/v1/set-cookie":
            return JSONResponse({}, headers={"set-cookie": "upstream-session=secret; Path=/"})
        return JSONResponse({"method": request.method, "path": request.url.path,
                             "query": request.url.query, "headers": dict(request.headers),
                             "body": body.decode("latin-1")})

    # CORS as vLLM's server answers it when started with `--allowed-origins '["*"]'` (through
    # Starlette's CORSMiddleware): preflights itself, and `Access-Control-Allow-Origin: *`
    return Starlette(middleware=[Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"],
                                            allow_headers=["*"])], routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/chat/completions/batch", batch_chat, methods=["POST"]),
        Route("/v1/chat/completions", stored_chat, methods=["GET"]),
        Route("/v1/chat/completions/{completion_id}", stored_chat, methods=["GET", "POST", "DELETE"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/responses/{response_id}", stored_response, methods=["GET"]),
        Route("/v1/responses/{response_id}/cancel", stored_response, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/conversations", conversations, methods=["POST"]),
        Route("/v1/conversations/{conversation_id}/items", conversations, methods=["GET", "POST"]),
        Route("/v1/conversations/{conversation_id}/items/{item_id}", conversations, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/completions", llamacpp_completion, methods=["POST"]),
        Route("/v1/{path:path}", echo_request, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ])
