"""The foundation: the proxy forwards the OpenAI API faithfully, over real loopback peers.

The `openai` SDK is the client; llm-katan (echo backend) and the scripted upstream are
the servers. No guard is involved here: every policy is `off`.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
import zlib
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.clients import close_sdk_clients  # noqa: F401 - an autouse fixture
from tests.support.clients import sdk as client
from tests.support.proxy import running_proxy, unguarded_yaml
from tests.support.servers import free_port

FIXTURES = Path(__file__).parent / "fixtures" / "vllm-0.32-cpu"


@pytest.fixture(scope="module")
def via_katan(katan_url):
    with running_proxy(unguarded_yaml(katan_url)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def via_scripted(scripted):
    url, recorder = scripted
    with running_proxy(unguarded_yaml(url)) as proxy:
        yield proxy, recorder


def echoed(text: str) -> str:
    """llm-katan's echo reply minus its first line (which carries a timestamp)."""
    return text.split("\n", 1)[1]


def test_chat_completion_sync(via_katan):
    reply = client(via_katan).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert echoed(reply.choices[0].message.content) == "User: What is the capital of France?"
    assert reply.choices[0].finish_reason == "stop"


def test_chat_completion_stream_sync(via_katan):
    stream = client(via_katan).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Tell me about otters."}], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert echoed(text) == "User: Tell me about otters."
    assert len(chunks) > 10  # llm-katan sends 4 characters a chunk; they arrive as chunks


def test_chat_completion_async_both_modes(via_katan):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=via_katan.url + "/v1", api_key="sk", max_retries=0)
        async with aclient:
            plain = await aclient.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "one"}])
            stream = await aclient.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "two"}], stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return plain.choices[0].message.content, text

    plain, streamed = asyncio.run(run())
    assert echoed(plain) == "User: one"
    assert echoed(streamed) == "User: two"


def test_models_list(via_katan):
    assert [m.id for m in client(via_katan).models.list()] == ["smollm2"]


def test_embeddings(via_scripted):
    proxy, _ = via_scripted
    result = client(proxy).embeddings.create(model="m", input=["ab", "abcd"])
    assert [d.embedding for d in result.data] == [[2.0, 0.5, -0.5], [4.0, 0.5, -0.5]]


def test_upstream_4xx_is_the_sdks_own_exception(via_katan):
    # llm-katan rejects an empty message list with 400 and its own error body.
    with pytest.raises(openai.BadRequestError) as caught:
        client(via_katan).chat.completions.create(model="smollm2", messages=[])
    assert caught.value.status_code == 400


def test_upstream_error_status_and_body_pass_through_unchanged(via_katan, katan_url):
    body = b'{"model": "smollm2", "messages": []}'
    headers = {"authorization": "Bearer x", "content-type": "application/json"}
    direct = httpx.post(katan_url + "/chat/completions", content=body, headers=headers)
    proxied = httpx.post(via_katan.url + "/v1/chat/completions", content=body, headers=headers)
    assert (proxied.status_code, proxied.content) == (direct.status_code, direct.content)
    assert direct.status_code == 400


def test_recorded_vllm_stream_is_byte_identical(via_scripted):
    proxy, _ = via_scripted
    for name in ("stream_raw.txt", "stream_n2_raw.txt", "stream_no_usage_raw.txt"):
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", json={"model": "smollm2", "stream": True},
                          headers={"x-script": f"replay:{name}"}) as response:
            received = b"".join(response.iter_raw())
        assert response.headers["content-type"].startswith("text/event-stream")
        assert received == (FIXTURES / name).read_bytes(), name


def test_sdk_reads_recorded_vllm_n2_stream(via_scripted):
    proxy, _ = via_scripted
    stream = client(proxy, default_headers={"x-script": "replay:stream_n2_raw.txt"}).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "x"}], stream=True, n=2)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] and texts[1] and texts[0] != texts[1]


def test_method_query_body_and_headers_forwarded(via_scripted, scripted):
    proxy, _ = via_scripted
    response = httpx.request(
        "PUT", proxy.url + "/v1/files/abc?purpose=batch&x=1", content=b"\x00raw bytes\xff",
        headers={"authorization": "Bearer sk-client", "x-custom": "kept", "connection": "keep-alive, x-hop",
                 "x-hop": "dropped", "keep-alive": "timeout=5", "content-type": "application/octet-stream"})
    seen = response.json()
    assert (seen["method"], seen["path"], seen["query"]) == ("PUT", "/v1/files/abc", "purpose=batch&x=1")
    assert seen["body"] == "\x00raw bytes\xff"
    assert seen["headers"]["authorization"] == "Bearer sk-client"
    assert seen["headers"]["x-custom"] == "kept"
    assert "x-hop" not in seen["headers"] and "keep-alive" not in seen["headers"]
    # The upstream sees its own address as Host, never the proxy's.
    assert seen["headers"]["host"] == httpx.URL(scripted[0]).netloc.decode()


@pytest.mark.parametrize("client", [{"authorization": "Bearer sk-client"}, {"x-api-key": "sk-client"},
                                    {"authorization": "Bearer sk-client", "x-api-key": "sk-client-2"}])
def test_upstream_api_key_replaces_client_credentials(scripted, client):
    """The configured key goes upstream in place of the client's, in whichever header the
    client sent it (the anthropic SDK sends `x-api-key`, which went on beside the
    configured key: the client's credential reached the upstream)."""
    url, _ = scripted
    yaml_text = unguarded_yaml(url, upstream_extra="    api_key: ${TEST_UPSTREAM_KEY}")
    import os
    os.environ["TEST_UPSTREAM_KEY"] = "sk-upstream-secret"
    try:
        with running_proxy(yaml_text) as proxy:
            seen = httpx.get(proxy.url + "/v1/anything", headers=client).json()
    finally:
        del os.environ["TEST_UPSTREAM_KEY"]
    assert seen["headers"]["authorization"] == "Bearer sk-upstream-secret"
    assert "x-api-key" not in seen["headers"]


@pytest.mark.parametrize("headers", [
    [("authorization", "Bearer sk-proxy-a"), ("x-api-key", "sk-proxy-a")],  # an SDK set both to one key
    [("authorization", "Bearer sk-proxy-a"), ("x-api-key", "sk-proxy-b")],
    [("x-api-key", "sk-proxy-a"), ("x-api-key", "sk-proxy-b")]])
def test_a_proxy_key_never_reaches_the_upstream_whichever_headers_carry_it(scripted, headers):
    """With proxy keys, the client's key is not forwarded: it was, in `x-api-key`, when
    the client sent `Authorization` too (a client that sets both to its key), or a second
    `x-api-key` line."""
    url, _ = scripted
    text = unguarded_yaml(url, server='  api_keys: ["sk-proxy-a", "sk-proxy-b"]')
    with running_proxy(text) as proxy:
        seen = httpx.get(proxy.url + "/v1/anything", headers=headers).json()["headers"]
    assert "sk-proxy" not in json.dumps(seen)


def test_malformed_json_is_400_in_openai_format(via_katan):
    response = httpx.post(via_katan.url + "/v1/chat/completions", content=b'{"model": ',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [b"[1, 2]", b"\xff\xfe", b"[" * 30000 + b"]" * 30000])
def test_json_endpoint_rejects_non_objects(via_katan, body):
    response = httpx.post(via_katan.url + "/v1/chat/completions", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("path", "compress", "coding"), [
    ("/v1/chat/completions", gzip.compress, "gzip"),
    ("/v1/responses", gzip.compress, "gzip"),
    ("/v1/embeddings", zlib.compress, "deflate"),
])
def test_compressed_body_on_a_json_endpoint_is_400_not_forwarded(via_scripted, path, compress, coding):
    """Refused, never inflated nor forwarded, with a message that says what to do (it said
    "not valid UTF-8", which is true of the bytes and no help)."""
    proxy, recorder = via_scripted
    before = len(recorder.requests)
    body = compress(json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                                "input": "hi"}).encode())
    response = httpx.post(proxy.url + path, content=body,
                          headers={"content-type": "application/json", "content-encoding": coding})
    assert response.status_code == 400
    assert response.json() == {"error": {
        "message": f"request body is compressed ({coding}); this endpoint does not accept compressed request "
                   "bodies: send the JSON uncompressed, without Content-Encoding",
        "type": "invalid_request_error", "param": None, "code": None}}
    assert len(recorder.requests) == before


def test_compressed_body_elsewhere_is_forwarded_as_sent(via_scripted):
    proxy, _ = via_scripted
    body = gzip.compress(b'{"purpose": "batch"}')
    seen = httpx.post(proxy.url + "/v1/files", content=body, headers={"content-encoding": "gzip"}).json()
    assert seen["body"].encode("latin-1") == body and seen["headers"]["content-encoding"] == "gzip"


def test_body_over_limit_is_413(via_katan):
    big = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "x" * 70000}]})
    response = httpx.post(via_katan.url + "/v1/chat/completions", content=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_upstream_down_is_502():
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with running_proxy(unguarded_yaml(dead)) as proxy:
        with pytest.raises(openai.InternalServerError) as caught:
            client(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502
        assert caught.value.body["code"] == "upstream_unreachable"
        ready = httpx.get(proxy.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["upstreams"] == {"up": False}
        assert httpx.get(proxy.url + "/healthz").status_code == 200


def test_upstream_slow_is_504(start_katan):
    with start_katan("--latency-ms", "3000") as slow:
        yaml_text = unguarded_yaml(slow, upstream_extra="    read_timeout: 0.5")
        with running_proxy(yaml_text) as proxy:
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as caught:
                client(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert time.monotonic() - started < 2.5
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "upstream_timeout"


@pytest.mark.parametrize("flags,status,sdk_error", [
    (("--error-rate", "1.0"), 500, openai.InternalServerError),
    (("--rate-limit-after", "1"), 429, openai.RateLimitError),
])
def test_upstream_injected_errors_pass_through(start_katan, flags, status, sdk_error):
    with start_katan(*flags) as faulty, running_proxy(unguarded_yaml(faulty)) as proxy:
        messages = [{"role": "user", "content": "hi"}]
        if status == 429:  # the first request is allowed, the next ones are limited
            client(proxy).chat.completions.create(model="m", messages=messages)
        with pytest.raises(sdk_error) as caught:
            client(proxy).chat.completions.create(model="m", messages=messages)
    assert caught.value.status_code == status


def test_client_disconnect_closes_upstream_stream(via_scripted):
    proxy, recorder = via_scripted
    before = len(recorder.streams)
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json={"model": "m", "stream": True},
                      headers={"x-script": "stall-after:3"}) as response:
        for line in response.iter_lines():
            if "tok2" in line:
                break  # leave while the upstream is stalled mid-stream
    deadline = time.monotonic() + 5
    while len(recorder.streams) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert recorder.streams[before:] == ["closed-early"]


def test_reset_mid_stream_becomes_in_band_error_then_done(via_scripted):
    proxy, _ = via_scripted
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json={"model": "m", "stream": True},
                      headers={"x-script": "reset-after:2"}) as response:
        body = b"".join(response.iter_raw())
    events = [block for block in body.split(b"\n\n") if block]
    assert events[-1] == b"data: [DONE]"
    error = json.loads(events[-2][len(b"data: "):])
    assert error["error"]["code"] == "upstream_unreachable"
    assert b"tok1" in body


def test_no_route_is_404_and_traversal_is_400(via_katan):
    assert httpx.get(via_katan.url + "/v2/models").status_code == 404
    for path in ("/v1/../admin", "/v1/%2e%2e/admin", "/v1/files%2fetc"):
        response = httpx.get(via_katan.url + path)
        assert response.status_code in (400, 404), path
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_routing_header_given_twice_is_400_not_a_route_by_order(katan_url):
    """A header route (`x-tenant: kids*`) before a catch-all: two `x-tenant` lines went to
    whichever route their order picked."""
    text = unguarded_yaml(katan_url).replace(
        "routes:\n", "routes:\n  - {prefix: /v1, header: {name: x-tenant, value: 'kids*'}, upstream: up, policy: open}\n")
    with running_proxy(text) as proxy:
        response = httpx.get(proxy.url + "/v1/models", headers=[("x-tenant", "adult"), ("x-tenant", "kids")])
        metrics = httpx.get(proxy.url + "/metrics").text
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert "'x-tenant' is given 2 times with different values" in response.json()["error"]["message"]
    assert 'siren_proxy_requests_total{route="-",status="400"} 1.0' in metrics


def test_readyz_true_when_upstream_up(via_katan):
    response = httpx.get(via_katan.url + "/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "upstreams": {"up": True}, "guard": "absent"}


def test_upstream_cookies_are_not_kept_for_other_clients(via_scripted):
    proxy, _ = via_scripted
    first = httpx.get(proxy.url + "/v1/set-cookie")
    assert first.headers["set-cookie"].startswith("upstream-session=")  # passed on to that client
    seen = httpx.get(proxy.url + "/v1/anything").json()["headers"]  # a new client, no cookies
    assert "cookie" not in seen


def test_upstream_sees_only_the_clients_headers(via_scripted):
    proxy, _ = via_scripted
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"GET /v1/anything HTTP/1.1\r\nHost: x\r\nX-Only: this\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    body = reply.split(b"\r\n\r\n", 1)[1]
    seen = json.loads(body)["headers"]
    assert set(seen) == {"host", "x-only"}


def test_a_compressed_stream_is_forwarded_as_sent():
    """An upstream behind a gateway that compresses event streams (Caddy's `encode gzip`
    does, for any text/*) answers a client that accepts gzip (the openai SDK does) with
    a gzip'd stream. Unguarded, it is the client's to inflate: the proxy used to read it
    as events (garbage: `upstream_unreachable`) and drop its Content-Encoding."""
    from tests.proxy.rawhttp import LAST_CHUNK, RawUpstream, chunk
    from tests.support.upstream import chat_chunk

    events = chat_chunk(role=True) + chat_chunk("hello ") + chat_chunk("world") + b"data: [DONE]\n\n"
    packed = gzip.compress(events)
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    with RawUpstream(lambda _: [head, chunk(packed[:20]), 0.05, chunk(packed[20:]), LAST_CHUNK]) as upstream, \
            running_proxy(unguarded_yaml(upstream.url)) as proxy:
        stream = client(proxy).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream)
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", json={"model": "m", "stream": True},
                          headers={"accept-encoding": "gzip"}) as response:
            raw = b"".join(response.iter_raw())
    assert text == "hello world"
    assert response.headers["content-encoding"] == "gzip" and raw == packed


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked", b"gzip\r\nTransfer-Encoding: chunked"])
def test_a_transfer_coding_other_than_chunked_is_501_not_forwarded_without_it(coding):
    """uvicorn undoes `chunked` alone and passed the rest on: a `gzip, chunked` body went
    upstream still gzipped, with no header left to say so (RFC 9112 6.1: 501)."""
    from tests.proxy.rawhttp import RawUpstream

    def script(head: bytes) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"]

    with RawUpstream(script) as upstream, running_proxy(unguarded_yaml(upstream.url)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"POST /v1/files HTTP/1.1\r\nhost: x\r\ntransfer-encoding: " + coding + b"\r\n\r\n"
                         b"3\r\nabc\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        served = [record.request.split(b"\r\n")[0] for record in upstream.served]
    assert reply.startswith(b"HTTP/1.1 501 "), reply[:200]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])
    assert body["error"]["code"] == "unsupported_transfer_coding"
    assert b"HTTP/1.1 200 " in reply  # the next request on the connection is served
    assert served == [b"GET /v1/models HTTP/1.1"]


def test_an_upstream_redirect_points_back_through_the_proxy(katan_url):
    """vLLM's server (Starlette) redirects a path with a trailing slash to the one without
    it, 307, at its own address: the client got the upstream's address, and one that
    follows redirects (httpx, the openai SDK's client) went on to it straight, past the
    proxy and its guard. A redirect into the upstream's base URL now names the route's
    prefix."""
    yaml_text = unguarded_yaml(katan_url).replace("prefix: /v1,", "prefix: /team/v1,")
    upstream = httpx.URL(katan_url)
    with running_proxy(yaml_text) as proxy:
        redirected = httpx.get(proxy.url + "/team/v1/models/?x=1")
        followed = httpx.get(proxy.url + "/team/v1/models/", follow_redirects=True,
                             headers={"authorization": "Bearer sk-any"})
    assert redirected.status_code == 307
    assert redirected.headers["location"] == "/team/v1/models?x=1"
    assert followed.status_code == 200 and followed.json()["data"]
    assert [str(r.url) for r in followed.history] == [proxy.url + "/team/v1/models/"]
    assert f":{upstream.port}" not in str(followed.url)


@pytest.mark.parametrize("location, base_url, prefix, expected", [
    ("http://vllm:8000/v1/models", "http://vllm:8000/v1", "/v1", "/v1/models"),
    ("HTTP://VLLM:8000/v1/models?a=1#f", "http://vllm:8000/v1", "/team/v1", "/team/v1/models?a=1#f"),
    ("/v1/models", "http://vllm:8000/v1", "/team/v1", "/team/v1/models"),
    ("//vllm:8000/v1/models", "http://vllm:8000/v1", "/v1", "/v1/models"),  # a network-path reference
    ("http://vllm:8000/", "http://vllm:8000", "/", "/"),
    ("http://vllm:8000/v1", "http://vllm:8000/v1", "/up", "/up"),
    ("http://vllm:8000/docs", "http://vllm:8000/v1", "/v1", "http://vllm:8000/docs"),  # outside the base: as sent
    ("http://vllm:8000/v10/x", "http://vllm:8000/v1", "/v1", "http://vllm:8000/v10/x"),
    ("https://login.example/v1/x", "http://vllm:8000/v1", "/v1", "https://login.example/v1/x"),
    ("models", "http://vllm:8000/v1", "/team/v1", "models"),  # relative to the request's path
])
def test_client_location(location, base_url, prefix, expected):
    from proxy.upstream import client_location
    assert client_location(location, base_url, prefix) == expected
