"""The selected neurons of the selected layers, per token, from a truncated backbone.

`Readout` owns the backbone once it is loaded for SIREN:

- Blocks above the highest selected layer cannot change any selected state in a causal
  LM, so they are dropped at load (exact; `siren_guard`'s trajectory guard does the same).
- Per-layer states are read with forward hooks on the kept blocks (``residual_mean``:
  the block's output, i.e. ``hidden_states[layer + 1]``; ``mlp_mean``: the block's MLP
  output), never through ``output_hidden_states`` and never through the LM head.
- HF Llama-style models return ``hidden_states[num_layers]`` *after* the final norm. So if
  the top selected layer is the backbone's original last block, its residual feature is
  the normed output (what the reference reads); for any lower layer it is the raw residual.
- Each hook keeps only the selected neurons, cast to float32: rows are
  (batch, seq, n_features) in artifact order, unweighted. Pooling and layer weights are
  applied by the caller (`pool`), in float32 whatever the backbone's dtype.
"""

from __future__ import annotations

import inspect

import torch

from guard.artifact import ArtifactConfig
from guard.errors import ArtifactError, WorkerClosed
from guard.features import decoder_layers


class Readout:
    def __init__(self, model: torch.nn.Module, config: ArtifactConfig) -> None:
        self.model = model
        self.inner = getattr(model, "model", model)
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name
        # warns, and goes in 5.40); earlier 5.x know only the old one
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.inner.forward).parameters \
            else "past_key_values"
        blocks = decoder_layers(model)
        self.original_layers = len(blocks)
        hidden = model.config.hidden_size
        for layer, idxs in config.selected_neurons.items():
            if layer >= self.original_layers:
                raise ArtifactError(f"field 'siren_module.selected_layers' selects layer {layer}, but the "
                                    f"backbone has {self.original_layers} blocks (0 to {self.original_layers - 1})")
            if max(idxs) >= hidden:
                raise ArtifactError(f"field 'siren_module.selected_neurons_dict.layer{layer}' selects neuron "
                                    f"{max(idxs)}, but the backbone's hidden size is {hidden} (0 to {hidden - 1})")
        keep = config.top_layer + 1
        if keep < self.original_layers:
            del blocks[keep:]
            model.config.num_hidden_layers = keep
            if hasattr(self.inner, "config"):
                self.inner.config.num_hidden_layers = keep
        self.pooling = config.pooling_type
        self.layers = config.selected_layers
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.neurons = {
            layer: torch.as_tensor(config.selected_neurons[layer], dtype=torch.long, device=self.device)
            for layer in self.layers
        }
        self.weights = torch.cat([
            torch.full((len(config.selected_neurons[layer]),), config.layer_weights[layer])
            for layer in self.layers
        ]).to(self.device, torch.float32)  # (n_features,)
        self.n_features = int(self.weights.numel())
        # The one case where the reference reads a post-norm state: hidden_states[-1].
        self.normed_top = self.pooling == "residual_mean" and config.top_layer == self.original_layers - 1
        self._captured: dict[int, torch.Tensor] = {}
        self._handles = [self._hook(layer, blocks[layer]) for layer in self.layers]
        self.closed = False

    def _hook(self, layer: int, block: torch.nn.Module):
        target = block.mlp if self.pooling == "mlp_mean" else block
        normed = self.normed_top and layer == self.original_layers - 1

        def keep(_module, _inputs, output):
            if normed:  # read from last_hidden_state instead
                return
            out = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
            self._captured[layer] = out.index_select(-1, self.neurons[layer])  # (batch, seq, k)

        return target.register_forward_hook(keep)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.closed = True

    @torch.no_grad()
    def rows(
        self,
        input_ids: torch.Tensor,  # (batch, seq)
        attention_mask: torch.Tensor | None = None,  # (batch, seq); None: no padding
        cache=None,
    ) -> torch.Tensor:
        """(batch, seq, n_features) float32 selected neurons of each new token.

        With `cache` (a transformers Cache), the tokens continue the cached prefix and
        the cache grows by `seq`; without it, they are whole texts.
        """
        if self.closed:  # its hooks are gone: nothing would be captured
            raise WorkerClosed("this guard is closed")
        self._captured.clear()
        out = self.inner(
            input_ids=input_ids, attention_mask=attention_mask, **{self._cache_kwarg: cache},
            use_cache=cache is not None, return_dict=True,
        )
        parts = []
        for layer in self.layers:
            if self.normed_top and layer == self.original_layers - 1:
                state = out.last_hidden_state.index_select(-1, self.neurons[layer])
            else:
                state = self._captured[layer]
            parts.append(state.to(torch.float32))  # (batch, seq, k_layer)
        self._captured.clear()
        return torch.cat(parts, dim=-1)  # (batch, seq, n_features)

    def pool(self, rows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean over tokens, then layer weights: (batch, seq, F) -> (batch, F)."""
        mask = attention_mask.to(rows.device, torch.float32).unsqueeze(-1)  # (batch, seq, 1)
        total = (rows * mask).sum(dim=1)  # (batch, F)
        count = mask.sum(dim=1).clamp(min=1)  # (batch, 1)
        return total / count * self.weights
