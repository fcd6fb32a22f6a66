"""A token decoder that reads per-position feature vectors (LDLM's D_w): no token embedding,
no time input.

    logits = Linear(LN(Backbone(Linear(h))))      h: (B, L, in_dim) -> (B, L, V)

Backbone is the bidirectional transformer of nets/transformer.py (plain pre-LN blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from diladiff.nets.transformer import Backbone, init_weights


class FeatureTokenDecoder(nn.Module):
    def __init__(
        self,
        in_dim: int,
        vocab_size: int,
        max_len: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        attention: str = "sdpa",
    ):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.backbone = Backbone(
            width, depth, heads, max_len, mlp_ratio, qk_norm=qk_norm, attention_backend=attention
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        init_weights(self)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) from features (B, L, in_dim)."""
        return self.head(self.norm(self.backbone(self.inp(h))))
