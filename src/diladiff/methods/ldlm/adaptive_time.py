"""Adaptive timestep sampling (LDLM, docs/methods/ldlm.md#adaptive-time; CDCD's time warping):
the schedule time u is drawn with density proportional to the slope of the denoising loss,

    p(u) = L'(u) / (L(1) - L(0)),   u = F^-1(t),  t ~ U[0, 1],   F(u) = int_0^u p,     (eq. 5)

so that the expected loss L(F^-1(t)) is linear in t: every stretch of t costs the same share of
the loss, and training (and the sampling grid, `time_grid`) spends its steps where the loss
changes. L is estimated online on N + 1 edges u_i = i / N (piecewise linear), p is piecewise
constant on the N bins between them and F piecewise linear:

    Lhat_i   EMA (decay beta) of the loss near u_i, Lhat_0 = 0 (z_0 is the data: no loss)
    Lt       = cummax(Lhat)                            (L is non-decreasing in u)
    p_i      = max(Lt_{i+1} - Lt_i, floor * Lt_N / N) / sum   (no bin dies)
    F(u)     = C_i + p_i (u N - i)  for u in [u_i, u_{i+1}],   C_i = sum_{j<i} p_j.

A per-example loss l at u in bin i (w = u N - i) counts with weight 1 - w at edge i and w at
edge i + 1; each edge's new value is the weighted mean of its losses in the batch. That mean
is L(u_i) up to O(L'' / N^2) at interior edges; the top edge u_N = 1 sees data from below only,
so its estimate is low by about L'(1) / (3 N), negligible where the loss saturates near u = 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class AdaptiveTimeSampler(nn.Module):
    """u ~ p(u) of eq. 5 from an online estimate of the loss curve (module docstring).

    All state is in persistent buffers, so it is saved with the model and a resumed run draws
    the same u: `loss_ema` (bins + 1 edges, Lhat), `seen` (whether an edge got data yet) and
    `probs` (bins; uniform until the first `refresh`). `update` feeds losses every step;
    `refresh` recomputes p from them (every few thousand steps, the caller's schedule)."""

    def __init__(self, bins: int = 100, ema: float = 0.99, floor: float = 1e-4):
        super().__init__()
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1], got {floor}")
        self.bins, self.ema, self.floor = bins, ema, floor
        # float64: F and F^-1 are cumulative sums over the bins and must invert each other.
        self.register_buffer("loss_ema", torch.zeros(bins + 1, dtype=torch.float64))
        seen = torch.zeros(bins + 1, dtype=torch.bool)
        seen[0] = True  # Lhat_0 = 0 by definition, not by data
        self.register_buffer("seen", seen)
        self.register_buffer("probs", torch.full((bins,), 1.0 / bins, dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"bins={self.bins}, ema={self.ema}, floor={self.floor}"

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None, device=None) -> torch.Tensor:
        """u (n,) float32: bin i ~ Cat(p), then u ~ U[u_i, u_{i+1}). Two uniform draws per
        example from `generator` only (the categorical by inversion of its cumulative sums, so
        the draw is the same on every device)."""
        device = self.probs.device if device is None else device
        r = torch.rand(2, n, generator=generator, device=device, dtype=torch.float64)
        cum = self._cumulative().to(device)
        i = (torch.searchsorted(cum, r[0], right=True) - 1).clamp(0, self.bins - 1)
        return ((i + r[1]) / self.bins).float()

    # ------------------------------------------------------------------ the loss curve
    @torch.no_grad()
    def update(self, u: torch.Tensor, losses: torch.Tensor) -> None:
        """Feed per-example losses (B,) at schedule times u (B,): split each loss linearly to
        its bin's two edges, then Lhat_j <- beta Lhat_j + (1 - beta) (weighted mean at j) for
        every edge j that got weight. An edge's first data sets Lhat_j to its weighted mean
        directly (an EMA started at 0 would drag L down where data is still scarce). Under
        torch.distributed the per-edge sums are all-reduced first, so every replica holds the
        same buffers."""
        u = u.detach().reshape(-1).to(self.loss_ema.device, torch.float64)
        losses = losses.detach().reshape(-1).to(self.loss_ema.device, torch.float64)
        if u.shape != losses.shape:
            raise ValueError(f"u {tuple(u.shape)} and losses {tuple(losses.shape)} differ")
        x = u.clamp(0.0, 1.0) * self.bins
        i = x.floor().long().clamp(0, self.bins - 1)
        w = x - i
        acc = torch.zeros(2, self.bins + 1, dtype=torch.float64, device=u.device)
        acc[0].index_add_(0, i, (1 - w) * losses).index_add_(0, i + 1, w * losses)
        acc[1].index_add_(0, i, 1 - w).index_add_(0, i + 1, w)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(acc, op=dist.ReduceOp.SUM)
        got = acc[1] > 0
        got[0] = False  # Lhat_0 stays 0
        mean = acc[0] / acc[1].clamp(min=torch.finfo(torch.float64).tiny)
        ema = self.ema * self.loss_ema + (1 - self.ema) * mean
        self.loss_ema.copy_(torch.where(got, torch.where(self.seen, ema, mean), self.loss_ema))
        self.seen.logical_or_(got)

    @torch.no_grad()
    def refresh(self) -> None:
        """p from the current loss estimate (eq. 5, module docstring). Edges without data yet
        are interpolated linearly between their seen neighbours (held flat past the last seen
        one). The floor is relative to the total increase Lt_N - Lt_0, so that it does not
        depend on the loss's scale: every bin keeps at least about floor / N probability. With
        no increase at all (no data yet) p stays uniform."""
        seen = self.seen.cpu()
        edges = torch.arange(self.bins + 1, dtype=torch.float64)
        lhat = self.loss_ema.cpu().clone()
        lhat[0] = 0.0
        known = edges[seen]
        lhat = _interp(edges, known, lhat[seen])
        lt = torch.cummax(lhat, dim=0).values
        inc = lt.diff()
        total = float(lt[-1] - lt[0])
        if not total > 0.0:
            p = torch.full((self.bins,), 1.0 / self.bins, dtype=torch.float64)
        else:
            p = (inc / total).clamp(min=self.floor / self.bins)
            p = p / p.sum()
        self.probs.copy_(p)

    # ------------------------------------------------------------------ the warp
    def _cumulative(self) -> torch.Tensor:
        """C_0 = 0, ..., C_N = 1 (bins + 1 values; the last exactly 1)."""
        c = torch.cat([self.probs.new_zeros(1), torch.cumsum(self.probs, 0)])
        c = c / c[-1]
        c[-1] = 1.0
        return c

    def cdf(self, u: torch.Tensor) -> torch.Tensor:
        """t = F(u) = C_i + p_i (u N - i), i the bin of u (clamped to [0, 1]); u's dtype."""
        x = u.to(self.probs.device, torch.float64).clamp(0.0, 1.0) * self.bins
        i = x.floor().long().clamp(0, self.bins - 1)
        t = self._cumulative()[i] + self.probs[i] * (x - i)
        return t.clamp(0.0, 1.0).to(u.device, u.dtype)

    def inverse_cdf(self, t: torch.Tensor) -> torch.Tensor:
        """u = F^-1(t) = (i + (t - C_i) / p_i) / N, i the bin with C_i <= t < C_{i+1}
        (t clamped to [0, 1]); t's dtype. p_i > 0, so F is strictly increasing."""
        c = self._cumulative()
        tt = t.to(self.probs.device, torch.float64).clamp(0.0, 1.0)
        i = (torch.searchsorted(c, tt, right=True) - 1).clamp(0, self.bins - 1)
        u = (i + ((tt - c[i]) / self.probs[i]).clamp(0.0, 1.0)) / self.bins
        return u.to(t.device, t.dtype)

    def time_grid(self, steps: int) -> torch.Tensor:
        """The sampling grid u_k = F^-1(1 - k / steps), k = 0..steps: steps + 1 float64 values
        on the CPU, strictly decreasing from exactly 1 to exactly 0 (equal steps in t). Where
        the loss is flat (near u = 1) a step in u is long: the first spans about [0.7, 1] at
        N = 32 for a typical LDLM curve, so a sampler on it must be stable for any step
        (sampling/latent.py's Euler-Maruyama sub-steps where beta Delta is large)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        t = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
        u = self.inverse_cdf(t).cpu()
        u[0], u[-1] = 1.0, 0.0
        return u


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp increasing, xp[0] <= x[0]); held
    at fp[-1] beyond xp[-1]."""
    if len(xp) == 1:
        return fp.expand(len(x)).clone()
    j = (torch.searchsorted(xp, x, right=True) - 1).clamp(0, len(xp) - 2)
    lam = ((x - xp[j]) / (xp[j + 1] - xp[j])).clamp(0.0, 1.0)
    return fp[j] + lam * (fp[j + 1] - fp[j])
