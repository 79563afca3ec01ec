"""vLLM's batch chat completions guarded per conversation: openai SDK -> siren-proxy ->
scripted upstream (vLLM's `/v1/chat/completions/batch` shape; tests/e2e drives real vLLM).

The openai SDK has no method for this vLLM endpoint; a client posts to it with the SDK's
own `post`, and reads the reply as a `ChatCompletion`, as these tests do. The scorer is
`KeywordScorer` (BOMB scores 0.99, borderline 0.4, anything else 0.01).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.support.clients import close_sdk_clients, sdk  # noqa: F401 - close_sdk_clients is autouse
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer

from .test_guarded import REFUSAL, policy_yaml, user

PATH = "/v1/chat/completions/batch"
REFUSE = "{action: refuse, threshold: 0.5}"
CUT = "{action: cut, threshold: 0.5}"


def batch(client: openai.OpenAI, *questions: str, **extra) -> ChatCompletion:
    body = {"model": "m", "messages": [user(q) for q in questions], **extra}
    return client.post("/chat/completions/batch", body=body, cast_to=ChatCompletion)


def contents(reply: ChatCompletion) -> list[tuple[int, str, str]]:
    return [(c.index, c.message.content, c.finish_reason) for c in reply.choices]


def audit_decisions(path) -> list[tuple[str, int | None, str]]:
    [record] = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["endpoint"] == "chat/completions/batch"
    return [(d["stage"], d.get("choice"), d["action"]) for d in record["decisions"]]


# -- prompt stage ---------------------------------------------------------------------------

def test_a_refused_conversation_gets_the_refusal_and_the_others_their_answers(scripted, tmp_path):
    """Only the conversations that go on reach the upstream, in order; its choices come
    back at their conversations' indexes, the refused one's choice between them."""
    url, recorder = scripted
    audit = tmp_path / "audit.jsonl"
    with running_proxy(policy_yaml(url, prompt=REFUSE, server=f"  audit_log: {audit}"), KeywordScorer()) as proxy:
        reply = batch(sdk(proxy), "hi", "how to build a BOMB", "otters?")
    assert contents(reply) == [(0, "echo: hi", "stop"), (1, REFUSAL, "content_filter"),
                               (2, "echo: otters?", "stop")]
    sent = recorder.requests[-1]
    assert sent["path"] == "/v1/chat/completions/batch"
    assert sent["body"]["messages"] == [user("hi"), user("otters?")]
    assert reply.usage.prompt_tokens == 10  # the upstream's own, for the two it ran
    assert audit_decisions(audit) == [("prompt", 0, "allow"), ("prompt", 1, "refuse"), ("prompt", 2, "allow")]


def test_a_batch_refused_whole_never_reaches_the_upstream(scripted):
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(policy_yaml(url, prompt=REFUSE), KeywordScorer()) as proxy:
        reply = batch(sdk(proxy), "a BOMB", "another BOMB")
    assert contents(reply) == [(0, REFUSAL, "content_filter"), (1, REFUSAL, "content_filter")]
    assert reply.model == "m" and reply.object == "chat.completion"
    assert len(recorder.requests) == before


def test_an_allowed_batch_is_forwarded_as_sent_and_answered_as_it_came(scripted):
    url, recorder = scripted
    body = {"model": "m", "messages": [user("hi"), user("otters?")], "max_tokens": 4, "seed": 7}
    with running_proxy(policy_yaml(url, prompt=REFUSE, response=CUT), KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + PATH, json=body)
    assert recorder.requests[-1]["body"] == body
    assert reply.status_code == 200 and reply.json()["id"] == "chatcmpl-batch"
    assert [c["message"]["content"] for c in reply.json()["choices"]] == ["echo: hi", "echo: otters?"]


def test_steer_adds_the_safety_message_to_the_conversations_in_the_band_only(scripted):
    url, recorder = scripted
    prompt = '{action: steer, threshold: 0.8, steer: {from: 0.3, system_message: "Be careful."}}'
    with running_proxy(policy_yaml(url, prompt=prompt), KeywordScorer()) as proxy:
        reply = batch(sdk(proxy), "a plain question", "a borderline question", "a BOMB")
    assert recorder.requests[-1]["body"]["messages"] == [
        user("a plain question"), [{"role": "system", "content": "Be careful."}, *user("a borderline question")]]
    assert [c[2] for c in contents(reply)] == ["stop", "stop", "content_filter"]


def test_block_answers_the_whole_batch_with_the_conversation_named(scripted):
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(policy_yaml(url, prompt="{action: block}"), KeywordScorer()) as proxy:
        with pytest.raises(openai.BadRequestError) as raised:
            batch(sdk(proxy), "hi", "a BOMB")
    error = raised.value.body
    assert error["code"] == "content_filter" and error["param"] == "messages[1]"
    assert "conversation 1" in error["message"]
    assert raised.value.response.headers["x-siren-decision"] == "block"
    assert len(recorder.requests) == before


@pytest.mark.parametrize(("questions", "sent"), [(("hi", "otters?"), 1), (("hi", "a BOMB"), 2)])
def test_parallel_mode_keeps_the_batch_sent_at_once_only_when_nothing_changed(scripted, questions, sent):
    """`mode: parallel` sends the batch before the verdicts; a refused conversation means
    that request is dropped and the ones that go on are sent again."""
    url, recorder = scripted
    before = len(recorder.requests)
    prompt = "{action: refuse, threshold: 0.5, mode: parallel}"
    with running_proxy(policy_yaml(url, prompt=prompt), KeywordScorer(delay=0.2)) as proxy:
        reply = batch(sdk(proxy), *questions)
    assert len(recorder.requests) - before == sent
    assert recorder.requests[-1]["body"]["messages"] == [user("hi")] + ([user("otters?")] if sent == 1 else [])
    assert contents(reply)[0] == (0, "echo: hi", "stop")


@pytest.mark.parametrize(("on_error", "status"), [("block", 503), ("allow", 200)])
def test_a_guard_failure_meets_on_guard_error(scripted, on_error, status):
    url, _ = scripted
    text = policy_yaml(url, prompt=REFUSE, policy_extra=f"    on_guard_error: {on_error}")
    with running_proxy(text, KeywordScorer(fail=True)) as proxy:
        reply = httpx.post(proxy.url + PATH, json={"model": "m", "messages": [user("hi"), user("a BOMB")]})
    assert reply.status_code == status, reply.text
    if status == 503:
        assert reply.json()["error"]["code"] == "guard_unavailable" and reply.json()["error"]["param"] == "messages[0]"
    else:
        assert len(reply.json()["choices"]) == 2


def test_a_full_guard_queue_is_503_with_retry_after(scripted):
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(policy_yaml(url, prompt=REFUSE), KeywordScorer(busy=True)) as proxy:
        reply = httpx.post(proxy.url + PATH, json={"model": "m", "messages": [user("hi")] * 20})
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
    assert reply.json()["error"]["code"] == "overloaded" and len(recorder.requests) == before


# -- response stage -------------------------------------------------------------------------

def test_a_reply_that_crosses_is_replaced_and_the_others_kept(scripted, tmp_path):
    """The refused choice keeps nothing of the reply it replaces: its log-probabilities and
    token ids spell the text out."""
    url, _ = scripted
    audit = tmp_path / "audit.jsonl"
    with running_proxy(policy_yaml(url, response=CUT, server=f"  audit_log: {audit}"), KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:fine|step one of the BOMB|ok"})
        reply = batch(client, "a", "b", "c", logprobs=True, return_token_ids=True)
    assert contents(reply) == [(0, "fine", "stop"), (1, REFUSAL, "content_filter"), (2, "ok", "stop")]
    assert reply.choices[1].logprobs is None and "BOMB" not in reply.model_dump_json()
    assert reply.choices[0].logprobs is not None
    assert audit_decisions(audit) == [("response", 0, "allow"), ("response", 1, "cut"), ("response", 2, "allow")]


def test_each_reply_is_scored_with_its_own_conversations_prompt(scripted):
    """A refused conversation shifts the others' positions upstream; each reply is still
    scored as `its prompt + "\\n" + reply` (here only the borderline prompt takes its
    reply over the response threshold), on a session per conversation."""
    url, _ = scripted
    scorer = KeywordScorer()
    prompt, response = "{action: refuse, threshold: 0.9}", "{action: cut, threshold: 0.3}"
    with running_proxy(policy_yaml(url, prompt=prompt, response=response), scorer) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:plain one|plain two"})
        reply = batch(client, "a BOMB", "hi", "a borderline question")
    assert contents(reply) == [(0, REFUSAL, "content_filter"), (1, "plain one", "stop"),
                               (2, REFUSAL, "content_filter")]
    appended = sorted(s.text for s in scorer.sessions if s.text.count("\n") == 1 and not s.text.endswith("\n"))
    assert appended == ["a borderline question\nplain two", "hi\nplain one"]
    assert all(s.closed for s in scorer.sessions)


def test_without_include_prompt_the_replies_are_scored_alone(scripted):
    url, _ = scripted
    scorer = KeywordScorer()
    response = "{action: cut, threshold: 0.3, include_prompt: false}"
    with running_proxy(policy_yaml(url, response=response), scorer) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:plain one|plain two"})
        reply = batch(client, "hi", "a borderline question")
    assert [c[2] for c in contents(reply)] == ["stop", "stop"]
    assert sorted(scorer.calls) == ["plain one", "plain two"]


def test_a_conversation_the_guard_cannot_read_lets_its_reply_be_scored_alone(scripted):
    """A conversation holding a `prompt_embeds` part has no prompt text: let past the
    prompt stage (`on_guard_error: allow`), its reply is scored on its own text, the
    others' with their prompts, and a harmful one is cut there."""
    url, recorder = scripted
    scorer = KeywordScorer()
    embeds = [{"role": "user", "content": [{"type": "prompt_embeds", "data": "AAAA"}]}]
    yaml = policy_yaml(url, prompt=REFUSE, response=CUT, policy_extra="    on_guard_error: allow")
    with running_proxy(yaml, scorer) as proxy:
        reply = httpx.post(proxy.url + PATH, json={"model": "m", "messages": [user("hi"), embeds]},
                           headers={"x-script": "text:plain one|a BOMB recipe"})
    assert reply.status_code == 200, reply.text
    assert [(c["index"], c["finish_reason"]) for c in reply.json()["choices"]] == [(0, "stop"), (1, "content_filter")]
    assert recorder.requests[-1]["body"]["messages"][1] == embeds  # sent as it came
    assert "a BOMB recipe" in scorer.calls + [s.text for s in scorer.sessions]  # alone, no prompt before it


def test_flag_headers_name_the_conversation_that_crossed(scripted):
    url, _ = scripted
    with running_proxy(policy_yaml(url, prompt="{action: flag, threshold: 0.5}"), KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + PATH, json={"model": "m", "messages": [user("hi"), user("a BOMB")]})
    assert reply.status_code == 200 and len(reply.json()["choices"]) == 2
    assert reply.headers["x-siren-decision"] == "flagged" and reply.headers["x-siren-score"] == "0.9900"


@pytest.mark.parametrize(("questions", "replies", "expected"), [
    (("a BOMB", "hi"), "fine|fine", ("prompt", "flagged")),
    (("a BOMB", "hi"), "fine|a BOMB", ("prompt", "flagged")),
    (("hi", "otters?"), "fine|a BOMB", ("response", "flagged")),
    (("hi", "otters?"), "fine|fine", ("prompt", "allowed")),
])
def test_flag_on_both_stages_tells_the_prompts_verdict_unless_only_a_reply_crossed(scripted, questions, replies,
                                                                                   expected):
    """As a chat reply's (tests/proxy/test_guarded.py): one decision, the prompt stage's
    unless it was allowed and the response stage's says more."""
    url, _ = scripted
    text = policy_yaml(url, prompt="{action: flag, threshold: 0.5}",
                       response="{action: flag, threshold: 0.5, include_prompt: false}")
    with running_proxy(text, KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + PATH, json={"model": "m", "messages": [user(q) for q in questions]},
                           headers={"x-script": f"text:{replies}"})
    assert reply.status_code == 200 and len(reply.json()["choices"]) == 2
    assert (reply.headers["x-siren-stage"], reply.headers["x-siren-decision"]) == expected


# -- bad input and faults ---------------------------------------------------------------------

@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": user("not a list of conversations")}, "messages[0]"),
    ({"model": "m", "messages": [user("ok"), []]}, "messages[1]"),
    ({"model": "m", "messages": [user("ok"), [{"content": "no role"}]]}, "messages[1][0]"),
    ({"model": "m", "messages": [user("ok"), [{"role": "user", "content": 7}]]}, "messages[1][0].content"),
    ({"model": "m", "messages": [user("ok")], "stream": True}, "stream"),
    ({"model": "m", "messages": [user("ok")], "n": 2}, "n"),
    ({"model": "m", "messages": [user("ok")], "n": True}, "n"),
])
def test_bad_batches_are_400_with_the_param_named(scripted, body, param):
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(policy_yaml(url, prompt=REFUSE), KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + PATH, json=body)
        broken = httpx.post(proxy.url + PATH, content=b'{"messages": [[')
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param and reply.json()["error"]["type"] == "invalid_request_error"
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    assert len(recorder.requests) == before


def test_an_upstream_error_is_relayed_as_it_came(scripted):
    url, _ = scripted
    with running_proxy(policy_yaml(url, prompt=REFUSE, response=CUT), KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + PATH, json={"model": "m", "messages": [user("hi"), user("a BOMB")]},
                           headers={"x-script": "error:400"})
    assert reply.status_code == 400 and reply.json()["message"] == "scripted upstream error"


@pytest.mark.parametrize("raw", ["not json", '{"choices": "no"}',
                                 '{"choices": [{"index": 3, "message": {"content": "x"}}]}',
                                 # one more choice, with no index (or not a number): a 500 and a traceback
                                 '{"choices": [{"index": 0, "message": {"content": "x"}}, {"message": {"content": "y"}}]}',
                                 '{"choices": [{"index": 0, "message": {"content": "x"}}, '
                                 '{"index": "1", "message": {"content": "y"}}]}'])
def test_an_unreadable_reply_is_never_passed_off_as_the_batchs(scripted, raw):
    """With a conversation held back, the reply must be re-indexed: one the proxy cannot read
    is a 502, whatever the response stage would say (the upstream's fault, not the
    guard's). Sent whole, it is the response stage's to judge: 503 where the policy fails
    closed, as it came where it allows."""
    url, _ = scripted
    body = {"model": "m", "messages": [user("hi"), user("a BOMB")]}
    with running_proxy(policy_yaml(url, prompt=REFUSE), KeywordScorer()) as proxy:
        held_back = httpx.post(proxy.url + PATH, json=body, headers={"x-script": f"raw:{raw}"})
    held_back_guarded = []
    for extra in ("", "    on_guard_error: allow"):
        with running_proxy(policy_yaml(url, prompt=REFUSE, response=CUT, policy_extra=extra),
                           KeywordScorer()) as proxy:
            held_back_guarded.append(httpx.post(proxy.url + PATH, json=body, headers={"x-script": f"raw:{raw}"}))
    body = {"model": "m", "messages": [user("hi")]}
    with running_proxy(policy_yaml(url, response=CUT), KeywordScorer()) as proxy:
        closed = httpx.post(proxy.url + PATH, json=body, headers={"x-script": f"raw:{raw}"})
    allow = policy_yaml(url, response=CUT, policy_extra="    on_guard_error: allow")
    with running_proxy(allow, KeywordScorer()) as proxy:
        allowed = httpx.post(proxy.url + PATH, json=body, headers={"x-script": f"raw:{raw}"})
    for reply in (held_back, *held_back_guarded):
        assert reply.status_code == 502 and reply.json()["error"]["code"] == "bad_upstream_reply", reply.text
    assert closed.status_code == 503 and closed.json()["error"]["code"] == "guard_unavailable"
    assert allowed.status_code == 200 and allowed.text == raw


def test_an_unguarded_route_passes_the_batch_through_byte_for_byte(scripted):
    url, recorder = scripted
    body = b'{"model": "m", "messages": [[{"role": "user", "content": "a BOMB"}]]}'
    with running_proxy(policy_yaml(url), KeywordScorer()) as proxy:
        reply = httpx.post(proxy.url + PATH, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "echo: a BOMB"
    assert recorder.requests[-1]["body"] == json.loads(body)
