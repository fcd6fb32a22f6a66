"""Cross-attention from token states to a latent, behind a zero-initialised projection.

    q_i = W_q LN(h_i) (+ P[i]),   k_j = W_k z_j (+ P'[c_j]),   v_j = W_v z_j
    h <- h + W_out * Attn(q, k, v)      with W_out = 0 at initialisation

so a decoder that gains these layers computes exactly what it computed before (the pretrained
MDLM) until training moves W_out. W_out is pointwise: one linear map applied per position.

The optional position tables P, P' (nets/positions.py) matter for small or briefly trained
decoders: their hidden states at masked positions are nearly identical (at full masking they
differ only by a tiny learned position embedding, and not at all with model.positions=rope:
identical inputs give identical values whatever the rotation), so queries built from LN(h)
alone cannot ask "what is at my position", every position reads the same mixture of the
latent, and the latent goes unused.
"""

from __future__ import annotations

import torch
from torch import nn

from diladiff.nets.positions import latent_centres, sinusoidal_table
from diladiff.nets.transformer import attention


class LatentCrossAttention(nn.Module):
    def __init__(
        self,
        width: int,
        context_dim: int,
        heads: int,
        qk_norm: bool = True,
        backend: str = "sdpa",
        max_len: int = 0,
        num_latents: int = 0,
    ):
        """With `max_len` and `num_latents` > 0, queries and keys get position tables."""
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(context_dim, width, bias=False)
        self.v = nn.Linear(context_dim, width, bias=False)
        head_dim = width // heads
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.query_pos = self.key_pos = None
        if max_len and num_latents:
            self.query_pos = nn.Parameter(sinusoidal_table(torch.arange(max_len), head_dim))
            centres = latent_centres(num_latents, max_len)
            self.key_pos = nn.Parameter(sinusoidal_table(centres, head_dim))
        self.out = nn.Linear(width, width)  # zero-initialised pointwise projection
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.out._zero_init = True

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, n, _ = h.shape
        m = z.shape[1]
        q = self.q(self.norm(h)).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.k(z).view(b, m, self.heads, -1).transpose(1, 2)
        v = self.v(z).view(b, m, self.heads, -1).transpose(1, 2)
        if self.query_pos is not None:
            q, k = q + self.query_pos[:n], k + self.key_pos[:m]
        o = attention(self.q_norm(q), self.k_norm(k), v, self.backend)
        return h + self.out(o.transpose(1, 2).reshape(b, n, -1))
