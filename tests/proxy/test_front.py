"""The front door against a client that never finishes its request head: `serve`'s own
uvicorn protocol (`proxy.front`), over raw sockets, since httpx always sends a whole head."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import time

import httpx
import openai

from policies.config import ServerConfig, parse_config
from policies.reload import ConfigHolder
from proxy.app import build_app
from proxy.front import FrontDoor
from tests.proxy.test_serve import Serve, config_text
from tests.support.proxy import unguarded_yaml
from tests.support.servers import LiveServer


def answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """What the server writes before it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


MAX_HEAD = ServerConfig().max_head_bytes
HEAD_TIMEOUT = 1.0


def front(base_url: str, server: str = "") -> LiveServer:
    """The proxy over `base_url`, behind `serve`'s front door, with `server` keys added."""
    app = build_app(ConfigHolder(parse_config(unguarded_yaml(base_url, server=server))))
    return LiveServer(app, http=FrontDoor)


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))


def test_an_endless_request_head_is_431_not_memory(tmp_path, scripted):
    """uvicorn's httptools server kept every header byte until the blank line: a client
    sending header lines without end grew the proxy by what it sent (61 MB for 61 MB)."""
    path = tmp_path / "config.yaml"
    path.write_text(config_text(scripted[0]))
    with Serve(path) as proxy:
        before = rss_mb(proxy.proc.pid)
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n")
            line = b"x-pad: " + b"a" * 8000 + b"\r\n"
            sent = 0
            while sent < 32 << 20 and not select.select([sock], [], [], 0)[0]:  # until the proxy answers
                select.select([], [sock], [], 10)
                sent += sock.send(line)
            reply = answer(sock)
        assert sent < 32 << 20
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
        body = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "request_head_too_large"
        assert rss_mb(proxy.proc.pid) - before < 16
        # One header line over the bound, never ended, is the same.
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nx-pad: " + os.urandom(MAX_HEAD).hex().encode())
            assert answer(sock).startswith(b"HTTP/1.1 431 ")
        # A head just under the bound is served, and so is the next request on its connection.
        pad = b"x-pad: " + b"a" * (MAX_HEAD - 200) + b"\r\n"
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + pad + b"\r\n"
                         b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            reply = answer(sock)
        assert reply.count(b"HTTP/1.1 200 ") == 2, reply[:300]


def test_a_head_that_never_ends_or_never_starts_is_closed_after_the_head_timeout(scripted):
    """uvicorn waits for a request head without end, and any byte stops its keep-alive
    timer: connections that sent nothing, or a header byte now and then (slowloris),
    stayed open for good, each a file descriptor."""
    with front(scripted[0], f"  head_timeout: {HEAD_TIMEOUT}") as proxy:
        silent = socket.create_connection(("127.0.0.1", proxy.port))
        drip = socket.create_connection(("127.0.0.1", proxy.port))
        after = socket.create_connection(("127.0.0.1", proxy.port))  # a drip after one answer
        after.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        started = time.monotonic()
        for byte in b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-slow: 1":
            drip.sendall(bytes([byte]))
            after.sendall(bytes([byte]))
            time.sleep(0.1)
            if time.monotonic() - started > 3:
                break
        assert answer(silent, timeout=5) == b""
        reply = answer(drip, timeout=5)
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_head_timeout"
        replies = answer(after, timeout=5)
        assert replies.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in replies, replies[:400]
        for sock in (silent, drip, after):
            sock.close()
        # A request that takes its time over the body is not the head's to time out.
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            body = b'{"input": "slow"}'
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n%s" % (len(body), body[:1]))
            time.sleep(HEAD_TIMEOUT * 1.5)
            sock.sendall(body[1:])
            assert answer(sock).startswith(b"HTTP/1.1 200 ")


def test_a_pipelined_head_too_large_waits_for_the_response_in_progress(scripted):
    """A client that pipelines a head over the bound behind a stream still going: the
    stream ends whole, then the 431. (The connection was closed at once, cutting the
    earlier response short.)"""
    words = " ".join(f"w{i}" for i in range(50))  # 50 chunks, 10 ms apart
    body = json.dumps({"model": "m", "stream": True}).encode()
    with front(scripted[0]) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"x-script: slowtext:" + words.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body)
                         + body + b"GET /v1/models HTTP/1.1\r\nx-pad: ")
            time.sleep(0.1)  # the pad in reads of its own: the read in which a head ends is not counted
            sock.sendall(b"a" * (2 * MAX_HEAD))
            reply = answer(sock)
    first, _, rest = reply.partition(b"data: [DONE]")
    assert first.startswith(b"HTTP/1.1 200 ") and b"w49" in first, reply[-300:]
    assert b"HTTP/1.1 431 " in rest, reply[-300:]


def test_a_body_dripped_after_an_early_answer_is_closed_after_the_head_timeout(scripted):
    """A request answered before its body came (413 on its Content-Length, 401 on its
    head) whose client then drips the body: no timer was left, as every byte stopped
    uvicorn's keep-alive timer and the head's ignored body bytes, so the connection
    stayed open for good. It closes `HEAD_TIMEOUT` after the answer, as an idle one does."""
    with front(scripted[0], f"  head_timeout: {HEAD_TIMEOUT}") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 999999999999\r\n\r\n{")
            started, closed = time.monotonic(), False
            while time.monotonic() - started < HEAD_TIMEOUT * 4 and not closed:
                time.sleep(0.1)
                try:
                    sock.sendall(b" ")
                except OSError:
                    closed = True
                    break
                if select.select([sock], [], [], 0)[0]:
                    closed = not sock.recv(65536)
        assert closed and time.monotonic() - started < HEAD_TIMEOUT * 3


def test_a_large_request_read_at_once_is_not_counted_as_the_next_head(scripted):
    """A request of 64-256 KiB (a long prompt) that the server read in one piece, head and
    body: the piece was counted toward the next head, so the request was answered, then a
    431 followed on the keep-alive connection, which was closed (a client reusing it could
    read that 431 as the answer to its next request)."""
    text = unguarded_yaml(scripted[0]).replace("max_body_bytes: 65536", "max_body_bytes: 1000000")
    body = json.dumps({"model": "m", "input": "x" * 120_000}).encode()
    request = (b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % len(body)) + body
    with LiveServer(build_app(ConfigHolder(parse_config(text))), http=FrontDoor) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            for _ in range(3):
                sock.sendall(request)
                time.sleep(0.3)  # answered, and anything after the answer written too
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            reply = answer(sock)
    assert re.findall(rb"HTTP/1\.1 \d+", reply) == [b"HTTP/1.1 200"] * 4, reply[-400:]


def test_the_head_bounds_and_the_keep_alive_are_the_configs(scripted):
    """`server.max_head_bytes` and `server.keep_alive_timeout` replace the defaults (they
    were constants: 64 KiB, and uvicorn's 5 s)."""
    pad = b"x-pad: " + b"a" * 1500 + b"\r\n"
    with front(scripted[0], "  max_head_bytes: 2048\n  keep_alive_timeout: 0.5") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            for piece in (b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + pad, pad, pad + b"\r\n"):
                sock.sendall(piece)  # a head over 2048 bytes in reads of its own (the one that
                time.sleep(0.2)  # ends a head is not counted, so a bound is one read's size)
            reply = answer(sock)
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
        assert b"over 2048 bytes" in reply
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + pad + b"\r\n")
            started = time.monotonic()
            reply = answer(sock)  # served, then closed when idle for half a second
            idle = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1") == 1, reply[:200]
        assert 0.3 < idle < 3, idle


def test_a_body_that_stops_coming_is_408_and_closed(scripted):
    """A client that sends a head and part of its body, then nothing: uvicorn waited for
    the rest for good (with no `request_timeout`), holding the connection and the request's
    task. `server.body_timeout` is the longest wait for the next bytes of a body."""
    body = json.dumps({"model": "m", "input": "slow"}).encode()
    with front(scripted[0], "  body_timeout: 1") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body[:5]))
            started = time.monotonic()
            reply = answer(sock)  # the answer, then the close (it was asked to keep alive)
            waited = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert b"connection: close" in head.lower()
        assert json.loads(payload)["error"] == {
            "message": "no byte of the request body came for 1s", "type": "invalid_request_error",
            "param": None, "code": "request_body_timeout"}
        assert 0.8 < waited < 5, waited
        # A body that keeps coming, however slowly, is read whole: the bound is per wait.
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n" % len(body))
            for i in range(0, len(body), 8):
                sock.sendall(body[i:i + 8])
                time.sleep(0.3)  # 1.5 s or more in all
            assert answer(sock).startswith(b"HTTP/1.1 200 ")
        # A chunked body that stops between chunks is the same.
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"5\r\n" + body[:5] + b"\r\n")
            assert answer(sock).startswith(b"HTTP/1.1 408 ")


def test_connections_over_the_per_client_bound_get_429(scripted):
    """One client could hold as many connections as the proxy had file descriptors. Over
    `server.max_connections_per_client`, a new connection is answered 429 at once, in the
    envelope, with Retry-After; the openai SDK raises RateLimitError; once the client
    closes one, it is served again."""
    with front(scripted[0], "  max_connections_per_client: 2") as proxy:
        held = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(2)]
        time.sleep(0.2)  # both are counted
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            reply = answer(sock)
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429 "), reply[:200]
        assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
        assert json.loads(payload)["error"]["code"] == "too_many_connections"
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        try:
            client.models.list()
            raise AssertionError("served over the bound")
        except openai.RateLimitError as exc:
            assert exc.code == "too_many_connections"
        # The held connections are served; one closed makes room for a new one.
        held[0].sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert answer(held[0]).startswith(b"HTTP/1.1 200 ")
        held[0].close()
        time.sleep(0.2)
        assert client.models.list().data
        held[1].close()
        client.close()
        # Counted in /metrics: the two refusals, and the connections open now (this one, the
        # client's until it is closed).
        time.sleep(0.2)
        metrics = httpx.get(proxy.url + "/metrics").text
        assert 'siren_proxy_front_door_refusals_total{code="too_many_connections"} 2.0' in metrics
        assert "siren_proxy_open_connections 1.0" in metrics, [
            line for line in metrics.splitlines() if "open_connections" in line]


def test_connections_over_the_total_bound_get_503(scripted):
    """`server.max_connections` bounds all clients' connections together: 503 overloaded."""
    with front(scripted[0], "  max_connections: 1") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as first:
            time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
                reply = answer(sock)
            assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "overloaded"
            first.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert answer(first).startswith(b"HTTP/1.1 200 ")


def test_a_reload_sets_the_bounds_of_new_connections(tmp_path, scripted):
    """The front door reads the live config as each connection opens."""
    path = tmp_path / "config.yaml"
    path.write_text(config_text(scripted[0]))
    with Serve(path) as proxy:
        held = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(3)]
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert answer(sock).startswith(b"HTTP/1.1 200 ")
        path.write_text("server: {max_connections_per_client: 3}\n" + config_text(scripted[0]))
        deadline = time.monotonic() + 10
        while True:
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                reply = answer(sock)
            if reply.startswith(b"HTTP/1.1 429 ") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert reply.startswith(b"HTTP/1.1 429 "), reply[:200]
        for sock in held:
            sock.close()
