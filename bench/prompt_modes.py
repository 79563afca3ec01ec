"""The prompt stage's two modes: time to first token, sequential vs parallel, against the guard's time.

Claim under test (README, *Prompt stage*): parallel mode's added time to first token is
about max(0, guard time - upstream time to first token); sequential mode adds the guard
time. Two llm-katan echo upstreams, `--ttft-ms 0` and `--ttft-ms 200` (override with
`--ttfts`); one proxy process (`python -m proxy serve`, the real embedded guard) with, per
upstream, an unguarded route and a `mode: sequential` and a `mode: parallel` route (prompt
`refuse` at 0.5, response `off`, so only the prompt stage differs). Each request streams a
short benign chat completion; TTFT is the time to the first content event at the client.
Arms are interleaved request by request (concurrency 1). llm-katan 0.22 sleeps
`--ttft-ms` twice before a stream's first chunk (once generating, once streaming), so the
upstream's real TTFT is the measured direct one (about 2x the flag); the prediction
max(0, guard - TTFT) uses the measured direct median. The guard time per request is
read from the proxy's `siren_proxy_guard_latency_seconds{stage="prompt"}` (sum/count
deltas around each guarded request).

    PYTHONPATH=. python bench/prompt_modes.py             # about 1-2 minutes
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

from bench.proxy_overhead import header  # noqa: E402
from bench._procs import start_katan, start_proxy, stop  # noqa: E402
from bench.stream_bench import HEADERS  # noqa: E402

PROMPT = "Give me three facts about otters, and tell me where they live and what they eat."


def proxy_yaml(upstreams: dict[int, str], dtype: str) -> str:
    lines = ["upstreams:"]
    lines += [f"  k{t}: {{base_url: {url}}}" for t, url in upstreams.items()]
    lines += ["guard:", f"  dtype: {dtype}", "policies:",
              "  default: {prompt: {action: off}, response: {action: off}}",
              "  sequential: {prompt: {action: refuse, threshold: 0.5, mode: sequential}, response: {action: off}}",
              "  parallel: {prompt: {action: refuse, threshold: 0.5, mode: parallel}, response: {action: off}}",
              "routes:"]
    for t in upstreams:
        lines += [f"  - {{prefix: /seq{t}/v1, upstream: k{t}, policy: sequential}}",
                  f"  - {{prefix: /par{t}/v1, upstream: k{t}, policy: parallel}}",
                  f"  - {{prefix: /open{t}/v1, upstream: k{t}, policy: default}}"]
    return "\n".join(lines) + "\n"


async def ttft(client: httpx.AsyncClient, url: str) -> float:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64, "stream": True}
    start = time.perf_counter()
    first = None
    async with client.stream("POST", url + "/chat/completions", json=body, headers=HEADERS) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}")
        buffer = b""
        async for chunk in response.aiter_raw():
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                for choice in json.loads(data).get("choices") or []:
                    if choice.get("finish_reason") == "content_filter":
                        raise RuntimeError(f"{url}: the benign prompt was refused")
                    if first is None and (choice.get("delta") or {}).get("content"):
                        first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"{url}: no content event")
    return first


GUARD_SUM = re.compile(r'^siren_proxy_guard_latency_seconds_(sum|count)\{stage="prompt"\} (\S+)$', re.M)


async def guard_seconds(client: httpx.AsyncClient, proxy: str) -> tuple[float, float]:
    found = dict(GUARD_SUM.findall((await client.get(proxy + "/metrics")).text))
    return float(found.get("sum", 0)), float(found.get("count", 0))


async def bench(args, direct: dict[int, str], proxy: str) -> dict[tuple[int, str], list[float]]:
    times: dict[tuple[int, str], list[float]] = {}
    guard: dict[int, list[float]] = {t: [] for t in direct}
    async with httpx.AsyncClient(timeout=120) as client:
        arms = []
        for t, url in direct.items():
            arms += [(t, "direct", url), (t, "unguarded", f"{proxy}/open{t}/v1"),
                     (t, "sequential", f"{proxy}/seq{t}/v1"), (t, "parallel", f"{proxy}/par{t}/v1")]
        for t, name, url in arms:  # warm-up
            await ttft(client, url)
        for i in range(args.requests):
            for t, name, url in (arms if i % 2 == 0 else arms[::-1]):
                before = await guard_seconds(client, proxy)
                times.setdefault((t, name), []).append(await ttft(client, url))
                after = await guard_seconds(client, proxy)
                if after[1] > before[1]:
                    guard[t].append((after[0] - before[0]) / (after[1] - before[1]))
    for t, values in guard.items():
        times[(t, "guard")] = values
    return times


def table(times: dict[tuple[int, str], list[float]], ttfts: list[int]) -> str:
    lines = ["| `--ttft-ms` | guard time p50 | direct | unguarded | sequential | parallel "
             "| sequential added | parallel added | predicted parallel added |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in ttfts:
        p = {name: statistics.median(times[(t, name)]) * 1000
             for name in ("guard", "direct", "unguarded", "sequential", "parallel")}
        lines.append(f"| {t} ms | {p['guard']:.1f} | {p['direct']:.1f} | {p['unguarded']:.1f} "
                     f"| {p['sequential']:.1f} | {p['parallel']:.1f} | {p['sequential'] - p['unguarded']:+.1f} "
                     f"| {p['parallel'] - p['unguarded']:+.1f} | {max(0.0, p['guard'] - p['direct']):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ttfts", type=int, nargs="+", default=[0, 200], help="upstream TTFTs (ms)")
    parser.add_argument("--requests", type=int, default=20, help="per arm")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    args = parser.parse_args()
    args.batches = args.warmup = args.concurrency = 0
    print(header(args).split("\nplan:")[0].replace("siren-proxy overhead benchmark", __doc__.splitlines()[0]))
    print(f"plan: {args.requests} requests per arm, interleaved, c=1; guard dtype {args.dtype}; "
          f"prompt {len(PROMPT)} chars")
    with tempfile.TemporaryDirectory() as tmp:
        katans = {t: start_katan(tmp, "--ttft-ms", str(t)) for t in args.ttfts}
        try:
            proxy, url = start_proxy(proxy_yaml({t: k[1] for t, k in katans.items()}, args.dtype), tmp)
            try:
                times = asyncio.run(bench(args, {t: k[1] for t, k in katans.items()}, url))
            finally:
                stop(proxy)
        finally:
            for proc, _ in katans.values():
                stop(proc)
    print()
    print("time to first content event, medians in ms; 'added' is against the unguarded route")
    print(table(times, args.ttfts))
    print(json.dumps({f"{t}/{name}": [round(v * 1000, 1) for v in values] for (t, name), values in times.items()}))


if __name__ == "__main__":
    main()
