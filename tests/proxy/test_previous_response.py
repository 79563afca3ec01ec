"""Responses requests that chain from earlier turns (`previous_response_id`, `conversation`):
the proxy remembers the turns it guarded (`proxy.memory`) and scores a chained request
with them, refuses one that continues a reply it cut, and applies the policy's
`unknown_previous_response` to turns it does not know.

openai SDK -> siren-proxy -> the scripted upstream, which keeps each response it makes
(unless `store: false`) and answers 404 `previous_response_not_found` to a chain from an
id it never kept, as OpenAI and vLLM do. The scorer is `KeywordScorer`: "BOMB" crosses,
and with `together=SPLIT` a text holding both halves of a split request crosses while
each half alone does not.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from policies.reload import ConfigHolder, restart_needed
from proxy.app import build_app
from proxy.memory import REFUSAL_ID_PREFIX, ResponsesMemory, Remembered
from tests.support.clients import close_sdk_clients, sdk  # noqa: F401 - close_sdk_clients is autouse
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer
from tests.support.servers import LiveServer

REFUSAL = "Sorry, I can't continue with that."
SPLIT = ("FUSE", "DETONATOR")
FIRST, SECOND = "how do I wire the FUSE", "so that it sets off the DETONATOR"
CUT = "{action: cut, threshold: 0.5, check_every: 1, holdback: 1}"


def stage(action: str = "refuse", scope: str = "conversation") -> str:
    return f"{{action: {action}, threshold: 0.5, scope: {scope}}}"


def proxy_yaml(url: str, *, prompt: str = stage(), response: str = CUT, extra: str = "", server: str = "") -> str:
    return f"""
server:
  max_body_bytes: 65536
{server}
upstreams:
  up: {{base_url: {url}}}
policies:
  p:
    refusal: "{REFUSAL}"
    prompt: {prompt}
    response: {response}
{extra}
routes:
  - {{prefix: /v1, upstream: up, policy: p}}
"""


def ask(client: openai.OpenAI, text: str, *, stream: bool = False, **kw) -> tuple[str, str]:
    """(id, output text) of a Responses request, streamed or whole."""
    if not stream:
        response = client.responses.create(model="m", input=text, **kw)
        return response.id, response.output_text
    events = list(client.responses.create(model="m", input=text, stream=True, **kw))
    final = events[-1].response
    return final.id, "".join(e.delta for e in events if e.type == "response.output_text.delta")


def audit_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("first_stream", [False, True])
@pytest.mark.parametrize("second_stream", [False, True])
@pytest.mark.parametrize("scope", ["conversation", "conversation_with_system"])
def test_a_request_split_across_chained_turns_is_refused(scripted, first_stream, second_stream, scope):
    """Each half alone passes; chained, the second is scored after the first (and the
    reply between them) and refused, whole or streamed, after a turn read whole or
    streamed. Before, the second was scored on its own input and forwarded."""
    url, recorder = scripted
    with running_proxy(proxy_yaml(url, prompt=stage(scope=scope)), KeywordScorer(together=SPLIT)) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:Use a crimp connector."})
        first, answer = ask(client, FIRST, stream=first_stream)
        alone = ask(client, SECOND, stream=second_stream)[1]
        before = len(recorder.requests)
        chained = ask(client, SECOND, stream=second_stream, previous_response_id=first)[1]
        upstream_calls = len(recorder.requests) - before
    assert answer == "Use a crimp connector." and alone == "Use a crimp connector."
    assert chained == REFUSAL and upstream_calls == 0


def test_a_chain_is_read_back_to_its_first_turn(scripted):
    """A turn remembers the turns it continued: a third turn is scored after the first."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url), KeywordScorer(together=SPLIT)) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok then"})
        first, _ = ask(client, "a question about a FUSE")
        second, text = ask(client, "and another", previous_response_id=first)
        third = ask(client, "and the DETONATOR", previous_response_id=second)[1]
    assert text == "ok then" and third == REFUSAL


def test_last_user_scores_the_last_user_turn_of_a_chain(scripted, tmp_path):
    """Under `last_user` a chained request's prompt is its own last user turn, as before,
    so a split request passes there (the conversation scopes are the defence); its
    response is still read after that prompt alone."""
    url, _ = scripted
    scorer = KeywordScorer(together=SPLIT)
    with running_proxy(proxy_yaml(url, prompt=stage(scope="last_user")), scorer) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok then"})
        first, _ = ask(client, FIRST)
        chained, text = ask(client, SECOND, previous_response_id=first)
        cut, _ = ask(sdk(proxy, default_headers={"x-script": "text:a BOMB"}), "hi")
        after_cut = ask(client, "hello", previous_response_id=cut)[1]
    assert text == "ok then" and chained.startswith("resp_") and scorer.sessions[1].prompt == SECOND
    assert after_cut == REFUSAL  # a reply the proxy cut is not continued, whatever the scope


@pytest.mark.parametrize("stream", [False, True])
def test_both_stages_read_the_remembered_conversation(scripted, stream):
    """The prompt stage scores the remembered turns, the reply between them and the new
    input, in the scope's rendering; the response's session continues that same prompt
    (the prompt is read once), so the guard's prefix cache finds the first turn's prompt
    at its start."""
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(proxy_yaml(url), scorer) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:fine thanks"})
        first, _ = ask(client, "hello there", stream=stream, instructions="be brief")
        ask(client, "how are you", stream=stream, previous_response_id=first, instructions="be brief")
    opening, chained = scorer.sessions[0], scorer.sessions[-1]
    assert opening.prompt == "user: hello there"
    assert chained.prompt == "user: hello there\nassistant: fine thanks\nuser: how are you"
    assert chained.prompt.startswith(opening.prompt) and chained.prompt_scored
    assert chained.text == chained.prompt + "\nfine thanks"  # the response stage read it after that prompt


def test_store_false_is_not_remembered(scripted):
    """A turn sent with `store: false` is kept neither upstream nor here: a request
    chaining from it is one from an unknown id (refused under `block`); the same turn
    stored is remembered and chained from."""
    url, _ = scripted
    text = proxy_yaml(url, extra="    unknown_previous_response: block")
    with running_proxy(text, KeywordScorer(together=SPLIT)) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok"})
        kept, _ = ask(client, FIRST)
        unkept, _ = ask(client, FIRST, store=False)
        chained = ask(client, "and then?", previous_response_id=kept)[1]
        with pytest.raises(openai.PermissionDeniedError) as info:
            ask(client, "and then?", previous_response_id=unkept)
    assert chained == "ok"
    assert info.value.status_code == 403
    assert (info.value.code, info.value.param) == ("unknown_previous_response", "previous_response_id")


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_the_proxy_cut_cannot_be_continued(scripted, tmp_path, stream):
    """The upstream stored the whole of a reply the proxy cut; a request chaining from
    it is refused by the prompt stage, whatever its own text, without calling the
    upstream, and the audit line says why. A request that does not chain passes."""
    url, recorder = scripted
    audit = tmp_path / "audit.jsonl"
    with running_proxy(proxy_yaml(url, server=f"  audit_log: {audit}"), KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:step one then the BOMB part"})
        cut, text = ask(client, "tell me a story", stream=stream)
        before = len(recorder.requests)
        again = ask(client, "go on", stream=stream, previous_response_id=cut)
        upstream_calls = len(recorder.requests) - before
        fresh = sdk(proxy, default_headers={"x-script": "text:a fresh start"})
        fine = ask(fresh, "go on", stream=stream)[1]
    assert cut.startswith("resp_") and text.endswith(REFUSAL) and "BOMB" not in text
    assert again[1] == REFUSAL and again[0].startswith(REFUSAL_ID_PREFIX) and upstream_calls == 0
    assert fine == "a fresh start"
    reasons = [d for line in audit_lines(audit) for d in line["decisions"] if "reason" in d]
    assert [(d["stage"], d["action"], d["crossed"], d["score"], d["reason"]) for d in reasons] == [
        ("prompt", "refuse", True, None, "previous_response_cut")]


def test_a_stream_the_proxy_did_not_read_to_its_end_cannot_be_continued(scripted, tmp_path):
    """A stream that broke off: the upstream may hold more of it than the guard read, so a
    chain from it is refused too (`previous_response_unread`)."""
    url, recorder = scripted
    audit = tmp_path / "audit.jsonl"
    with running_proxy(proxy_yaml(url, server=f"  audit_log: {audit}"), KeywordScorer()) as proxy:
        broken, events = sdk(proxy, default_headers={"x-script": "reset-after:3"}), []
        with pytest.raises(openai.APIError, match="upstream"):
            for event in broken.responses.create(model="m", input="tell me", stream=True):
                events.append(event)
        before = len(recorder.requests)
        client = sdk(proxy, default_headers={"x-script": "text:never"})
        again = ask(client, "go on", previous_response_id=events[0].response.id)[1]
        upstream_calls = len(recorder.requests) - before
    assert again == REFUSAL and upstream_calls == 0
    reasons = [d["reason"] for line in audit_lines(audit) for d in line["decisions"] if "reason" in d]
    assert reasons == ["previous_response_unread"]


@pytest.mark.parametrize(("prompt", "expect"), [
    (stage("block", "last_user"), 400), (stage("flag", "last_user"), 200),
    ("{action: steer, threshold: 0.5, steer: {from: 0.2, system_message: Be safe.}}", 200)])
def test_a_continuation_of_a_cut_reply_meets_the_prompt_action(scripted, prompt, expect):
    """It crosses, as a harmful prompt does: `block` answers 400 content_filter naming
    `previous_response_id`, `flag` forwards it flagged (the new reply is guarded as it is
    read), and a turn after it too, `steer` refuses."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url, prompt=prompt), KeywordScorer()) as proxy:
        cut, _ = ask(sdk(proxy, default_headers={"x-script": "text:here is the BOMB"}), "a story")
        client = sdk(proxy, default_headers={"x-script": "text:more story"})
        response = client.responses.with_raw_response.create(model="m", input="go on", previous_response_id=cut) \
            if expect == 200 else None
        if expect == 400:
            with pytest.raises(openai.BadRequestError) as info:
                client.responses.create(model="m", input="go on", previous_response_id=cut)
        if "flag" in prompt:  # the turn after a withheld one: the upstream's context still holds it
            later = client.responses.with_raw_response.create(model="m", input="and then",
                                                               previous_response_id=response.parse().id)
    if "block" in prompt:
        assert (info.value.code, info.value.param) == ("content_filter", "previous_response_id")
    elif "flag" in prompt:
        assert response.headers["x-siren-decision"] == "flagged" and "x-siren-score" not in response.headers
        assert response.parse().output_text == "more story"
        assert later.headers["x-siren-decision"] == "flagged" and "x-siren-score" not in later.headers
    else:
        assert response.parse().output_text == REFUSAL


def test_a_refused_reply_cannot_be_continued_even_when_nothing_is_remembered(scripted):
    """A refusal's id (`resp-siren-...`) exists nowhere upstream: the proxy refuses a chain
    from it itself (before, the upstream's 404), with its memory off too."""
    url, recorder = scripted
    with running_proxy(proxy_yaml(url, server="  responses_memory_mb: 0"), KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:never"})
        refused, text = ask(client, "how to build a BOMB")
        before = len(recorder.requests)
        again = ask(client, "ok, something else", previous_response_id=refused)[1]
        upstream_calls = len(recorder.requests) - before
    assert refused.startswith(REFUSAL_ID_PREFIX) and text == again == REFUSAL and upstream_calls == 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_unknown_id_is_forwarded_and_the_chain_remembered_from_there(scripted, stream):
    """Under `forward` (the default) an id this proxy does not know (made through another
    replica here) is forwarded, scored on its input alone; the turn it starts is
    remembered, so a third turn reads the second."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url), KeywordScorer(together=SPLIT)) as replica:
        other, _ = ask(sdk(replica, default_headers={"x-script": "text:ok"}), "first, about the DETONATOR")
    with running_proxy(proxy_yaml(url, extra="    unknown_previous_response: forward"),
                       KeywordScorer(together=SPLIT)) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok"})
        second, text = ask(client, "now the FUSE", stream=stream, previous_response_id=other)
        third = ask(client, "and the DETONATOR again", stream=stream, previous_response_id=second)[1]
    assert text == "ok" and second.startswith("resp_")
    assert third == REFUSAL


@pytest.mark.parametrize(("field", "value"), [("previous_response_id", None), ("conversation", "conv_1"),
                                              ("conversation", {"id": "conv_1"})])
def test_unknown_turns_are_refused_under_block(scripted, field, value):
    """Under `block` an id the proxy does not know, or any `conversation` (items are added
    to one outside guarded requests), is refused with 403 unknown_previous_response
    naming the field, before the upstream is called."""
    url, recorder = scripted
    with running_proxy(proxy_yaml(url), KeywordScorer()) as replica:
        value = value or ask(sdk(replica, default_headers={"x-script": "text:ok"}), "hi")[0]
    with running_proxy(proxy_yaml(url, extra="    unknown_previous_response: block"), KeywordScorer()) as proxy:
        before = len(recorder.requests)
        with pytest.raises(openai.PermissionDeniedError) as info:
            sdk(proxy).responses.create(model="m", input="hello", **{field: value})
        upstream_calls = len(recorder.requests) - before
    assert (info.value.code, info.value.param) == ("unknown_previous_response", field) and upstream_calls == 0


def test_block_does_not_refuse_under_a_policy_that_stops_nothing(scripted):
    """`flag` and `shadow` stop nothing, so there is nothing to evade: unknown turns are
    forwarded under them, as unguarded endpoints are."""
    url, _ = scripted
    text = proxy_yaml(url, prompt=stage("flag"), response="{action: shadow}",
                      extra="    unknown_previous_response: block")
    with running_proxy(text, KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok"})
        response = client.responses.with_raw_response.create(model="m", input="hello",
                                                             conversation=client.conversations.create().id)
    assert response.status_code == 200 and response.headers["x-siren-decision"] == "allowed"


def test_turns_are_remembered_per_proxy_key(scripted):
    """One key never continues from another key's turn: bob's chain from alice's id is an
    unknown id to him (forwarded, scored on its input alone; 403 under block), while
    alice's own chain is read whole and refused."""
    url, _ = scripted
    keys = "  api_keys: [{key: sk-alice, name: alice}, {key: sk-bob, name: bob}]"
    with running_proxy(proxy_yaml(url, server=keys), KeywordScorer(together=SPLIT)) as proxy:
        alice = sdk(proxy, api_key="sk-alice", default_headers={"x-script": "text:ok"})
        bob = sdk(proxy, api_key="sk-bob", default_headers={"x-script": "text:ok"})
        first, _ = ask(alice, FIRST)
        by_bob = ask(bob, SECOND, previous_response_id=first)[1]
        by_alice = ask(alice, SECOND, previous_response_id=first)[1]
    assert by_bob == "ok" and by_alice == REFUSAL
    blocking = proxy_yaml(url, server=keys, extra="    unknown_previous_response: block")
    with running_proxy(blocking, KeywordScorer(together=SPLIT)) as proxy:
        first, _ = ask(sdk(proxy, api_key="sk-alice", default_headers={"x-script": "text:ok"}), "hi")
        with pytest.raises(openai.PermissionDeniedError) as info:
            ask(sdk(proxy, api_key="sk-bob"), "hi again", previous_response_id=first)
    assert info.value.code == "unknown_previous_response"


def test_the_memory_bound_evicts_the_least_recently_used_turn(scripted):
    """`server.responses_memory_mb` bounds the turns held: with room for two (697 bytes
    each), a third evicts the one least recently used (chained from, `store: false`,
    least recently), whose chain is then an unknown id."""
    url, _ = scripted
    text = proxy_yaml(url, server="  responses_memory_mb: 0.0015",  # 1,572 bytes
                      extra="    unknown_previous_response: block")
    turn = Remembered((("user", "a" * 200), ("assistant", "x" * 100)))
    assert 2 * turn.nbytes <= 1572 < 3 * turn.nbytes
    with running_proxy(text, KeywordScorer()) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:" + "x" * 100})
        oldest, _ = ask(client, "a" * 200)
        used, _ = ask(client, "b" * 200)
        ask(client, "c", previous_response_id=oldest, store=False)
        ask(client, "c", previous_response_id=used, store=False)  # `used` is now the most recent of the two
        ask(client, "d" * 200)
        assert ask(client, "e", previous_response_id=used, store=False)[1] == "x" * 100
        with pytest.raises(openai.PermissionDeniedError) as info:
            ask(client, "f", previous_response_id=oldest)
    assert info.value.code == "unknown_previous_response"


def test_memory_off_remembers_nothing(scripted):
    """`responses_memory_mb: 0`: every id is unknown, so a split request passes under
    `forward` (as before this memory) and is refused under `block`."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url, server="  responses_memory_mb: 0"), KeywordScorer(together=SPLIT)) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok"})
        first, _ = ask(client, FIRST)
        chained = ask(client, SECOND, previous_response_id=first)[1]
    assert chained == "ok"
    text = proxy_yaml(url, server="  responses_memory_mb: 0", extra="    unknown_previous_response: block")
    with running_proxy(text, KeywordScorer(together=SPLIT)) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok"})
        first, _ = ask(client, "hi")
        with pytest.raises(openai.PermissionDeniedError):
            ask(client, "again", previous_response_id=first)


def test_a_reload_resizes_the_memory_and_0_empties_it(scripted, tmp_path):
    """`server.responses_memory_mb` is read by each request: after a reload to 0 the next
    Responses request, chained or not, drops what was remembered (the gauge says 0), and
    no restart is asked for; a later reload back does not bring it back."""
    url, _ = scripted
    path = tmp_path / "config.yaml"
    text = proxy_yaml(url, extra="    unknown_previous_response: block")
    path.write_text(text)
    holder = ConfigHolder.load(str(path))
    with LiveServer(build_app(holder, KeywordScorer())) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok"})
        first, _ = ask(client, "hi")
        held = httpx.get(proxy.url + "/metrics").text
        path.write_text(text.replace("max_body_bytes: 65536", "max_body_bytes: 65536\n  responses_memory_mb: 0"))
        assert holder.reload() and restart_needed(holder._started, holder.current) == ()
        ask(client, "a turn that chains from nothing")
        emptied = httpx.get(proxy.url + "/metrics").text
        with pytest.raises(openai.PermissionDeniedError):
            ask(client, "again", previous_response_id=first)
        path.write_text(text)
        assert holder.reload()
        with pytest.raises(openai.PermissionDeniedError):
            ask(client, "again", previous_response_id=first)
    assert gauge(held) > 0 and gauge(emptied) == 0


def gauge(metrics: str) -> float:
    return next(float(line.split()[1]) for line in metrics.splitlines()
                if line.startswith("siren_proxy_responses_memory_bytes "))


# -- the memory itself ------------------------------------------------------------------------

def test_the_memory_keeps_what_fits_least_recently_used_out_first():
    memory = ResponsesMemory()
    turn = Remembered((("user", "x" * 100), ("assistant", "y" * 100)))
    limit = 2 * turn.nbytes
    memory.remember("k", "a", turn, limit=limit)
    memory.remember("k", "b", turn, limit=limit)
    assert memory.get("k", "a", limit=limit) is turn  # now b is the least recently used
    memory.remember("k", "c", turn, limit=limit)
    assert [memory.get("k", i, limit=limit) is not None for i in "abc"] == [True, False, True]
    assert memory.nbytes == limit and len(memory) == 2
    assert memory.get("other key", "a", limit=limit) is None
    memory.remember("k", "big", Remembered((("user", "z" * limit),)), limit=limit)  # larger than the bound
    assert memory.get("k", "big", limit=limit) is None and len(memory) == 2
    memory.remember("k", "a", Remembered((), withheld="cut"), limit=limit)  # an id remembered again: replaced
    assert memory.get("k", "a", limit=limit).withheld == "cut"
    assert memory.nbytes == turn.nbytes + Remembered(()).nbytes
    assert memory.get("k", "a", limit=0) is None and len(memory) == 0 and memory.nbytes == 0  # off: emptied


def test_a_turn_is_counted_in_utf8_bytes():
    ascii_turn, wide_turn = Remembered((("user", "a" * 10),)), Remembered((("user", "é" * 10),))
    assert wide_turn.nbytes - ascii_turn.nbytes == 10


def conversation(client: openai.OpenAI, *turns: str) -> str:
    """A conversation (the Conversations API) holding `turns` as the client's messages,
    added outside any request the proxy guards; its id."""
    return client.conversations.create(items=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": turn}]}
        for turn in turns]).id


def conversation_reads(recorder, before: int) -> list[str]:
    return [r["query"] for r in recorder.requests[before:] if r["path"].endswith("/items")]


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_split_across_a_conversations_turns_is_refused(scripted, stream):
    """A Responses request that names a `conversation` is answered after its items, which
    the proxy never saw (they are added through `POST conversations`). It was scored on its
    input alone, so a request split across the items and the input passed. Under the
    conversation scopes the proxy now reads the items from the upstream and scores the
    input after them."""
    url, recorder = scripted
    with running_proxy(proxy_yaml(url), KeywordScorer(together=SPLIT)) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok"})
        first = conversation(client, FIRST)
        before = len(recorder.requests)
        text = ask(client, SECOND, stream=stream, conversation=first)[1]
        reads = conversation_reads(recorder, before)
        alone = ask(client, SECOND, stream=stream, conversation=conversation(client, "what is a fuse"))[1]
    assert text == REFUSAL and alone == "ok"
    assert len(reads) == 1 and "order=desc" in reads[0] and "limit=100" in reads[0]
    assert recorder.requests[-1]["body"]["input"] == SECOND  # the second one reached the upstream


def test_a_conversation_is_read_page_by_page_and_whole(scripted):
    """Items over several pages are all read, newest first, the oldest included: a half of
    the request in the oldest item still counts."""
    url, recorder = scripted
    with running_proxy(proxy_yaml(url), KeywordScorer(together=SPLIT)) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok"})
        long = conversation(client, FIRST, *(f"turn {i}" for i in range(230)))
        before = len(recorder.requests)
        text = ask(client, SECOND, conversation=long)[1]
    reads = conversation_reads(recorder, before)
    assert text == REFUSAL and len(reads) == 3 and "after=" in reads[1] and "after=" in reads[2]


def test_a_conversation_is_read_only_where_the_scope_reads_turns(scripted):
    """Under `last_user` only the request's own last user turn is read: nothing is asked."""
    url, recorder = scripted
    with running_proxy(proxy_yaml(url, prompt=stage(scope="last_user")), KeywordScorer(together=SPLIT)) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok"})
        first = conversation(client, FIRST)
        before = len(recorder.requests)
        text = ask(client, SECOND, conversation=first)[1]
    assert text == "ok" and conversation_reads(recorder, before) == []


def test_a_conversation_the_upstream_does_not_give_stays_unknown(scripted):
    """An id the upstream answers 404 (or anything but a page of items): the request is
    scored on its input alone, as before, and refused under `unknown_previous_response:
    block`; the upstream's own 404 for the request reaches the client."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url), KeywordScorer(together=SPLIT)) as proxy:
        with pytest.raises(openai.NotFoundError):
            sdk(proxy).responses.create(model="m", input=SECOND, conversation="conv_nowhere")
    with running_proxy(proxy_yaml(url, extra="    unknown_previous_response: block"),
                       KeywordScorer(together=SPLIT)) as proxy:
        with pytest.raises(openai.PermissionDeniedError) as info:
            sdk(proxy).responses.create(model="m", input=SECOND, conversation="conv_nowhere")
    assert info.value.code == "unknown_previous_response"


def test_a_conversation_past_max_prompt_bytes_is_too_long_not_cut_short(scripted):
    """Reading stops once the turns are past `server.max_prompt_bytes`; the prompt is then
    too long to score (400), never scored without its oldest turns."""
    url, _ = scripted
    with running_proxy(proxy_yaml(url, server="  max_prompt_bytes: 2000"), KeywordScorer(together=SPLIT)) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:ok"})
        long = conversation(client, FIRST, *("x" * 100 for _ in range(150)))
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="m", input=SECOND, conversation=long)
    assert info.value.code == "prompt_too_long"
