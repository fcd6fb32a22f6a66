"""The absorbing-state (masking) forward process with the linear schedule alpha_t = 1 - t.

Forward: q(x_t^l | x_0^l) = alpha_t [x_t^l = x_0^l] + (1 - alpha_t) [x_t^l = m], independently
per position. Pure tensor math: no networks.
"""

from __future__ import annotations

import torch


def alpha(t: torch.Tensor | float) -> torch.Tensor | float:
    """alpha_t = 1 - t: the probability that a token is still clean at time t."""
    return 1.0 - t


def alpha_derivative(t: torch.Tensor | float) -> torch.Tensor | float:
    """d alpha_t / dt = -1."""
    return -1.0 + 0.0 * t


def elbo_weight(t: torch.Tensor) -> torch.Tensor:
    """ELBO weight -alpha'_t / (1 - alpha_t) = 1 / t for the linear schedule."""
    return -alpha_derivative(t) / (1.0 - alpha(t))


def loss_weight(t: torch.Tensor, kind: str) -> torch.Tensor:
    """w(t): "elbo" (1/t, an upper bound on -log p) or "constant" (1, lower variance)."""
    if kind == "elbo":
        return elbo_weight(t)
    if kind == "constant":
        return torch.ones_like(t)
    raise ValueError(f"unknown loss weight {kind!r}; choose 'elbo' or 'constant'")


def sample_times(
    batch: int,
    generator: torch.Generator | None = None,
    antithetic: bool = True,
    eps: float = 1e-3,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t in [eps, 1]; antithetic (low-discrepancy) draws t_i = (u + i / B) mod 1 cover (0, 1)
    evenly within a batch, which lowers the variance of the batch loss."""
    if antithetic:
        u = torch.rand(1, generator=generator, device=device)
        t = (u + torch.arange(batch, device=device) / batch) % 1.0
    else:
        t = torch.rand(batch, generator=generator, device=device)
    return eps + (1.0 - eps) * t


def mask_tokens(
    x0: torch.Tensor, t: torch.Tensor, mask_id: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x_t: each token replaced by `mask_id` with probability 1 - alpha_t (t of shape (B,))."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = u < (1.0 - alpha(t)).unsqueeze(-1)
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


def mask_exactly(
    x0: torch.Tensor, counts: torch.Tensor, mask_id: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mask exactly counts[b] positions of row b, chosen uniformly (the discrete-ratio
    estimator's forward process)."""
    scores = torch.rand(x0.shape, generator=generator, device=x0.device)
    ranks = scores.argsort(dim=-1).argsort(dim=-1)
    masked = ranks < counts.unsqueeze(-1)
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


def unmask_probability(t: float, s: float) -> float:
    """Probability that a position masked at time t is revealed by time s < t:
    (alpha_s - alpha_t) / (1 - alpha_t)  (= (t - s) / t for the linear schedule)."""
    return (alpha(s) - alpha(t)) / (1.0 - alpha(t))


def reverse_posterior(probs: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """q(x_s | x_t = m, x_0 ~ probs) for a masked position, over V tokens + [stay masked]:

        p(x_s = v) = (alpha_s - alpha_t) / (1 - alpha_t) * probs[v]
        p(x_s = m) = (1 - alpha_s) / (1 - alpha_t)

    The last entry of the returned (..., V + 1) tensor is the stay-masked probability.
    """
    p_unmask = unmask_probability(t, s)
    stay = torch.full_like(probs[..., :1], 1.0 - p_unmask)
    return torch.cat([p_unmask * probs, stay], dim=-1)
