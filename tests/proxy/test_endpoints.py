"""Which endpoints are guarded, and the ones that generate text the guard cannot read."""

from __future__ import annotations

import httpx
import pytest

from proxy.endpoints import guarded_endpoint, unread_endpoint
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
])
def test_guarded_endpoints_are_known_by_their_last_segments(method, url, endpoint):
    assert guarded_endpoint(method, url) == endpoint


@pytest.mark.parametrize(("method", "url", "stage"), [
    ("POST", "http://h/v1/systemone", "prompt"),
    ("POST", "http://h/v1/batches", "prompt"),
    ("GET", "http://h/v1/responses/resp_1?stream=true", "response"),
    ("GET", "http://h/v1/chat/completions", "response"),
    ("GET", "http://h/v1/chat/completions/chatcmpl-1", "response"),
    ("GET", "http://h/v1/conversations/c1/items", "response"),
    ("GET", "http://h/v1/conversations/c1/items/i1", "response"),
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
GENERATING = [("POST", "/v1/systemone"), ("POST", "/v1/batches")]
RETRIEVING = [("GET", "/v1/responses/resp_1"), ("GET", "/v1/chat/completions/chatcmpl-1")]


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
    ("{action: refuse}", "{action: off}", "", "GET", "/v1/responses/resp_1"),  # no response stage to evade
    ("{action: shadow}", "{action: flag}", "", "POST", "/v1/systemone"),  # neither stage stops anything
    ("{action: refuse}", "{action: shadow}", "", "GET", "/v1/responses/resp_1"),
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


@pytest.mark.parametrize(("stream", "response", "extra", "refused"), [
    (False, CUT % (4, 4), "", True),
    (True, CUT % (4, 4), "", False),  # streamed: guarded as it is generated
    (False, "{action: shadow}", "", False),
    (False, CUT % (4, 4), "    unguarded_endpoints: forward", False),
])
def test_a_background_response_read_back_later_is_refused_up_front(scripted, stream, response, extra, refused):
    url, recorder = scripted
    forwarded = len(recorder.requests)
    with running_proxy(policy_yaml(url, response=response, policy_extra=extra), KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + "/v1/responses", json={"model": "m", "input": "q", "background": True,
                                                              "stream": stream}, timeout=10)
    if refused:
        assert reply.status_code == 403 and reply.json()["error"]["param"] == "background"
        assert reply.json()["error"]["code"] == "unguarded_endpoint"
        assert len(recorder.requests) == forwarded
    else:
        assert reply.status_code == 200 and len(recorder.requests) == forwarded + 1
