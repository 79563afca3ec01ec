"""Packed streaming steps: new tokens of several windows in one forward, each window
keeping its own KV cache.

A streaming check feeds a few new tokens (16 at the proxy's default) into a window that
already holds a cached prefix. Several sessions' checks can share one forward because
every part of a block but attention treats tokens one at a time: their new tokens are
packed into one row dimension (no padding), the matrix products, norms and MLPs run
once over all of them, and only attention is split, each window's queries reading its
own `DynamicCache` under a causal mask offset by its cached length.

- On CPU this is what makes batching streams pay: a product over 16 rows runs some 1.6x
  slower per row than one over 256 (README, "Benchmark" (d)), and a transformers forward
  carries fixed costs per call (masks, cache bookkeeping, hooks) that packing shares.
  Measured on 2 cores with the shipped artifact, 16-token feeds into 8 caches: 2.0x the
  tokens per second of one forward per cache; whole streaming checks (which also
  re-tokenise and prefill new windows): 2 streams 1.30x, 8 streams 1.64x
  (`bench/guard_bench.py` (e)).
- One window alone goes through the same forward, as fast as the transformers forward
  it replaces (1.02x) and with the same numbers (equal to the last bit on SmolLM2).
- Llama-style blocks only (`guard.graphs.unsupported_reason`: full attention, fixed
  RoPE); other backbones keep `Readout.rows` with one forward per window. States are
  read as `Readout` reads them: the MLP output or the block output, post-norm for the
  original last block.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from guard.features import decoder_layers


class PackedStep:
    def __init__(self, readout) -> None:
        model = readout.model
        self.readout = readout
        self.inner = readout.inner
        self.blocks = list(decoder_layers(model))
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        # The model's own RoPE, so the packed path rounds exactly as its forward does.
        self.rope = sys.modules[type(self.blocks[0].self_attn).__module__].apply_rotary_pos_emb
        self.reads = {layer: readout.neurons[layer] for layer in readout.layers}
        self.top_normed = readout.original_layers - 1 if readout.normed_top else None

    @torch.no_grad()
    def rows(self, feeds: Sequence[tuple[DynamicCache, list[int]]]) -> list[torch.Tensor]:
        """Feed each `ids` (at least one) after its cache's prefix, in one forward; each
        feed's (len(ids), n_features) float32 rows. Every cache grows by its feed."""
        if not feeds or any(not ids for _, ids in feeds):
            raise ValueError("every packed feed needs at least one token")
        if len({id(cache) for cache, _ in feeds}) < len(feeds):
            raise ValueError("a cache can take one feed per packed step")
        device = self.readout.device
        lengths = [len(ids) for _, ids in feeds]
        past = [cache.get_seq_length() for cache, _ in feeds]
        total = sum(lengths)
        ids = torch.tensor([[t for _, feed in feeds for t in feed]], dtype=torch.long, device=device)  # (1, T)
        positions = torch.cat([torch.arange(n, n + m, device=device) for n, m in zip(past, lengths)])[None]  # (1, T)
        # query i of a feed sees the cached prefix and new tokens up to itself
        masks = [torch.arange(n + m, device=device)[None, :] <= (n + torch.arange(m, device=device))[:, None]
                 for n, m in zip(past, lengths)]  # (m, n + m) each
        bounds = [0, *itertools.accumulate(lengths)]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        h = self.inner.embed_tokens(ids)  # (1, T, hidden)
        cos, sin = self.inner.rotary_emb(h, positions)  # (1, T, head_dim)
        parts = []
        for i, block in enumerate(self.blocks):
            attn = block.self_attn
            x = block.input_layernorm(h)
            q = attn.q_proj(x).view(1, total, heads, head_dim)
            k = attn.k_proj(x).view(1, total, kv_heads, head_dim)
            v = attn.v_proj(x).view(1, total, kv_heads, head_dim).transpose(1, 2)  # (1, kv_heads, T, head_dim)
            if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (1, heads|kv_heads, T, head_dim)
            outs = []
            for (cache, _), lo, hi, mask in zip(feeds, bounds, bounds[1:], masks):
                keys, values = cache.update(k[:, :, lo:hi], v[:, :, lo:hi], attn.layer_idx)  # (1, kv_heads, n+m, d)
                outs.append(F.scaled_dot_product_attention(
                    q[:, :, lo:hi], keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True))
            out = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, total, heads * head_dim)
            h = h + attn.o_proj(out)
            mlp = block.mlp.forward(block.post_attention_layernorm(h))  # .forward: no Readout hooks
            h = h + mlp
            neurons = self.reads.get(i)
            if neurons is not None:
                state = mlp if self.readout.pooling == "mlp_mean" else h
                if i == self.top_normed:
                    state = self.inner.norm(h)
                parts.append(state[0].index_select(-1, neurons).to(torch.float32))  # (T, k_i)
        return list(torch.cat(parts, dim=-1).split(lengths))  # (m, F) each
