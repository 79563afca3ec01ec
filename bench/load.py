"""Sustained streaming load through siren-proxy: errors, fidelity, memory, latency.

K concurrent clients (default 200) each stream chat completions back to back for D
seconds (default 60) through the proxy, which runs unguarded in its own process
(`python -m proxy serve`, as in production), in front of llm-katan's echo backend
(`--max-concurrent 1024`). Loopback only; bounded by --duration and --max-requests.

Fidelity: each request's body is one of --bodies distinct messages, and each of those is
first requested directly from llm-katan. A proxied stream counts as identical when
(1) its bytes equal the direct stream's after masking the `"id"` and `"created"` values
and every digit inside `"content"` strings (the echo's `time=...` token is cut across
chunks), and (2) the decoded content sequence, joined, equals the direct one after
replacing the `time=...` token. (2) restores what (1) masks outside the timestamp.

Memory: the proxy's VmRSS from /proc every --sample seconds; printed first, last, max,
and the least-squares slope over the run's second half (MiB/min; flat is about 0).

    PYTHONPATH=. python bench/load.py --duration 60 --concurrency 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._procs import start_katan, start_proxy, stop  # noqa: E402

PROXY_YAML = """
server:
  max_body_bytes: 1048576
  max_concurrent_streams: 4096
upstreams:
  katan:
    base_url: {base_url}
    max_connections: 1024
policies:
  default:                 # defined here, off: an implicit default guards, and would load the model
    prompt: {{action: off}}
    response: {{action: off}}
  open:
    prompt: {{action: off}}
    response: {{action: off}}
routes:
  - {{prefix: /v1, upstream: katan, policy: open}}
"""
HEADERS = {"authorization": "Bearer sk-bench", "content-type": "application/json"}
_VARYING = re.compile(rb'"(id|created)": ?("[^"]*"|\d+)')
_CONTENT = re.compile(rb'"content": ?"((?:[^"\\]|\\.)*)"')
_TIME = re.compile(r"time=\S+")


def body(i: int) -> bytes:
    return json.dumps({"model": "smollm2", "stream": True, "messages": [
        {"role": "user", "content": f"Tell me three things about sea otters, request {i}."}]}).encode()


def masked(raw: bytes) -> bytes:
    raw = _VARYING.sub(lambda m: b'"' + m.group(1) + b'": _', raw)
    return _CONTENT.sub(lambda m: re.sub(rb"\d", b"#", m.group(0)), raw)


def content(raw: bytes) -> str:
    text = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return _TIME.sub("time=*", "".join(text))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def stream(client: httpx.AsyncClient, url: str, data: bytes) -> tuple[int, bytes, float, float]:
    started = time.perf_counter()
    first = None
    chunks = []
    async with client.stream("POST", url + "/chat/completions", content=data, headers=HEADERS) as response:
        async for piece in response.aiter_raw():
            if first is None:
                first = time.perf_counter() - started
            chunks.append(piece)
    return response.status_code, b"".join(chunks), first or 0.0, time.perf_counter() - started


async def run(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        katan, direct_url = start_katan(tmp)
        proxy, proxy_root = start_proxy(PROXY_YAML.format(base_url=direct_url), tmp, unguarded=True)
        proxy_url = proxy_root + "/v1"
        try:
            return await measure(args, proxy.pid, direct_url, proxy_url)
        finally:
            stop(proxy)
            stop(katan)


async def measure(args, pid: int, direct_url: str, proxy_url: str) -> int:
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        references = {}
        for i in range(args.bodies):
            status, raw, _, _ = await stream(client, direct_url, body(i))
            assert status == 200 and raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
            references[i] = (masked(raw), content(raw), raw.count(b"\ndata: ") + 1)
        chunks = statistics.mean(r[2] for r in references.values())
        print(f"direct references: {args.bodies} bodies, {chunks:.0f} SSE events a stream", flush=True)

        done, errors, mismatched, ttfb, total = 0, [], 0, [], []
        rss: list[tuple[float, float]] = []
        stop_at = time.monotonic() + args.duration
        started = time.monotonic()
        issued = 0

        async def worker(w: int) -> None:
            nonlocal done, mismatched, issued
            while time.monotonic() < stop_at and issued < args.max_requests:
                issued += 1
                i = (w + issued) % args.bodies
                try:
                    status, raw, first, whole = await stream(client, proxy_url, body(i))
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if status != 200 or b'"error"' in raw:
                    errors.append(f"status {status}: {raw[:200]!r}")
                    continue
                done += 1
                ttfb.append(first)
                total.append(whole)
                if masked(raw) != references[i][0] or content(raw) != references[i][1]:
                    mismatched += 1

        async def sampler() -> None:
            while True:
                rss.append((time.monotonic() - started, rss_mib(pid)))
                await asyncio.sleep(args.sample)

        sampling = asyncio.create_task(sampler())
        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        elapsed = time.monotonic() - started
        sampling.cancel()
        rss.append((elapsed, rss_mib(pid)))

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")

    half = [(t, m) for t, m in rss if t >= elapsed / 2]
    slope = 0.0
    if len(half) >= 2:
        tm = statistics.mean(t for t, _ in half)
        mm = statistics.mean(m for _, m in half)
        den = sum((t - tm) ** 2 for t, _ in half)
        slope = sum((t - tm) * (m - mm) for t, m in half) / den * 60 if den else 0.0
    print(f"concurrency {args.concurrency}, {elapsed:.1f} s, {done} streams completed "
          f"({done / elapsed:.1f}/s, {done * chunks / elapsed:.0f} events/s)")
    print(f"errors: {len(errors)}; streams not identical to the direct one: {mismatched}")
    for error in errors[:5]:
        print("  ", error)
    print(f"time to first byte ms: p50 {pct(ttfb, .5):.0f}  p90 {pct(ttfb, .9):.0f}  p99 {pct(ttfb, .99):.0f}")
    print(f"whole stream ms:       p50 {pct(total, .5):.0f}  p90 {pct(total, .9):.0f}  p99 {pct(total, .99):.0f}  "
          f"max {max(total) * 1000 if total else float('nan'):.0f}")
    print(f"proxy RSS MiB ({len(rss)} samples): first {rss[0][1]:.1f}  last {rss[-1][1]:.1f}  "
          f"max {max(m for _, m in rss):.1f}  slope over the second half {slope:+.2f} MiB/min")
    return 0 if not errors and not mismatched and done else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=200, help="concurrent streams (default %(default)s)")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    parser.add_argument("--bodies", type=int, default=32, help="distinct request bodies (default %(default)s)")
    parser.add_argument("--sample", type=float, default=3.0, help="RSS sampling period, s (default %(default)s)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
