"""`siren-proxy serve` and `check-config` as a user runs them: a real process, a real file.

Policies here score nothing, so no model loads; the guarded paths are tested in-process
(test_guarded.py) and with the real guard in test_real_guard.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from proxy.server import watch_config
from tests.support.servers import free_port, katan, wait_http


def config_text(base_url: str, prefix: str = "/v1") -> str:
    return f"""
upstreams:
  up: {{base_url: {base_url}}}
policies:
  default:
    prompt: {{action: off}}
    response: {{action: off}}
routes:
  - {{prefix: {prefix}, upstream: up, policy: default}}
"""


class Serve:
    def __init__(self, config_path, *args: str, poll: float = 0.2) -> None:
        self.port = free_port()
        env = {**os.environ, "SIREN_PROXY_RELOAD_POLL_SECONDS": str(poll), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config_path), "--port", str(self.port), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Serve:
        wait_http(self.url + "/healthz", timeout=60, proc=self.proc)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.output = self.proc.communicate(timeout=15)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.output = self.proc.communicate()[0]


def eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def status(url: str) -> int:
    return httpx.get(url).status_code


def test_serve_forwards_and_reloads_on_file_change(tmp_path, scripted):
    upstream, _ = scripted
    path = tmp_path / "config.yaml"
    path.write_text(config_text(upstream))
    with Serve(path) as serve:
        assert status(serve.url + "/v1/models") == 200
        path.write_text(config_text(upstream, prefix="/v2"))
        eventually(lambda: status(serve.url + "/v2/models") == 200)
        assert status(serve.url + "/v1/models") == 404
        path.write_text(config_text(upstream, prefix="/v3") + "\nbogus_key: 1\n")  # rejected
        time.sleep(1.0)
        assert status(serve.url + "/v2/models") == 200  # the old config keeps serving
    assert "bogus_key" in serve.output  # the rejection names the key


def test_sighup_reloads(tmp_path, scripted):
    upstream, _ = scripted
    path = tmp_path / "config.yaml"
    path.write_text(config_text(upstream))
    with Serve(path, poll=3600) as serve:
        path.write_text(config_text(upstream, prefix="/v2"))
        time.sleep(0.5)
        assert status(serve.url + "/v1/models") == 200  # no poll: nothing changed yet
        serve.proc.send_signal(signal.SIGHUP)
        eventually(lambda: status(serve.url + "/v2/models") == 200)


def test_a_reload_rotates_api_keys_without_a_restart(tmp_path, scripted):
    """`server.api_keys` is read by each request: after a reload the new key is let in and
    the revoked one refused at once, and the log speaks of no restart."""
    upstream, _ = scripted
    path = tmp_path / "config.yaml"

    def keyed(key: str) -> str:
        return config_text(upstream) + f"server: {{api_keys: [{key}]}}\n"

    def code(key: str) -> int:
        return httpx.get(serve.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code

    path.write_text(keyed("sk-old"))
    with Serve(path) as serve:
        assert (code("sk-old"), code("sk-new")) == (200, 401)
        path.write_text(keyed("sk-new"))
        eventually(lambda: code("sk-new") == 200)
        assert code("sk-old") == 401
    assert "config reloaded" in serve.output and "restart" not in serve.output


def test_in_flight_stream_finishes_under_its_config(tmp_path, scripted):
    upstream, recorder = scripted
    path = tmp_path / "config.yaml"
    path.write_text(config_text(upstream))
    words = " ".join(f"w{i}" for i in range(100))  # 100 chunks, 10 ms apart
    with Serve(path) as serve:
        with httpx.stream("POST", serve.url + "/v1/chat/completions", headers={"x-script": f"slowtext:{words}"},
                          json={"model": "m", "stream": True}, timeout=30) as response:
            chunks = response.iter_raw()
            first = next(chunks)
            dead = f"http://127.0.0.1:{free_port()}/v1"
            path.write_text(config_text(dead))  # reload points the route at a dead upstream
            eventually(lambda: status(serve.url + "/v1/models") == 502)
            body = first + b"".join(chunks)
    assert body.endswith(b"data: [DONE]\n\n") and b"w99" in body


def slow_words(count: int) -> str:
    """The scripted upstream's stream of `count` chunks, 10 ms apart."""
    return "slowtext:" + " ".join(f"w{i}" for i in range(count))


def shut_down_during(tmp_path, upstream: str, shutdown_timeout: float, script: str) -> tuple[bytes, float]:
    """SIGTERM once the scripted upstream's stream has begun: what the client got (the
    body must end cleanly), and how long after the signal it ended."""
    path = tmp_path / "config.yaml"
    path.write_text(f"server:\n  shutdown_timeout: {shutdown_timeout}\n" + config_text(upstream))
    with Serve(path) as serve:
        with httpx.stream("POST", serve.url + "/v1/chat/completions", headers={"x-script": script},
                          json={"model": "m", "stream": True}, timeout=30) as response:
            chunks = response.iter_raw()
            first = next(chunks)
            serve.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            body = first + b"".join(chunks)
        took = time.monotonic() - signalled
        assert serve.proc.wait(timeout=15) == -signal.SIGTERM  # uvicorn raises the signal again once shut down
    return body, took


def test_shutdown_ends_a_stream_still_going_with_an_in_band_error(tmp_path, scripted):
    """SIGTERM with a stream open that would go on for 30 s: it ends around
    `shutdown_timeout` (1.5 s), with `server_shutting_down` and [DONE], and the process
    exits. (uvicorn cancelled it at its grace period's end: a broken body.)"""
    body, took = shut_down_during(tmp_path, scripted[0], 1.5, slow_words(3000))
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][len(b"data: "):])["error"]["code"] == "server_shutting_down"
    assert b"w5 " in body and b"w2999" not in body and took < 5


def test_shutdown_ends_a_stream_whose_upstream_has_gone_silent(tmp_path, scripted):
    """SIGTERM while the upstream, two tokens in, sends nothing more: the stream still ends
    around `shutdown_timeout` with `server_shutting_down`. (The drain was seen only at the
    stream's next event, which never came, so uvicorn cancelled it: a broken body.)"""
    body, took = shut_down_during(tmp_path, scripted[0], 1.5, "stall-after:2")
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][len(b"data: "):])["error"]["code"] == "server_shutting_down"
    assert b"tok1 " in body and took < 5


def test_shutdown_lets_a_stream_that_ends_in_time_end(tmp_path, scripted):
    body, _ = shut_down_during(tmp_path, scripted[0], 8, slow_words(60))
    assert body.endswith(b"data: [DONE]\n\n") and b"w59" in body and b"error" not in body


@pytest.mark.parametrize("stream", [False, True])
def test_shutdown_answers_a_request_still_waiting_for_its_upstream(tmp_path, stream):
    """SIGTERM while the upstream has not answered (llm-katan holds its reply 30 s): the
    client gets a 503 `server_shutting_down` around `shutdown_timeout` (1.5 s), which it
    may retry elsewhere. (uvicorn cancelled the request at its grace period's end and
    closed the connection with no answer.)"""
    with katan(str(tmp_path), "--latency-ms", "30000") as upstream:
        path = tmp_path / "config.yaml"
        path.write_text("server:\n  shutdown_timeout: 1.5\n" + config_text(upstream))
        with Serve(path) as serve, ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, serve.url + "/v1/chat/completions", timeout=30,
                                 headers={"authorization": "Bearer sk-client"}, json={
                "model": "smollm2", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
            time.sleep(1.0)  # the request is with the upstream
            serve.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            response = answer.result(timeout=20)
            took = time.monotonic() - signalled
            assert serve.proc.wait(timeout=15) == -signal.SIGTERM
    assert response.status_code == 503 and took < 5
    assert response.json()["error"]["code"] == "server_shutting_down"


@pytest.mark.parametrize("timeout", ["", "  request_timeout: 60\n"])
def test_shutdown_answers_a_request_whose_body_is_still_coming(tmp_path, scripted, timeout):
    """SIGTERM while a client is still sending its body: it gets the 503
    `server_shutting_down` around `shutdown_timeout` (1.5 s), as a request waiting for its
    upstream does. (The body read did not see the drain: uvicorn cancelled it at its grace
    period's end, a bare 500.)"""
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  shutdown_timeout: 1.5\n" + timeout + config_text(scripted[0]))
    with Serve(path) as serve, socket.create_connection(("127.0.0.1", serve.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"model\": ")
        time.sleep(0.5)  # the body is being read
        serve.proc.send_signal(signal.SIGTERM)
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert serve.proc.wait(timeout=15) == -signal.SIGTERM
    assert answer.startswith(b"HTTP/1.1 503") and b"server_shutting_down" in answer


def test_the_config_watcher_outlives_a_reload_that_raises(caplog):
    """A reload that raises what it does not expect (a bug, a RecursionError before the
    YAML bound) ended the file watcher for good: later edits were never read. It is
    logged, and the next change is read."""
    class Holder:
        calls = 0

        def changed(self) -> bool:
            return True

        def reload(self) -> bool:
            Holder.calls += 1
            if Holder.calls == 1:
                raise RuntimeError("unexpected")
            return True

    async def main():
        watcher = asyncio.create_task(watch_config(Holder(), 0.01))
        while Holder.calls < 3 and not watcher.done():
            await asyncio.sleep(0.01)
        watcher.cancel()

    asyncio.run(main())
    assert Holder.calls >= 3
    assert "config reload failed" in caplog.text and "RuntimeError: unexpected" in caplog.text


def test_upstream_flag_overrides_the_file(tmp_path, scripted):
    upstream, _ = scripted
    path = tmp_path / "config.yaml"
    path.write_text(config_text(f"http://127.0.0.1:{free_port()}/v1"))
    with Serve(path, "--upstream", upstream) as serve:
        assert httpx.get(serve.url + "/v1/models").json()["data"][0]["id"] == "smollm2"
        assert httpx.get(serve.url + "/readyz").json() == {"ready": True, "upstreams": {"up": True},
                                                            "guard": "absent"}


@pytest.mark.parametrize("text,names", [
    ("upstreams: {up: {base_url: http://x/v1}}\nroutes:\n  - {prefix: /v1, upstream: nope, policy: default}\n",
     "routes[0].upstream"),
    ("upstreams: {up: {base_url: http://x/v1, timeout: 3}}\n", "upstreams.up.timeout"),
])
def test_bad_config_fails_at_start_naming_the_key(tmp_path, text, names):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port",
                             str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert names in result.stderr and "Traceback" not in result.stderr


def test_an_audit_log_that_cannot_be_opened_fails_at_start_naming_the_key(tmp_path):
    """It was a traceback (FileNotFoundError from deep in the app's set-up) and exit 1."""
    path = tmp_path / "config.yaml"
    audit = tmp_path / "missing" / "audit.jsonl"
    path.write_text(f"server: {{audit_log: '{audit}'}}\n" + config_text("http://127.0.0.1:8000/v1"))
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port",
                             str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (f"siren-proxy: invalid config: {path}: server.audit_log: cannot open {str(audit)!r}: "
                             "No such file or directory\n")


@pytest.mark.parametrize("poll", ["abc", "0", "-1", "nan", "inf", ""])
def test_a_bad_reload_poll_fails_at_start_naming_the_variable(tmp_path, poll):
    """It was a traceback at import (ValueError from float()) and exit 1; 0 or a negative
    number polled the file without pause on the event loop, and nan or inf never."""
    path = tmp_path / "config.yaml"
    path.write_text(config_text("http://127.0.0.1:8000/v1"))
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port",
                             str(free_port())], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SIREN_PROXY_RELOAD_POLL_SECONDS": poll})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == ("siren-proxy: invalid SIREN_PROXY_RELOAD_POLL_SECONDS: must be a finite number of "
                             f"seconds > 0; got {poll!r}\n")


@pytest.mark.parametrize(("extra", "key", "reason"), [
    ("server: {audit_log: '{tmp}/missing/audit.jsonl'}\n", "server.audit_log",
     "cannot open '{tmp}/missing/audit.jsonl': No such file or directory"),
    ("server: {audit_log: '{tmp}'}\n", "server.audit_log", "cannot open '{tmp}': Is a directory"),
    ("guard: {artifact: '{tmp}/no-such-head'}\n", "guard.artifact",
     "'{tmp}/no-such-head' is not a directory: a local artifact path (a hub id has no leading '/', '.' or '~')"),
])
def test_check_config_and_serve_agree_on_paths_they_cannot_use(tmp_path, extra, key, reason):
    """check-config said OK for an audit log `serve` then refused, and for an artifact
    directory that does not exist (`serve` started, and every guarded request was a 503
    `guard_unavailable` with one ERROR line to say why). Both now refuse both, naming the
    key; check-config creates nothing."""
    extra, reason = extra.replace("{tmp}", str(tmp_path)), reason.replace("{tmp}", str(tmp_path))
    path = tmp_path / "config.yaml"
    path.write_text(extra + config_text("http://127.0.0.1:8000/v1"))
    check = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and check.stderr == f"error: {path}: {key}: {reason}\n"
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port",
                             str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == f"siren-proxy: invalid config: {path}: {key}: {reason}\n"
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(("upstream", "reason"), [
    ("ftp://x/v1", "must be an http(s) URL without query or fragment; got 'ftp://x/v1'"),
    ("http://127.0.0.1:99999/v1", "the port must be a number in 1-65535; got 'http://127.0.0.1:99999/v1'"),
    ("http://bob:hunter2@127.0.0.1:8000/v1", "must not carry credentials (user:password@): they are not sent; "
     "set the upstream's api_key; got 'http://***@127.0.0.1:8000/v1'"),
])
def test_bad_upstream_flag_fails_at_start_as_the_file_would(tmp_path, upstream, reason):
    """`--upstream` is checked as a config file's `base_url` is, before anything listens."""
    path = tmp_path / "config.yaml"
    path.write_text(config_text("http://127.0.0.1:8000/v1"))
    port = free_port()
    try:
        result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", str(port),
                                 "--upstream", upstream], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve --upstream {upstream} started serving")
    assert result.returncode == 2
    assert result.stderr == f"siren-proxy: invalid --upstream: {reason}\n"
    path.write_text(config_text(upstream))
    check = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and check.stderr.rstrip().endswith(f"upstreams.up.base_url: {reason}")


def test_check_config_prints_the_routing_table():
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", "config.yaml"],
                            capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    assert "/redteam/v1" in result.stdout and "redteam" in result.stdout


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "http"])
def test_a_port_out_of_range_is_a_usage_error(tmp_path, port):
    """`--port 99999` listened on 34463 (99999 mod 65536) while uvicorn's log said :99999;
    it is refused as `server.port` is, before anything starts."""
    path = tmp_path / "config.yaml"
    path.write_text(config_text("http://127.0.0.1:8000/v1"))
    try:
        result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path), f"--port={port}"],
                                capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve --port {port} started serving")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("siren-proxy serve: error: argument --port: ")
    assert "0-65535" in result.stderr


def test_port_zero_on_the_command_line_picks_a_free_port(tmp_path):
    """`--port 0` was read as no `--port` (`port or server.port`), so it listened on the
    file's port; 0 asks for a free port, as `server.port: 0` does."""
    taken = free_port()
    path = tmp_path / "config.yaml"
    path.write_text(f"server: {{port: {taken}}}\n" + config_text("http://127.0.0.1:8000/v1"))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "0"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "Uvicorn running on" in line:
                break
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert port != taken
        assert status(f"http://127.0.0.1:{port}/healthz") == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_a_reader_that_closes_early_gets_no_traceback():
    """`siren-proxy check-config config.yaml | head -1` (or `score --jsonl ... | head`)
    ended in a BrokenPipeError traceback once `head` had read what it wanted."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        result = subprocess.run([sys.executable, "-m", "proxy", "check-config", "config.yaml"],
                                stdout=write, stderr=subprocess.PIPE, text=True, timeout=60,
                                cwd=Path(__file__).parents[2])
    finally:
        os.close(write)
    assert result.stderr == "" and result.returncode == 1


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "critical"])
def test_log_level_takes_every_level_the_file_does(level):
    """`server.log_level: critical` loads, but `--log-level critical` was a usage error."""
    from policies.config import LOG_LEVELS
    from proxy.cli import build_parser

    assert level in LOG_LEVELS
    assert build_parser().parse_args(["serve", "--log-level", level]).log_level == level
