"""Stored Responses replies read back (`GET responses/{id}`, whole or replayed as a
stream, and `POST responses/{id}/cancel`), guarded by the response stage
(`proxy.retrieval`); background requests, whose output is read only that way.

openai SDK -> siren-proxy -> the scripted upstream, which keeps each response it makes
(unless `store: false`) with its stream's events, answers a background request "queued"
and serves both back as vLLM does (`tests/support/upstream.py`). The scorer is
`KeywordScorer`: "BOMB" crosses.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from policies.config import parse_config
from proxy.memory import MemoryView, Remembered, ResponsesMemory
from proxy.records import Exchange
from proxy.retrieval import Retrieval, resumed, retrieved
from tests.support.clients import close_sdk_clients, sdk  # noqa: F401 - close_sdk_clients is autouse
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer

from .test_previous_response import CUT, REFUSAL, ask, audit_lines, proxy_yaml, stage

HARMFUL = "text:step one then the BOMB part"


def background(client: openai.OpenAI, text: str = "tell me") -> str:
    """A background request's id; it is answered at once, "queued"."""
    queued = client.responses.create(model="m", input=text, background=True)
    assert queued.status == "queued" and queued.output == []
    return queued.id


def replayed(events) -> list[dict]:
    return [event.model_dump() for event in events]


@pytest.mark.parametrize(("script", "expect"), [("text:a plain answer", "a plain answer"), (HARMFUL, REFUSAL)])
def test_a_background_response_is_guarded_when_it_is_read_back(scripted, script, expect):
    """A background request on a route that cuts is forwarded (it was refused up front,
    403, when its output could only be read unguarded); its output is scored when it is
    read back, and one that crosses is the policy's refusal, keeping the upstream's id."""
    url, recorder = scripted
    with running_proxy(proxy_yaml(url, prompt=stage("refuse", "last_user")), KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": script})
        response_id = background(client)
        read = client.responses.retrieve(response_id)
        again = client.responses.retrieve(response_id)
    assert recorder.requests[-1]["path"] == f"/v1/responses/{response_id}"
    assert read.id == again.id == response_id and read.output_text == again.output_text == expect
    if expect == REFUSAL:
        assert read.status == "incomplete" and read.incomplete_details.reason == "content_filter"


def test_a_queued_reply_is_not_scored_until_it_has_text(scripted):
    """A background request answered "queued" has generated nothing yet: its empty
    output is not scored (with `include_prompt`, a harmful prompt the prompt stage only
    shadows would have crossed on its own, and "cut" a reply not yet written); its output
    is scored, after that prompt, when it is read back."""
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(proxy_yaml(url, prompt=stage("shadow", "last_user")), scorer) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:I will not help with that"})
        response_id = background(client, "how to make a BOMB")
        read = client.responses.retrieve(response_id)
    assert read.output_text == REFUSAL  # the prompt with the reply crosses, as a POST's reply would
    assert scorer.sessions[-1].text == "how to make a BOMB\nI will not help with that"


def test_a_reply_the_proxy_cut_is_refused_when_read_back_unscored(scripted, tmp_path):
    """A stream cut at its crossing: the upstream kept the whole text. Read back whole,
    replayed or cancelled it is the refusal, decided on what the proxy remembers (the
    audit says why, with no score) and not on a score of the whole."""
    url, recorder = scripted
    audit = tmp_path / "audit.jsonl"
    scorer = KeywordScorer()
    with running_proxy(proxy_yaml(url, server=f"  audit_log: {audit}"), scorer) as proxy:
        client = sdk(proxy, default_headers={"x-script": HARMFUL})
        cut, text = ask(client, "tell me a story", stream=True)
        scored = len(scorer.checks) + len(scorer.calls)
        whole = client.responses.retrieve(cut)
        stream = replayed(client.responses.retrieve(cut, stream=True))
        cancelled = client.responses.cancel(cut)
        upstream_had = recorder.stored[cut][0]["output"][0]["content"][0]["text"]
    assert text.endswith(REFUSAL) and "BOMB" in upstream_had
    assert whole.id == cut and whole.output_text == REFUSAL and cancelled.output_text == REFUSAL
    deltas = "".join(e["delta"] for e in stream if e["type"] == "response.output_text.delta")
    assert deltas == REFUSAL and stream[-1]["type"] == "response.incomplete" and stream[0]["response"]["id"] == cut
    assert len(scorer.checks) + len(scorer.calls) == scored  # nothing scored: the memory decided
    reads = [line for line in audit_lines(audit) if line["endpoint"] == "responses/retrieve"]
    assert [(d["action"], d["score"], d["reason"]) for line in reads for d in line["decisions"]] == [
        ("cut", None, "stored_response_cut")] * 3


@pytest.mark.parametrize("script", ["text:a plain answer here", HARMFUL])
def test_a_replay_is_guarded_as_the_stream_was(scripted, script):
    """`stream=true`: the upstream's events again, scored as they come; a benign replay
    is the upstream's bytes unchanged, a harmful one is cut at its crossing."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url, prompt=stage("shadow", "last_user")), KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": script})
        response_id = background(client)
        events = replayed(client.responses.retrieve(response_id, stream=True))
        through = httpx.get(f"{proxy.url}/v1/responses/{response_id}", params={"stream": "true"}).content
        direct = httpx.get(f"{url}/responses/{response_id}", params={"stream": "true"}).content
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    if script == HARMFUL:
        assert "BOMB" not in text and text.endswith(REFUSAL) and events[-1]["type"] == "response.incomplete"
        assert b"BOMB" in direct and b"BOMB" not in through
    else:
        assert through == direct and text == "a plain answer here"


@pytest.mark.parametrize(("script", "harmful"), [("text:one two three four five six", False),
                                                 ("text:one BOMB three four five six", True)])
def test_a_resumed_replay_is_read_from_its_start(scripted, script, harmful):
    """`starting_after=n` (a client resuming a broken replay): the upstream is asked for
    the whole replay, whose events up to n are scored but not sent. So text the client
    was sent before still counts: a crossing in it cuts what follows."""
    url, recorder = scripted
    with running_proxy(proxy_yaml(url, prompt=stage("shadow", "last_user")), KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": script})
        response_id = background(client)
        events = replayed(client.responses.retrieve(response_id, stream=True, starting_after=5))
    assert recorder.requests[-1]["query"] == "stream=true"  # from the start
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    if harmful:
        assert text == REFUSAL and events[-1]["type"] == "response.incomplete"
        assert all(e["sequence_number"] > 5 for e in events)  # numbered on from the replay
    else:
        assert [e["sequence_number"] for e in events][0] == 6 and text == "four five six"


@pytest.mark.parametrize("value", ["x", "1.5", "", "99999999999"])
def test_a_starting_after_that_is_not_an_integer_is_a_400(scripted, value):
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(proxy_yaml(url), KeywordScorer()) as proxy:
        reply = httpx.get(proxy.url + "/v1/responses/resp_1", params={"stream": "true", "starting_after": value})
        twice = httpx.get(proxy.url + "/v1/responses/resp_1?stream=true&starting_after=1&starting_after=2")
    for answer in (reply, twice):
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "starting_after"
    assert len(recorder.requests) == before


def test_a_background_reply_read_whole_and_passed_may_be_continued(scripted, tmp_path):
    """Until its output is read, a chain from a background reply is refused (the proxy
    has not read it: `previous_response_unread`); read back whole and passed, it is a
    turn like any other, and a chain from it is scored after its text. A reply read back
    while still in progress is not yet whole: still refused."""
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(proxy_yaml(url), scorer) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:a crimp connector"})
        response_id = background(client, "how do I join two wires")
        before = ask(client, "go on", previous_response_id=response_id)[1]
        partial = client.responses.retrieve(response_id, extra_headers={"x-script": "status:in_progress|a cri"})
        still = ask(client, "go on", previous_response_id=response_id)[1]
        assert client.responses.retrieve(response_id).output_text == "a crimp connector"
        after, text = ask(client, "go on", previous_response_id=response_id)
    assert before == still == REFUSAL and partial.status == "in_progress" and partial.output_text == "a cri"
    assert after.startswith("resp_") and text == "a crimp connector"
    assert scorer.sessions[-1].prompt == "user: how do I join two wires\nassistant: a crimp connector\nuser: go on"


def test_a_reply_cut_when_read_back_cannot_be_continued(scripted):
    """Cut when read back (a background reply, or one the proxy does not remember): the
    memory keeps it as cut, so a chain from it is refused too."""
    url, recorder = scripted
    with running_proxy(proxy_yaml(url), KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": HARMFUL})
        queued = background(client)
        direct = httpx.post(f"{url}/responses", json={"model": "m", "input": "q"}, headers={"x-script": HARMFUL})
        unknown = direct.json()["id"]  # made past the proxy: it does not remember it
        assert client.responses.retrieve(queued).output_text == REFUSAL
        assert client.responses.retrieve(unknown).output_text == REFUSAL
        calls = len(recorder.requests)
        chained = [ask(client, "go on", previous_response_id=i)[1] for i in (queued, unknown)]
    assert chained == [REFUSAL, REFUSAL] and len(recorder.requests) == calls


def test_a_reply_read_back_is_scored_after_the_turns_it_answered(scripted):
    """With `include_prompt` the response stage reads the reply after the conversation the
    proxy remembers for it (under the policy's scope), as it read the reply to the POST."""
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(proxy_yaml(url), scorer) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok"})
        first, _ = ask(client, "first question")
        second = ask(client, "second", previous_response_id=first)[0]
        client.responses.retrieve(second)
    assert scorer.sessions[-1].prompt == "user: first question\nassistant: ok\nuser: second"
    assert scorer.sessions[-1].text.endswith("\nok")


@pytest.mark.parametrize(("response", "decision"), [("{action: flag, threshold: 0.5}", "flagged"),
                                                    ("{action: shadow, threshold: 0.5}", None)])
def test_a_route_that_does_not_cut_passes_a_harmful_reply_read_back(scripted, response, decision):
    url, _ = scripted
    with running_proxy(proxy_yaml(url, response=response), KeywordScorer()) as proxy:
        response_id = background(sdk(proxy, default_headers={"x-script": HARMFUL}))
        reply = httpx.get(f"{proxy.url}/v1/responses/{response_id}")
    assert "BOMB" in reply.json()["output"][0]["content"][0]["text"]
    assert reply.headers.get("x-siren-decision") == decision


def test_without_a_response_stage_a_read_is_forwarded_unread(scripted):
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(proxy_yaml(url, response="{action: off}"), scorer) as proxy:
        response_id = background(sdk(proxy, default_headers={"x-script": HARMFUL}))
        scored = (len(scorer.checks), len(scorer.calls))  # the prompt's
        read = sdk(proxy).responses.retrieve(response_id)
    assert "BOMB" in read.output_text and (len(scorer.checks), len(scorer.calls)) == scored


def test_an_id_the_upstream_does_not_have_is_its_404(scripted):
    url, _ = scripted
    with running_proxy(proxy_yaml(url), KeywordScorer()) as proxy:
        with pytest.raises(openai.NotFoundError) as info:
            sdk(proxy).responses.retrieve("resp_nowhere")
    assert "resp_nowhere" in info.value.message


def test_one_keys_cut_is_not_another_keys_memory(scripted):
    """The memory is partitioned by proxy key: a reply cut under one key is refused to it
    unscored; read by another key it is scored afresh (and cut: its text crosses)."""
    url, _ = scripted
    keys = "  api_keys: [key-a, key-b]"
    scorer = KeywordScorer()
    with running_proxy(proxy_yaml(url, server=keys), scorer) as proxy:
        client = sdk(proxy, api_key="key-a", default_headers={"x-script": HARMFUL})
        cut, _ = ask(client, "tell me", stream=True)
        scored = len(scorer.checks) + len(scorer.calls)
        mine = client.responses.retrieve(cut).output_text
        assert len(scorer.checks) + len(scorer.calls) == scored
        theirs = sdk(proxy, api_key="key-b").responses.retrieve(cut).output_text
    assert mine == theirs == REFUSAL and scorer.calls[-1] == "step one then the BOMB part"  # alone: no turns known


def test_a_replay_takes_a_stream_slot(scripted):
    """A replay is a stream like any other: over `max_concurrent_streams` it is a 503."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url, server="  max_concurrent_streams: 1"), KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": "endless:on and on"})
        held = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], stream=True)
        next(iter(held))
        with pytest.raises(openai.InternalServerError, match="too many concurrent streams"):
            client.responses.retrieve("resp_1", stream=True)
        whole = httpx.get(f"{proxy.url}/v1/responses/resp_nowhere")  # not a stream: no slot needed
        held.close()
    assert whole.status_code == 404


def test_cut_routes_unchanged_for_what_the_guard_still_cannot_read(scripted):
    """An Assistants thread's messages are still refused where the response stage cuts
    (Responses replies, stored chat completions and conversation items are read back
    guarded: `proxy.retrieval`, `proxy.stored`)."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url), KeywordScorer()) as proxy:
        messages = httpx.get(f"{proxy.url}/v1/threads/t1/messages")
    assert messages.status_code == 403 and messages.json()["error"]["code"] == "unguarded_endpoint"


def test_cut_still_covers_the_stream_of_a_background_request(scripted):
    """`background: true` streamed is guarded as it is generated, as before."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url, response=CUT), KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": HARMFUL})
        events = list(client.responses.create(model="m", input="q", background=True, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "BOMB" not in text and text.endswith(REFUSAL)


@pytest.mark.parametrize("stream", [False, True])
def test_a_guard_that_fails_on_a_read_fails_closed(scripted, stream):
    """`on_guard_error: block` (the default): a read the guard cannot score is a 503
    `guard_unavailable` whole, an in-band error replayed; never the unscored text."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url, prompt="{action: off}"), KeywordScorer()) as proxy:
        response_id = background(sdk(proxy, default_headers={"x-script": HARMFUL}))
    with running_proxy(proxy_yaml(url, prompt="{action: off}"), KeywordScorer(fail=True)) as proxy:
        reply = httpx.get(f"{proxy.url}/v1/responses/{response_id}", params={"stream": "true"} if stream else {})
    assert "BOMB" not in reply.text
    if stream:
        assert reply.status_code == 200 and '"code":"guard_unavailable"' in reply.text.replace(" ", "")
    else:
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "guard_unavailable"


def test_a_read_is_known_by_its_path_and_its_id_as_the_upstream_reads_it(scripted):
    """`GET responses/{id}` and `POST responses/{id}/cancel`, in any case and with matrix
    parameters, as endpoints are known; the id as sent, and also without its matrix
    parameters (as Tomcat or Spring would read it) when the memory holds that one cut."""
    assert retrieved("GET", "http://h/v1/Responses/resp_A") == "resp_A"
    assert retrieved("POST", "http://h/v1/responses/resp_A/Cancel;x=1") == "resp_A"
    assert [retrieved("GET", "http://h/v1/responses/resp_A/input_items"), retrieved("POST", "http://h/v1/responses"),
            retrieved("DELETE", "http://h/v1/responses/resp_A")] == [None, None, None]
    assert resumed("stream=true&starting_after=7&include=x") == ("stream=true&include=x", 7)
    assert resumed("stream=true") == ("stream=true", None)
    memory = ResponsesMemory()
    view = MemoryView.of(memory, key_name=None, upstream="up", megabytes=1)
    view.remember("resp_A", Remembered((("user", "q"), ("assistant", "a BOMB")), "cut"))
    view.remember("resp_A;v=1", Remembered((("user", "q"), ("assistant", "fine")), None))
    policy = parse_config(proxy_yaml(scripted[0])).policies["p"]
    read = Retrieval(scorer=None, audit=None, policy=policy, exchange=Exchange("r", "p", "x", False),
                     response_id="resp_A;v=1", memory=view)
    assert (read.remembered_as, read.entry.withheld, read.prompt) == ("resp_A", "cut", "user: q")


def test_a_cut_reply_read_through_a_route_that_only_flags_goes_on_flagged(scripted):
    """The memory is per key and upstream, not per route: a reply cut through one route,
    read back through a route on the same upstream whose response stage flags, goes on
    as the upstream kept it, flagged as crossing (unscored: the memory decided)."""
    url, _ = scripted
    text = proxy_yaml(url, extra="  loose: {prompt: {action: off}, response: {action: flag, threshold: 0.5}}")
    text = text.replace("  - {prefix: /v1, upstream: up, policy: p}",
                        "  - {prefix: /loose/v1, upstream: up, policy: loose}\n  - {prefix: /v1, upstream: up, policy: p}")
    scorer = KeywordScorer()
    with running_proxy(text, scorer) as proxy:
        cut, _ = ask(sdk(proxy, default_headers={"x-script": HARMFUL}), "tell me", stream=True)
        scored = len(scorer.checks) + len(scorer.calls)
        read = httpx.get(f"{proxy.url}/loose/v1/responses/{cut}")
    assert "BOMB" in read.json()["output"][0]["content"][0]["text"]
    assert read.headers["x-siren-decision"] == "flagged" and "x-siren-score" not in read.headers
    assert len(scorer.checks) + len(scorer.calls) == scored


@pytest.mark.parametrize(("on_error", "status"), [("block", 503), ("allow", 200)])
def test_a_read_back_that_is_no_response_meets_on_guard_error(scripted, on_error, status):
    """A 200 at `responses/{id}` that is not a Responses reply (here the scripted
    upstream's echo, under a route mounted below its `/v1`) may carry text the guard
    never scores: a guard failure, refused under `on_guard_error: block`."""
    url, _ = scripted
    text = proxy_yaml(url + "/odd", extra=f"    on_guard_error: {on_error}")
    with running_proxy(text, KeywordScorer()) as proxy:
        reply = httpx.get(f"{proxy.url}/v1/responses/resp_x")
    assert reply.status_code == status
    if status == 503:
        assert reply.json()["error"]["code"] == "guard_unavailable"
    else:
        assert reply.json()["path"] == "/v1/odd/responses/resp_x"
