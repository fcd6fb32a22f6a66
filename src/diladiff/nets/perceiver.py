"""Perceiver-style compressor: N_z learned latent vectors read a feature sequence.

Each layer updates the latents by attention from the latents to concat(features, latents),
then an MLP (pre-norm, residual):

    u <- u + Attn(LN(u), LN([h; u]))
    u <- u + MLP(LN(u))

and a final projection maps the latents to width d_z. With `max_len` > 0, queries and keys get
learned position tables (nets/positions.py): latent j's query and key start at its centre
c_j = (j + 1/2) L / N_z, feature i's key at i, so latent j first reads the positions near c_j.
"""

from __future__ import annotations

import torch
from torch import nn

from diladiff.nets.positions import latent_centres, sinusoidal_table
from diladiff.nets.transformer import MLP, attention


class PerceiverLayer(nn.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        backend: str = "sdpa",
        max_len: int = 0,
        num_latents: int = 0,
    ):
        super().__init__()
        self.q_pos = self.kv_pos = None
        if max_len and num_latents:
            centres = latent_centres(num_latents, max_len)
            self.q_pos = nn.Parameter(sinusoidal_table(centres, width // heads))
            key_positions = torch.cat([torch.arange(max_len, dtype=torch.float64), centres])
            self.kv_pos = nn.Parameter(sinusoidal_table(key_positions, width // heads))
            self.max_len = max_len
        self.heads, self.backend = heads, backend
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        b, n, _ = u.shape
        ctx = self.norm_kv(torch.cat([h, u], dim=1))
        q = self.q(self.norm_q(u)).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.q_pos is not None:
            L = h.shape[1]
            if L > self.max_len:
                raise ValueError(f"{L} feature positions exceed max_len {self.max_len}")
            q = q + self.q_pos
            k = k + torch.cat([self.kv_pos[:L], self.kv_pos[self.max_len :]])
        u = u + self.out(attention(q, k, v, self.backend).transpose(1, 2).reshape(b, n, -1))
        return u + self.mlp(self.norm_mlp(u))


class PerceiverCompressor(nn.Module):
    def __init__(
        self,
        in_dim: int,
        width: int,
        num_latents: int,
        latent_dim: int,
        depth: int = 2,
        heads: int = 8,
        backend: str = "sdpa",
        max_len: int = 0,
    ):
        """`max_len` > 0 (the longest feature sequence) turns on the position tables."""
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.latents = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.layers = nn.ModuleList(
            PerceiverLayer(width, heads, 4.0, backend, max_len, num_latents) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, latent_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Features (B, L, in_dim) -> latent (B, N_z, d_z)."""
        h = self.inp(h)
        u = self.latents.unsqueeze(0).expand(h.shape[0], -1, -1)
        for layer in self.layers:
            u = layer(u, h)
        return self.proj(self.norm(u))
