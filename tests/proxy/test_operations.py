"""Operating the proxy: metrics, proxy API keys, stream limits, request deadlines."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.proxy import running_proxy
from tests.support.scorers import KeywordScorer

CUT = "{action: cut, threshold: 0.5, check_every: 4, holdback: 4, include_prompt: false}"


def config(base_url: str, *, server: str = "", routes: str = "", prompt="{action: refuse}", response=CUT) -> str:
    return f"""
server:
{server or "  port: 8080"}
upstreams:
  up: {{base_url: {base_url}}}
policies:
  p:
    prompt: {prompt}
    response: {response}
  open:
    prompt: {{action: off}}
    response: {{action: off}}
routes:
{routes or "  - {prefix: /v1, upstream: up, policy: p}"}
"""


def test_metrics_count_requests_decisions_and_tokens(scripted):
    url, _ = scripted
    with running_proxy(config(url), KeywordScorer()) as proxy:
        headers = {"x-script": "text:one two three BOMB four five six"}
        httpx.post(proxy.url + "/v1/chat/completions", headers=headers,
                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        httpx.post(proxy.url + "/v1/chat/completions",
                   json={"model": "m", "messages": [{"role": "user", "content": "BOMB"}]})
        text = httpx.get(proxy.url + "/metrics").text
    assert 'siren_proxy_requests_total{route="routes[0]",status="200"} 2.0' in text
    assert 'siren_proxy_guard_decisions_total{action="refuse",stage="prompt"} 1.0' in text
    assert 'siren_proxy_guard_decisions_total{action="cut",stage="response"} 1.0' in text
    assert 'siren_proxy_tokens_scored_total 4.0' in text
    assert 'siren_proxy_tokens_released_after_crossing_total 0.0' in text
    assert 'siren_proxy_guard_latency_seconds_count{stage="prompt"} 2.0' in text
    assert "siren_proxy_upstream_latency_seconds_count 1.0" in text
    assert "siren_proxy_active_streams 0.0" in text


def test_proxy_api_keys(scripted):
    url, recorder = scripted
    os.environ["TEST_PROXY_KEY_A"] = "sk-proxy-a"
    server = '  api_keys: [{key: "${TEST_PROXY_KEY_A}", name: team-a}, "sk-proxy-b"]'
    routes = ("  - {prefix: /v1, upstream: up, policy: open, api_key: team-a}\n"
              "  - {prefix: /v1, upstream: up, policy: p}")
    try:
        with running_proxy(config(url, server=server, routes=routes), KeywordScorer()) as proxy:
            def ask(key):
                return httpx.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                  json={"model": "m", "messages": [{"role": "user", "content": "BOMB"}]})
            missing = httpx.get(proxy.url + "/v1/models")
            wrong = ask("sk-nope")
            team_a = ask("sk-proxy-a")  # routed to the open policy: forwarded
            seen = recorder.requests[-1]["headers"]
            other = ask("sk-proxy-b")  # the default route refuses
    finally:
        del os.environ["TEST_PROXY_KEY_A"]
    assert missing.status_code == 401 and wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert team_a.status_code == 200 and team_a.json()["choices"][0]["finish_reason"] == "stop"
    assert "authorization" not in seen  # the proxy's key never travels upstream
    assert other.json()["choices"][0]["finish_reason"] == "content_filter"


def test_a_client_without_a_proxy_key_is_401_before_its_body_is_read(scripted):
    """The key is checked on the head: a client without one was answered on its body
    first (the proxy read and parsed it, up to `max_body_bytes`: a 400 with the JSON
    parser's message, a 413), and one that sent its body slowly held the connection."""
    url, recorder = scripted
    before = len(recorder.requests)
    with running_proxy(config(url, server='  api_keys: ["sk-proxy"]'), KeywordScorer()) as proxy:
        malformed = httpx.post(proxy.url + "/v1/chat/completions", content=b"{not json")
        huge = httpx.post(proxy.url + "/v1/chat/completions", content=b"x" * (1 << 20))
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:  # a body never sent
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
            head = sock.recv(65536)
        keyed = httpx.post(proxy.url + "/v1/chat/completions", content=b"{not json",
                           headers={"authorization": "Bearer sk-proxy"})
    for response in (malformed, huge):
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert head.startswith(b"HTTP/1.1 401 ")
    assert keyed.status_code == 400  # with its key, the body is read and judged
    assert len(recorder.requests) == before


@contextlib.contextmanager
def one_stream_open(proxy) -> Iterator[None]:
    """A stream held open (the scripted upstream stalls after one chunk) for the block."""
    opened, release = threading.Event(), threading.Event()

    def hold():
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", headers={"x-script": "stall-after:1"},
                          json={"model": "m", "stream": True}) as response:
            chunks = response.iter_raw()  # kept: a dropped iterator would close the stream
            next(chunks)
            opened.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert opened.wait(10)
        yield
    finally:
        release.set()
        holder.join()


def test_concurrent_stream_limit_is_503_with_retry_after(scripted):
    url, _ = scripted
    with running_proxy(config(url, server="  max_concurrent_streams: 1", prompt="{action: off}",
                              response="{action: off}"), None) as proxy:
        with one_stream_open(proxy):
            refused = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "m", "stream": True})
            plain = httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": "text:ok"},
                               json={"model": "m"})  # non-streaming requests are not limited by it
        time.sleep(0.2)
        again = httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": "text:ok"},
                           json={"model": "m", "stream": True})
        metrics = httpx.get(proxy.url + "/metrics").text
    assert refused.status_code == 503
    # counted under the route it was refused on (it was "-", as if no route had matched)
    assert 'siren_proxy_requests_total{route="routes[0]",status="503"} 1.0' in metrics
    assert 'route="-"' not in metrics
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert plain.status_code == 200 and again.status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions;x=1", "/v1/Chat/Completions"])
def test_a_stream_on_another_spelling_of_its_endpoint_takes_a_slot(scripted, path):
    """A path the guard knows as chat (matrix parameters, another case: `proxy.endpoints`)
    is a stream under `max_concurrent_streams` too. (`;x=1` was read as no JSON endpoint,
    so such streams went past the limit.)"""
    url, _ = scripted
    with running_proxy(config(url, server="  max_concurrent_streams: 1", prompt="{action: off}",
                              response="{action: off}"), None) as proxy:
        with one_stream_open(proxy):
            refused = httpx.post(proxy.url + path, headers={"x-script": "text:ok"}, json={"model": "m", "stream": True})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"


def test_request_deadline(scripted):
    url, recorder = scripted
    with running_proxy(config(url, server="  request_timeout: 0.5", prompt="{action: off}",
                              response="{action: off}"), None) as proxy:
        before = len(recorder.streams)
        started = time.monotonic()
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", headers={"x-script": "stall-after:2"},
                          json={"model": "m", "stream": True}) as response:
            body = b"".join(response.iter_raw())
        elapsed = time.monotonic() - started
        closed = time.monotonic() + 10  # the upstream sees its stream closed soon after (0.2 s was short on a loaded CI)
        while len(recorder.streams) == before and time.monotonic() < closed:
            time.sleep(0.05)
    assert elapsed < 3
    assert b'"code":"request_timeout"' in body and body.endswith(b"data: [DONE]\n\n")
    assert recorder.streams[before:] == ["closed-early"]


def test_slow_guard_before_headers_hits_the_deadline(katan_url):
    with running_proxy(config(katan_url, server="  request_timeout: 0.3"), KeywordScorer(delay=2)) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk", max_retries=0)
        with client, pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "request_timeout"


@pytest.mark.parametrize("on_error,status", [("block", 503), ("allow", 200)])
def test_full_guard_queue_is_503_with_retry_after(scripted, on_error, status):
    url, _ = scripted
    text = config(url).replace("    prompt: {action: refuse}", f"    on_guard_error: {on_error}\n    prompt: {{action: refuse}}", 1)
    with running_proxy(text, KeywordScorer(busy=True)) as proxy:
        response = httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": "text:ok"},
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == status
    if status == 503:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "overloaded"


@pytest.mark.parametrize("batch", [False, True])
def test_a_prompt_refused_for_a_full_guard_queue_is_recorded(scripted, tmp_path, batch):
    """The 503 `overloaded` of a full guard queue is the prompt stage's guard failure: it
    is counted, logged and audited as one (it was answered with no record at all)."""
    url, _ = scripted
    audit = tmp_path / "audit.jsonl"
    with running_proxy(config(url, server=f"  audit_log: {audit}"), KeywordScorer(busy=True)) as proxy:
        messages = [{"role": "user", "content": "hi"}]
        path, body = ("/v1/chat/completions/batch", {"messages": [messages]}) if batch else \
            ("/v1/chat/completions", {"messages": messages})
        response = httpx.post(proxy.url + path, json={"model": "m", **body})
        metrics = httpx.get(proxy.url + "/metrics").text
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "overloaded"
    assert 'siren_proxy_guard_decisions_total{action="guard_error",stage="prompt"} 1.0' in metrics
    [record] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(d["action"], d["guard_error"]) for d in record["decisions"]] == [("guard_error", "the guard's queue is full")]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device whose writes fail: disk full)")
def test_a_full_disk_loses_audit_lines_not_requests(scripted, caplog):
    url, _ = scripted
    with running_proxy(config(url, server="  audit_log: /dev/full"), KeywordScorer()) as proxy:
        def ask(content, script, stream=False):
            return httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": script},
                              json={"model": "m", "messages": [{"role": "user", "content": content}], "stream": stream})
        refused = ask("BOMB", "text:x")
        allowed = ask("hi", "text:hello there")
        cut = ask("hi", "text:one two BOMB three four", stream=True)
        metrics = httpx.get(proxy.url + "/metrics").text
    # Each was a 500 text/plain "Internal Server Error" (or a traceback after the stream).
    assert refused.status_code == 200 and refused.json()["choices"][0]["finish_reason"] == "content_filter"
    assert allowed.status_code == 200 and allowed.json()["choices"][0]["message"]["content"] == "hello there"
    assert cut.status_code == 200 and '"finish_reason":"content_filter"' in cut.text
    assert cut.text.endswith("data: [DONE]\n\n")
    assert 'siren_proxy_requests_total{route="routes[0]",status="200"} 3.0' in metrics
    lost = [r for r in caplog.records if r.name == "proxy.records" and r.levelname == "ERROR"]
    assert len(lost) == 1 and "/dev/full" in lost[0].getMessage()  # said once, not per line


AUDIT_CUT_SHORT = """
import resource, signal, sys
from proxy.records import AuditLog, Exchange
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
audit = AuditLog(sys.argv[1])
audit.write(Exchange(route="r", policy="p", endpoint="chat", stream=False))
size = len(open(sys.argv[1], "rb").read())
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, resource.RLIM_INFINITY))  # the file may grow 40 bytes
audit.write(Exchange(route="r", policy="p", endpoint="chat", stream=False))  # cut short at 40 bytes
audit.write(Exchange(route="r", policy="p", endpoint="chat", stream=False))  # lost whole
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # room again
audit.write(Exchange(route="after", policy="p", endpoint="chat", stream=False))
audit.close()
"""


def test_an_audit_line_cut_short_by_a_full_disk_leaves_the_next_ones_whole(tmp_path):
    path = tmp_path / "audit.jsonl"
    result = subprocess.run([sys.executable, "-c", AUDIT_CUT_SHORT, str(path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert result.returncode == 0, result.stderr
    first, cut, after = path.read_text().split("\n")[:3]
    assert json.loads(first)["route"] == "r" and len(cut) == 40
    assert json.loads(after)["route"] == "after"  # not glued to the cut line
    assert path.read_text().endswith("\n") and "cannot write" in result.stderr and "1 line(s)" not in result.stderr
    assert "2 line(s) were lost" in result.stderr


def test_the_audit_log_follows_its_path_when_rotated_or_removed(scripted, tmp_path):
    url, _ = scripted
    audit = tmp_path / "audit.jsonl"
    with running_proxy(config(url, server=f"  audit_log: {audit}"), KeywordScorer()) as proxy:
        def ask(content):
            httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": "text:ok"},
                       json={"model": "m", "messages": [{"role": "user", "content": content}]})
        ask("BOMB one")
        audit.rename(tmp_path / "audit.jsonl.1")  # logrotate's default: move, then create
        audit.touch()
        ask("BOMB two")
        audit.unlink()  # removed by hand
        ask("BOMB three")
    rotated, current = tmp_path / "audit.jsonl.1", audit
    assert len(rotated.read_text().splitlines()) == 1  # the later lines went here, and were lost with it
    assert len(current.read_text().splitlines()) == 1  # written again where the config says


def test_an_audit_line_after_close_goes_nowhere_else(tmp_path, caplog):
    """A request that ends after the audit log closed (uvicorn cancels what is left at its
    grace period's end and closes the app at once; the cancelled responses' cleanup then
    writes their lines): the line is lost, not written through a file descriptor the
    closed log no longer owns, which the process may have given to another file."""
    from proxy.records import AuditLog, Exchange

    log = AuditLog(str(tmp_path / "audit.jsonl"))
    log.close()
    with open(tmp_path / "other", "w"):  # takes the freed descriptor
        log.write(Exchange(route="r", policy="p", endpoint="chat/completions", stream=False))
    assert (tmp_path / "other").read_text() == ""
    assert (tmp_path / "audit.jsonl").read_text() == ""


def test_request_deadline_ends_a_stream_its_client_does_not_read(scripted):
    """A client that stops reading blocks the proxy's writes (the socket's buffers fill):
    the deadline ends the request there too, freeing its stream slot and closing the
    upstream stream, rather than holding both for as long as the client stays connected."""
    url, recorder = scripted
    server = "  request_timeout: 1\n  max_concurrent_streams: 1"
    with running_proxy(config(url, server=server, prompt="{action: off}", response="{action: off}")) as proxy:
        before = len(recorder.streams)
        body = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\nx-script: flood:8\r\n"
                           b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 6
            while len(recorder.streams) == before and time.monotonic() < deadline:
                time.sleep(0.1)
            after = httpx.post(proxy.url + "/v1/chat/completions", headers={"x-script": "text:ok"},
                               json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            gauge = httpx.get(proxy.url + "/metrics").text
    assert recorder.streams[before:before + 1] == ["closed-early"]
    assert after.status_code == 200 and after.text.endswith("data: [DONE]\n\n")
    assert "siren_proxy_active_streams 0.0" in gauge


def test_request_deadline_covers_a_body_that_does_not_arrive(scripted):
    """A client that sends its headers and then its body slowly, or never, is answered at
    the deadline too, rather than holding its connection and task for as long as it likes."""
    url, recorder = scripted
    with running_proxy(config(url, server="  request_timeout: 0.5", prompt="{action: off}",
                              response="{action: off}")) as proxy:
        before = len(recorder.requests)
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\n"
                           b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\": ")
            client.settimeout(5)
            started = time.monotonic()
            answer = client.recv(65536)
            elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 504 ") and b'"code":"request_timeout"' in answer.replace(b" ", b"")
    assert elapsed < 3
    assert len(recorder.requests) == before
