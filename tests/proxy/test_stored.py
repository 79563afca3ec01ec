"""Stored chat completions read back (`GET chat/completions/{id}`, `POST` of its metadata,
`GET chat/completions`) and a conversation's items, guarded by the response stage (`proxy.stored`).

openai SDK -> siren-proxy -> the scripted upstream, which keeps a chat completion made
with `store: true` whole (however much of its stream the client read) and serves it back
as OpenAI does (`tests/support/upstream.py`). The scorer is `KeywordScorer`: "BOMB"
crosses.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.support.clients import close_sdk_clients, sdk  # noqa: F401 - close_sdk_clients is autouse
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer

from .test_previous_response import CUT, REFUSAL, audit_lines, proxy_yaml, stage

HARMFUL = "text:step one then the BOMB part"
BENIGN = "text:a plain answer"
USER = [{"role": "user", "content": "tell me"}]


def stored(client: openai.OpenAI, script: str, *, stream: bool = False) -> tuple[str, str]:
    """(id, text the client got) of a chat completion made with `store: true`."""
    extra = {"extra_headers": {"x-script": script}}
    if not stream:
        completion = client.chat.completions.create(model="m", messages=USER, store=True, **extra)
        return completion.id, completion.choices[0].message.content
    chunks = list(client.chat.completions.create(model="m", messages=USER, store=True, stream=True, **extra))
    return chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_a_completion_the_proxy_cut_is_refused_again_unscored(scripted, tmp_path, stream):
    """OpenAI keeps a stored completion whole, the text the proxy cut included: read
    back, updated or listed, it is the refusal again, without a score (a score of the whole
    need not cross where a check of a prefix did)."""
    url, recorder = scripted
    recorder.chats.clear()
    audit = tmp_path / "audit.jsonl"
    scorer = KeywordScorer()
    with running_proxy(proxy_yaml(url, prompt=stage("shadow"), server=f"  audit_log: {audit}"), scorer) as proxy:
        client = sdk(proxy)
        completion_id, got = stored(client, HARMFUL, stream=stream)
        assert REFUSAL in got and "BOMB" in recorder.chats[completion_id]["choices"][0]["message"]["content"]
        scored = len(scorer.calls)
        read = client.chat.completions.retrieve(completion_id)
        updated = client.chat.completions.update(completion_id, metadata={"k": "v"})
        listed = client.chat.completions.list()
    assert len(scorer.calls) == scored  # refused unscored
    for completion in (read, updated, listed.data[0]):
        assert completion.id == completion_id
        assert completion.choices[0].message.content == REFUSAL
        assert completion.choices[0].finish_reason == "content_filter"
    assert updated.metadata == {"k": "v"} and recorder.chats[completion_id]["metadata"] == {"k": "v"}
    reads = [r for r in audit_lines(audit) if r["endpoint"] == "chat/completions/stored"]
    assert len(reads) == 3
    assert all(d["reason"] == "stored_completion_cut" and d["action"] == "cut" for r in reads for d in r["decisions"])


def test_a_stored_completion_the_proxy_never_read_is_scored_alone(scripted):
    """One made around the proxy (here, through a route whose response stage is off) is
    scored on its own text when read back: one that crosses is the refusal, and
    remembered as cut; a benign one comes back as the upstream kept it."""
    url, recorder = scripted
    recorder.chats.clear()
    text = proxy_yaml(url, prompt=stage("off")).replace(
        "routes:\n", "  open:\n    prompt: {action: off}\n    response: {action: off}\nroutes:\n"
        "  - {prefix: /open/v1, upstream: up, policy: open}\n")
    scorer = KeywordScorer()
    with running_proxy(text, scorer) as proxy:
        around = openai.OpenAI(base_url=proxy.url + "/open/v1", api_key="sk", max_retries=0)
        harmful_id, got = stored(around, HARMFUL)
        benign_id, _ = stored(around, BENIGN)
        around.close()
        assert "BOMB" in got  # not read on the way out
        client = sdk(proxy)
        assert client.chat.completions.retrieve(benign_id).choices[0].message.content == "a plain answer"
        read = client.chat.completions.retrieve(harmful_id)
        scored = len(scorer.calls)
        again = client.chat.completions.retrieve(harmful_id)  # remembered as cut: unscored
    assert read.choices[0].message.content == again.choices[0].message.content == REFUSAL
    assert len(scorer.calls) == scored
    assert read.usage.total_tokens > 0 and read.model == "smollm2"  # the rest of the object kept


def test_a_list_is_read_item_by_item(scripted):
    """`GET chat/completions`: each stored completion is decided on its own; the ones that
    cross are the refusal, the others and the page's own fields stay as they came."""
    url, recorder = scripted
    recorder.chats.clear()
    with running_proxy(proxy_yaml(url, prompt=stage("off"), response="{action: off}"), KeywordScorer()) as proxy:
        ids = [stored(sdk(proxy), script)[0] for script in (BENIGN, HARMFUL, BENIGN)]
    with running_proxy(proxy_yaml(url, prompt=stage("off")), KeywordScorer()) as proxy:
        page = sdk(proxy).chat.completions.list()
    assert [c.id for c in page.data] == ids and page.has_more is False
    assert [c.choices[0].message.content for c in page.data] == ["a plain answer", REFUSAL, "a plain answer"]


def test_under_flag_a_stored_completion_is_relayed_with_its_verdict(scripted):
    url, recorder = scripted
    recorder.chats.clear()
    with running_proxy(proxy_yaml(url, prompt=stage("off"), response="{action: off}"), KeywordScorer()) as proxy:
        completion_id, _ = stored(sdk(proxy), HARMFUL)
    with running_proxy(proxy_yaml(url, prompt=stage("off"), response="{action: flag, threshold: 0.5}"),
                       KeywordScorer()) as proxy:
        reply = httpx.get(f"{proxy.url}/v1/chat/completions/{completion_id}")
    assert reply.status_code == 200 and "BOMB" in reply.json()["choices"][0]["message"]["content"]
    assert reply.headers["x-siren-decision"] == "flagged" and reply.headers["x-siren-stage"] == "response"


@pytest.mark.parametrize("on_guard_error, status", [("block", 503), ("allow", 200)])
def test_what_the_guard_cannot_read_or_score_meets_on_guard_error(scripted, on_guard_error, status):
    """A 200 that is no stored completion (or a list whose item is none), and a guard that
    fails, may carry text it never scored: 503 under `block`, as it came under `allow`."""
    url, recorder = scripted
    recorder.chats.clear()
    text = proxy_yaml(url, prompt=stage("off"), extra=f"    on_guard_error: {on_guard_error}")
    with running_proxy(proxy_yaml(url, prompt=stage("off"), response="{action: off}"), KeywordScorer()) as proxy:
        completion_id, _ = stored(sdk(proxy), HARMFUL)
    odd = [json.dumps({"object": "list", "data": [{"id": "chatcmpl-x", "choices": "BOMB"}]}),
           json.dumps({"id": "chatcmpl-x", "output": "BOMB"})]
    with running_proxy(text, KeywordScorer()) as proxy:
        replies = [httpx.get(proxy.url + "/v1/chat/completions", headers={"x-script": f"raw:{odd[0]}"}),
                   httpx.get(proxy.url + "/v1/chat/completions/chatcmpl-x", headers={"x-script": f"raw:{odd[1]}"})]
    with running_proxy(text, KeywordScorer(fail=True)) as proxy:
        replies.append(httpx.get(f"{proxy.url}/v1/chat/completions/{completion_id}"))
    assert [r.status_code for r in replies] == [status] * 3, [r.text for r in replies]
    if status == 503:
        assert all(r.json()["error"]["code"] == "guard_unavailable" for r in replies)


def test_what_carries_no_generated_text_is_forwarded_as_it_came(scripted):
    """An id the upstream does not keep (vLLM keeps none) is its 404; the request's own
    messages and a deletion are forwarded; with the response stage off, nothing is read."""
    url, recorder = scripted
    recorder.chats.clear()
    with running_proxy(proxy_yaml(url, prompt=stage("off")), KeywordScorer()) as proxy:
        client = sdk(proxy)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.retrieve("chatcmpl-none")
        completion_id, _ = stored(client, BENIGN)
        messages = httpx.get(f"{proxy.url}/v1/chat/completions/{completion_id}/messages")
        assert messages.status_code == 200 and messages.json()["path"].endswith("/messages")  # the echo route
        assert client.chat.completions.delete(completion_id).deleted is True
    with running_proxy(proxy_yaml(url, prompt=stage("off"), response="{action: off}"), KeywordScorer()) as proxy:
        harmful_id, _ = stored(sdk(proxy), HARMFUL)
        assert "BOMB" in sdk(proxy).chat.completions.retrieve(harmful_id).choices[0].message.content


def test_a_cut_without_store_is_not_remembered(scripted):
    """Only `store: true` completions are kept upstream, so only they are remembered."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url, prompt=stage("off"), response=CUT), KeywordScorer()) as proxy:
        client = sdk(proxy)
        client.chat.completions.create(model="m", messages=USER, extra_headers={"x-script": HARMFUL})
        proxy_memory = proxy.server.config.app.state.proxy.memory
    assert proxy_memory.nbytes == 0


def conversation_with(client: openai.OpenAI, script: str, *, stream: bool = False) -> str:
    """A conversation (the Conversations API) holding a client's turn, which itself says
    BOMB, then a Responses turn answered by `script`; its id."""
    conversation = client.conversations.create(
        items=[{"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "a BOMB question of my own"}]}]).id
    options = {"extra_headers": {"x-script": script}, "conversation": conversation}
    if stream:
        list(client.responses.create(model="m", input="and then?", stream=True, **options))
    else:
        client.responses.create(model="m", input="and then?", **options)
    return conversation


def test_a_conversations_items_the_model_wrote_are_read_back_guarded(scripted):
    """`GET conversations/{id}/items[/{item}]` (they were refused where the response stage
    cuts): an item the model wrote that crosses (here, its reasoning) is the refusal under
    its own id; the answer beside it and the client's own turns come back as kept, and are
    not scored (the client's turns are its input). Read again, the item is refused
    unscored."""
    url, recorder = scripted
    with running_proxy(proxy_yaml(url, prompt=stage("off"), response="{action: off}"), KeywordScorer()) as proxy:
        conversation = conversation_with(sdk(proxy), "think:the BOMB plan|a plain answer")
    kept = recorder.conversations[conversation]
    scorer = KeywordScorer()
    with running_proxy(proxy_yaml(url, prompt=stage("off")), scorer) as proxy:
        client = sdk(proxy)
        items = client.conversations.items.list(conversation, order="asc").data
        scored = list(scorer.calls)
        reasoning = kept[2]["id"]
        one = client.conversations.items.retrieve(reasoning, conversation_id=conversation)
        again = client.conversations.items.retrieve(reasoning, conversation_id=conversation)
        answer = client.conversations.items.retrieve(kept[3]["id"], conversation_id=conversation)
    assert [item.id for item in items] == [item["id"] for item in kept]
    assert [item.type for item in items] == ["message", "message", "message", "message"]
    assert items[0].content[0].text == "a BOMB question of my own" and items[1].content[0].text == "and then?"
    assert items[2].role == "assistant" and items[2].content[0].text == REFUSAL
    assert items[3].content[0].text == "a plain answer"
    assert not any("question of my own" in text or "and then?" in text for text in scored)
    assert one.id == again.id == reasoning and one.content[0].text == again.content[0].text == REFUSAL
    assert answer.content[0].text == "a plain answer"
    assert len(scorer.calls) == len(scored) + 1  # the read of the answer; not the second of the reasoning


def test_a_turn_the_proxy_cut_is_whole_in_its_conversation_and_refused_when_read(scripted):
    """The upstream adds the whole reply to the conversation, whatever the proxy cut of its
    stream: reading the conversation through the proxy refuses it."""
    url, recorder = scripted
    with running_proxy(proxy_yaml(url, prompt=stage("off")), KeywordScorer()) as proxy:
        client = sdk(proxy)
        conversation = conversation_with(client, HARMFUL, stream=True)
        items = client.conversations.items.list(conversation, order="asc").data
    assert "BOMB" in recorder.conversations[conversation][-1]["content"][0]["text"]
    assert items[-1].content[0].text == REFUSAL


@pytest.mark.parametrize("on_guard_error, status", [("block", 503), ("allow", 200)])
def test_conversation_items_the_guard_cannot_read_meet_on_guard_error(scripted, on_guard_error, status):
    url, _ = scripted
    odd = json.dumps({"object": "list", "data": [{"id": "msg_x", "role": "assistant", "content": "BOMB"}]})
    text = proxy_yaml(url, prompt=stage("off"), extra=f"    on_guard_error: {on_guard_error}")
    with running_proxy(text, KeywordScorer()) as proxy:
        reply = httpx.get(proxy.url + "/v1/conversations/conv_x/items", headers={"x-script": f"raw:{odd}"})
    assert reply.status_code == status, reply.text
