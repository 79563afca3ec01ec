"""Mean-pooled layer features: the one definition that training and scoring share.

SIREN's feature for a layer is the mean over a text's tokens of that layer's output:
``residual_mean`` reads ``hidden_states[layer + 1]`` (the residual stream after block
`layer`), ``mlp_mean`` reads block `layer`'s MLP output. Tokenisation truncates at
``max_length`` and pads on the right, as the reference does; padded positions are
masked out of the mean. Sums are taken in float32 whatever the backbone's dtype, so a
bf16 backbone loses precision only inside the blocks, not in the pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POOLINGS = ("residual_mean", "mlp_mean")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (`model.model.layers` in Llama-style LMs)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise NotImplementedError(
            f"{type(model).__name__} does not expose `model.layers`; SIREN pooling needs it"
        )
    return layers


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer(
        list(texts), return_tensors="pt", truncation=True, max_length=max_length, padding=True
    )


@torch.no_grad()
def layer_outputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (batch, seq)
    attention_mask: torch.Tensor,  # (batch, seq)
    layers: Sequence[int],
    pooling: str,
) -> dict[int, torch.Tensor]:
    """Per-token outputs of each requested layer, {layer: (batch, seq, hidden)}.

    Runs the base model (`model.model`), not the LM head: the logits are never needed.
    """
    if pooling not in POOLINGS:
        raise NotImplementedError(f"unsupported pooling_type {pooling!r}; supported: {POOLINGS}")
    inner = getattr(model, "model", model)
    if pooling == "residual_mean":
        out = inner(input_ids=input_ids, attention_mask=attention_mask,
                    output_hidden_states=True, use_cache=False, return_dict=True)
        return {layer: out.hidden_states[layer + 1] for layer in layers}
    captured: dict[int, torch.Tensor] = {}
    blocks = decoder_layers(model)
    handles = [
        blocks[layer].mlp.register_forward_hook(
            lambda _m, _i, output, layer=layer: captured.__setitem__(
                layer, output[0] if isinstance(output, tuple) else output
            )
        )
        for layer in layers
    ]
    try:
        inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens, in float32: (batch, seq, hidden) -> (batch, hidden)."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)  # (batch, seq, 1)
    total = (hidden.to(torch.float32) * mask).sum(dim=1)  # (batch, hidden)
    return total / attention_mask.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)


@torch.no_grad()
def pooled_features(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    pooling: str = "residual_mean",
    max_length: int = 512,
) -> dict[int, torch.Tensor]:
    """{layer: (batch, hidden)} float32 mean-pooled features of already-prepared texts.

    `texts` must come from `guard.text.model_text`; this function does no cleaning.
    """
    device = next(model.parameters()).device
    enc = tokenize(tokenizer, texts, max_length)
    input_ids = enc["input_ids"].to(device)  # (batch, seq)
    attention_mask = enc["attention_mask"].to(device)  # (batch, seq)
    per_layer = layer_outputs(model, input_ids, attention_mask, layers, pooling)
    return {layer: masked_mean(h, attention_mask) for layer, h in per_layer.items()}
