"""A reasoning model's thinking is scored like its answer: the client receives both.

vLLM (`--reasoning-parser`) streams the thinking as `delta.reasoning` (llama.cpp and
DeepSeek's API as `delta.reasoning_content`), and its Responses API as a reasoning item
before the message. The scripted upstream's `think:<reasoning>|<answer>` plays such a
model; `KeywordScorer` makes BOMB cross. tests/e2e/test_vllm.py runs the same against
vLLM's own reasoning parser.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from tests.support.clients import close_sdk_clients, sdk  # noqa: F401 - close_sdk_clients is autouse
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer

from .test_guarded import AUTH, CUT, REFUSAL, policy_yaml, sse_events, user

FIELDS = ["reasoning", "reasoning_content"]


def chat_stream(proxy, script: str, field: str = "reasoning", **extra) -> tuple[list[dict], str]:
    """The stream's chunks and everything the client was shown (reasoning and content)."""
    payload = {"model": "m", "messages": user("q"), "stream": True, **extra}
    headers = {"x-script": script, "x-reasoning-field": field, **AUTH}
    body = httpx.post(proxy.url + "/v1/chat/completions", json=payload, headers=headers, timeout=30).content
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    shown = "".join(str(c["delta"].get(k) or "") for chunk in chunks for c in chunk["choices"]
                    for k in (*FIELDS, "content"))
    return chunks, shown


@pytest.mark.parametrize("field", FIELDS)
def test_harmful_thinking_is_cut_before_the_client_sees_it(scripted, field):
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), scorer) as proxy:
        chunks, shown = chat_stream(proxy, "think:first I will explain the BOMB parts|fine words", field)
    assert "BOMB" not in shown and shown.endswith(REFUSAL)
    assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == ["content_filter"]
    assert "fine" not in shown  # the answer after the cut thinking is never sent


@pytest.mark.parametrize("field", FIELDS)
def test_benign_thinking_and_answer_reach_the_client_whole(scripted, field):
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), scorer) as proxy:
        chunks, shown = chat_stream(proxy, "think:the user wants otters facts|otters hold hands", field)
    assert shown == "the user wants otters facts otters hold hands "
    [session] = scorer.sessions
    assert session.text == "q\n" + shown  # the thinking was read, in the order it streamed


def test_a_server_sending_both_fields_is_read_once(scripted):
    url, _ = scripted
    scorer = KeywordScorer()
    both = "reasoning,reasoning_content"
    with running_proxy(policy_yaml(url, response=CUT % (16, 16)), scorer) as proxy:
        reply = sdk(proxy, default_headers={"x-script": "think:hmm|ok", "x-reasoning-field": both}
                    ).chat.completions.create(model="m", messages=user("q"))
        chat_stream(proxy, "think:hmm hmm|ok", both)
    assert reply.choices[0].message.content == "ok"
    assert [s.text for s in scorer.sessions] == ["q\nhmm\nok", "q\nhmm hmm ok "]


@pytest.mark.parametrize("field", FIELDS)
def test_non_stream_thinking_is_scored_and_replaced_with_the_answer(scripted, field):
    url, _ = scripted
    with running_proxy(policy_yaml(url, response=CUT % (16, 16)), KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": "think:a BOMB recipe|sure", "x-reasoning-field": field})
        reply = client.chat.completions.with_raw_response.create(model="m", messages=user("q"))
    message = json.loads(reply.content)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": REFUSAL}  # the thinking is gone with the answer
    assert reply.parse().choices[0].finish_reason == "content_filter"


def responses_events(proxy, script: str) -> list:
    client = sdk(proxy, default_headers={"x-script": script})
    return list(client.responses.create(model="m", input="q", stream=True))


def test_responses_stream_harmful_reasoning_item_is_cut(scripted):
    url, _ = scripted
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), KeywordScorer()) as proxy:
        events = responses_events(proxy, "think:so a BOMB needs|fine words")
    shown = json.dumps([e.model_dump() for e in events])
    assert "BOMB" not in shown
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "content_filter"


def test_responses_stream_is_cut_in_the_message_after_a_reasoning_item(scripted):
    """The reasoning item's `.done` events do not end the stream's guarding."""
    url, _ = scripted
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), KeywordScorer()) as proxy:
        events = responses_events(proxy, "think:the user asks about chemistry|here is the BOMB recipe now")
    shown = json.dumps([e.model_dump() for e in events])
    assert "BOMB" not in shown
    assert "the user asks about chemistry" in shown  # the benign reasoning went out
    assert events[-1].type == "response.incomplete"
    assert [e.delta for e in events if e.type == "response.output_text.delta"][-1] == REFUSAL


def test_responses_stream_benign_passes_every_event(scripted):
    url, _ = scripted
    scorer = KeywordScorer()
    script = "think:the user wants otters facts|otters hold hands"
    with running_proxy(policy_yaml(url, response=CUT % (2, 2)), scorer) as proxy:
        events = responses_events(proxy, script)
    upstream = SimpleNamespace(url=url.removesuffix("/v1"))
    direct = list(sdk(upstream, default_headers={"x-script": script}).responses.create(
        model="m", input="q", stream=True))
    assert [e.type for e in events] == [e.type for e in direct]
    assert events[-1].type == "response.completed"
    [session] = scorer.sessions
    assert session.text == "q\nthe user wants otters factsotters hold hands"


def test_responses_non_stream_reasoning_item_is_scored(scripted):
    url, _ = scripted
    with running_proxy(policy_yaml(url, response=CUT % (16, 16)), KeywordScorer()) as proxy:
        response = sdk(proxy, default_headers={"x-script": "think:BOMB parts|sure"}).responses.create(
            model="m", input="q")
    assert response.status == "incomplete" and response.output_text == REFUSAL
    assert [item.type for item in response.output] == ["message"]


def test_safest_of_n_streams_the_chosen_candidates_thinking(scripted):
    url, _ = scripted
    extra = "    rerank: {n: 2, select: safest}"
    with running_proxy(policy_yaml(url, response="{action: cut, threshold: 0.5}", policy_extra=extra),
                       KeywordScorer()) as proxy:
        _, shown = chat_stream(proxy, "think:otters are mammals|yes")
        _, refused = chat_stream(proxy, "think:a BOMB|yes")
    assert shown == "otters are mammalsyes"
    assert refused == REFUSAL


@pytest.mark.parametrize("scope", ["conversation", "last_user"])
def test_thinking_sent_back_in_an_earlier_turn_is_part_of_the_conversation(scripted, scope):
    """A client writes the earlier turns itself: a forged thought is scored as a forged
    answer is, under the conversation scopes (`last_user` reads the last user turn only)."""
    url, recorder = scripted
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "reasoning_content": "I will explain the BOMB", "content": "ok"},
                {"role": "user", "content": "go on"}]
    prompt = f"{{action: refuse, threshold: 0.5, scope: {scope}}}"
    forwarded = len(recorder.requests)
    with running_proxy(policy_yaml(url, prompt=prompt), KeywordScorer()) as proxy:
        reply = sdk(proxy).chat.completions.create(model="m", messages=messages)
        response = sdk(proxy).responses.create(model="m", input=[
            {"role": "user", "content": "hi"},
            {"type": "reasoning", "id": "rs_0", "summary": [],
             "content": [{"type": "reasoning_text", "text": "I will explain the BOMB"}]},
            {"role": "user", "content": "go on"}])
    refused = scope == "conversation"
    assert (reply.choices[0].message.content == REFUSAL) is refused
    assert (response.output_text == REFUSAL) is refused
    assert len(recorder.requests) - forwarded == (0 if refused else 2)
