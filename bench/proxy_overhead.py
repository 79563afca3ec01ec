"""What the proxy adds to a request: direct-to-upstream vs through siren-proxy.

Both arms talk to the same llm-katan echo upstream; the proxy runs unguarded (every
policy `off`, so no guard is loaded) in its own process, started with
`python -m proxy serve` as in production, so that its event loop and the client's do
not share a GIL. The arms are interleaved in one run, so that both see the same load on
a shared machine: at concurrency 1 request by request, at concurrency C batch by batch
(C concurrent direct requests, then C proxied, the order alternating).

Non-streaming requests are timed to the last body byte; streaming ones to the first body
chunk (time to first byte). "Added" is reported two ways: p50(proxied) - p50(direct),
and the median of paired differences (request i proxied minus request i direct at
concurrency 1; batch median minus batch median at concurrency C), which cancels most of
the load drift between pairs. The last two columns are CPU time (user + system, from
/proc) per request of the proxy process and of the upstream: unlike wall time, they
hardly depend on what else the machine is running.

    PYTHONPATH=. python bench/proxy_overhead.py
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._procs import start_katan, start_proxy, stop  # noqa: E402

# `default` is defined here (off) because an implicit `default` policy guards, and
# `serve` would then load the guard even though no route uses it.
PROXY_YAML = """
server:
  max_body_bytes: 1048576
upstreams:
  katan:
    base_url: {base_url}
    max_connections: 256
policies:
  default:
    prompt: {{action: off}}
    response: {{action: off}}
routes:
  - {{prefix: /v1, upstream: katan, policy: default}}
"""

HEADERS = {"authorization": "Bearer sk-bench", "content-type": "application/json"}


def request_body(stream: bool) -> bytes:
    return json.dumps({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": 16,
        "stream": stream,
    }).encode()


@dataclass
class Arm:
    name: str
    client: httpx.AsyncClient
    url: str


async def one(arm: Arm, body: bytes, stream: bool) -> float:
    """Seconds to the last byte (non-streaming) or to the first body chunk (streaming)."""
    if not stream:
        start = time.perf_counter()
        response = await arm.client.post(arm.url, content=body, headers=HEADERS)
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"{arm.name}: HTTP {response.status_code}: {response.text[:200]}")
        return elapsed
    start = time.perf_counter()
    async with arm.client.stream("POST", arm.url, content=body, headers=HEADERS) as response:
        elapsed = None
        async for chunk in response.aiter_raw():
            if elapsed is None and chunk:
                elapsed = time.perf_counter() - start
        if response.status_code != 200 or elapsed is None:
            raise RuntimeError(f"{arm.name}: HTTP {response.status_code}, first chunk {elapsed}")
    return elapsed


async def batch(arm: Arm, body: bytes, stream: bool, size: int) -> list[float]:
    return list(await asyncio.gather(*(one(arm, body, stream) for _ in range(size))))


async def measure(direct: Arm, proxied: Arm, *, stream: bool, concurrency: int,
                  rounds: int) -> tuple[list[float], list[float], list[float]]:
    """Per-request times of each arm, and the paired differences (seconds)."""
    body = request_body(stream)
    times = {direct.name: [], proxied.name: []}
    paired = []
    for i in range(rounds):
        order = (direct, proxied) if i % 2 == 0 else (proxied, direct)
        got = {}
        for arm in order:
            got[arm.name] = await batch(arm, body, stream, concurrency)
            times[arm.name].extend(got[arm.name])
        paired.append(statistics.median(got[proxied.name]) - statistics.median(got[direct.name]))
    return times[direct.name], times[proxied.name], paired


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def header(args: argparse.Namespace) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    if subprocess.run(["git", "status", "--porcelain", "--", "proxy", "policies"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip():
        commit += " + uncommitted changes in proxy/ or policies/"
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = ", ".join(f"{n} {pkg(n)}" for n in
                         ("httpx", "httpcore", "uvicorn", "starlette", "anyio", "uvloop", "httptools", "llm-katan"))
    return "\n".join([
        "siren-proxy overhead benchmark",
        f"commit {commit}; {platform.platform()}; Python {platform.python_version()}",
        f"CPU: {cpu}; {cores} cores usable; load average at start {load}",
        f"versions: {versions}",
        f"plan: c=1 x {args.requests} requests per arm; c={args.concurrency} x {args.batches} batches per arm;"
        f" warm-up {args.warmup} per arm",
    ])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


@dataclass
class Row:
    label: str
    concurrency: int
    direct: list[float]
    proxied: list[float]
    paired: list[float]
    proxy_cpu: float  # proxy process CPU seconds per proxied request
    katan_cpu: float  # upstream CPU seconds per request (it serves both arms)


def table(rows: list[Row]) -> str:
    lines = [
        "| request | c | n/arm | direct p50 | proxied p50 | direct p99 | proxied p99 "
        "| added p50 | added, paired median | p50 ratio | p99 ratio | proxy CPU/req | upstream CPU/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d50, p50 = percentile(r.direct, 50), percentile(r.proxied, 50)
        d99, p99 = percentile(r.direct, 99), percentile(r.proxied, 99)
        lines.append(f"| {r.label} | {r.concurrency} | {len(r.direct)} | {ms(d50)} | {ms(p50)} | {ms(d99)} "
                     f"| {ms(p99)} | {ms(p50 - d50)} | {ms(statistics.median(r.paired))} | {p50 / d50:.2f}x "
                     f"| {p99 / d99:.2f}x | {ms(r.proxy_cpu)} | {ms(r.katan_cpu)} |")
    return "\n".join(lines)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used: what it costs, whatever the load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace, katan_url: str, proxy_url: str,
              katan_pid: int, proxy_pid: int) -> list[Row]:
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)

    def client() -> httpx.AsyncClient:
        return httpx.AsyncClient(limits=limits, timeout=30.0, trust_env=False)

    async with client() as direct_client, client() as proxied_client:
        direct = Arm("direct", direct_client, katan_url + "/chat/completions")
        proxied = Arm("proxied", proxied_client, proxy_url + "/chat/completions")
        # Warm-up opens every pooled connection on both hops (client->proxy->upstream).
        for stream in (False, True):
            await measure(direct, proxied, stream=stream, concurrency=1, rounds=args.warmup)
            await measure(direct, proxied, stream=stream, concurrency=args.concurrency, rounds=4)
        rows = []
        for concurrency, rounds in ((1, args.requests), (args.concurrency, args.batches)):
            for stream, label in ((False, "non-streaming, to last byte"), (True, "streaming, to first byte")):
                gc.collect()
                started = time.perf_counter()
                proxy_cpu, katan_cpu = cpu_seconds(proxy_pid), cpu_seconds(katan_pid)
                d, p, paired = await measure(direct, proxied, stream=stream, concurrency=concurrency, rounds=rounds)
                proxy_cpu, katan_cpu = cpu_seconds(proxy_pid) - proxy_cpu, cpu_seconds(katan_pid) - katan_cpu
                print(f"  {label}, c={concurrency}: {time.perf_counter() - started:.1f}s", flush=True)
                rows.append(Row(label, concurrency, d, p, paired, proxy_cpu / len(p), katan_cpu / (len(d) + len(p))))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per arm at c=1 (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32, help="the concurrent level (default %(default)s)")
    parser.add_argument("--batches", type=int, default=40,
                        help="batches per arm at the concurrent level (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=100, help="c=1 warm-up requests per arm (default %(default)s)")
    args = parser.parse_args(argv)

    print(header(args), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        upstream, katan_url = start_katan(tmp)
        try:
            proxy, proxy_root = start_proxy(PROXY_YAML.format(base_url=katan_url), tmp, unguarded=True)
            proxy_url = proxy_root + "/v1"
            try:
                started = time.perf_counter()
                rows = asyncio.run(run(args, katan_url, proxy_url, upstream.pid, proxy.pid))
            finally:
                stop(proxy)
        finally:
            stop(upstream)
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())};"
          f" measured in {time.perf_counter() - started:.0f}s; times in ms\n")
    print(table(rows))
    c1 = rows[0]
    added, paired = percentile(c1.proxied, 50) - percentile(c1.direct, 50), statistics.median(c1.paired)
    print(f"\ntarget: p50 added latency under 1 ms at c=1 (non-streaming): {ms(added)} ms,"
          f" paired median {ms(paired)} ms -> {'met' if max(added, paired) < 0.001 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
