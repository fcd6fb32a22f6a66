"""Rotary position embedding (RoPE, Su et al. 2021) of attention queries and keys.

Each pair of dimensions (u_k, u_{k + d/2}) of a head vector at position p is rotated by the
angle p * base^(-2k/d) (the rotate-half layout), so that

    <R_p q, R_r k> depends on q, k and the offset p - r only.

Attention then sees relative positions from the first step, with nothing to learn; a learned
absolute table has to discover them from random noise first (RESULTS.md, "Positions": a small
MDLM on real text stays a bag of words for ~1,000 steps with it).
"""

from __future__ import annotations

import torch


def rope_tables(
    n: int, head_dim: int, base: float = 1e4, device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n, head_dim) for positions 0..n-1: angle p * base^(-2k/head_dim) on
    dims k and k + head_dim/2 (rotate-half layout); computed in float32, or float64 if asked."""
    exact = torch.promote_types(dtype, torch.float32)
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=device, dtype=exact) / head_dim)
    angles = torch.outer(torch.arange(n, device=device, dtype=exact), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates each pair (u_k, u_{k+d/2}) of u (..., n, d) by its position's angle, so that
    <R_p q, R_r k> depends on p - r only."""
    u1, u2 = u.chunk(2, dim=-1)
    return u * cos + torch.cat([-u2, u1], dim=-1) * sin
