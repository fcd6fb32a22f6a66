"""The token denoiser: embedding -> transformer backbone -> final norm -> vocabulary logits.

By default it has no time input (MDLM's denoiser is time-independent), which is what makes
reusing the previous step's logits exact when no token changed during sampling. With
`time_conditioning` (DUO: the uniform-state process needs it) every block is modulated by
adaLN-Zero from an embedding of a per-row scalar (DUO feeds sigma = -log alpha_t), and the
input may also be a distribution over the vocabulary (B, L, V), embedded as probs @ E (DUO's
curriculum feeds a tempered softmax of a Gaussian latent).
"""

from __future__ import annotations

import torch
from torch import nn

from diladiff.config import ModelConfig
from diladiff.nets.time_embedding import TimeEmbedding
from diladiff.nets.transformer import Backbone, init_weights


class TokenDenoiser(nn.Module):
    def __init__(
        self, cfg: ModelConfig, vocab_size: int, seq_len: int, time_conditioning: bool = False
    ):
        super().__init__()
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.backbone = Backbone(
            cfg.width,
            cfg.depth,
            cfg.heads,
            seq_len,
            cfg.mlp_ratio,
            cond_dim=cfg.width if time_conditioning else 0,
            qk_norm=cfg.qk_norm,
            attention_backend=cfg.attention,
            positions=cfg.positions,
        )
        # sigma = -log alpha_t lies in [0, ~7]: sinusoidal features of sigma itself (scale 1)
        self.t_embed = TimeEmbedding(cfg.width, scale=1.0) if time_conditioning else None
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, vocab_size)
        init_weights(self)  # the blocks' adaLN layers stay zero (adaLN-Zero)

    def hidden(
        self, x: torch.Tensor, after_block: dict | None = None, time: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states (B, L, width) of token ids x (B, L), or of distributions over
        the vocabulary x (B, L, V) embedded as x @ E; `time` (B,) when time-conditioned."""
        h = x.to(self.embed.weight.dtype) @ self.embed.weight if x.is_floating_point() else None
        h = self.embed(x) if h is None else h
        cond = None
        if self.t_embed is not None:
            if time is None:
                raise ValueError("this denoiser is time-conditioned: pass `time`")
            cond = self.t_embed(time)
        return self.norm(self.backbone(h, cond=cond, after_block=after_block))

    def forward(self, x: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits (B, L, V)."""
        return self.head(self.hidden(x, time=time))
