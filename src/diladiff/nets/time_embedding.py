"""Sinusoidal embedding of a per-row scalar (time, or a noise level) for adaLN conditioning."""

from __future__ import annotations

import math

import torch
from torch import nn


class TimeEmbedding(nn.Module):
    """Sinusoidal features of scale * t, then an MLP to width (output layer optionally zero).
    scale 1000 for t in [0, 1] (the latent prior); 1 for DUO's sigma = -log alpha in [0, ~7]."""

    def __init__(
        self, width: int, freq_dim: int = 256, zero_out: bool = False, scale: float = 1000.0
    ):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.zero_out = zero_out

    def reset_output(self) -> None:
        if self.zero_out:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        t = t if t.is_floating_point() else t.float()
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / half
        )
        args = self.scale * t.unsqueeze(-1) * freqs
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
