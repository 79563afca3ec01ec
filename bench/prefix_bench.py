"""Prefix cache benchmark: guard work per request with and without `guard.prefixes`.

    PYTHONPATH=. python bench/prefix_bench.py [--threads 1] [--repeat 3] [--artifact DIR] [--device cuda]

Two guards load the same artifact and backbone, one with the prefix cache (the default,
256 MiB) and one without (`prefix_cache_mb=0`); every request goes through a
`GuardWorker`, as the proxy's do, one request at a time. Texts come from the committed
fixture rows (tests/guard/fixtures/responses.jsonl: HarmBench, XSTest); prompts are
rendered by the proxy's own `policies.extract.prompt_text`.

(1) A conversation of 8 turns, `conversation` scope: turn k's prompt is every message so
    far. Per turn, the prompt stage's time (a session's prefill and its score, as the
    proxy reads a conversation prompt), and the whole guarded turn: that prompt, then
    the reply checked every 16 tokens on the same session (`include_prompt`, the default).
(2) 8 requests that share a ~400-token system prompt, `conversation_with_system` scope,
    each with its own question: the prompt stage's time.
(3) The same prompt sent again (a retry, or "regenerate").
(4) Safest-of-4 (`rerank`), or a whole reply with n=4: the guard work of one request,
    the prompt stage and the four candidates. Before: the prompt scored as text, then
    the four `prompt + "\n" + candidate` texts as one batch (`score_many`); now: the
    prompt stage's session, then three more that take its prompt from the cache, the
    four appends packed (`proxy.whole.WholeReply.score_choices`). Both on the guard with the cache.
(5) `last_user` prompts with no response session (the prompt stage alone): 64 distinct
    prompts (tests/guard/fixtures/train_small.jsonl) from 16 concurrent callers, then the
    same 64 again (retries). Before: full-text scores, batched by the worker
    (`worker.score`); now: a session each, closed at once (`GuardedCall._prompt_by_session`),
    on the guard without the cache and with it.

Each arm starts with an empty cache; each figure is the best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guard import SirenGuard  # noqa: E402
from guard.worker import GuardWorker  # noqa: E402
from policies.extract import prompt_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default=None, help="default: the embedded head")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: static steps, and cached windows copied into their slots")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the proxy's default on 2 cores)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", default="12345", help="which cases to run, e.g. 5")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    cached = SirenGuard.from_pretrained(args.artifact, device=args.device, dtype=dtype)
    plain = SirenGuard.from_pretrained(args.artifact, device=args.device, dtype=dtype, prefix_cache_mb=0)
    for guard in (cached, plain):
        guard.warm_up()  # on a GPU: capture every step size before timing
    tok = cached.tokenizer
    rows = [json.loads(x) for x in (ROOT / "tests/guard/fixtures/responses.jsonl").open()]

    def tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def render(messages, scope: str) -> str:
        return prompt_text("chat/completions", {"messages": messages}, scope)

    def timed(guard, requests) -> list[tuple[float, float]]:
        """Best of `--repeat` runs, per request: (prompt stage s, whole request s); a
        request is (prompt, reply checked every 16 tokens, or None)."""
        best = None
        for _ in range(args.repeat):
            if guard.prefixes is not None:
                guard.prefixes.clear()
            worker = GuardWorker(guard, num_threads=args.threads)
            times = asyncio.run(run(worker, requests))
            worker.close()
            best = times if best is None else [tuple(map(min, a, b)) for a, b in zip(best, times)]
        return best

    async def run(worker, requests):
        times = []
        for prompt, reply in requests:
            started = time.perf_counter()
            session = worker.stream(prompt=prompt)
            await session.prompt_score()
            prompt_s = time.perf_counter() - started
            if reply is not None:
                ids = tok(reply, add_special_tokens=False)["input_ids"]
                done = ""
                for n in range(16, len(ids) + 16, 16):
                    text = tok.decode(ids[:n])
                    await session.append(text[len(done):])
                    done = text
            await session.aclose()
            times.append((prompt_s, time.perf_counter() - started))
        return times

    def report(name: str, requests, whole: bool) -> None:
        with_cache, without = timed(cached, requests), timed(plain, requests)
        print(f"\n{name}")
        print("  request  prompt tokens  prompt stage: no cache / cache" + ("   whole request: no cache / cache"
                                                                          if whole else ""))
        for k, ((prompt, _), (p1, w1), (p0, w0)) in enumerate(zip(requests, with_cache, without)):
            line = f"  {k + 1:>7}  {tokens(prompt):>13}  {p0*1e3:>8.0f} ms / {p1*1e3:>5.0f} ms ({p0/p1:4.1f}x)"
            if whole:
                line += f"   {w0*1e3:>8.0f} ms / {w1*1e3:>5.0f} ms ({w0/w1:4.1f}x)"
            print(line)
        p0, p1 = sum(t[0] for t in without), sum(t[0] for t in with_cache)
        line = f"  all      {'':>13}  {p0*1e3:>8.0f} ms / {p1*1e3:>5.0f} ms ({p0/p1:4.1f}x)"
        if whole:
            w0, w1 = sum(t[1] for t in without), sum(t[1] for t in with_cache)
            line += f"   {w0*1e3:>8.0f} ms / {w1*1e3:>5.0f} ms ({w0/w1:4.1f}x)"
        print(line)

    print(f"dtype {args.dtype}; torch threads {args.threads}; max_length {cached.max_length}; "
          f"best of {args.repeat}")

    # (1) a conversation: each turn resends the history
    messages, turns = [], []
    for row in rows[:8]:
        messages.append({"role": "user", "content": row["prompt"][:300]})
        reply = row["response"][:500]
        turns.append((render(messages, "conversation"), reply))
        messages.append({"role": "assistant", "content": reply})
    if "1" in args.cases:
        report("(1) an 8-turn conversation, `conversation` scope", turns, whole=True)

    # (2) one system prompt, many questions
    system = " ".join(r["response"][:400] for r in rows[20:24])
    shared = [(render([{"role": "system", "content": system}, {"role": "user", "content": r["prompt"][:200]}],
                      "conversation_with_system"), None) for r in rows[8:16]]
    if "2" in args.cases:
        report("(2) 8 requests sharing a system prompt, `conversation_with_system` scope", shared, whole=False)

    # (3) the same prompt again
    longest = max((r["prompt"] for r in rows), key=len)
    again = [(longest[:1200], None)] * 2
    if "3" in args.cases:
        report("(3) one prompt sent twice (a retry)", again, whole=False)
        print(f"\ncache after (3): {len(cached.prefixes)} entries, {cached.prefixes.nbytes / 2**20:.1f} MiB; "
              f"hits {cached.prefixes.hits}, misses {cached.prefixes.misses}, "
              f"tokens reused {cached.prefixes.tokens_reused}")

    # (4) n candidates for one prompt
    async def as_texts(worker, prompt, candidates):
        await worker.score(prompt=prompt)
        await worker.score_many([(prompt, c) for c in candidates])

    async def as_sessions(worker, prompt, candidates):
        sessions = [worker.stream(prompt=prompt)]
        await sessions[0].prompt_score()
        sessions += [worker.stream(prompt=prompt) for _ in candidates[1:]]
        await asyncio.gather(*(s.append(c) for s, c in zip(sessions, candidates)))
        for s in sessions:
            await s.aclose()

    def best_of(how, prompt, candidates) -> float:
        best = float("inf")
        for _ in range(args.repeat):
            cached.prefixes.clear()
            worker = GuardWorker(cached, num_threads=args.threads)
            started = time.perf_counter()
            asyncio.run(how(worker, prompt, candidates))
            best = min(best, time.perf_counter() - started)
            worker.close()
        return best

    candidates = [r["response"][:600] for r in rows if len(r["response"]) >= 600][:4]
    if "4" in args.cases:
        print("\n(4) 4 candidates (safest-of-4, or n=4), ~"
              f"{sum(map(tokens, candidates)) / 4:.0f} tokens each: prompt stage + candidates")
        print("  prompt tokens  as texts (before) / sessions from the cached prompt")
        for prompt in (next(r["prompt"][:250] for r in rows if len(r["prompt"]) >= 250), turns[3][0]):
            t0, t1 = best_of(as_texts, prompt, candidates), best_of(as_sessions, prompt, candidates)
            print(f"  {tokens(prompt):>13}  {t0*1e3:>8.0f} ms / {t1*1e3:>5.0f} ms ({t0/t1:4.1f}x)")

    # (5) last_user prompts, the prompt stage alone: full-text scores vs sessions, then retries
    async def as_text(worker, prompt):
        await worker.score(prompt=prompt)

    async def as_session(worker, prompt):
        session = worker.stream(prompt=prompt)
        try:
            await session.prompt_score()
        finally:
            await session.aclose()

    async def callers(worker, how, prompts):
        async def caller(k):
            for prompt in prompts[k::16]:
                await how(worker, prompt)
        await asyncio.gather(*(caller(k) for k in range(16)))

    def passes(guard, how, prompts) -> tuple[float, float]:
        """Best of `--repeat`: (first pass s, second pass s), from an empty cache."""
        best = (float("inf"), float("inf"))
        for _ in range(args.repeat):
            if guard.prefixes is not None:
                guard.prefixes.clear()
            worker = GuardWorker(guard, num_threads=args.threads)
            times = []
            for _ in range(2):
                started = time.perf_counter()
                asyncio.run(callers(worker, how, prompts))
                times.append(time.perf_counter() - started)
            worker.close()
            best = tuple(map(min, best, times))
        return best

    if "5" in args.cases:
        small = [json.loads(x)["prompt"] for x in (ROOT / "tests/guard/fixtures/train_small.jsonl").open()]
        prompts = list(dict.fromkeys(p[:300] for p in small))[:64]
        print(f"\n(5) {len(prompts)} distinct `last_user` prompts (~{sum(map(tokens, prompts)) / len(prompts):.0f} "
              "tokens) from 16 callers, prompt stage alone; then the same prompts again (retries)")
        print("  arm                                   first pass        again")
        arms = (("full-text scores, batched (before)", plain, as_text),
                ("sessions, no cache", plain, as_session),
                ("sessions, prefix cache (now)", cached, as_session))
        for name, guard, how in arms:
            first, again_s = passes(guard, how, prompts)
            print(f"  {name:<36}  {len(prompts)/first:6.1f} prompts/s  {len(prompts)/again_s:6.1f} prompts/s")
        print(f"  cache after: {len(cached.prefixes)} entries, {cached.prefixes.nbytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
