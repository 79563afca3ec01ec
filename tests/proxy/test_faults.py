"""Upstream faults below HTTP's surface, the guard failing mid-stream, bad reloads, disconnects.

A raw-socket upstream (`rawhttp.RawUpstream`) plays each fault byte for byte: an RST in
the middle of a stream (SO_LINGER 0), SSE that is not JSON, binary garbage, an event over
the decoder's limit, a half-written chunk, no status line at all, a slow drip. Each case
goes through an unguarded and a guarded policy, checks exactly what the client gets
(status, body, the in-band error event and `data: [DONE]`), and that the same proxy then
serves a plain request. The README ("Faults: what the client sees") has the table these tests pin down.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import time

import httpx
import pytest

from policies.reload import ConfigHolder
from proxy.app import build_app
from tests.proxy.rawhttp import FIN, LAST_CHUNK, RST, RawUpstream, chunk, sse_head
from tests.support.proxy import running_proxy
from proxy.scorer import ScorerBusy
from tests.support.scorers import GuardBroke, KeywordScorer, keyword_score
from tests.support.servers import LiveServer
from tests.support.upstream import chat_chunk

DONE = b"data: [DONE]\n\n"
HEAD = [chat_chunk(role=True)] + [chat_chunk(f"tok{i} ") for i in range(4)]
TAIL = chat_chunk(finish="stop") + DONE
AFTER_FINISH = chat_chunk(finish="stop") + chat_chunk("a BOMB ") + chat_chunk("more ") + chat_chunk("text ")
BOTH = b"data: " + json.dumps({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": "m",
                               "choices": [{"index": 0, "delta": {"content": "a BOMB "}, "finish_reason": None},
                                           {"index": 1, "delta": {"content": "x\ud800y "}, "finish_reason": None}]}
                              ).encode() + b"\n\n"
CROSSING = b"".join(HEAD) + chat_chunk("a BOMB ") + chat_chunk("more ") + TAIL
OVER_LIMIT = (4 << 20) + 1024  # proxy.relay.MAX_EVENT_BYTES is 4 MiB


def whole(body: bytes) -> list[bytes]:
    return [chunk(body), LAST_CHUNK]


def plain_json(status: int, obj: dict) -> list[bytes]:
    data = json.dumps(obj).encode()
    return [b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (status, len(data)),
            data]


OK_CHAT = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}]}

FAULTS = {
    "ok": lambda: [sse_head(), *whole(b"".join(HEAD) + TAIL)],
    "plain": lambda: plain_json(200, OK_CHAT),
    "rst-mid-stream": lambda: [sse_head(), chunk(b"".join(HEAD)), 0.05, RST],
    "rst-before-headers": lambda: [RST],
    "close-before-headers": lambda: [FIN],
    "not-http": lambda: [b"SPDY/9 banana\r\n\r\n", FIN],
    "invalid-json-event": lambda: [sse_head(), chunk(b"".join(HEAD)), chunk(b"data: {not json\n\n"),
                                   *whole(TAIL)],
    "binary-garbage-then-end": lambda: [sse_head(), chunk(b"".join(HEAD)), chunk(b"\x00\xff\xfe\x80 no blank line"),
                                        LAST_CHUNK],
    "event-over-limit": lambda: [sse_head(), chunk(b"".join(HEAD)), chunk(b"data: " + b"x" * OVER_LIMIT + b"\n\n"),
                                 *whole(TAIL)],
    "half-written-chunk": lambda: [sse_head(), chunk(b"".join(HEAD)), b"400\r\ndata: {\"partial", FIN],
    "short-plain-body": lambda: [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n",
                                 b'{"id": "c", "choices"', FIN],
    "stall-plain-body": lambda: [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n",
                                 b'{"id": "c", "choices"', 1.5, FIN],
    "chunked-plain-body-reset": lambda: [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                         b"transfer-encoding: chunked\r\n\r\n", chunk(b'{"id": "c", "choices"'), 0.05, RST],
    "slow-drip": lambda: [sse_head()] + [step for piece in split(b"".join(HEAD) + TAIL, 9)
                                         for step in (chunk(piece), 0.004)] + [LAST_CHUNK],
    "stall-mid-stream": lambda: [sse_head(), chunk(b"".join(HEAD)), 1.5, *whole(TAIL)],
    # Text for a choice after its finish_reason (choice 1 still going, in the n=2 one)
    "text-after-finish": lambda: [sse_head(), *whole(b"".join(HEAD) + AFTER_FINISH + DONE)],
    "text-after-finish-n2": lambda: [sse_head(), *whole(b"".join(HEAD) + second(b"".join(HEAD)) + AFTER_FINISH
                                                        + second(TAIL))],
    # One chunk for both choices; choice 1's text has a lone surrogate escape (JSON can hold one)
    "surrogate-beside-a-cut": lambda: [sse_head(), *whole(b"".join(HEAD) + second(b"".join(HEAD)) + BOTH
                                                          + chat_chunk(finish="stop") + second(TAIL))],
    # The same stream crossing at its 6th token, in one piece and an event at a time
    "crossing-in-one-read": lambda: [sse_head(), *whole(CROSSING)],
    "crossing-dripped": lambda: [sse_head()] + [step for event in events(CROSSING)
                                                for step in (chunk(event + b"\n\n"), 0.02)] + [LAST_CHUNK],
    # Media types are case-insensitive (RFC 9110)
    "media-type-in-capitals": lambda: [sse_head().replace(b"text/event-stream", b"Text/Event-Stream; charset=UTF-8"),
                                       *whole(CROSSING)],
    "gzip-stream": lambda: [sse_head().replace(b"\r\n\r\n", b"\r\ncontent-encoding: gzip\r\n\r\n"),
                            *whole(gzip.compress(b"".join(HEAD) + TAIL))],
}


def second(chunks: bytes) -> bytes:
    """The same chunks for choice 1 (`chat_chunk` writes choice 0's)."""
    return chunks.replace(b'"index": 0', b'"index": 1')


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def script(head: bytes) -> list:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"x-fault:"):
            return FAULTS[line.split(b":", 1)[1].strip().decode()]()
    return FAULTS["ok"]()


def yaml(base_url: str, policy: str) -> str:
    stages = {"unguarded": "prompt: {action: off}\n    response: {action: off}",
              # The prompt stage alone: the response is relayed unread, as if unguarded.
              "prompt-only": "prompt: {action: refuse}\n    response: {action: off}",
              "guarded": "prompt: {action: off}\n"
                         "    response: {action: cut, threshold: 0.5, check_every: 2, holdback: 2}"}[policy]
    return f"""
upstreams:
  up: {{base_url: {base_url}, read_timeout: 0.8, connect_timeout: 2}}
policies:
  p:
    {stages}
routes:
  - {{prefix: /v1, upstream: up, policy: p}}
"""


@pytest.fixture(scope="module")
def upstream():
    with RawUpstream(script) as up:
        yield up


@pytest.fixture(scope="module", params=["unguarded", "prompt-only", "guarded"])
def proxy(request, upstream):
    with running_proxy(yaml(upstream.url, request.param), KeywordScorer()) as server:
        yield request.param, server


def ask(server, fault: str, *, stream: bool = True) -> tuple[int, bytes, str]:
    """status, body (what arrived before the connection ended) and how the body ended."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with httpx.Client(timeout=20) as client:
        with client.stream("POST", server.url + "/v1/chat/completions", json=body,
                           headers={"x-fault": fault}) as response:
            received, ending = b"", "complete"
            try:
                for piece in response.iter_raw():
                    received += piece
            except httpx.RemoteProtocolError:
                ending = "connection-closed-mid-body"
            return response.status_code, received, ending


def events(body: bytes) -> list[bytes]:
    return [block for block in body.split(b"\n\n") if block]


def error_of(block: bytes) -> dict:
    assert block.startswith(b"data: "), block[:100]
    return json.loads(block[len(b"data: "):])["error"]


def still_serves(server) -> None:
    status, body, _ = ask(server, "ok")
    assert status == 200 and body.endswith(DONE)
    status, body, _ = ask(server, "plain", stream=False)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "fine"


def assert_in_band(body: bytes, code: str, *, kept: bytes = b"tok1 ") -> dict:
    """A 200 stream that ends with one error event and [DONE], after what the upstream sent."""
    blocks = events(body)
    assert blocks[-1] == b"data: [DONE]", body[-300:]
    error = error_of(blocks[-2])
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert kept in body
    return error


# -- faults before the response starts: a real status code -------------------------------

@pytest.mark.parametrize("fault", ["rst-before-headers", "close-before-headers", "not-http"])
def test_no_response_is_502(proxy, fault):
    _, server = proxy
    status, body, _ = ask(server, fault)
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_unreachable"
    still_serves(server)


# -- faults after the response started: in-band error, then [DONE] -----------------------

@pytest.mark.parametrize("fault,code,detail", [
    ("rst-mid-stream", "upstream_unreachable", "ReadError"),
    ("half-written-chunk", "upstream_unreachable", "RemoteProtocolError"),
    ("event-over-limit", "upstream_unreachable", "EventTooLarge"),
    ("stall-mid-stream", "upstream_timeout", "read timeout"),
])
def test_stream_breaking_off_is_an_in_band_error_then_done(proxy, fault, code, detail):
    _, server = proxy
    status, body, ending = ask(server, fault)
    assert (status, ending) == (200, "complete")
    error = assert_in_band(body, code)
    assert detail in error["message"]
    assert b"x" * 1000 not in body  # nothing of the oversized event reaches the client
    still_serves(server)


def test_an_invalid_json_event_is_relayed_unguarded_and_fails_a_guarded_stream_closed(proxy):
    """An event whose data is not JSON is relayed as sent where nothing is guarded. Under
    a guard it is text the guard cannot read (a client may show it), so a fail-closed
    policy ends the stream there, after what was scored."""
    policy, server = proxy
    status, body, ending = ask(server, "invalid-json-event")
    assert (status, ending) == (200, "complete")
    if policy != "guarded":
        assert body == b"".join(HEAD) + b"data: {not json\n\n" + TAIL
    else:
        error = assert_in_band(body, "guard_unavailable", kept=b"".join(HEAD))
        assert "cannot read" in error["message"] and b"not json" not in body
    still_serves(server)


def test_unterminated_garbage_at_the_end_is_reported_in_band(proxy):
    """Binary bytes without their blank line, then a clean end of the body.

    The SSE decoder returns them as a truncated block: the upstream was cut off inside an
    event. The client must learn that the stream broke (an error event after a blank line
    that ends the garbage, then [DONE]), not see a stream that just stops without [DONE].
    """
    _, server = proxy
    status, body, _ = ask(server, "binary-garbage-then-end")
    assert status == 200
    assert_in_band(body, "upstream_unreachable")


def test_slow_drip_arrives_whole_and_byte_identical(proxy):
    """9-byte chunks, 4 ms apart: events split everywhere reassemble; the read timeout
    (0.8 s) is between bytes, so a stream slower in total than that is not cut."""
    _, server = proxy
    started = time.monotonic()
    status, body, _ = ask(server, "slow-drip")
    assert status == 200 and body == b"".join(HEAD) + TAIL
    assert time.monotonic() - started > 0.2  # it did drip


@pytest.mark.parametrize("n", [1, 2])
def test_text_a_choice_sends_after_its_finish_is_guarded_as_any(proxy, n):
    """A choice's text after its finish_reason (an upstream that does not behave) is
    scored like any; when it crosses, the choice is cut: nothing of it goes out. (It was
    scored, crossed, and released anyway: the cut skipped a choice already finished.)
    With n=2 the other choice goes on to its end."""
    policy, server = proxy
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "n": n}
    with httpx.Client(timeout=20) as client, client.stream(
            "POST", server.url + "/v1/chat/completions", json=body,
            headers={"x-fault": "text-after-finish" if n == 1 else "text-after-finish-n2"}) as response:
        received = b"".join(response.iter_raw())
    assert response.status_code == 200 and received.endswith(DONE)
    if policy != "guarded":
        assert b"BOMB" in received
        return
    assert b"BOMB" not in received and b"more" not in received
    refusal = [json.loads(block[6:]) for block in events(received) if b"content_filter" in block]
    assert [chunk["choices"][0]["index"] for chunk in refusal] == [0]
    assert (received.count(b'"index": 1, "delta": {"content": "tok3 "}') == 1) == (n == 2)
    still_serves(server)


def test_a_chunk_rewritten_around_a_cut_choice_keeps_a_lone_surrogate(proxy):
    """A cut takes its choice out of chunks it shares with others, which are written
    anew; a lone surrogate in another choice's text (`"\\ud800"`) goes out as the escape
    it came as. (Writing it as UTF-8 raised: the client got a broken chunked body.)"""
    policy, server = proxy
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2}
    with httpx.Client(timeout=20) as client, client.stream(
            "POST", server.url + "/v1/chat/completions", json=body,
            headers={"x-fault": "surrogate-beside-a-cut"}) as response:
        received = b"".join(response.iter_raw())
    assert response.status_code == 200 and received.endswith(DONE)
    texts: dict[int, str] = {}
    for block in events(received)[:-1]:
        for choice in json.loads(block[6:])["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert texts[1] == "tok0 tok1 tok2 tok3 x\ud800y "
    if policy == "guarded":
        assert "BOMB" not in texts[0] and texts[0].endswith("I'm sorry, but I can't help with that.")
    still_serves(server)


def test_what_a_cut_stream_releases_does_not_depend_on_how_the_upstream_wrote_it(proxy):
    """Text scored safe is released whether its events came in one read with the crossing
    or one at a time. (Events were released once per read, so a cut in the same read
    dropped the text scored safe before it: a client of a guard slower than its upstream,
    whose events pile up in the socket, got less.)"""
    policy, server = proxy
    _, at_once, _ = ask(server, "crossing-in-one-read")
    _, dripped, _ = ask(server, "crossing-dripped")
    assert at_once == dripped
    if policy != "guarded":
        assert at_once == CROSSING
    else:
        assert at_once.startswith(b"".join(HEAD)) and b"BOMB" not in at_once and b"content_filter" in at_once


def test_an_event_stream_named_in_capitals_is_a_stream(proxy):
    """`Text/Event-Stream` is `text/event-stream`: relayed event by event, and guarded.
    (A guarded request got a 503 `guard_unavailable`: the stream was read as a whole
    reply, which it is not.)"""
    policy, server = proxy
    status, received, ending = ask(server, "media-type-in-capitals")
    assert (status, ending) == (200, "complete")
    if policy != "guarded":
        assert received == CROSSING
    else:
        assert received.startswith(b"".join(HEAD)) and b"BOMB" not in received and b"content_filter" in received


def test_a_compressed_stream_is_read_decoded_where_it_is_guarded(proxy):
    """An upstream that compresses its stream (a gateway with gzip on, answering the
    client's Accept-Encoding; or one that ignores the guard's `identity`). Where the
    response is guarded its events are read, guarded and forwarded decompressed, without
    the Content-Encoding they no longer have; elsewhere the stream is the client's to
    inflate and goes as sent (test_forwarding). (Both were read as compressed bytes: the
    client got one error event.)"""
    policy, server = proxy
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.Client(timeout=20) as client, client.stream(
            "POST", server.url + "/v1/chat/completions", json=body,
            headers={"x-fault": "gzip-stream", "accept-encoding": "gzip"}) as response:
        received = b"".join(response.iter_raw())
    assert response.status_code == 200
    if policy == "guarded":
        assert "content-encoding" not in response.headers and received == b"".join(HEAD) + TAIL
    else:
        assert response.headers["content-encoding"] == "gzip"
        assert gzip.decompress(received) == b"".join(HEAD) + TAIL
    still_serves(server)


@pytest.fixture
def server_errors():
    """What uvicorn logs as errors (its logger does not reach pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    yield records
    logging.getLogger("uvicorn.error").removeHandler(handler)


@pytest.mark.parametrize("fault,guarded_answer", [("short-plain-body", (502, "upstream_unreachable")),
                                                  ("stall-plain-body", (504, "upstream_timeout")),
                                                  ("chunked-plain-body-reset", (502, "upstream_unreachable"))])
def test_plain_body_cut_short(proxy, fault, guarded_answer, server_errors):
    """Unguarded: the headers went out, so the only honest signal is to close the
    connection short of the body (the client sees an incomplete body: short of its
    Content-Length, or a chunked body without its last chunk, which a clean end would
    pass off as whole), and no traceback. Guarded: the body is read whole before any
    header goes out, so the failure is still a status code, as before the response
    began (README "Errors")."""
    policy, server = proxy
    status, body, ending = ask(server, fault, stream=False)
    if policy != "guarded":
        assert (status, ending) == (200, "connection-closed-mid-body") and body == b'{"id": "c", "choices"'
    else:
        assert status == guarded_answer[0], body[:300]
        assert json.loads(body)["error"]["code"] == guarded_answer[1]
    assert not [r for r in server_errors if r.exc_info], server_errors
    still_serves(server)


# -- the guard, the config and the client failing ----------------------------------------

GUARDED = """
upstreams:
  up: {{base_url: {url}}}
policies:
  p:
    on_guard_error: {on_error}
    prompt: {{action: off}}
    response: {{action: cut, threshold: 0.5, check_every: 2, holdback: 2}}
routes:
  - {{prefix: /v1, upstream: up, policy: p}}
"""
WORDS = " ".join(f"w{i}" for i in range(60))  # slowtext: 10 ms a word, ~0.6 s in all


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("on_error", ["block", "allow"])
def test_guard_failing_after_the_stream_started(scripted, on_error):
    """The guard answers the first checks, then raises. Fail closed (block): the stream
    ends with a guard_unavailable event and [DONE], and the upstream is closed. allow:
    the rest of the stream goes out unscored."""
    url, recorder = scripted
    scorer = KeywordScorer()
    with running_proxy(GUARDED.format(url=url, on_error=on_error), scorer) as server:
        before = len(recorder.streams)
        body = b""
        with httpx.Client(timeout=20) as client, client.stream(
                "POST", server.url + "/v1/chat/completions", headers={"x-script": f"slowtext:{WORDS}"},
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as response:
            for piece in response.iter_raw():
                body += piece
                if b"w3 " in body and not scorer.fail:
                    scorer.fail = True
        wait_for(lambda: len(recorder.streams) > before)
        scorer.fail = False
        still = httpx.post(server.url + "/v1/chat/completions", headers={"x-script": "text:ok"},
                           json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and still.status_code == 200
    blocks = events(body)
    assert blocks[-1] == b"data: [DONE]"
    if on_error == "block":
        assert error_of(blocks[-2])["code"] == "guard_unavailable"
        assert b"w59" not in body
        assert recorder.streams[before:] == ["closed-early"]
    else:
        assert b"w59" in body and b'"error"' not in body
        assert recorder.streams[before:] == ["complete"]


class RecoveringScorer(KeywordScorer):
    """A guard that fails its first checks, then recovers: `refused` session opens are
    refused (a full queue, or the guard still loading), or the first session fails every
    append (the real worker's session whose prefill failed stays failed)."""

    def __init__(self, *, refused: int = 0, dead_first: bool = False) -> None:
        super().__init__()
        self.refused = refused
        self.dead_first = dead_first

    def stream(self, prompt=None, *, cache_salt=None):
        if self.refused:
            self.refused -= 1
            raise ScorerBusy("scripted full queue")
        session = super().stream(prompt, cache_salt=cache_salt)
        if self.dead_first and len(self.sessions) == 1:
            async def broken(delta: str) -> float:
                raise GuardBroke("scripted session failure")
            session.append = broken
        return session


@pytest.mark.parametrize("failure", ["session refused", "session broken"])
def test_a_check_after_a_guard_failure_reads_the_whole_response(scripted, failure):
    """`on_guard_error: allow`: the first check fails (no session could open, or the
    session is broken), its text goes out unscored, and the guard recovers. The next
    check scores prompt + the whole response so far on a fresh session, as every check
    does: it read only the text after the failure (the failed check's text was dropped,
    or the broken session kept failing), so "BOMB", in the first words, never crossed."""
    url, _ = scripted
    scorer = RecoveringScorer(refused=2) if failure == "session refused" else RecoveringScorer(dead_first=True)
    with running_proxy(GUARDED.format(url=url, on_error="allow"), scorer) as server:
        body = httpx.post(server.url + "/v1/chat/completions", headers={"x-script": "text:BOMB w1 w2 w3 w4 w5"},
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                          timeout=20).content
    assert b'"finish_reason":"content_filter"' in body and b"w5" not in body
    session = scorer.sessions[-1]
    assert session.text.startswith("hi\nBOMB w1 ") and all(s.closed for s in scorer.sessions)


def test_a_crossing_after_a_guard_failure_is_the_choices_decision(scripted, tmp_path):
    """A stream's choice is logged once, with its first crossing if any: a crossing (the
    cut) after a failed check was logged and counted as the failure's `allow`, though the
    stream was cut."""
    url, _ = scripted
    audit = tmp_path / "audit.jsonl"
    text = f"server:\n  audit_log: {audit}\n" + GUARDED.format(url=url, on_error="allow")
    with running_proxy(text, RecoveringScorer(refused=2)) as server:
        body = httpx.post(server.url + "/v1/chat/completions", headers={"x-script": "text:BOMB w1 w2 w3 w4 w5"},
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                          timeout=20).content
        metrics = httpx.get(server.url + "/metrics").text
    assert b'"finish_reason":"content_filter"' in body
    [decision] = json.loads(audit.read_text())["decisions"]
    assert decision["action"] == "cut" and decision["crossed"] and decision["guard_error"] is None
    assert 'siren_proxy_guard_decisions_total{action="cut",stage="response"} 1.0' in metrics


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_client_disconnect_under_the_guard_closes_upstream_and_session(scripted, delay):
    """The client leaves mid-stream (delay 0.3: while the guard is still scoring)."""
    url, recorder = scripted
    scorer = KeywordScorer(delay=delay)
    with running_proxy(GUARDED.format(url=url, on_error="block"), scorer) as server:
        before = len(recorder.streams)
        with httpx.Client(timeout=20) as client, client.stream(
                "POST", server.url + "/v1/chat/completions", headers={"x-script": "stall-after:6"},
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as response:
            for line in response.iter_lines():
                if "tok0" in line:
                    break
        wait_for(lambda: len(recorder.streams) > before and all(s.closed for s in scorer.sessions))
    assert recorder.streams[before:] == ["closed-early"]
    assert scorer.sessions and all(s.closed for s in scorer.sessions)



@pytest.mark.parametrize("script", ["stall-after:6", "endless:w1 w2", "slowtext:" + WORDS])
def test_client_disconnect_under_a_request_deadline_leaves_no_traceback(scripted, script):
    """With `server.request_timeout` set each piece of the body is awaited against the
    deadline; a client that leaves mid-stream cancels that wait, and the guarded relay's
    cleanup (its upstream, its session) then runs on. The wait ran the piece's read in a
    task of its own (`asyncio.wait_for`), which the disconnect left running: closing the
    body then raised "asynchronous generator is already running" (uvicorn: "Exception in
    ASGI application")."""
    url, recorder = scripted
    scorer = KeywordScorer()
    text = "server:\n  request_timeout: 30\n" + GUARDED.format(url=url, on_error="block")
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    with running_proxy(text, scorer) as server:
        logging.getLogger("uvicorn.error").addHandler(handler)  # after uvicorn set its logging up
        try:
            before = len(recorder.streams)
            with httpx.Client(timeout=20) as client, client.stream(
                    "POST", server.url + "/v1/chat/completions", headers={"x-script": script},
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as response:
                for line in response.iter_lines():
                    if "w1" in line or "tok0" in line:
                        break
            wait_for(lambda: len(recorder.streams) > before and all(s.closed for s in scorer.sessions))
            time.sleep(0.2)
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not errors, [record.getMessage() for record in errors]
    assert recorder.streams[before:] == ["closed-early"]

GOOD = """
upstreams:
  up: {{base_url: {url}}}
policies:
  p:
    prompt: {{action: {action}}}
    response: {{action: off}}
routes:
  - {{prefix: /v1, upstream: up, policy: p}}
"""
BROKEN = {
    "unknown key": GOOD.replace("routes:", "rootes:"),
    "not YAML": "upstreams: [unclosed\n",
    "unknown policy": GOOD.replace("policy: p}", "policy: nope}"),
    "unset variable": GOOD.replace("{url}", "${SIREN_TEST_UNSET_VARIABLE}"),
    "empty": "",
}


def test_broken_config_on_reload_keeps_the_old_one_serving(scripted, tmp_path):
    url, _ = scripted
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.format(url=url, action="off"))
    holder = ConfigHolder.load(str(path))
    chat = {"model": "m", "messages": [{"role": "user", "content": "a BOMB"}]}
    with LiveServer(build_app(holder, KeywordScorer())) as server, httpx.Client(timeout=20) as client:
        def ask_once() -> str:
            reply = client.post(server.url + "/v1/chat/completions", json=chat, headers={"x-script": "text:served"})
            assert reply.status_code == 200
            return reply.json()["choices"][0]["finish_reason"]

        assert ask_once() == "stop"
        for name, text in BROKEN.items():
            path.write_text(text.format(url=url, action="refuse") if "{url}" in text else text)
            assert holder.reload() is False, name
            assert ask_once() == "stop", name  # the old config (prompt off) still serves
        path.write_bytes(b"\xff\xfe not utf-8")
        assert holder.reload() is False
        assert ask_once() == "stop"
        path.write_text(GOOD.format(url=url, action="refuse"))
        assert holder.reload() is True
        assert ask_once() == "content_filter"  # the new policy refuses the same request


class Watched(KeywordScorer):
    """Records whether a prompt's scoring ran to its end or was cancelled."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay=delay)
        self.ended: list[str] = []

    async def _score(self, text: str) -> float:
        try:
            score = await super()._score(text)
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        self.ended.append("scored")
        return score



def test_a_client_that_leaves_while_sending_its_body_leaves_no_traceback(scripted):
    """Starlette raises `ClientDisconnect` from the body's stream when the client goes
    before the end of its body; it escaped the handler (uvicorn: "Exception in ASGI
    application"). It is a 499, as a client that leaves during the prompt stage is."""
    url, recorder = scripted
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    before = len(recorder.requests)
    with running_proxy(GOOD.format(url=url, action="off")) as server:
        logging.getLogger("uvicorn.error").addHandler(handler)  # after uvicorn set its logging up
        try:
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                             b"content-length: 1000\r\n\r\n{\"model\": ")
                time.sleep(0.2)
            wait_for(lambda: 'status="499"' in httpx.get(server.url + "/metrics").text or errors)
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
        metrics = httpx.get(server.url + "/metrics").text
    assert not errors, [record.getMessage() for record in errors]
    assert 'siren_proxy_requests_total{route="-",status="499"} 1.0' in metrics
    assert len(recorder.requests) == before

@pytest.mark.parametrize("response", ["{action: off}", "{action: cut}"])  # full-text score / session prefill
def test_a_client_that_leaves_during_the_prompt_stage_frees_the_guard(scripted, response):
    """The guard's work for a client that has left is cancelled (with the real guard, a
    long prompt's prefill stops at its next window: tests/guard/test_worker.py), and the
    upstream is never called."""
    url, recorder = scripted
    scorer = Watched(delay=30)
    before = len(recorder.requests)
    text = GOOD.format(url=url, action="refuse").replace("response: {action: off}", f"response: {response}")
    with running_proxy(text, scorer) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", timeout=0.5,
                       json={"model": "m", "messages": [{"role": "user", "content": "a long prompt"}]})
        wait_for(lambda: scorer.ended)
        metrics = httpx.get(server.url + "/metrics").text
    assert scorer.ended == ["cancelled"]  # not scored to its end (30 s) for nobody
    assert len(recorder.requests) == before
    assert 'siren_proxy_requests_total{route="routes[0]",status="499"} 1.0' in metrics


@pytest.mark.parametrize("response", ["{action: off}", "{action: cut}"])
def test_a_request_past_its_deadline_frees_the_guard(scripted, response):
    url, recorder = scripted
    scorer = Watched(delay=30)
    before = len(recorder.requests)
    text = "server:\n  request_timeout: 0.5\n" + GOOD.format(url=url, action="refuse").replace(
        "response: {action: off}", f"response: {response}")
    with running_proxy(text, scorer) as server:
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=10,
                           json={"model": "m", "messages": [{"role": "user", "content": "a long prompt"}]})
        wait_for(lambda: scorer.ended)
        time.sleep(0.5)  # a pipeline that went on after its deadline would call the upstream by now
    assert scorer.ended == ["cancelled"]
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "request_timeout"
    assert len(recorder.requests) == before


def firehose(head: bytes):
    """A stream whose events arrive faster than the proxy relays them, for up to 30 s:
    the upstream's socket has bytes at every turn of the proxy's event loop."""
    yield sse_head()
    piece = chunk(b"".join(HEAD) * 8)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        yield piece
    yield LAST_CHUNK


@pytest.mark.parametrize("policy", ["unguarded", "guarded"])
def test_a_client_that_leaves_a_stream_that_never_pauses_frees_it(policy):
    """uvicorn's `send` does nothing once the client is gone, and the relay's disconnect
    watcher cancels it through anyio, which delivers a cancellation only while the task
    waits on something not yet done: with upstream bytes at every turn of the loop, the
    relay went on reading the upstream for nobody (until it ended), holding its
    connection and stream slot."""
    with RawUpstream(firehose) as upstream, running_proxy(yaml(upstream.url, policy), KeywordScorer()) as server:
        with httpx.Client(timeout=20) as client, client.stream(
                "POST", server.url + "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as response:
            for line in response.iter_lines():
                if "tok0" in line:
                    break
        wait_for(lambda: upstream.served and upstream.served[0].ended)
        metrics = httpx.get(server.url + "/metrics").text
    assert upstream.served[0].ended == "client-closed"
    assert "siren_proxy_active_streams 0.0" in metrics


@pytest.mark.parametrize("policy", ["unguarded", "guarded"])
def test_the_request_deadline_in_a_plain_body(upstream, policy, server_errors):
    """`server.request_timeout` passing while an unguarded reply's body is on its way: its
    headers went out, and an in-band error is an SSE event, which a JSON body has no
    place for (it was appended to it). The body is cut short, as an upstream failure
    there is. Guarded, the body is read whole first: a 504."""
    text = "server:\n  request_timeout: 0.3\n" + yaml(upstream.url, policy)
    with running_proxy(text, KeywordScorer()) as server:
        status, body, ending = ask(server, "stall-plain-body", stream=False)
    if policy == "unguarded":
        assert (status, ending) == (200, "connection-closed-mid-body") and body == b'{"id": "c", "choices"'
    else:
        assert status == 504 and json.loads(body)["error"]["code"] == "request_timeout"
    assert not [r for r in server_errors if r.exc_info], server_errors


class FinishesAnyway(KeywordScorer):
    """A score that, cancelled, still returns: as Python 3.11's `asyncio.wait_for` does
    when its result is ready as the cancel comes (the upstream connect's, say)."""

    async def _score(self, text: str) -> float:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            pass
        return keyword_score(text)


def test_a_response_made_after_the_client_left_is_closed(scripted):
    """A pipeline cancelled too late goes on to a response that is never sent: it still
    closes its upstream stream and guard session (they were held until the upstream
    ended, the upstream connection's pool slot with them)."""
    url, recorder = scripted
    scorer = FinishesAnyway(delay=30)
    text = GOOD.format(url=url, action="refuse").replace("response: {action: off}", "response: {action: cut}")
    with running_proxy(text, scorer) as server:
        before = len(recorder.streams)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", timeout=0.5, headers={"x-script": "endless:a b c"},
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        wait_for(lambda: len(recorder.streams) > before and all(s.closed for s in scorer.sessions))
        metrics = httpx.get(server.url + "/metrics").text
    assert recorder.streams[before:] == ["closed-early"]
    assert scorer.sessions and all(s.closed for s in scorer.sessions)
    assert 'siren_proxy_requests_total{route="routes[0]",status="499"} 1.0' in metrics


@pytest.mark.parametrize("policy", ["guarded", "unguarded"])
def test_client_disconnect_before_the_deadline_is_no_error(scripted, caplog, policy):
    """Under `request_timeout` each upstream read waits at most until the deadline; a
    client leaving mid-stream cancels that wait, which used to leave the body's generator
    running in a task of its own: its close raised (`aclose(): asynchronous generator is
    already running`), logged as an exception in the ASGI application each time."""
    url, recorder = scripted
    scorer = KeywordScorer(delay=0.005)
    text = "server:\n  request_timeout: 30\n" + GUARDED.format(url=url, on_error="block")
    if policy == "unguarded":
        text = text.replace("{action: cut, threshold: 0.5, check_every: 2, holdback: 2}", "{action: off}")
    uvicorn_errors = logging.getLogger("uvicorn.error")
    with running_proxy(text, scorer) as server:
        uvicorn_errors.addHandler(caplog.handler)  # after uvicorn's logging set-up; it does not propagate
        try:
            before = len(recorder.streams)
            for _ in range(8):
                with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=20,
                                  headers={"x-script": "endless:w1 w2 w3 w4"},
                                  json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                        "stream": True}) as response:
                    for i, _ in enumerate(response.iter_raw()):
                        if i == 3:
                            break
            wait_for(lambda: len(recorder.streams) >= before + 8 and all(s.closed for s in scorer.sessions))
        finally:
            uvicorn_errors.removeHandler(caplog.handler)
    assert recorder.streams[before:] == ["closed-early"] * 8
    assert all(s.closed for s in scorer.sessions)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_client_leaving_while_sending_its_body_is_a_499(scripted, caplog):
    """Not an exception in the ASGI application (Starlette's `ClientDisconnect` from the
    body read, logged with a traceback): the request counts as 499, as any other client
    that leaves before the response."""
    url, _ = scripted
    uvicorn_errors = logging.getLogger("uvicorn.error")
    with running_proxy(GOOD.format(url=url, action="refuse"), KeywordScorer()) as server:
        uvicorn_errors.addHandler(caplog.handler)  # after uvicorn's logging set-up; it does not propagate
        try:
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\n"
                               b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\": ")
                time.sleep(0.2)  # the proxy is reading the body
            wait_for(lambda: "499" in httpx.get(server.url + "/metrics").text)
            metrics = httpx.get(server.url + "/metrics").text
        finally:
            uvicorn_errors.removeHandler(caplog.handler)
    assert 'siren_proxy_requests_total{route="-",status="499"} 1.0' in metrics
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_response_made_after_the_deadline_is_closed(scripted):
    """The same, when the request deadline cancels the pipeline: the client has its 504,
    and the response the pipeline went on to make still closes its upstream stream and
    guard session."""
    url, recorder = scripted
    scorer = FinishesAnyway(delay=30)
    text = "server:\n  request_timeout: 0.5\n" + GOOD.format(url=url, action="refuse").replace(
        "response: {action: off}", "response: {action: cut}")
    with running_proxy(text, scorer) as server:
        before = len(recorder.streams)
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=10, headers={"x-script": "endless:a b c"},
                           json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        wait_for(lambda: len(recorder.streams) > before and all(s.closed for s in scorer.sessions))
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "request_timeout"
    assert recorder.streams[before:] == ["closed-early"]
    assert scorer.sessions and all(s.closed for s in scorer.sessions)
