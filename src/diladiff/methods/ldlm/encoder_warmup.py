"""Diffusion-to-encoder gradient warm-up (LDLM, docs/methods/ldlm.md#encoder-warm-up): the
diffusion loss reaches the latent encoder with a weight gamma(s) that rises from gamma_min to 1
over the first S_wu training steps, along a sigmoid ramp rescaled to hit both ends exactly:

    sig(s)   = sigmoid(k (s / S_wu - c))
    gamma(s) = gamma_min + (1 - gamma_min) (sig(s) - sig(0)) / (sig(S_wu) - sig(0)),  s <= S_wu
    gamma(s) = 1,                                                                     s > S_wu

The weight enters through a partial stop-gradient, z0d = sg(z0) + gamma (z0 - sg(z0)): the
forward value is z0 itself, only the gradient that flows back into z0 is scaled by gamma.
"""

from __future__ import annotations

import math

import torch


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def gradient_warmup(
    step: int, warmup_steps: int, k: float = 10.0, c: float = 0.8, gamma_min: float = 0.0
) -> float:
    """gamma(s) (module docstring): gamma_min at s = 0, 1 from s = S_wu on; 1 throughout when
    warmup_steps <= 0 (no warm-up). Steps before 0 count as 0."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    x = max(step, 0) / warmup_steps
    lo, hi = _sigmoid(-k * c), _sigmoid(k * (1.0 - c))
    ramp = (_sigmoid(k * (x - c)) - lo) / (hi - lo)
    return gamma_min + (1.0 - gamma_min) * ramp


def partial_stop_gradient(x: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """sg(x) + gamma (x - sg(x)): the value of x, with the gradient into x scaled by gamma
    (a float or a 0-dim tensor; a tensor does not make a compiled graph recompile when gamma
    changes)."""
    xd = x.detach()
    return xd + gamma * (x - xd)
