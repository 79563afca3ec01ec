"""The processes a benchmark runs beside it: llm-katan and `siren-proxy serve`.

Each runs in its own process, as in production, so neither shares an event loop or a GIL
with the load generator. Every start waits until the process answers, and stops it if
it never does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.servers import free_port, katan_command, wait_http  # noqa: E402


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_katan(tmp: str, *flags: str) -> tuple[subprocess.Popen, str]:
    """llm-katan's echo backend; yields its `/v1` base URL."""
    port = free_port()
    # --max-concurrent: the echo backend otherwise serves one request at a time.
    proc = subprocess.Popen(katan_command(port, "--stats-file", os.path.join(tmp, f"katan-{port}.json"),
                                          "--max-concurrent", "1024", *flags),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    except BaseException:
        stop(proc)
        raise
    return proc, f"http://127.0.0.1:{port}/v1"


def start_proxy(config_text: str, tmp: str, *, unguarded: bool = False,
                ready_timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`python -m proxy serve` on `config_text`; returns once /readyz is 200 (the guard loaded).

    `unguarded` also checks that no guard was loaded, so a pass-through measurement
    never silently includes one. Returns the process and the proxy's root URL.
    """
    config = os.path.join(tmp, "proxy.yaml")
    Path(config).write_text(config_text)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = open(os.path.join(tmp, "proxy.log"), "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", config, "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc=proc)
        deadline = time.monotonic() + ready_timeout
        while (ready := httpx.get(url + "/readyz", timeout=5)).status_code != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the proxy did not become ready ({ready.text}); see {log.name}")
            time.sleep(0.5)
        if unguarded and ready.json().get("guard") != "absent":
            raise RuntimeError(f"the proxy is not an unguarded pass-through: /readyz says {ready.text}")
    except BaseException:
        stop(proc)
        raise
    return proc, url
