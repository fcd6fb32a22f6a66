"""Perceiver-style compressor: N_z learned latent vectors read a feature sequence.

Each layer updates the latents by attention from the latents to concat(features, latents),
then an MLP (pre-norm, residual):

    u <- u + Attn(LN(u), LN([h; u]))
    u <- u + MLP(LN(u))

and a final projection maps the latents to width d_z. With `max_len` > 0, queries and keys get
learned position tables (nets/positions.py): latent j's query and key start at its centre
c_j = (j + 1/2) L / N_z, feature i's key at i, so latent j first reads the positions near c_j
(L = `centre_span`, by default the table length `max_len`).

Features of different lengths come right-padded with a mask `valid` (B, L) bool: a padded
position is no key of any attention (the latents always are, so no row attends to nothing), and
the latents are the same whatever the padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diladiff.nets.positions import latent_centres, sinusoidal_table
from diladiff.nets.transformer import MLP, attention


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, backend: str
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + log 1[key valid]) v: attention over the keys marked True in
    `keys` (B, L_k) only; q (B, H, N, d), k and v (B, H, L_k, d). Every row needs a valid key."""
    mask = keys[:, None, None, :]
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
    return attention(q, k, v, backend)  # an unknown backend: attention's error


class PerceiverLayer(nn.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        backend: str = "sdpa",
        max_len: int = 0,
        num_latents: int = 0,
        centre_span: int = 0,
    ):
        super().__init__()
        self.q_pos = self.kv_pos = None
        if max_len and num_latents:
            centres = latent_centres(num_latents, centre_span or max_len)
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

    def forward(
        self, u: torch.Tensor, h: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Latents u (B, N, W) updated from features h (B, L, W); valid (B, L) bool marks the
        feature positions to read (default all)."""
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
        if valid is None:
            o = attention(q, k, v, self.backend)
        else:
            keys = torch.cat([valid.bool(), valid.new_ones(b, n, dtype=torch.bool)], dim=1)
            o = masked_attention(q, k, v, keys, self.backend)
        u = u + self.out(o.transpose(1, 2).reshape(b, n, -1))
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
        centre_span: int = 0,
    ):
        """`max_len` > 0 (the longest feature sequence) turns on the position tables; the
        latents' centres spread over `centre_span` positions (0 = max_len)."""
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.latents = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.layers = nn.ModuleList(
            PerceiverLayer(width, heads, 4.0, backend, max_len, num_latents, centre_span)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, latent_dim)

    def forward(self, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, L, in_dim) -> latent (B, N_z, d_z); valid (B, L) bool: the positions
        that are features, not padding (default all)."""
        h = self.inp(h)
        u = self.latents.unsqueeze(0).expand(h.shape[0], -1, -1)
        for layer in self.layers:
            u = layer(u, h, valid)
        return self.proj(self.norm(u))
