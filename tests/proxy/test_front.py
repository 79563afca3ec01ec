"""The front door against a client that never finishes its request head: `serve`'s own
uvicorn protocol (`proxy.front`), over raw sockets, since httpx always sends a whole head."""

from __future__ import annotations

import json
import os
import select
import socket

from proxy.front import MAX_HEAD
from tests.proxy.test_serve import Serve, config_text


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
