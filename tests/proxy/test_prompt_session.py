"""The prompt is read once per request: the prompt stage scores it by opening the
response's guard session (its prefill is the prompt's score), and the response stage
continues that session. Every way a request ends closes the session.

The real guard's prompt score read off a prefill is tested in tests/guard/test_worker.py
and end to end in tests/proxy/test_real_guard.py; here `KeywordScorer` shows which
session did what.
"""

from __future__ import annotations

import json
import time

import anyio
import httpx
import pytest

from proxy.whole import CHOICE_SESSIONS
from proxy.relay import RelayResponse
from tests.proxy.test_guarded import AUTH, CUT, REFUSAL, policy_yaml, sse_events, stream_body, user
from tests.support.clients import close_sdk_clients, sdk  # noqa: F401 - close_sdk_clients is autouse
from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer
from tests.support.servers import free_port

REFUSE = "{action: refuse, threshold: 0.5}"


def all_closed(scorer: KeywordScorer, timeout: float = 5.0) -> bool:
    """The proxy closes sessions as the response ends, just after the client has it all."""
    deadline = time.monotonic() + timeout
    while not all(s.closed for s in scorer.sessions) and time.monotonic() < deadline:
        time.sleep(0.02)
    return all(s.closed for s in scorer.sessions)


def test_a_guarded_stream_continues_the_prompt_stages_session(katan_url):
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(katan_url, prompt=REFUSE, response=CUT % (4, 4)), scorer) as proxy:
        body = stream_body(proxy, "tell me about otters")
    assert sse_events(body)[-1] == "[DONE]"
    [session] = scorer.sessions
    assert session.prompt_scored  # the prompt stage's score came from this session's prefill
    assert scorer.calls == ["tell me about otters"]  # and nothing scored the prompt a second time
    assert session.text.startswith("tell me about otters\n") and session.text.endswith("User: tell me about otters")
    assert all_closed(scorer)


def test_a_crossing_in_the_shared_session_still_cuts(scripted):
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(url, prompt=REFUSE, response=CUT % (1, 1)), scorer) as proxy:
        body = stream_body(proxy, "hello", script="text:one two BOMB three")
    events = sse_events(body)
    assert REFUSAL in "".join(events) and "BOMB" not in "".join(events)
    [session] = scorer.sessions
    assert session.prompt_scored and all_closed(scorer)


def test_a_whole_reply_is_scored_on_the_prompt_stages_session(scripted):
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(url, prompt=REFUSE, response=CUT % (16, 16)), scorer) as proxy:
        ok = sdk(proxy, default_headers={"x-script": "text:fine words"}).chat.completions.create(
            model="m", messages=user("hi"))
        cut = sdk(proxy, default_headers={"x-script": "text:a BOMB recipe"}).chat.completions.create(
            model="m", messages=user("hi"))
    assert ok.choices[0].message.content == "fine words"
    assert cut.choices[0].message.content == REFUSAL
    assert [s.text for s in scorer.sessions] == ["hi\nfine words", "hi\na BOMB recipe"]
    assert all(s.prompt_scored for s in scorer.sessions)
    assert scorer.calls == ["hi", "hi"]  # no full-text scoring of prompt + response
    assert all_closed(scorer)


@pytest.mark.parametrize("prompt_stage", [REFUSE, "{action: off}"])
def test_several_whole_choices_continue_the_prompts_session(scripted, prompt_stage):
    """n > 1: choice 0 continues the prompt's session (the prompt stage's, or the one
    opened early); the other choices' sessions open only after its prefill has scored, so
    the real guard's prefix cache holds the prompt for them. No full-text scoring."""
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(url, prompt=prompt_stage, response=CUT % (16, 16)), scorer) as proxy:
        reply = sdk(proxy, default_headers={"x-script": "text:calm|BOMB"}).chat.completions.create(
            model="m", messages=user("hi"), n=2)
    assert [c.message.content for c in reply.choices] == ["calm", REFUSAL]
    assert scorer.calls == ["hi"]  # the prompt's prefill, once
    assert [s.text for s in scorer.sessions] == ["hi\ncalm", "hi\nBOMB"]
    assert [s.prompt_scored for s in scorer.sessions] == [True, False]
    assert scorer.sessions[1].calls_before == 1  # opened after the prompt had scored
    assert all_closed(scorer)


def test_many_whole_choices_are_scored_a_bounded_group_at_a_time(scripted):
    """n=40: every choice is scored, by at most `CHOICE_SESSIONS` sessions open at once
    (each would hold a copy of the prompt's cache), and every session is closed."""
    url, _ = scripted
    scorer = KeywordScorer()
    words = [f"w{i}" for i in range(40)]
    words[33] = "BOMB"
    with running_proxy(policy_yaml(url, prompt=REFUSE, response=CUT % (16, 16)), scorer) as proxy:
        reply = sdk(proxy, default_headers={"x-script": "text:" + "|".join(words)}).chat.completions.create(
            model="m", messages=user("hi"), n=40)
    assert [c.message.content for c in reply.choices] == words[:33] + [REFUSAL] + words[34:]
    assert sorted(s.text for s in scorer.sessions) == sorted(f"hi\n{w}" for w in words)
    assert scorer.most_open == CHOICE_SESSIONS and all_closed(scorer)


@pytest.mark.parametrize("rerank", [False, True])
def test_a_full_queue_while_choices_open_closes_every_session_and_fails_closed(scripted, rerank):
    """The guard's queue fills after two sessions, while the third choice (or candidate)
    opens: the two are closed, and the reply meets `on_guard_error` (block: 503)."""
    url, _ = scripted
    scorer = KeywordScorer(sessions_before_busy=2)
    extra = "    rerank: {n: 3, select: safest}" if rerank else ""
    with running_proxy(policy_yaml(url, prompt=REFUSE, response=CUT % (16, 16), policy_extra=extra), scorer) as proxy:
        response = httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": "text:a|b|c"},
                              json={"model": "m", "messages": user("hi"), **({} if rerank else {"n": 3})}, timeout=20)
    assert response.status_code == 503 and response.json()["error"]["code"] == "guard_unavailable"
    assert len(scorer.sessions) == 2 and all_closed(scorer)


def test_with_n_streams_choice_0_takes_the_prompts_session(scripted):
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(url, prompt=REFUSE, response=CUT % (2, 2)), scorer) as proxy:
        body = stream_body(proxy, "hi", script="replay:stream_n2_raw.txt", n=2)  # a recorded vLLM n=2 stream
    assert sse_events(body)[-1] == "[DONE]"
    assert [s.prompt_scored for s in scorer.sessions] == [True, False]
    assert all(s.text.startswith("hi\n") for s in scorer.sessions)
    assert all_closed(scorer)


@pytest.mark.parametrize("case", ["refused", "upstream error", "upstream unreachable", "rerank"])
def test_every_other_ending_closes_the_prompts_session(scripted, case):
    url, recorder = scripted
    extra = "    rerank: {n: 2, select: safest}" if case == "rerank" else ""
    if case == "upstream unreachable":
        url = f"http://127.0.0.1:{free_port()}/v1"
    scorer = KeywordScorer()
    message = "a BOMB please" if case == "refused" else "hi"
    script = "no-such-script" if case == "upstream error" else "text:fine"
    with running_proxy(policy_yaml(url, prompt=REFUSE, response=CUT % (4, 4), policy_extra=extra), scorer) as proxy:
        response = httpx.post(proxy.url + "/v1/chat/completions", headers={**AUTH, "x-script": script},
                              json={"model": "m", "messages": user(message)}, timeout=20)
    expect = {"refused": 200, "upstream error": 400, "upstream unreachable": 502, "rerank": 200}[case]
    assert response.status_code == expect, response.text
    assert ("choices" if expect == 200 else "error") in response.json()
    if case == "rerank":  # the candidates continue the prompt's session, and one more opens after it
        assert scorer.calls == ["hi"] and [s.text for s in scorer.sessions] == ["hi\nfine", "hi\nfine"]
        assert scorer.sessions[0].prompt_scored and all_closed(scorer)
    else:
        [session] = scorer.sessions
        assert session.prompt_scored and session.text == f"{message}\n"  # never appended to
        assert all_closed(scorer)


@pytest.mark.parametrize("response_stage", ["{action: off}", "{action: cut, include_prompt: false}"])
def test_a_prompt_no_response_session_reads_is_read_by_a_session_of_its_own(katan_url, response_stage):
    """`last_user`, the default scope, too: when no response session reads the prompt,
    the prompt stage reads it through a session closed at once, not a full-text score,
    so a retried or regenerated prompt continues from the guard's prefix cache (the real
    guard: tests/proxy/test_real_guard.py)."""
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(katan_url, prompt=REFUSE, response=response_stage), scorer) as proxy:
        sdk(proxy).chat.completions.create(model="m", messages=user("otters"))
    first, *rest = scorer.sessions
    assert first.prompt == "otters" and first.prompt_scored and first.text == "otters\n"  # never appended to
    assert scorer.calls[0] == "otters" and not any(s.prompt_scored for s in rest)
    assert all(s.prompt is None for s in rest)  # include_prompt: false scores the response alone
    assert all_closed(scorer)


@pytest.mark.parametrize("scope", ["conversation", "conversation_with_system"])
def test_a_conversation_prompt_is_read_by_a_session_of_its_own(scripted, scope):
    """Conversation scopes: when no response session reads the prompt, the prompt stage
    still reads it through a session (closed at once), so the guard's prefix cache can
    carry each turn into the next (tests/guard/test_prefixes.py); a refusal too."""
    url, _ = scripted
    scorer = KeywordScorer()
    prompt = "{action: refuse, threshold: 0.5, scope: %s}" % scope
    with running_proxy(policy_yaml(url, prompt=prompt, response="{action: off}"), scorer) as proxy:
        client = sdk(proxy, default_headers={"x-script": "text:fine"})
        messages = [{"role": "system", "content": "be brief"}, *user("hi")]
        first = client.chat.completions.create(model="m", messages=messages)
        turn = [*messages, {"role": "assistant", "content": "fine"}, *user("a BOMB, please")]
        refused = client.chat.completions.create(model="m", messages=turn)
    assert first.choices[0].message.content == "fine" and refused.choices[0].message.content == REFUSAL
    system = "system: be brief\n" if scope == "conversation_with_system" else ""
    assert [s.prompt for s in scorer.sessions] == [
        f"{system}user: hi", f"{system}user: hi\nassistant: fine\nuser: a BOMB, please"]
    assert all(s.prompt_scored for s in scorer.sessions) and all_closed(scorer)
    assert scorer.calls == [s.prompt for s in scorer.sessions]  # no full-text scoring


@pytest.mark.parametrize("reachable", [True, False])
def test_without_a_prompt_stage_the_session_opens_before_the_upstream_call(scripted, reachable):
    """The prompt's prefill then overlaps with the upstream's time to first token; an
    upstream that cannot be reached still closes it."""
    url, recorder = scripted
    if not reachable:
        url = f"http://127.0.0.1:{free_port()}/v1"
    scorer = KeywordScorer()
    opened_at = []
    stream = scorer.stream

    def recording(prompt=None, **options):
        opened_at.append(len(recorder.requests))
        return stream(prompt, **options)

    scorer.stream = recording
    with running_proxy(policy_yaml(url, response=CUT % (4, 4)), scorer) as proxy:
        before = len(recorder.requests)
        response = httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": "text:one two three"},
                              json={"model": "m", "messages": user("hi"), "stream": True}, timeout=20)
    assert opened_at == [before]  # before the upstream had the request
    [session] = scorer.sessions
    assert not session.prompt_scored and all_closed(scorer)
    if reachable:
        assert session.text == "hi\none two three " and sse_events(response.content)[-1] == "[DONE]"
    else:
        assert response.status_code == 502 and session.text == "hi\n"


def test_an_empty_prompt_is_scored_as_text(scripted):
    """No user message: the prompt is empty and a session would have nothing to prefill,
    so the prompt stage scores it as a text (" ") and the request goes through."""
    url, _ = scripted
    scorer = KeywordScorer()
    with running_proxy(policy_yaml(url, prompt=REFUSE, response=CUT % (4, 4)), scorer) as proxy:
        reply = sdk(proxy, default_headers={"x-script": "text:fine"}).chat.completions.create(
            model="m", messages=[{"role": "system", "content": "Be brief."}])
    assert reply.choices[0].message.content == "fine"
    assert scorer.calls[0] == "" and not any(s.prompt_scored for s in scorer.sessions)


def test_a_failed_prompt_session_is_closed_and_replaced(katan_url):
    """The prompt stage's session fails (the guard is down); with `on_guard_error: allow`
    the request goes on, and the response stage opens a session of its own rather than
    inherit the broken one (and a fresh one after each failed check, which reads the
    whole response so far: tests/proxy/test_faults.py)."""
    scorer = KeywordScorer(fail=True)
    text = policy_yaml(katan_url, prompt=REFUSE, response=CUT % (4, 4), policy_extra="    on_guard_error: allow")
    with running_proxy(text, scorer) as proxy:
        body = stream_body(proxy, "hi there")
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    reply = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    first, *later = scorer.sessions
    assert first.prompt_scored and first.text == "hi there\n"  # failed, closed, never appended to
    assert later and not any(s.prompt_scored for s in later)
    assert later[-1].text == "hi there\n" + reply  # the last check read it all
    assert all_closed(scorer)


def test_a_relay_that_never_started_still_runs_on_close():
    """The client is gone before the first body chunk: the body iterator never starts,
    so its own `finally` (which closes the upstream and the sessions) never runs, and
    `on_close` must."""
    ran = {"body": False, "finally": False, "on_close": 0}

    async def body():
        try:
            ran["body"] = True
            yield b"data: x\n\n"
        finally:
            ran["finally"] = True

    async def on_close() -> None:
        ran["on_close"] += 1

    async def broken() -> None:
        raise RuntimeError("a callback that fails")

    async def send(message) -> None:
        raise OSError("the client went away")

    async def receive():
        await anyio.sleep_forever()

    for watch in (True, False):
        ran.update(body=False, on_close=0)
        response = RelayResponse(body(), 200, [], watch=watch)
        response.on_close += [broken, on_close]  # a failing callback does not stop the next
        anyio.run(response, {"type": "http"}, receive, send)
        assert ran == {"body": False, "finally": False, "on_close": 1}


def test_a_client_gone_before_the_first_byte_leaves_nothing_open(scripted, tmp_path):
    """The ASGI server's `send` raises at the response's start (the client left during the
    prompt stage): the stream's slot is freed, the upstream and the guard session are
    closed, and the audit line is written, though the body never started."""
    import asyncio
    import json

    from policies.config import parse_config
    from policies.reload import ConfigHolder
    from proxy.app import build_app

    url, recorder = scripted
    audit = tmp_path / "audit.jsonl"
    text = policy_yaml(url, prompt=REFUSE, response=CUT % (2, 2), server=f"  audit_log: {audit}")
    scorer = KeywordScorer()
    app = build_app(ConfigHolder(parse_config(text)), scorer)
    body = json.dumps({"model": "m", "messages": user("hi"), "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"proxy"), (b"content-type", b"application/json"),
                         (b"x-script", b"slowtext:a b c d e f g h i j k l m n o p")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    started = []

    async def receive():
        if not started:
            started.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message) -> None:
        raise OSError("the client went away")

    async def main() -> tuple[str, list[str]]:
        async with app.router.lifespan_context(app):  # closes the pool and the audit file
            return await run()

    async def run() -> tuple[str, list[str]]:
        before = len(recorder.streams)
        await app(scope, receive, send)
        for _ in range(100):  # the upstream notices the close on its next write
            if len(recorder.streams) > before:
                break
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
            metrics = (await client.get("/metrics")).text
        return metrics, recorder.streams[before:]

    metrics, streams = asyncio.run(main())
    assert "siren_proxy_active_streams 0.0" in metrics  # the slot came back
    assert streams == ["closed-early"]
    [session] = scorer.sessions
    assert session.prompt_scored and session.closed
    [record] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert record["stream"] and record["decisions"][0]["stage"] == "prompt"


@pytest.mark.parametrize("scope", ["key", "shared"])
def test_sessions_are_salted_by_api_key_and_cache_salt(scripted, scope):
    """The guard's prefix cache is partitioned per request (`guard.prefix_cache_scope`):
    by the proxy key's name unless the scope is `shared`, and by the body's `cache_salt`
    (vLLM's field) when it is a non-empty string. Every session of a request gets the
    same salt: the prompt stage's (choice 0's) and the other choices' of an n=2 stream."""
    url, _ = scripted
    server = ("  api_keys: [{key: sk-alice, name: alice}, {key: sk-bob, name: bob}]\n"
              f"guard:\n  prefix_cache_scope: {scope}")
    scorer = KeywordScorer()
    requests = [("sk-alice", {}), ("sk-bob", {}), ("sk-alice", {"cache_salt": "s1"}),
                ("sk-alice", {"cache_salt": 7}), ("sk-alice", {"cache_salt": ""})]
    with running_proxy(policy_yaml(url, prompt=REFUSE, response=CUT % (4, 4), server=server), scorer) as proxy:
        for key, extra in requests:
            payload = {"model": "m", "messages": user("hi"), "stream": True, "n": 2, **extra}
            headers = {"authorization": f"Bearer {key}", "x-script": "replay:stream_n2_raw.txt"}
            with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=payload, headers=headers) as response:
                assert response.status_code == 200
                assert sse_events(b"".join(response.iter_raw()))[-1] == "[DONE]"
    salts = [session.cache_salt for session in scorer.sessions]
    alice, bob = ('{"key": "alice"}', '{"key": "bob"}') if scope == "key" else (None, None)
    salted = '{"key": "alice", "salt": "s1"}' if scope == "key" else '{"salt": "s1"}'
    assert salts == [alice, alice, bob, bob, salted, salted, alice, alice, alice, alice]
    assert all_closed(scorer)
