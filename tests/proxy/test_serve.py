"""`siren-proxy serve` and `check-config` as a user runs them: a real process, a real file.

Policies here score nothing, so no model loads; the guarded paths are tested in-process
(test_guarded.py) and with the real guard in test_real_guard.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.servers import free_port, wait_http


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


def shut_down_during(tmp_path, upstream: str, shutdown_timeout: float, words: int) -> tuple[bytes, float]:
    """SIGTERM once a stream of `words` chunks (10 ms apart) has begun: what the client
    got (the body must end cleanly), and how long after the signal it ended."""
    path = tmp_path / "config.yaml"
    path.write_text(f"server:\n  shutdown_timeout: {shutdown_timeout}\n" + config_text(upstream))
    text = " ".join(f"w{i}" for i in range(words))
    with Serve(path) as serve:
        with httpx.stream("POST", serve.url + "/v1/chat/completions", headers={"x-script": f"slowtext:{text}"},
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
    body, took = shut_down_during(tmp_path, scripted[0], 1.5, 3000)
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][len(b"data: "):])["error"]["code"] == "server_shutting_down"
    assert b"w5 " in body and b"w2999" not in body and took < 5


def test_shutdown_lets_a_stream_that_ends_in_time_end(tmp_path, scripted):
    body, _ = shut_down_during(tmp_path, scripted[0], 8, 60)
    assert body.endswith(b"data: [DONE]\n\n") and b"w59" in body and b"error" not in body


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
