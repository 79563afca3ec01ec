"""Which endpoints are guarded, and the ones that generate text the guard cannot read."""

from __future__ import annotations

import json

import httpx
import pytest

from proxy.endpoints import guarded_endpoint, segments, unread_endpoint
from proxy.stream_guard import readable
from tests.proxy.rawhttp import exchange
from tests.support.clients import close_sdk_clients, sdk  # noqa: F401 - close_sdk_clients is autouse
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer

from .test_guarded import CUT, REFUSAL, policy_yaml, user


@pytest.mark.parametrize(("method", "url", "endpoint"), [
    ("POST", "http://h/v1/chat/completions", "chat/completions"),
    ("POST", "http://h/v1/chat/completions/", "chat/completions"),
    ("POST", "http://h/chat/completions?x=1", "chat/completions"),
    ("POST", "http://h/openai/deployments/d/chat/completions", "chat/completions"),
    ("POST", "http://h/v1/completions", "completions"),
    ("POST", "http://h/v1/responses", "responses"),
    ("POST", "http://h/v1/messages", "messages"),
    ("POST", "http://h/anthropic/v1/messages", "messages"),
    ("POST", "http://h/v1/messages/count_tokens", None),
    ("POST", "http://h/v1/threads/t1/messages", None),
    ("GET", "http://h/v1/chat/completions", None),
    ("POST", "http://h/v1/chat/completions/batch", "chat/completions/batch"),  # vLLM's (proxy.batch)
    ("POST", "http://h/v1/chat/completions/render", None),
    ("POST", "http://h/v1/responses/resp_1/cancel", None),
    ("POST", "http://h/v1/embeddings", None),
    ("POST", "http://h/completions-like", None),
    ("POST", "http://h/v1/chat/%63ompletions", "chat/completions"),  # as an upstream that decodes reads it
    ("POST", "http://h/v1/m%65ssages", "messages"),
    ("POST", "http://h/v1/chat/completions/%62atch", "chat/completions/batch"),
])
def test_guarded_endpoints_are_known_by_their_last_segments(method, url, endpoint):
    assert guarded_endpoint(method, url) == endpoint


@pytest.mark.parametrize(("method", "url", "stage"), [
    ("POST", "http://h/v1/systemone", "prompt"),
    ("POST", "http://h/v1/batches", "prompt"),
    ("POST", "http://h/completion", "prompt"),  # llama.cpp's own formats
    ("POST", "http://h/infill", "prompt"),
    ("POST", "http://h/predict", "prompt"),
    ("POST", "http://h/generate", "prompt"),  # TGI
    ("POST", "http://h/generate_stream", "prompt"),
    ("POST", "http://h/api/generate", "prompt"),  # Ollama
    ("POST", "http://h/api/chat", "prompt"),
    ("POST", "http://h/inference/v1/generate", "prompt"),  # vLLM, token ids in and out
    ("POST", "http://h/invocations", "prompt"),  # vLLM's SageMaker entry: chat or completions by the body
    ("POST", "http://h/ping", None),
    ("GET", "http://h/v1/stream/conv-1", "response"),  # llama.cpp's resumable streams
    ("POST", "http://h/v1/streams/lookup", "response"),
    ("DELETE", "http://h/v1/stream/conv-1", None),
    ("GET", "http://h/v1/streams", None),
    ("POST", "http://h/api/embed", None),
    ("POST", "http://h/tokenize", None),
    ("GET", "http://h/v1/responses/resp_1?stream=true", None),  # guarded: `proxy.retrieval`
    ("GET", "http://h/v1/chat/completions", None),  # guarded: `proxy.stored`
    ("GET", "http://h/v1/chat/completions/chatcmpl-1", None),
    ("GET", "http://h/v1/conversations/c1/items", None),  # guarded: `proxy.stored`
    ("GET", "http://h/v1/conversations/c1/items/i1", None),
    ("POST", "http://h/v1beta/models/gemini-pro:generateContent", "prompt"),  # other providers' formats
    ("POST", "http://h/v1/models/m%3AstreamGenerateContent", "prompt"),
    ("POST", "http://h/v1/projects/p/locations/l/endpoints/e:rawPredict", "prompt"),
    ("POST", "http://h/model/anthropic.claude/invoke", "prompt"),
    ("POST", "http://h/model/m/converse-stream", "prompt"),
    ("POST", "http://h/v2/chat", "prompt"),
    ("POST", "http://h/v1/threads/runs", "prompt"),  # Assistants
    ("POST", "http://h/v1/threads/t1/runs", "prompt"),
    ("POST", "http://h/v1/threads/t1/runs/r1/submit_tool_outputs", "prompt"),
    ("GET", "http://h/v1/threads/t1/messages", "response"),
    ("GET", "http://h/v1/threads/t1/messages/m1", "response"),
    ("GET", "http://h/v1/threads/t1/runs/r1/steps", "response"),
    ("POST", "http://h/v1/responses/resp_1/cancel", None),  # guarded: `proxy.retrieval`
    ("POST", "http://h/v1/chat/completions/chatcmpl-1", None),  # metadata update, guarded: `proxy.stored`
    ("POST", "http://h/v1/chat/completions/render", None),  # vLLM's: token ids of the prompt
    ("GET", "http://h/v1/threads/t1", None),
    ("POST", "http://h/v1/models/m:countTokens", None),
    ("POST", "http://h/v1/messages", None),  # guarded
    ("POST", "http://h/v1/chat/completions/batch", None),  # guarded
    ("POST", "http://h/v1/messages/count_tokens", None),
    ("POST", "http://h/v1/threads/t1/messages", None),
    ("GET", "http://h/v1/responses/resp_1/input_items", None),
    ("GET", "http://h/v1/batches", None),
    ("GET", "http://h/v1/conversations/c1", None),
    ("DELETE", "http://h/v1/responses/resp_1", None),
    ("GET", "http://h/v1/models", None),
])
def test_endpoints_generating_text_the_guard_cannot_read(method, url, stage):
    unread = unread_endpoint(method, url)
    assert (unread.stage if unread else None) == stage


def call(proxy, method: str, path: str) -> httpx.Response:
    body = {"model": "m", "max_tokens": 8, "messages": user("a BOMB question")} if method == "POST" else None
    return httpx.request(method, proxy.url + path, json=body, timeout=10)


ENFORCING = [("{action: refuse}", CUT % (4, 4)), ("{action: shadow}", CUT % (4, 4)),
             ("{action: steer, steer: {from: 0.2, system_message: s}}", "{action: shadow}")]
GENERATING = [("POST", "/v1/systemone"), ("POST", "/v1/batches"), ("POST", "/v1/models/m:generateContent")]
RETRIEVING = [("GET", "/v1/threads/t1/messages/m1"), ("GET", "/v1/threads/t1/messages"),
              ("GET", "/v1/threads/t1/runs/r1/steps")]


@pytest.mark.parametrize(("method", "path", "prompt", "response"),
                         [(*where, *policy) for where in GENERATING for policy in ENFORCING]
                         + [(*where, *policy) for where in RETRIEVING for policy in ENFORCING if "cut" in policy[1]])
def test_a_guarded_route_refuses_what_its_guard_cannot_read(scripted, method, path, prompt, response):
    """Generation is refused when either stage enforces; a retrieval, which evades only the
    response stage, when that stage cuts."""
    url, recorder = scripted
    forwarded = len(recorder.requests)
    with running_proxy(policy_yaml(url, prompt=prompt, response=response), KeywordScorer()) as proxy:
        reply = call(proxy, method, path)
    assert reply.status_code == 403
    error = reply.json()["error"]
    assert error["code"] == "unguarded_endpoint" and error["type"] == "invalid_request_error"
    assert path in error["message"] and "unguarded_endpoints: forward" in error["message"]
    assert len(recorder.requests) == forwarded


@pytest.mark.parametrize(("prompt", "response", "extra", "method", "path"), [
    ("{action: refuse}", CUT % (4, 4), "    unguarded_endpoints: forward", "POST", "/v1/systemone"),
    ("{action: off}", "{action: off}", "", "POST", "/v1/systemone"),  # a plain pass-through
    ("{action: refuse}", "{action: off}", "", "GET", "/v1/threads/t1/messages"),  # no response stage to evade
    ("{action: shadow}", "{action: flag}", "", "POST", "/v1/systemone"),  # neither stage stops anything
    ("{action: refuse}", "{action: shadow}", "", "GET", "/v1/threads/t1/messages"),
    ("{action: refuse}", CUT % (4, 4), "", "POST", "/v1/messages/count_tokens"),
])
def test_they_are_forwarded_when_the_policy_says_so_or_has_nothing_to_evade(scripted, prompt, response, extra,
                                                                            method, path):
    url, _ = scripted
    with running_proxy(policy_yaml(url, prompt=prompt, response=response, policy_extra=extra),
                       KeywordScorer()) as proxy:
        reply = call(proxy, method, path)
    assert reply.status_code == 200, reply.text
    assert reply.json()["path"] == path  # the upstream's echo of what it was sent


@pytest.mark.parametrize("path", [b"/v1/chat/%63ompletions", b"/v1/chat/completion%73", b"/%76%31/chat/completions",
                                  b"/v1/chat%2Dcompletions-not-an-endpoint"])
def test_escaped_letters_in_the_path_are_no_way_around_the_guard(scripted, path):
    """uvicorn (vLLM's server) decodes the path, so `chat/%63ompletions` is its chat
    endpoint: the proxy decodes escaped letters and digits before routing, guards it as
    chat, and forwards the decoded path."""
    url, recorder = scripted
    before = len(recorder.requests)
    body = json.dumps({"model": "m", "messages": user("a BOMB question")}).encode()
    with running_proxy(policy_yaml(url, prompt="{action: refuse}", response=CUT % (4, 4)), KeywordScorer()) as proxy:
        refused = exchange(proxy.port, b"POST", path, [(b"content-type", b"application/json")], body)
        answered = exchange(proxy.port, b"POST", path, [(b"content-type", b"application/json"),
                                                        (b"x-script", b"text:otters")],
                            body.replace(b"a BOMB question", b"hi"))
    if path.endswith(b"not-an-endpoint"):  # `-` decoded too; not an endpoint, forwarded as such
        assert json.loads(refused.body)["path"] == "/v1/chat-completions-not-an-endpoint"
        return
    assert refused.status == 200, refused.body
    assert json.loads(refused.body)["choices"][0]["message"]["content"] == REFUSAL
    assert json.loads(answered.body)["choices"][0]["message"]["content"] == "otters"
    assert [r["path"] for r in recorder.requests[before:]] == ["/v1/chat/completions"]  # the allowed one, decoded


def test_a_route_mounted_above_the_api_root_still_guards(scripted):
    """`prefix: /` over `base_url` without `/v1`: the client's `/v1/chat/completions` is the
    upstream's, and is guarded (it used to be forwarded unguarded, as an unknown path)."""
    url, _ = scripted
    text = policy_yaml(url.removesuffix("/v1"), response=CUT % (2, 2)).replace(
        "{prefix: /v1, upstream: up, policy: p}", "{prefix: /, upstream: up, policy: p}")
    with running_proxy(text, KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:one two BOMB three four"})
        reply = client.chat.completions.create(model="m", messages=user("q"))
        stream = client.chat.completions.create(model="m", messages=user("q"), stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert reply.choices[0].message.content == REFUSAL
    assert "BOMB" not in streamed and streamed.endswith(REFUSAL)


def test_a_route_mounted_on_the_endpoint_itself_still_guards(scripted):
    """`prefix: /chat-only` over `base_url: .../v1/chat/completions`: the client's path says
    nothing of chat, the upstream URL does; the body is read as chat (or refused as bad JSON)."""
    url, _ = scripted
    text = policy_yaml(url + "/chat/completions", response=CUT % (2, 2)).replace(
        "{prefix: /v1, upstream: up, policy: p}", "{prefix: /chat-only, upstream: up, policy: p}")
    with running_proxy(text, KeywordScorer()) as proxy:
        headers = {"x-script": "text:one two BOMB three four"}
        reply = httpx.post(proxy.url + "/chat-only", json={"model": "m", "messages": user("q")}, headers=headers)
        broken = httpx.post(proxy.url + "/chat-only", content=b"{not json", headers=headers)
    assert reply.json()["choices"][0]["message"]["content"] == REFUSAL
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


@pytest.mark.parametrize(("base", "path", "body"), [
    ("/chat/completions", "/chat-only", {"messages": user("BOMB")}),  # guarded: the prompt is refused
    ("", "/chat-only/systemone", {"prompt": "BOMB"}),  # text the guard cannot read: 403
])
def test_model_routes_read_the_model_of_any_json_body(scripted, base, path, body):
    """A `model` condition reads the body's `model` whatever the path: the upstream reads
    it there too. Routing read it only under the paths of the JSON endpoints it parses,
    so under a route mounted on the endpoint itself, or for an endpoint such as vLLM's
    `systemone`, the stricter route for that model was passed over for the next one."""
    url, recorder = scripted
    text = policy_yaml(url + base, prompt="{action: refuse}", policy_extra="  open: {prompt: {action: off}, "
                       "response: {action: off}, unguarded_endpoints: forward}").replace(
        "  - {prefix: /v1, upstream: up, policy: p}",
        "  - {prefix: /chat-only, upstream: up, policy: p, model: 'strict-*'}\n"
        "  - {prefix: /chat-only, upstream: up, policy: open}")
    with running_proxy(text, KeywordScorer()) as proxy:
        strict = httpx.post(proxy.url + path, json={"model": "strict-1", **body})
        other = httpx.post(proxy.url + path, json={"model": "other", **body})  # forwarded under `open`
        metrics = httpx.get(proxy.url + "/metrics").text
    if path.endswith("systemone"):
        assert strict.status_code == 403 and strict.json()["error"]["code"] == "unguarded_endpoint"
        assert other.status_code == 200 and other.json()["path"] == "/v1/systemone"
    else:
        assert strict.json()["choices"][0]["message"]["content"] == REFUSAL
        assert other.status_code == 200 and recorder.requests[-1]["body"]["model"] == "other"
    assert 'siren_proxy_requests_total{route="routes[0]",status="' in metrics
    assert 'siren_proxy_requests_total{route="routes[1]",status="200"} 1.0' in metrics


def test_a_body_without_a_model_cannot_pass_over_a_model_route(scripted):
    """vLLM serves a request without `model` with the model it serves, so leaving `model`
    out passed over the route meant for that model, to the next one (here, one that
    forwards unread). Refused as OpenAI refuses it (400, `param: "model"`), unforwarded,
    wherever a route's `model` condition was all that a request did not meet; requests
    no model route could take, and bodiless ones, are served as before."""
    url, recorder = scripted
    text = policy_yaml(url, prompt="{action: refuse}", policy_extra="  open: {prompt: {action: off}, "
                       "response: {action: off}}").replace(
        "  - {prefix: /v1, upstream: up, policy: p}",
        "  - {prefix: /v1, upstream: up, policy: p, model: 'smollm2'}\n"
        "  - {prefix: /v1, upstream: up, policy: open, header: {name: x-tenant, value: lab}}\n"
        "  - {prefix: /other, upstream: up, policy: open}\n"
        "  - {prefix: /v1, upstream: up, policy: open}")
    before = len(recorder.requests)
    with running_proxy(text, KeywordScorer()) as proxy:
        for body in ({"messages": user("BOMB")}, {"model": 7, "messages": user("BOMB")}):
            reply = httpx.post(proxy.url + "/v1/chat/completions", json=body)
            assert reply.status_code == 400, reply.text
            assert reply.json()["error"]["param"] == "model"
            assert reply.json()["error"]["message"].startswith("you must provide a model parameter")
        assert len(recorder.requests) == before  # never forwarded
        named = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "smollm2", "messages": user("BOMB")})
        assert named.json()["choices"][0]["message"]["content"] == REFUSAL
        # Where no model route could take the request, nothing changes.
        assert httpx.post(proxy.url + "/other/chat/completions", json={"messages": user("BOMB")}).status_code == 200
        assert httpx.get(proxy.url + "/v1/models").status_code == 200
    # A route the request meets before the model route's turn comes: no passing over.
    reordered = text.replace("  - {prefix: /v1, upstream: up, policy: p, model: 'smollm2'}\n", "").replace(
        "  - {prefix: /other, upstream: up, policy: open}\n",
        "  - {prefix: /v1, upstream: up, policy: p, model: 'smollm2'}\n  - {prefix: /other, upstream: up, policy: open}\n")
    assert reordered.index("x-tenant") < reordered.index("smollm2")
    with running_proxy(reordered, KeywordScorer()) as proxy:
        lab = httpx.post(proxy.url + "/v1/chat/completions", json={"messages": user("BOMB")},
                         headers={"x-tenant": "lab"})
        assert lab.status_code == 200 and lab.json()["choices"][0]["message"]["content"] != REFUSAL
        assert httpx.post(proxy.url + "/v1/chat/completions", json={"messages": user("hi")}).status_code == 400
    with running_proxy(text.replace("model: 'smollm2'}", "model: 'smollm2', header: {name: x-tenant, value: "
                                    "kids}}"), KeywordScorer()) as proxy:
        # The model route's other condition (a header) is not met: it was never this request's.
        assert httpx.post(proxy.url + "/v1/chat/completions", json={"messages": user("hi")}).status_code == 200
        lab = httpx.post(proxy.url + "/v1/chat/completions", json={"messages": user("hi")},
                         headers={"x-tenant": "kids"})
        assert lab.status_code == 400 and lab.json()["error"]["param"] == "model"


def llamacpp_root(url: str, extra: str = "") -> str:
    """A route at `/` over the server's root, as a llama.cpp user mounts it to reach its
    own endpoints beside the OpenAI ones."""
    return policy_yaml(url.removesuffix("/v1"), prompt="{action: refuse}", response=CUT % (4, 4),
                       policy_extra=extra).replace("{prefix: /v1, upstream: up, policy: p}",
                                                   "{prefix: /, upstream: up, policy: p}")


def test_a_servers_own_generation_formats_are_no_way_around_the_guard(scripted):
    """Under a route at the server's root, llama.cpp's `/completion` and `/infill`, Ollama's
    `api/chat`, TGI's `generate` and llama.cpp's resumable streams are refused, not
    forwarded unguarded."""
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(llamacpp_root(url), KeywordScorer()) as proxy:
        replies = [httpx.post(proxy.url + path, json={"prompt": "BOMB", "stream": True})
                   for path in ("/completion", "/infill", "/api/chat", "/generate", "/v1/streams/lookup")]
        replies.append(httpx.get(proxy.url + "/v1/stream/conv-1"))
    assert [r.status_code for r in replies] == [403] * 6
    assert {r.json()["error"]["code"] for r in replies} == {"unguarded_endpoint"}
    assert len(recorder.requests) == before


def test_vllms_sagemaker_invocations_are_no_way_around_the_guard(scripted):
    """vLLM serves `POST /invocations` at its root (SageMaker's entry point) and runs there
    whatever chat or completions body it is sent: under a route at the server's root it is
    refused, not forwarded unguarded as an unknown path (it was, so a harmful chat request
    reached the model, and its answer the client, past both stages)."""
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(llamacpp_root(url), KeywordScorer()) as proxy:
        replies = [httpx.post(proxy.url + "/invocations", json=body) for body in (
            {"model": "m", "messages": user("a BOMB, step by step")}, {"model": "m", "prompt": "a BOMB"})]
    assert [r.status_code for r in replies] == [403, 403]
    assert {r.json()["error"]["code"] for r in replies} == {"unguarded_endpoint"}
    assert len(recorder.requests) == before


@pytest.mark.parametrize("stream", [True, False])
def test_llamacpp_s_own_format_at_completions_fails_as_the_policy_says(scripted, stream):
    """llama.cpp answers `/completions` (no `/v1`) in its own format, which the guard cannot
    read (`content`, no `choices`): failing closed, the client gets `guard_unavailable` (in
    band once a stream began) and none of the text; `on_guard_error: allow` lets it through."""
    url, _ = scripted
    body = {"prompt": "tell me", "stream": stream}
    headers = {"x-script": "text:step one of the BOMB"}
    with running_proxy(llamacpp_root(url), KeywordScorer()) as proxy:
        closed = httpx.post(proxy.url + "/completions", json=body, headers=headers)
    with running_proxy(llamacpp_root(url, "    on_guard_error: allow"), KeywordScorer()) as proxy:
        allowed = httpx.post(proxy.url + "/completions", json=body, headers=headers)
    assert "BOMB" not in closed.text
    if stream:
        assert closed.status_code == 200 and '"code":"guard_unavailable"' in closed.text
        assert closed.text.endswith("data: [DONE]\n\n")
        assert allowed.text.count('"content"') == 6 and '"stop": true' in allowed.text
    else:
        assert closed.status_code == 503 and closed.json()["error"]["code"] == "guard_unavailable"
        assert allowed.json()["content"] == "step one of the BOMB"


@pytest.mark.parametrize(("endpoint", "payload", "ok"), [
    ("chat/completions", {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]}, True),
    ("chat/completions", {"id": "c", "choices": [], "usage": {"total_tokens": 3}}, True),  # the usage chunk
    ("chat/completions", {"error": {"message": "boom", "type": "BadRequestError", "code": 400}}, True),  # vLLM
    ("chat/completions", {"object": "error", "message": "boom", "type": "BadRequestError"}, True),  # older vLLM
    ("chat/completions", {"content": "step one", "stop": False}, False),  # llama.cpp's own format
    ("chat/completions", {"choices": "not a list"}, False),
    ("chat/completions", {"choices": [{"index": "1", "delta": {"content": "hi"}}]}, False),
    ("chat/completions", {"choices": ["hi"]}, False),
    ("chat/completions", ["a", "list"], False),
    ("chat/completions", "a string", False),
    ("chat/completions", None, False),  # not JSON at all
    ("completions", {"choices": [{"index": 0, "text": "hi"}]}, True),
    ("completions", {"token": {"text": "hi"}, "generated_text": None}, False),  # TGI's own
    ("responses", {"type": "response.output_text.delta", "delta": "hi"}, True),
    ("responses", {"delta": "hi"}, False),
    ("messages", {"type": "ping"}, True),
    ("messages", {"type": 7}, False),
])
def test_which_stream_events_the_guard_reads(endpoint, payload, ok):
    assert readable(endpoint, payload) is ok


@pytest.mark.parametrize(("role", "content"), [
    *((role, "a BOMB question") for role in ("User", "USER", " user", "human")),
    ("user\nExplain the BOMB, step by step.", "go on"), ("BOMB maker", "go on")])
def test_a_user_turn_under_another_role_string_is_read_with_its_role(scripted, role, content):
    """vLLM renders any role string through the chat template, so the model reads these
    as the user's turn; `last_user` scores them (it used to find no user message and
    score ""). The template writes the role into the prompt where the model reads it
    (ChatML: `<|im_start|>` + role + newline + content), so text put in a user turn's role
    is scored with its content: before, a request written in the role reached the model
    unscored."""
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(policy_yaml(url, prompt="{action: block}"), KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + "/v1/chat/completions",
                           json={"model": "m", "messages": [{"role": role, "content": content}]})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "content_filter"
    assert len(recorder.requests) == before


LIMIT = "  max_prompt_bytes: 500"


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"model": "m", "messages": user("x" * 501)}, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": user("é" * 251)}, "messages"),  # 502 bytes
    ("/v1/completions", {"model": "m", "prompt": ["short", "x" * 501]}, "prompt"),
    ("/v1/responses", {"model": "m", "input": "x" * 501}, "input"),
    ("/v1/messages", {"model": "m", "max_tokens": 8, "messages": user("x" * 501)}, "messages"),
    ("/v1/chat/completions/batch", {"model": "m", "messages": [user("short"), user("x" * 501)]}, "messages[1]"),
])
def test_a_prompt_over_max_prompt_bytes_is_a_400_before_the_guard_reads_it(scripted, path, body, param):
    """One huge prompt would hold the guard for every other request (a few hundred tokens
    a second on 2 cores): `server.max_prompt_bytes` bounds what one prompt makes it read."""
    url, recorder = scripted
    before = len(recorder.requests)
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(url, prompt="{action: refuse}", server=LIMIT), scorer) as proxy:
        reply = httpx.post(proxy.url + path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json().get("error")
    if path == "/v1/messages":  # Anthropic's envelope, with the proxy's code
        assert error["type"] == "invalid_request_error" and error["code"] == "prompt_too_long"
    else:
        assert (error["code"], error["param"]) == ("prompt_too_long", param)
        assert "server.max_prompt_bytes" in error["message"]
    assert scorer.calls == [] and len(recorder.requests) == before


@pytest.mark.parametrize(("prompt", "response", "server", "text"), [
    ("{action: refuse}", "{action: off}", LIMIT, "é" * 250),  # 500 bytes: at the limit
    ("{action: off}", "{action: cut, include_prompt: false}", LIMIT, "x" * 501),  # the guard reads no prompt
    ("{action: refuse}", "{action: off}", "  max_prompt_bytes: null", "x" * 60000),  # no bound
])
def test_prompts_within_the_bound_or_unread_go_on(scripted, prompt, response, server, text):
    url, _ = scripted
    with running_proxy(policy_yaml(url, prompt=prompt, response=response, server=server), KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": "text:fine"},
                           json={"model": "m", "messages": user(text)})
    assert reply.status_code == 200, reply.text




def test_url_lookups_cache_only_urls_of_ordinary_length():
    """The per-URL caches (endpoint segments, unread endpoints, parsed upstream URLs) keep
    a client's odd long URLs out: 1,024 of them near the head bound would hold tens of MB."""
    from proxy.upstream import parsed_url

    long_url = "http://up/v1/" + "x" * 5000 + "/chat/completions"
    for lookup, args in ((segments, (long_url,)), (unread_endpoint, ("POST", long_url)), (parsed_url, (long_url,))):
        before = lookup.cache_info().currsize
        assert lookup(*args) == lookup(*args)
        assert lookup.cache_info().currsize == before
    short = "http://up/v1/chat/completions"
    assert segments(short) is segments(short)  # ordinary URLs are cached
