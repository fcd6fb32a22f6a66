"""Cross-attention from token states to a latent, behind a zero-initialised projection.

    h <- h + W_out * Attn(LN(h), z, z)        with W_out = 0 at initialisation

so a decoder that gains these layers computes exactly what it computed before (the pretrained
MDLM) until training moves W_out. W_out is pointwise: one linear map applied per position.
"""

from __future__ import annotations

import torch
from torch import nn

from diladiff.nets.transformer import attention


class LatentCrossAttention(nn.Module):
    def __init__(
        self, width: int, context_dim: int, heads: int, qk_norm: bool = True, backend: str = "sdpa"
    ):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(context_dim, 2 * width, bias=False)
        head_dim = width // heads
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.out = nn.Linear(width, width)  # zero-initialised pointwise projection
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.out._zero_init = True

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, n, _ = h.shape
        q = self.q(self.norm(h)).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(z).view(b, z.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = attention(self.q_norm(q), self.k_norm(k), v, self.backend)
        return h + self.out(o.transpose(1, 2).reshape(b, n, -1))
