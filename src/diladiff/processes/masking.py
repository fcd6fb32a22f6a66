"""The absorbing-state (masking) forward process with the linear schedule alpha_t = 1 - t.

Forward: q(x_t^l | x_0^l) = alpha_t [x_t^l = x_0^l] + (1 - alpha_t) [x_t^l = m], independently
per position. Pure tensor math: networks enter only as callables passed in (the loss).

The denoiser's output is post-processed by SUBS (`subs_logits`, `subs_log_probs`): the mask is
never predicted, and unmasked positions copy their token. The training objective is
`masked_diffusion_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


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


def subs_logits(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS on raw logits: float32, with the mask logit at -inf (the denoiser never predicts the
    mask). Writes into `logits` when it is already float32 (the head's fresh output)."""
    logits = logits.float()
    logits[..., mask_id] = -math.inf
    return logits


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: log p_theta(x_0 | x_t) = log_softmax(subs_logits) at masked positions; positions
    that are not masked copy their token (log-prob 0 on x_t^l, -inf elsewhere)."""
    logp = subs_logits(logits, mask_id).log_softmax(dim=-1)
    keep = (x_t != mask_id).unsqueeze(-1)
    copy = torch.full_like(logp, -math.inf).scatter_(-1, x_t.unsqueeze(-1), 0.0)
    return torch.where(keep, copy, logp)


def masked_diffusion_loss(
    hidden_fn: Callable[[torch.Tensor], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The masked-diffusion (MDLM) objective for clean rows x0 (B, L) at times t (B,):

        x_t = mask(x0, t)    (each token -> m with probability 1 - alpha_t = t),
        loss = (1 / B) sum_b w(t_b) sum_{l : x_t^{b,l} = m} -log p_theta(x_0^{b,l} | x_t^b) / L,

    p_theta(. | x_t) = softmax(SUBS(head(hidden_fn(x_t)))). `weight` is w(t) per row (B,), e.g.
    `loss_weight(t, kind)`; w = 1/t makes the expectation over t an upper bound on
    -log p(x_0) / L. The vocabulary head runs on the masked rows of hidden_fn(x_t) only.
    Consumes `generator` once, through `mask_tokens`.
    """
    x_t = mask_tokens(x0, t, mask_id, generator)
    hidden = hidden_fn(x_t)  # (B, L, W)
    sel = x_t == mask_id
    logits = subs_logits(head(hidden[sel]), mask_id)  # (N_masked, V)
    nll = F.cross_entropy(logits, x0[sel], reduction="none")
    rows = sel.nonzero()[:, 0]
    return (weight[rows] * nll).sum() / x0.numel()
