"""The SIREN head: the small MLP that maps the weighted pooled neurons to two logits.

Same module layout as the reference's `_AdaptiveMLPClassifier`, so its state_dict keys
(`network.0.weight`, `network.0.bias`, ...) are the artifact's keys: Linear, ReLU and an
optional Dropout per hidden layer, then a final Linear to `num_classes` logits.
P(harmful) is softmax(logits)[:, 1]. The head always runs in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from guard.artifact import ArtifactConfig


class SirenHead(nn.Module):
    def __init__(
        self,
        input_dim: int,
        layer_dims: Sequence[int],
        dropout_rates: Sequence[float],
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        if len(layer_dims) != len(dropout_rates):
            raise ValueError("layer_dims and dropout_rates must have the same length")
        modules: list[nn.Module] = []
        prev = input_dim
        for hidden, dropout in zip(layer_dims, dropout_rates):
            modules += [nn.Linear(prev, hidden), nn.ReLU()]
            if dropout > 0:
                modules.append(nn.Dropout(dropout))
            prev = hidden
        modules.append(nn.Linear(prev, num_classes))
        self.network = nn.Sequential(*modules)

    @classmethod
    def from_config(cls, config: ArtifactConfig) -> SirenHead:
        return cls(config.input_dim, config.layer_dims, config.dropout_rates, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, input_dim) -> (batch, classes)
        return self.network(x)

    @torch.no_grad()
    def p_harmful(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, input_dim) float32 features -> (batch,) P(harmful)."""
        logits = self.network(x.to(torch.float32))  # (batch, classes)
        return torch.softmax(logits, dim=-1)[:, 1]
