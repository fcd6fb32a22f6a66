"""Bidirectional transformer blocks (DiT-style), with no knowledge of diffusion.

A block is pre-norm self-attention + MLP. With a conditioning vector c (cond_dim > 0) it is a
DiT adaLN-Zero block: (shift, scale, gate) = Linear(SiLU(c)), initialised to zero, and

    h = h + gate_a * Attn(LN(h) * (1 + scale_a) + shift_a)
    h = h + gate_m * MLP(LN(h) * (1 + scale_m) + shift_m)

Without conditioning the gates are 1 and shift/scale 0 (a plain pre-LN block). Attention uses
QK-norm (RMSNorm on queries and keys per head) and either torch's scaled_dot_product_attention
or an explicit softmax(QK^T / sqrt(d)) V that supports forward-mode AD (torch.func.jvp).

Positions (POSITIONS): "learned", an absolute table added to the input (the paper's denoiser,
docs/methods/mdlm.md), or "rope", rotary embeddings of the (normed) queries and keys in every block
(nets/rotary.py; the MDLM authors' code, and the cpu preset's measured choice).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diladiff.nets.rotary import apply_rope, rope_tables

ATTENTION_BACKENDS = ("sdpa", "math")
POSITIONS = ("learned", "rope")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims; q, k, v of shape (B, H, L, d)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return scores.softmax(dim=-1) @ v
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool = True, backend: str = "sdpa"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose {ATTENTION_BACKENDS}")
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        head_dim = width // heads
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()

    def forward(self, h: torch.Tensor, rope: tuple | None = None) -> torch.Tensor:
        """Self-attention over h (B, L, W); `rope` = (cos, sin) tables rotate q and k."""
        b, n, _ = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = attention(q, k, v, self.backend)
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(width * ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LN(h) * (1 + scale) + shift, with (shift, scale) broadcast over positions."""
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        cond_dim: int = 0,
        qk_norm: bool = True,
        attention_backend: str = "sdpa",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=cond_dim == 0)
        self.attn = SelfAttention(width, heads, qk_norm, attention_backend)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=cond_dim == 0)
        self.mlp = MLP(width, mlp_ratio)
        self.ada = None
        if cond_dim:
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))
            nn.init.zeros_(self.ada[1].weight)
            nn.init.zeros_(self.ada[1].bias)
            self.ada[1]._zero_init = True  # kept at zero by init_weights

    def forward(
        self, h: torch.Tensor, cond: torch.Tensor | None = None, rope: tuple | None = None
    ) -> torch.Tensor:
        if self.ada is None:
            h = h + self.attn(self.norm1(h), rope)
            return h + self.mlp(self.norm2(h))
        if cond is None:
            raise ValueError("this block is conditioned (cond_dim > 0) but got no conditioning")
        sa, ca, ga, sm, cm, gm = self.ada(cond).chunk(6, dim=-1)
        h = h + ga.unsqueeze(1) * self.attn(modulate(self.norm1(h), sa, ca), rope)
        return h + gm.unsqueeze(1) * self.mlp(modulate(self.norm2(h), sm, cm))


class Backbone(nn.Module):
    """A stack of blocks over (B, L, width) with positions of kind `positions` (POSITIONS): a
    learned absolute embedding added to the input, or RoPE in every block's attention.

    `between` hooks let a later stage insert layers after given blocks (the auto-encoder's
    cross-attention to the latent) without touching this module.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        max_len: int,
        mlp_ratio: float = 4.0,
        cond_dim: int = 0,
        qk_norm: bool = True,
        attention_backend: str = "sdpa",
        positions: str = "learned",
    ):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; choose one of {POSITIONS}")
        if positions == "rope" and (width // heads) % 2:
            raise ValueError(f"RoPE needs an even head width, not {width} / {heads} heads")
        self.max_len, self.head_dim = max_len, width // heads
        self.pos = None
        if positions == "learned":
            self.pos = nn.Parameter(torch.zeros(1, max_len, width))
            nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, cond_dim, qk_norm, attention_backend)
            for _ in range(depth)
        )

    def forward(
        self,
        h: torch.Tensor,
        cond: torch.Tensor | None = None,
        after_block: dict[int, object] | None = None,
    ) -> torch.Tensor:
        n = h.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len {self.max_len}")
        rope = None
        if self.pos is not None:
            h = h + self.pos[:, :n]
        else:
            rope = rope_tables(n, self.head_dim, device=h.device, dtype=h.dtype)
        for i, block in enumerate(self.blocks):
            h = block(h, cond, rope)
            if after_block and i in after_block:
                h = after_block[i](h)
        return h


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) linear and embedding weights, zero biases (GPT-2 style)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if getattr(m, "_zero_init", False):
                continue
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
