"""The token denoiser: embedding -> transformer backbone -> final norm -> vocabulary logits.

It has no time input (MDLM's denoiser is time-independent), which is what makes reusing the
previous step's logits exact when no token changed during sampling.
"""

from __future__ import annotations

import torch
from torch import nn

from diladiff.config import ModelConfig
from diladiff.nets.transformer import Backbone, init_weights


class TokenDenoiser(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, seq_len: int):
        super().__init__()
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.backbone = Backbone(
            cfg.width,
            cfg.depth,
            cfg.heads,
            seq_len,
            cfg.mlp_ratio,
            qk_norm=cfg.qk_norm,
            attention_backend=cfg.attention,
        )
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, vocab_size)
        init_weights(self)

    def hidden(self, x: torch.Tensor, after_block: dict | None = None) -> torch.Tensor:
        """Final hidden states (B, L, width) of token ids x (B, L)."""
        return self.norm(self.backbone(self.embed(x), after_block=after_block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits (B, L, V)."""
        return self.head(self.hidden(x))
