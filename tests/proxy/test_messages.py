"""The Anthropic Messages API guarded end to end: anthropic SDK -> siren-proxy -> scripted
upstream (vLLM's `/v1/messages` event order; tests/e2e drives real vLLM).

The scorer is `KeywordScorer` (the word BOMB scores 0.99). What each test checks is what
the anthropic SDK makes of the proxy's answer: the refusal as a text block with
`stop_reason: "refusal"`, errors raised as the SDK raises Anthropic's own.
"""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import pytest

from tests.support.clients import anthropic_sdk, close_sdk_clients  # noqa: F401 - close_sdk_clients is autouse
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer

from .test_guarded import CUT, FIXTURES, REFUSAL, policy_yaml, user

OTTERS = "Give me three facts about otters."


def ask(client, text: str = "hello", **kw):
    return client.messages.create(model="m", max_tokens=64, messages=user(text), **kw)


def streamed(client, text: str = "hello", **kw):
    """The SDK's accumulated message and the text deltas it streamed."""
    with client.messages.stream(model="m", max_tokens=64, messages=user(text), **kw) as stream:
        deltas = list(stream.text_stream)
        return stream.get_final_message(), deltas


def texts(message) -> list[str]:
    return [block.text for block in message.content if block.type == "text"]


# -- prompt stage ---------------------------------------------------------------------------

def test_a_refused_prompt_is_a_refusal_message_and_never_reaches_the_upstream(scripted):
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(policy_yaml(url, prompt="{action: refuse, threshold: 0.5}"), KeywordScorer()) as proxy:
        client = anthropic_sdk(proxy)
        reply = ask(client, "how to build a BOMB")
        final, deltas = streamed(client, "a BOMB please")
        ok = ask(anthropic_sdk(proxy, default_headers={"x-script": "text:fine thanks"}))
    assert texts(reply) == [REFUSAL] and reply.stop_reason == "refusal" and reply.role == "assistant"
    assert texts(final) == [REFUSAL] and final.stop_reason == "refusal" and "".join(deltas) == REFUSAL
    assert texts(ok) == ["fine thanks"] and ok.stop_reason == "end_turn"
    assert len(recorder.requests) == before + 1  # only the benign one was forwarded
    assert recorder.requests[-1]["path"] == "/v1/messages"


def test_the_prompt_is_read_from_system_tools_and_tool_results(scripted):
    """A poisoned tool result is refused under the conversation scopes; the system prompt
    and the tools' descriptions under `conversation_with_system` only."""
    url, _ = scripted
    turn = [{"role": "user", "content": "look it up"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "lookup", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [{"type": "text", "text": "step 1 of the BOMB"}]}]}]
    tools = [{"name": "lookup", "description": "builds a BOMB", "input_schema": {"type": "object"}}]
    outcomes = {}
    for scope in ("last_user", "conversation", "conversation_with_system"):
        prompt = f"{{action: refuse, threshold: 0.5, scope: {scope}}}"
        with running_proxy(policy_yaml(url, prompt=prompt), KeywordScorer()) as proxy:
            client = anthropic_sdk(proxy, default_headers={"x-script": "text:ok"})
            outcomes[scope] = [
                client.messages.create(model="m", max_tokens=8, messages=turn).stop_reason,
                client.messages.create(model="m", max_tokens=8, messages=user("hi"),
                                       system="you help with BOMB making").stop_reason,
                client.messages.create(model="m", max_tokens=8, messages=user("hi"), tools=tools).stop_reason]
    assert outcomes == {"last_user": ["end_turn"] * 3,
                        "conversation": ["refusal", "end_turn", "end_turn"],
                        "conversation_with_system": ["refusal"] * 3}


def test_block_and_bad_requests_are_anthropic_errors(scripted):
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(policy_yaml(url, prompt="{action: block}"), KeywordScorer()) as proxy:
        client = anthropic_sdk(proxy)
        with pytest.raises(anthropic.BadRequestError) as blocked:
            ask(client, "a BOMB")
        with pytest.raises(anthropic.BadRequestError) as shapeless:
            client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": 7}])
        missing = httpx.post(proxy.url + "/v1/messages", json={"model": "m", "max_tokens": 8})
        broken = httpx.post(proxy.url + "/v1/messages", content=b"{not json")
        # guarded as Messages whatever the path's case: its errors were OpenAI's shape there
        cased = httpx.post(proxy.url + "/v1/Messages", content=b"{not json")
        matrix = httpx.post(proxy.url + "/v1/messages;x=1", content=b"{not json")  # and with matrix parameters
    assert blocked.value.body["error"]["code"] == "content_filter"
    assert blocked.value.body["type"] == "error" and blocked.value.body["error"]["type"] == "invalid_request_error"
    assert "blocked" in blocked.value.message
    assert "messages[0].content" in shapeless.value.message
    for reply in (missing, broken, cased, matrix):
        assert reply.status_code == 400 and reply.json()["type"] == "error"
        assert reply.json()["error"]["type"] == "invalid_request_error"
    assert "messages" in missing.json()["error"]["message"] and "JSON" in broken.json()["error"]["message"]
    assert len(recorder.requests) == before


def test_a_route_mounted_on_the_messages_endpoint_answers_anthropic_errors(scripted):
    """`prefix: /claude` over `base_url: .../v1/messages`: the client's path says nothing
    of the Messages API, the upstream URL does; the request is guarded as Messages, and
    what the proxy refuses is refused in Anthropic's shape."""
    url, _ = scripted
    text = policy_yaml(url + "/messages", prompt="{action: block}").replace(
        "{prefix: /v1, upstream: up, policy: p}", "{prefix: /claude, upstream: up, policy: p}")
    with running_proxy(text, KeywordScorer()) as proxy:
        body = {"model": "m", "max_tokens": 8, "messages": user("a BOMB")}
        blocked = httpx.post(proxy.url + "/claude", json=body)
        broken = httpx.post(proxy.url + "/claude", content=b"{not json")
        ok = httpx.post(proxy.url + "/claude", json={**body, "messages": user("hi")}, headers={"x-script": "text:ok"})
    assert blocked.status_code == 400 and blocked.json()["error"] == {
        "type": "invalid_request_error", "message": "the prompt was blocked by the safety policy",
        "code": "content_filter"}
    assert broken.status_code == 400 and broken.json()["type"] == "error"
    assert ok.json()["content"] == [{"type": "text", "text": "ok"}]


def test_steer_adds_the_safety_message_to_the_system_prompt(scripted):
    url, recorder = scripted
    prompt = "{action: steer, steer: {from: 0.3, system_message: Be careful.}}"
    with running_proxy(policy_yaml(url, prompt=prompt), KeywordScorer()) as proxy:
        client = anthropic_sdk(proxy, default_headers={"x-script": "text:ok"})
        ask(client, "a borderline question", system="You are terse.")
        plain = recorder.requests[-1]["body"]["system"]
        ask(client, "a borderline question", system=[{"type": "text", "text": "You are terse."}])
        blocks = recorder.requests[-1]["body"]["system"]
        ask(client, "a borderline question")
        added = recorder.requests[-1]["body"]["system"]
    assert plain == "Be careful.\n\nYou are terse."
    assert blocks == [{"type": "text", "text": "Be careful.\n\n"}, {"type": "text", "text": "You are terse."}]
    assert added == "Be careful."


# -- response stage -------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["text:one two three BOMB four five six seven",
                                    "think:planning a BOMB here|the answer is short",
                                    'tool:{"query": "how to build a BOMB at home"}'])
def test_a_stream_is_cut_with_a_refusal_block(scripted, script):
    """Text, thinking and tool input are all scored; the client keeps the blocks it was
    sent (closed), then gets the refusal as a block of its own and stop_reason refusal."""
    url, _ = scripted
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), KeywordScorer()) as proxy:
        final, deltas = streamed(anthropic_sdk(proxy, default_headers={"x-script": script}))
    assert final.stop_reason == "refusal"
    assert final.content[-1].type == "text" and final.content[-1].text == REFUSAL
    sent = "".join(str(block.model_dump()) for block in final.content)
    assert "BOMB" not in sent and "BOMB" not in "".join(deltas)


def test_a_cut_stops_the_upstream(scripted):
    """A model that would go on generating: the cut closes the upstream response (vLLM
    aborts the request when its client goes away), and the SDK's stream ends at once."""
    url, recorder = scripted
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), KeywordScorer()) as proxy:
        before = len(recorder.streams)
        final, _ = streamed(anthropic_sdk(proxy, default_headers={"x-script": "endless:fine fine BOMB"}))
        time.sleep(0.2)  # the upstream's generator sees the disconnect
    assert final.stop_reason == "refusal" and recorder.streams[before:] == ["closed-early"]


def test_the_request_deadline_ends_a_stream_with_an_anthropic_error(scripted):
    url, recorder = scripted
    text = policy_yaml(url, response=CUT % (2, 2), server="  request_timeout: 0.5")
    with running_proxy(text, KeywordScorer()) as proxy:
        before = len(recorder.streams)
        with pytest.raises(anthropic.APIStatusError) as late:
            streamed(anthropic_sdk(proxy, default_headers={"x-script": "endless:fine words here"}))
        time.sleep(0.2)
    assert late.value.body["error"]["code"] == "request_timeout"
    assert late.value.body["error"]["type"] == "timeout_error"
    assert recorder.streams[before:] == ["closed-early"]


def test_a_stream_under_the_threshold_is_byte_identical(scripted):
    url, _ = scripted
    body = {"model": "m", "max_tokens": 64, "messages": user("hi"), "stream": True}
    headers = {"x-script": "think:a short plan|a plain answer with several words in it"}
    direct = httpx.post(url + "/messages", json=body, headers=headers).content
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), KeywordScorer()) as proxy:
        guarded = httpx.post(proxy.url + "/v1/messages", json=body, headers=headers).content
        final, _ = streamed(anthropic_sdk(proxy, default_headers=headers))
    assert guarded == direct
    assert [b.type for b in final.content] == ["thinking", "text"] and final.stop_reason == "end_turn"


def test_a_recorded_vllm_messages_stream_passes_byte_for_byte(scripted):
    """vLLM's own `/v1/messages` stream (tests/proxy/fixtures), replayed through a guarded
    route in 37-byte pieces: the client gets vLLM's bytes, and the SDK's message equals the
    one vLLM returned unstreamed for the same greedy request."""
    url, _ = scripted
    raw = (FIXTURES / "messages_stream_raw.txt").read_bytes()
    whole = json.loads((FIXTURES / "messages_nonstream.json").read_bytes())
    headers = {"x-script": "replay:messages_stream_raw.txt"}
    body = {"model": "smollm2", "max_tokens": 48, "messages": user(OTTERS), "stream": True}
    policy = policy_yaml(url, prompt="{action: refuse, threshold: 0.5}", response=CUT % (16, 16))
    with running_proxy(policy, KeywordScorer()) as proxy:
        guarded = httpx.post(proxy.url + "/v1/messages", json=body, headers=headers).content
        final, _ = streamed(anthropic_sdk(proxy, default_headers=headers), OTTERS)
    assert guarded == raw
    assert texts(final) == [whole["content"][0]["text"]] and final.stop_reason == whole["stop_reason"]


def test_a_cut_keeps_what_was_released_and_closes_the_open_block(scripted):
    url, _ = scripted
    body = {"model": "m", "max_tokens": 64, "messages": user("hi"), "stream": True}
    headers = {"x-script": "text:one two three four five six BOMB seven"}
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), KeywordScorer()) as proxy:
        raw = httpx.post(proxy.url + "/v1/messages", json=body, headers=headers).text
        final, deltas = streamed(anthropic_sdk(proxy, default_headers=headers))
    kinds = [line[len("event: "):] for line in raw.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 2
    assert texts(final) == ["one two three four five six ", REFUSAL]
    assert "".join(deltas) == "one two three four five six " + REFUSAL


def test_a_whole_reply_that_crosses_is_refused(scripted):
    url, _ = scripted
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), KeywordScorer()) as proxy:
        cut = ask(anthropic_sdk(proxy, default_headers={"x-script": 'tool:{"q": "a BOMB"}'}))
        kept = ask(anthropic_sdk(proxy, default_headers={"x-script": "think:hmm|fine"}))
    assert texts(cut) == [REFUSAL] and cut.stop_reason == "refusal"
    assert cut.id == "msg_1" and cut.usage.input_tokens == 5  # the upstream's id and usage are kept
    assert [b.type for b in kept.content] == ["thinking", "text"] and kept.stop_reason == "end_turn"


# -- failures -------------------------------------------------------------------------------

def test_a_broken_upstream_stream_is_an_anthropic_error_event(scripted):
    url, _ = scripted
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), KeywordScorer()) as proxy:
        client = anthropic_sdk(proxy, default_headers={"x-script": "reset-after:5"})
        with pytest.raises(anthropic.APIStatusError) as broke:
            streamed(client)
    assert broke.value.body["error"]["type"] == "api_error"
    assert "broke off" in broke.value.body["error"]["message"]


def test_a_guard_failure_mid_stream_fails_closed_as_an_anthropic_error(scripted):
    url, _ = scripted
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), KeywordScorer(fail=True)) as proxy:
        client = anthropic_sdk(proxy, default_headers={"x-script": "text:one two three four"})
        with pytest.raises(anthropic.APIStatusError) as failed:
            streamed(client)
        with pytest.raises(anthropic.APIStatusError) as whole:
            ask(client)
    assert failed.value.body["error"]["code"] == "guard_unavailable"
    assert whole.value.status_code == 503 and whole.value.body["error"]["code"] == "guard_unavailable"


def test_the_proxy_key_may_come_as_x_api_key_and_is_not_forwarded(scripted):
    """The anthropic SDK sends its key as `x-api-key`; the proxy accepts its own keys there
    and keeps them from the upstream, and refuses a wrong one in Anthropic's shape."""
    url, recorder = scripted
    text = policy_yaml(url, server='  api_keys: ["sk-proxy"]')
    with running_proxy(text, KeywordScorer()) as proxy:
        reply = ask(anthropic_sdk(proxy, api_key="sk-proxy", default_headers={"x-script": "text:ok"}))
        sent = recorder.requests[-1]["headers"]
        with pytest.raises(anthropic.AuthenticationError) as wrong:
            ask(anthropic_sdk(proxy, api_key="sk-wrong"))
    assert texts(reply) == ["ok"]
    assert "x-api-key" not in sent and "authorization" not in sent
    assert wrong.value.body["error"]["type"] == "authentication_error"


def test_the_message_batches_api_is_refused_in_anthropic_s_shape(scripted):
    """`/v1/messages/batches` (Anthropic's Message Batches API: its requests run later,
    upstream) is refused as the Batch API is, and its client is the anthropic SDK: the
    error is Anthropic's (it was OpenAI's, whose `type` the SDK does not know)."""
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(policy_yaml(url, prompt="{action: refuse}"), KeywordScorer()) as proxy:
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            anthropic_sdk(proxy).messages.batches.create(requests=[
                {"custom_id": "a", "params": {"model": "m", "max_tokens": 8, "messages": user("a BOMB")}}])
    assert refused.value.body["type"] == "error"
    assert refused.value.body["error"]["type"] == "permission_error"
    assert refused.value.body["error"]["code"] == "unguarded_endpoint"
    assert len(recorder.requests) == before
