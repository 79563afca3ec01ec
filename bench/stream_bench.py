"""Streams at a model's pace: what the proxy adds per token, guarded and not, as K grows.

K concurrent streams of about 512 chunks each from an llm-katan echo upstream that waits
`--itl-ms` between chunks (so it emits 1000/itl tokens/s per stream, like a model), in
three arms of one run: direct to the upstream, through siren-proxy on an unguarded route
(both stages `off`, a byte pass-through), and through the same proxy process on a
guarded route (the real embedded guard: prompt `refuse` at 0.5, response `cut`,
`check_every` 16, `holdback` 16, as the shipped `config.yaml` default policy, but with the
response threshold at 0.9 (`--threshold`): the guard does the same work at any threshold,
and at 0.5 the shipped head cuts this long benign echo part-way (it scores ~0.4-0.44 one-shot
and crossed 0.5 in the stream sessions), which would end the guarded streams early). The
echo streams the user message back in 4-character chunks, so the user message is a long
benign text: it is also the prompt the guard scores (and the prefix of every response
session, `include_prompt: true`).

Per arm and K, measured at the client: the gaps between successive content events
(mean/p50/p99; with `holdback` the guarded arm's events come in bursts after each check,
so its p50 gap is ~0 and its p99 is the check's cost), time to first content event, whole
stream time, and the proxy process's CPU seconds per stream (utime + stime from
/proc/PID/stat). "Keeps up" at K: the guarded arm's mean whole-stream time is within
`--keep-up` (1.2x) of the direct arm's; reported too for the time after the first content
event (the prompt stage and the first check are paid once, before it; after it, the
question is whether the checks keep pace with the tokens). K doubles (1, 2, 4, ...) until
the guarded arm falls behind after its first token, or the time budget is spent.

    PYTHONPATH=. python bench/stream_bench.py              # about 3-5 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proxy_overhead import cpu_seconds, header, percentile  # noqa: E402
from bench._procs import start_katan, start_proxy, stop  # noqa: E402

PROXY_YAML = """
server:
  max_body_bytes: 1048576
  max_concurrent_streams: 4096
upstreams:
  katan:
    base_url: {base_url}
    max_connections: 1024
guard:
  max_queue: 4096
  dtype: {dtype}
policies:
  # `default` is defined (off) so that no route uses the built-in guarding default by accident.
  default:
    prompt: {{action: off}}
    response: {{action: off}}
  guarded:
    prompt: {{action: refuse, threshold: 0.5}}
    response: {{action: cut, threshold: {threshold}, check_every: {check_every}, holdback: {holdback}}}
routes:
  - {{name: guarded, prefix: /guarded/v1, upstream: katan, policy: guarded}}
  - {{name: open, prefix: /v1, upstream: katan, policy: default}}
"""

FACTS = ("Otters are semi-aquatic mammals that live in rivers, lakes and along coasts. They eat fish, "
         "crabs and sea urchins, use stones as tools, groom their dense fur for hours, and sea otters "
         "hold paws while they sleep so that they do not drift apart on the current. ")


HEADERS = {"authorization": "Bearer sk-bench", "content-type": "application/json"}


def user_message(chunks: int, header_chars: int = 140) -> str:
    """Benign text long enough that the echo (a header line, then `User: <text>`) is `chunks` x 4 chars."""
    want = chunks * 4 - header_chars
    return (FACTS * (want // len(FACTS) + 1))[:want]


def request_body(message: str) -> bytes:
    return json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": message}],
                       "max_tokens": 4096, "stream": True}).encode()


@dataclass
class Stream:
    ttft: float
    total: float
    gaps: list[float]
    chunks: int
    finish: str | None


async def one_stream(client: httpx.AsyncClient, url: str, body: bytes) -> Stream:
    start = time.perf_counter()
    arrivals: list[float] = []
    finish = None
    done = False
    buffer = b""
    async with client.stream("POST", url, content=body, headers=HEADERS) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for chunk in response.aiter_raw():
            now = time.perf_counter()
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    done = True
                    continue
                payload = json.loads(data)
                if "error" in payload:
                    raise RuntimeError(f"{url}: in-band error {payload['error']}")
                for choice in payload.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        arrivals.append(now)
                    finish = choice.get("finish_reason") or finish
    if not done:
        raise RuntimeError(f"{url}: the stream ended without [DONE]")
    end = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return Stream(ttft=arrivals[0] - start if arrivals else float("nan"), total=end - start, gaps=gaps,
                  chunks=len(arrivals), finish=finish)


@dataclass
class ArmResult:
    arm: str
    k: int
    streams: list[Stream]
    proxy_cpu: float  # seconds per stream
    katan_cpu: float
    wall: float = 0.0
    cut: int = field(init=False)

    def __post_init__(self) -> None:
        self.cut = sum(s.finish == "content_filter" for s in self.streams)

    @property
    def mean_total(self) -> float:
        return statistics.fmean(s.total for s in self.streams)

    @property
    def mean_pace(self) -> float:
        """Stream time after the first content event: the stage where the guard checks tokens."""
        return statistics.fmean(s.total - s.ttft for s in self.streams)


SERIAL = itertools.count(1)


def distinct_body(message: str) -> bytes:
    """Each stream's own prompt: the guard's prefix cache (README, "Prefix cache") would
    otherwise run one shared prompt once for all K streams, a best case, not the usual one."""
    return request_body(f"Note {next(SERIAL)}: {message}")


async def run_arm(name: str, client: httpx.AsyncClient, url: str, message: str, k: int, proxy_pid: int,
                  katan_pid: int) -> ArmResult:
    p0, u0, t0 = cpu_seconds(proxy_pid), cpu_seconds(katan_pid), time.perf_counter()
    streams = await asyncio.gather(*(one_stream(client, url, distinct_body(message)) for _ in range(k)))
    wall = time.perf_counter() - t0
    return ArmResult(name, k, list(streams), (cpu_seconds(proxy_pid) - p0) / k, (cpu_seconds(katan_pid) - u0) / k,
                     wall)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(results: list[ArmResult]) -> str:
    lines = ["| K | arm | chunks/stream | gap mean | gap p50 | gap p99 | TTFT p50 | stream mean | stream p99 "
             "| vs direct | after 1st token vs direct | proxy CPU/stream | upstream CPU/stream | cut |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    direct = {r.k: r.mean_total for r in results if r.arm == "direct"}
    pace = {r.k: r.mean_pace for r in results if r.arm == "direct"}
    for r in results:
        gaps = [g for s in r.streams for g in s.gaps]
        totals = [s.total for s in r.streams]
        lines.append(
            f"| {r.k} | {r.arm} | {statistics.fmean(s.chunks for s in r.streams):.0f} | {ms(statistics.fmean(gaps))} "
            f"| {ms(percentile(gaps, 50))} | {ms(percentile(gaps, 99))} "
            f"| {ms(percentile([s.ttft for s in r.streams], 50))} | {statistics.fmean(totals):.2f} s "
            f"| {percentile(totals, 99):.2f} s | {r.mean_total / direct[r.k]:.2f}x | {r.mean_pace / pace[r.k]:.2f}x "
            f"| {'-' if r.arm == 'direct' else f'{r.proxy_cpu * 1000:.0f} ms'} | {r.katan_cpu * 1000:.0f} ms "
            f"| {r.cut} |")
    return "\n".join(lines)


async def bench(args: argparse.Namespace, katan_url: str, proxy_url: str, proxy_pid: int,
                katan_pid: int) -> list[ArmResult]:
    message = user_message(args.chunks)
    path = "/chat/completions"
    arms = {"direct": katan_url + path, "unguarded": proxy_url + "/v1" + path,
            "guarded": proxy_url + "/guarded/v1" + path}
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    results: list[ArmResult] = []
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        for name, url in arms.items():  # warm-up: connections, the guard's first batch
            await one_stream(client, url, request_body(user_message(32)))
        k = 1
        while k <= args.max_k:
            step = []
            for name, url in arms.items():
                step.append(await run_arm(name, client, url, message, k, proxy_pid, katan_pid))
                print(f"K={k:<4} {name:<9} mean stream {step[-1].mean_total:6.2f} s  wall {step[-1].wall:6.2f} s",
                      flush=True)
            results.extend(step)
            ratio = step[2].mean_total / step[0].mean_total
            paced = step[2].mean_pace / step[0].mean_pace
            elapsed = time.monotonic() - started
            print(f"K={k}: guarded/direct = {ratio:.2f}x whole stream, {paced:.2f}x after the first token")
            if paced > args.keep_up:  # keeping on past the whole-stream bound: the pace says more
                print(f"K={k}: the guard no longer keeps pace with the stream ({paced:.2f}x > {args.keep_up}x)")
                break
            if elapsed + 3.5 * sum(r.wall for r in step) > args.budget:
                print(f"K={k}: stopping, the next step would overrun the {args.budget:.0f} s budget")
                break
            k *= 2
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--itl-ms", type=int, default=20, help="upstream inter-token latency (20 ms = 50 tok/s)")
    parser.add_argument("--chunks", type=int, default=512, help="content chunks per stream")
    parser.add_argument("--max-k", type=int, default=256)
    parser.add_argument("--keep-up", type=float, default=1.2)
    parser.add_argument("--check-every", type=int, default=16)
    parser.add_argument("--holdback", type=int, default=16)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="the guard's dtype (auto = bfloat16, the serving default)")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="the guarded route's response threshold (the guard's work does not depend on it)")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for the K steps")
    args = parser.parse_args()
    args.requests = args.batches = args.warmup = args.concurrency = 0  # for header()
    print(header(args).split("\nplan:")[0].replace("siren-proxy overhead benchmark", __doc__.splitlines()[0]))
    print(f"plan: K = 1, 2, 4, ... streams of {args.chunks} chunks at itl {args.itl_ms} ms "
          f"({1000 / args.itl_ms:.0f} tok/s); guarded: check_every {args.check_every}, holdback {args.holdback}, "
          f"guard dtype {args.dtype}; "
          f"keeps up while guarded <= {args.keep_up}x direct")
    with tempfile.TemporaryDirectory() as tmp:
        katan, katan_url = start_katan(tmp, "--itl-ms", str(args.itl_ms))
        try:
            t0 = time.monotonic()
            proxy, proxy_url = start_proxy(PROXY_YAML.format(base_url=katan_url, check_every=args.check_every,
                                                             holdback=args.holdback, dtype=args.dtype,
                                                             threshold=args.threshold), tmp)
            print(f"proxy ready (guard loaded) in {time.monotonic() - t0:.1f} s", flush=True)
            try:
                results = asyncio.run(bench(args, katan_url, proxy_url, proxy.pid, katan.pid))
            finally:
                stop(proxy)
        finally:
            stop(katan)
    print()
    print(table(results))
    direct = {r.k: r for r in results if r.arm == "direct"}
    guarded = [r for r in results if r.arm == "guarded"]
    kept = [r.k for r in guarded if r.mean_total <= args.keep_up * direct[r.k].mean_total]
    paced = [r.k for r in guarded if r.mean_pace <= args.keep_up * direct[r.k].mean_pace]
    print(f"\nlargest K at which the guard keeps up (guarded <= {args.keep_up}x direct), whole stream: "
          f"{max(kept) if kept else 'none'}; after the first token: {max(paced) if paced else 'none'}")


if __name__ == "__main__":
    main()
