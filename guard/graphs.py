"""Static streaming steps, captured as CUDA graphs on a GPU.

On a GPU this backbone is launch-bound: an eager streaming step of the 20 kept blocks
launches some 800 small kernels and costs 15-20 ms whether it reads 16 tokens or 512
(README, "On a GPU"). A `StaticStepper` runs the same step over fixed shapes, so that
each step size is captured once as a CUDA graph and a check becomes one replay:

- Slots: per kept block, K and V for `slots` windows of `length = max_length + largest
  step` positions, and each window's per-token rows of selected neurons (float32). A
  `_Window` of `guard.session` that gets a slot keeps its cache there instead of in a
  `DynamicCache`.
- A step feeds m new tokens at positions [start, start + m) of a slot, padded to the
  smallest step size B >= m (powers of two up to `STEP_SIZES[-1]`; longer feeds are
  cut). The pads write K, V and rows at positions >= start + m only. A query at position
  q attends to positions <= q, and a later step writes its own positions before it
  attends, so no query ever reads a pad; the mean counts positions < start + m only.
- So cropping a window (a tokenisation rollback) costs nothing: its count goes down and
  the next step overwrites what follows.
- Several slots step at once (`feed_many`): their tokens go through every product
  together and attention runs batched per slot and kv head; the step is padded to the
  longest feed and to a batch size (powers of two up to `slots`) with the scratch slot.
  A replay costs about the same for 16 tokens as for 128, so on an H100 16 streams made
  5.5x the checks per second of stepping one at a time, and 64 streams on 64 slots 7.3x.
- The step is our own forward over the model's own modules and weights, for
  Llama-style blocks (`llama`, `qwen2`, `qwen3`, `mistral`; full attention, no dynamic
  RoPE), which is what lets it run at fixed shapes; other backbones keep the eager
  `DynamicCache` path. It reads the same states as `Readout.rows` (the tests compare
  them on CPU) in fewer kernels (`_step`). To fuse the q/k/v and gate/up products, the
  stepper makes those Linears' weights views of one tensor each, in place: no memory
  is added and the eager path reads the very same weights.
- Measured on an H100 with the shipped artifact (README, "On a GPU"): a 16-token step
  is one replay of 667 kernels, 2.6 ms in float32 and 2.3 ms in bf16; the eager step
  it replaces launched ~800 kernels from Python and took 16-31 ms. With `compile`
  (torch.compile before capture, fusing the elementwise kernels) 1.8 and 0.94 ms.
- On CPU the same step runs without capture: the tests check the slot, padding and
  cropping logic there, against full recomputes; on CUDA each step size is captured on
  first use, or all at once by `warm_up`, into one shared memory pool.

Not thread-safe, like the backbone: one worker thread steps; `release` may come from
any thread (a session dropped elsewhere).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from guard.features import decoder_layers

logger = logging.getLogger(__name__)

STEP_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


def unsupported_reason(model: torch.nn.Module, length: int) -> str | None:
    """Why this backbone cannot take static steps (None when it can)."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model_type {kind!r} (static steps support {', '.join(SUPPORTED)})"
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    window = getattr(config, "sliding_window", None)
    if types != {"full_attention"} or (
        window is not None and window < length and getattr(config, "use_sliding_window", True)
    ):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
        return "RoPE that changes with the sequence length"
    block = decoder_layers(model)[0]
    attn = getattr(block, "self_attn", None)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(attn, name, None), torch.nn.Linear):
            return f"blocks without self_attn.{name}"
    if not hasattr(getattr(model, "model", model), "rotary_emb"):
        return "no rotary embedding module"
    return None


def _rms(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for HF's RMSNorm (Llama, Qwen2/3, Mistral) in 2 kernels instead of 6."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or not type(norm).__name__.endswith("RMSNorm"):
        return norm(x)
    return norm.weight * F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps).to(x.dtype)


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several Linears on the same input, in place.

    The Linears' parameters become views of the fused tensors, so memory does not grow
    and the eager path reads the very same weights.
    """
    weight = torch.cat([linear.weight for linear in linears])
    bias = None
    if any(linear.bias is not None for linear in linears):  # a missing one reads as zeros
        bias = torch.cat([linear.weight.new_zeros(linear.weight.shape[0]) if linear.bias is None else linear.bias
                          for linear in linears])
    at = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(weight[at : at + rows], requires_grad=False)
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(bias[at : at + rows], requires_grad=False)
        at += rows
    return weight, bias


class StaticStepper:
    def __init__(
        self, readout, head, max_length: int, *, slots: int = 16, capture: bool | None = None,
        compile: bool | str = False,
    ) -> None:
        model = readout.model
        self.readout = readout
        self.head = head
        self.inner = readout.inner
        self.blocks = list(decoder_layers(model))
        self.device = readout.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.length = max_length + STEP_SIZES[-1]
        self.slots = slots
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        rows = self.length * (slots + 1)  # slot `slots` is scratch, for warm-up steps
        dtype = readout.dtype
        self.k = [torch.zeros(self.kv_heads, rows, self.head_dim, dtype=dtype, device=self.device)
                  for _ in self.blocks]  # (kv_heads, slot * L + position, head_dim)
        self.v = [torch.zeros_like(k) for k in self.k]
        self.rows = torch.zeros(rows, readout.n_features, dtype=torch.float32, device=self.device)
        self.positions = torch.arange(self.length, device=self.device)  # (L,)
        with torch.no_grad():
            probe = torch.zeros(1, 1, config.hidden_size, dtype=dtype, device=self.device)
            cos, sin = self.inner.rotary_emb(probe, self.positions[None])  # (1, L, head_dim)
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin[:half], sin[half:]]
        self.cos = cos[0]  # (L, head_dim)
        self.sin_signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        attn = self.blocks[0].self_attn
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        self.qkv = [_fuse([b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj]) for b in self.blocks]
        self.gate_up = [
            _fuse([b.mlp.gate_proj, b.mlp.up_proj])
            if all(hasattr(b.mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")) else None
            for b in self.blocks
        ]
        self.reads = {layer: readout.neurons[layer] for layer in readout.layers}
        self.top_normed = readout.original_layers - 1 if readout.normed_top else None
        # Several slots' feeds go through one step: up to the next of these batch sizes
        # (powers of two up to `slots`), padded with the scratch slot.
        self.batches = tuple(sorted({min(2 ** i, slots) for i in range(max(slots - 1, 0).bit_length() + 1)}))
        # One input buffer per (batch, step size): [slots, starts, counts, ids...]; one output.
        self._inputs = {(n, b): torch.zeros(n * (3 + b), dtype=torch.long, device=self.device)
                        for n in self.batches for b in STEP_SIZES}
        self._scores = torch.zeros(self.batches[-1], dtype=torch.float32, device=self.device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()
        # torch.compile fuses each step's kernels before capture (a backend name, or True
        # for inductor). Compiling costs about 9 s per step size on an H100: `warm_up`.
        self.compile = "inductor" if compile is True else compile
        self._compiled_step = None

    # -- slots -------------------------------------------------------------------------
    def acquire(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def views(self, slot: int, count: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Views (not copies) of the first `count` positions of `slot`: each block's
        (K, V), shaped as a `DynamicCache` layer holds them (1, kv_heads, count,
        head_dim), and the rows (count, F). What the prefix cache copies of a window in
        a slot; the next step may overwrite them."""
        at = slice(slot * self.length, slot * self.length + count)
        return [(k[:, at].unsqueeze(0), v[:, at].unsqueeze(0)) for k, v in zip(self.k, self.v)], self.rows[at]

    @torch.no_grad()
    def load(self, slot: int, layers: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor) -> None:
        """Write a `DynamicCache`'s layers of these blocks and their rows into the first
        positions of `slot`: a cached window continues there with static steps, for the
        price of a copy rather than a prefill."""
        count = rows.shape[0]
        at = slice(slot * self.length, slot * self.length + count)
        if len(layers) != len(self.blocks) or count > self.length - STEP_SIZES[-1]:
            raise ValueError(f"a cache of {len(layers)} blocks and {count} positions does not fit a slot")
        for (keys, values), k, v in zip(layers, self.k, self.v):
            k[:, at].copy_(keys[0, :, :count])
            v[:, at].copy_(values[0, :, :count])
        self.rows[at].copy_(rows)

    # -- stepping ----------------------------------------------------------------------
    def feed(self, slot: int, start: int, ids: list[int]) -> float:
        """Feed `ids` (at least one) at positions [start, start + len(ids)) of `slot`; the
        window's score."""
        return self.feed_many([(slot, start, ids)])[0]

    @torch.no_grad()
    def feed_many(self, feeds: list[tuple[int, int, list[int]]]) -> list[float]:
        """`feed` for several slots (each at most once) at once: each round of up to 128
        tokens a feed runs as one step over all of them, padded to the longest part and
        to the next batch size. A replay costs about the same for 16 tokens as for 128,
        so N streams' checks cost about what one does (README, "On a GPU")."""
        if len({slot for slot, _, _ in feeds}) < len(feeds):
            raise ValueError("a slot can take one feed per step")
        for _, start, ids in feeds:
            if not ids:
                raise ValueError("nothing to feed")
            if start + len(ids) > self.length - STEP_SIZES[-1]:
                raise ValueError(f"a window holds at most {self.length - STEP_SIZES[-1]} tokens")
        scores = [0.0] * len(feeds)
        most = STEP_SIZES[-1]
        for done in range(0, max(len(ids) for _, _, ids in feeds), most):
            live = [i for i, (_, _, ids) in enumerate(feeds) if len(ids) > done]
            for at in range(0, len(live), self.batches[-1]):
                group = live[at : at + self.batches[-1]]
                parts = [feeds[i][2][done : done + most] for i in group]
                size = next(b for b in STEP_SIZES if b >= max(map(len, parts)))
                batch = next(n for n in self.batches if n >= len(group))
                slots, starts, counts, tokens = [], [], [], []
                for i, part in zip(group, parts):
                    slot, start, _ = feeds[i]
                    slots.append(slot)
                    starts.append(start + done)
                    counts.append(start + done + len(part))
                    tokens += part + [0] * (size - len(part))
                pad = batch - len(group)  # padding: one token into the scratch slot each
                host = (slots + [self.slots] * pad + starts + [0] * pad + counts + [1] * pad
                        + tokens + [0] * (size * pad))
                self._inputs[batch, size].copy_(torch.tensor(host, dtype=torch.long))
                self._run(batch, size)
                out = self._scores[: len(group)].tolist()
                for i, score in zip(group, out):
                    scores[i] = score
        return scores

    @torch.no_grad()
    def rescore(self, slot: int, count: int) -> float:
        """The score of the first `count` positions of `slot` (after a crop)."""
        base = slot * self.length
        pooled = self.rows[base : base + count].sum(dim=0, keepdim=True) / count * self.readout.weights
        return float(self.head.p_harmful(pooled)[0])

    def warm_up(self) -> None:
        """Capture (and compile) every step shape now, on the scratch slot, rather than
        at the first check of each; scores of live slots are untouched."""
        for key in self._inputs:
            if self.capture and key not in self._graphs:
                self._capture(*key)
            elif not self.capture and self.compile and key[0] == 1:
                with self._scratch(*key):
                    self._forward(*key)

    @contextmanager
    def _scratch(self, batch: int, size: int):
        """Point a step's inputs at the scratch slot, then restore them."""
        inputs = self._inputs[batch, size]
        live = inputs.clone()
        inputs[: 3 * batch] = torch.tensor([self.slots] * batch + [0] * batch + [1] * batch)
        try:
            yield
        finally:
            inputs.copy_(live)

    def _forward(self, batch: int, size: int) -> None:
        # Only single-slot steps are compiled: one compile per shape costs about 9 s, and
        # batches of slots already share each kernel's launch among their streams.
        if not self.compile or batch > 1:
            self._step(batch, size)
            return
        if self._compiled_step is None:
            import torch._dynamo

            limit = max(torch._dynamo.config.cache_size_limit, 2 * len(STEP_SIZES))  # one entry per size
            torch._dynamo.config.cache_size_limit = limit
            self._compiled_step = torch.compile(self._step, backend=self.compile, fullgraph=True, dynamic=False)
        self._compiled_step(batch, size)

    def _run(self, batch: int, size: int) -> None:
        if not self.capture:
            self._forward(batch, size)
            return
        graph = self._graphs.get((batch, size))
        if graph is None:
            graph = self._capture(batch, size)
        graph.replay()

    def _capture(self, batch: int, size: int) -> torch.cuda.CUDAGraph:
        with self._scratch(batch, size):  # warm-up runs write to the scratch slot only
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(batch, size)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._forward(batch, size)
        self._graphs[batch, size] = graph
        logger.debug("captured the streaming step of %d slots x %d tokens as a CUDA graph", batch, size)
        return graph

    def _step(self, batch: int, size: int) -> None:
        """One step of `size` tokens into each of `batch` slots; shapes depend on those
        two only (capturable).

        Same math as the model's eager forward, in fewer kernels: fused q/k/v and
        gate/up products, RMSNorm in one kernel, RoPE on q and k together, grouped
        queries folded into the query rows instead of repeating K and V, and attention
        as batched products (measured on an H100: 587 kernels and 2.8 ms per 16-token
        step with the fused attention kernel, which alone took a third of it). The
        slots' tokens share every product; attention is one batched product per slot
        and kv head.
        """
        inputs = self._inputs[batch, size]
        slots, starts, counts = inputs[:batch], inputs[batch : 2 * batch], inputs[2 * batch : 3 * batch]
        ids = inputs[3 * batch :].view(1, batch * size)  # (1, N*B)
        heads, kv_heads, head_dim, length = self.heads, self.kv_heads, self.head_dim, self.length
        groups = heads // kv_heads
        query_pos = starts[:, None] + self.positions[:size]  # (N, B)
        rows = (slots[:, None] * length + query_pos).view(-1)  # (N*B,) the slots' rows at those positions
        slot_rows = (slots[:, None] * length + self.positions).view(-1)  # (N*L,) each slot's, in position order
        allowed = (self.positions[None, None, :] <= query_pos[:, :, None]).repeat(1, groups, 1)  # (N, groups*B, L)
        mask = torch.zeros(allowed.shape, dtype=torch.float32, device=self.device).masked_fill_(
            ~allowed, float("-inf"))  # additive: made once per step
        mask = mask[:, None].expand(batch, kv_heads, groups * size, length).reshape(
            batch * kv_heads, groups * size, length)
        cos = self.cos.index_select(0, query_pos.view(-1))[:, None]  # (N*B, 1, head_dim)
        sin = self.sin_signed.index_select(0, query_pos.view(-1))[:, None]
        h = self.inner.embed_tokens(ids)  # (1, N*B, hidden)
        parts = []
        for i, block in enumerate(self.blocks):
            attn = block.self_attn
            x = _rms(block.input_layernorm, h)
            qkv = F.linear(x, self.qkv[i][0], self.qkv[i][1])  # (1, N*B, (heads + 2 kv_heads) * head_dim)
            qk = qkv[..., : (heads + kv_heads) * head_dim].view(1, batch * size, heads + kv_heads, head_dim)
            v = qkv[..., (heads + kv_heads) * head_dim :].view(batch * size, kv_heads, head_dim)
            if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head before RoPE
                qk = torch.cat([_rms(attn.q_norm, qk[:, :, :heads]), _rms(attn.k_norm, qk[:, :, heads:])], dim=2)
            qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin  # RoPE, rounded as the model rounds it
            self.k[i].index_copy_(1, rows, qk[0, :, heads:].transpose(0, 1))  # (kv_heads, N*B, head_dim)
            self.v[i].index_copy_(1, rows, v.transpose(0, 1))
            # (N*kv_heads, L, head_dim): slot n's keys for kv head j at row n*kv_heads + j
            keys = self.k[i].index_select(1, slot_rows).view(kv_heads, batch, length, head_dim).transpose(0, 1)
            keys = keys.reshape(batch * kv_heads, length, head_dim)
            values = self.v[i].index_select(1, slot_rows).view(kv_heads, batch, length, head_dim).transpose(0, 1)
            values = values.reshape(batch * kv_heads, length, head_dim)
            # query head h reads kv head h // groups: kv head j's queries become rows (g, b)
            q = qk[0, :, :heads].view(batch, size, kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4)
            q = q.reshape(batch * kv_heads, groups * size, head_dim)
            # Attention as three kernels: at these sizes (a few heads, one short query
            # tile) PyTorch's fused attention kernel runs one thread block per head: 4x slower.
            # Scores and softmax in float32 whatever the dtype, as the fused kernels keep them.
            scores = torch.baddbmm(mask, q.float(), keys.float().transpose(1, 2),
                                   alpha=self.scaling)  # (N*kv_heads, groups*B, L)
            probs = scores.softmax(dim=-1).to(values.dtype)  # as flash attention rounds P
            out = torch.bmm(probs, values)  # (N*kv_heads, groups*B, head_dim)
            out = out.view(batch, kv_heads, groups, size, head_dim).permute(0, 3, 1, 2, 4)
            out = out.reshape(1, batch * size, heads * head_dim)
            h = h + attn.o_proj(out)
            x = _rms(block.post_attention_layernorm, h)
            if self.gate_up[i] is not None:
                gate, up = F.linear(x, *self.gate_up[i]).chunk(2, dim=-1)
                mlp = block.mlp.down_proj(block.mlp.act_fn(gate) * up)
            else:
                mlp = block.mlp.forward(x)  # .forward: no Readout hooks
            h = h + mlp
            neurons = self.reads.get(i)
            if neurons is not None:
                state = mlp if self.readout.pooling == "mlp_mean" else h
                if i == self.top_normed:
                    state = _rms(self.inner.norm, h)
                parts.append(state[0].index_select(-1, neurons).to(torch.float32))  # (N*B, k_i)
        self.rows.index_copy_(0, rows, torch.cat(parts, dim=-1))  # (N*B, F)
        valid = (self.positions[None, :] < counts[:, None]).to(torch.float32)[:, :, None]  # (N, L, 1)
        total = (self.rows.index_select(0, slot_rows).view(batch, length, -1) * valid).sum(dim=1)  # (N, F)
        pooled = total / counts[:, None].to(torch.float32) * self.readout.weights
        self._scores[:batch].copy_(self.head.p_harmful(pooled))
