"""What the proxy adds per piece of a relayed body: `Proxy._finishing` and
`RelayResponse._send`, with no request deadline (the default: no timeout armed, a
drain wakes the wait) and with one (a timeout armed per piece). In-process, no
sockets: a generator of small pieces, and a `send` that does nothing, so the figures
are the proxy's own Python per piece. A bare generator is the floor.

    PYTHONPATH=. python bench/chunk_overhead.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.handler import Proxy  # noqa: E402
from proxy.relay import RelayResponse  # noqa: E402


class Holder:
    current = types.SimpleNamespace(guard=types.SimpleNamespace(prefix_cache_scope="key"))


async def pieces(n: int):
    for _ in range(n):
        yield b'data: {"choices": []}\n\n'


async def bare(n: int, deadline: float | None) -> float:
    started = time.perf_counter()
    async for _ in pieces(n):
        pass
    return time.perf_counter() - started


async def finishing(n: int, deadline: float | None) -> float:
    proxy = Proxy(Holder(), pool=None)
    started = time.perf_counter()
    async for _ in proxy._finishing(pieces(n), deadline, 60.0):
        pass
    return time.perf_counter() - started


async def sends(n: int, deadline: float | None) -> float:
    response = RelayResponse(pieces(0), 200, [])
    response.deadline = deadline

    async def send(message) -> None:
        pass

    started = time.perf_counter()
    for _ in range(n):
        await response._send(send, b"x", more=True)
    return time.perf_counter() - started


async def run(n: int, repeats: int) -> None:
    loop = asyncio.get_running_loop()
    cases = [("bare generator", bare, False), ("Proxy._finishing", finishing, False),
             ("Proxy._finishing", finishing, True), ("RelayResponse._send", sends, False),
             ("RelayResponse._send", sends, True)]
    times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for _ in range(repeats):  # interleaved, so that every case sees the same load
        for i, (_, fn, timed) in enumerate(cases):
            times[i].append(await fn(n, loop.time() + 3600 if timed else None) / n * 1e6)
    print(f"us per piece, {n} pieces x {repeats} runs: min / median / max")
    for i, (label, _, timed) in enumerate(cases):
        t = sorted(times[i])
        deadline = "request deadline set" if timed else "no deadline"
        print(f"  {label:22s} {deadline:21s} {t[0]:6.2f} / {statistics.median(t):6.2f} / {t[-1]:6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    try:
        import uvloop  # the server's loop
        uvloop.run(run(args.pieces, args.repeats))
    except ImportError:
        asyncio.run(run(args.pieces, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
