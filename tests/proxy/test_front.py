"""The front door against a client that never finishes its request head: `serve`'s own
uvicorn protocol (`proxy.front`), over raw sockets, since httpx always sends a whole head."""

from __future__ import annotations

import json
import os
import select
import socket
import time

from policies.config import parse_config
from policies.reload import ConfigHolder
from proxy.app import build_app
from proxy.front import MAX_HEAD, FrontDoor
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


class QuickDoor(FrontDoor):
    HEAD_TIMEOUT = 1.0


def test_a_head_that_never_ends_or_never_starts_is_closed_after_the_head_timeout(scripted):
    """uvicorn waits for a request head without end, and any byte stops its keep-alive
    timer: connections that sent nothing, or a header byte now and then (slowloris),
    stayed open for good, each a file descriptor."""
    app = build_app(ConfigHolder(parse_config(unguarded_yaml(scripted[0]))))
    with LiveServer(app, http=QuickDoor) as proxy:
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
            time.sleep(QuickDoor.HEAD_TIMEOUT * 1.5)
            sock.sendall(body[1:])
            assert answer(sock).startswith(b"HTTP/1.1 200 ")


def test_a_pipelined_head_too_large_waits_for_the_response_in_progress(scripted):
    """A client that pipelines a head over the bound behind a stream still going: the
    stream ends whole, then the 431. (The connection was closed at once, cutting the
    earlier response short.)"""
    app = build_app(ConfigHolder(parse_config(unguarded_yaml(scripted[0]))))
    words = " ".join(f"w{i}" for i in range(50))  # 50 chunks, 10 ms apart
    body = json.dumps({"model": "m", "stream": True}).encode()
    with LiveServer(app, http=FrontDoor) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"x-script: slowtext:" + words.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body)
                         + body + b"GET /v1/models HTTP/1.1\r\nx-pad: " + b"a" * (2 * MAX_HEAD))
            reply = answer(sock)
    first, _, rest = reply.partition(b"data: [DONE]")
    assert first.startswith(b"HTTP/1.1 200 ") and b"w49" in first, reply[-300:]
    assert b"HTTP/1.1 431 " in rest, reply[-300:]


def test_a_body_dripped_after_an_early_answer_is_closed_after_the_head_timeout(scripted):
    """A request answered before its body came (413 on its Content-Length, 401 on its
    head) whose client then drips the body: no timer was left, as every byte stopped
    uvicorn's keep-alive timer and the head's ignored body bytes, so the connection
    stayed open for good. It closes `HEAD_TIMEOUT` after the answer, as an idle one does."""
    app = build_app(ConfigHolder(parse_config(unguarded_yaml(scripted[0]))))
    with LiveServer(app, http=QuickDoor) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 999999999999\r\n\r\n{")
            started, closed = time.monotonic(), False
            while time.monotonic() - started < QuickDoor.HEAD_TIMEOUT * 4 and not closed:
                time.sleep(0.1)
                try:
                    sock.sendall(b" ")
                except OSError:
                    closed = True
                    break
                if select.select([sock], [], [], 0)[0]:
                    closed = not sock.recv(65536)
        assert closed and time.monotonic() - started < QuickDoor.HEAD_TIMEOUT * 3
