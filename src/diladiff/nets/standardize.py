"""Per-coordinate standardisation, y = (x - mean) / sqrt(var + eps), with its statistics kept as
buffers (saved in checkpoints):

    norm = RunningStandardizer((d,))      # aggregated over the training batches seen
    norm.update(h, across_ranks=True)     # every rank's batch folded in (torch.distributed)
    y = norm(h); h = norm.inverse(y)

    fixed = Standardizer((d,))            # estimated once, then fixed
    fixed.fit(batches); y = fixed(h)

Used on frozen features (the auto-encoder's h, LDLM's E_h) and on latents (z_norm, the latent
stages' prior space).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["RunningStandardizer", "Standardizer"]


class RunningStandardizer(nn.Module):
    """(x - mean) / sqrt(var + eps) per coordinate, with mean and variance aggregated over all
    training batches seen (Chan et al.'s parallel update) and stored as buffers. Under
    torch.distributed, `update(x, across_ranks=True)` folds in every rank's batch, so the
    replicas keep identical statistics (every rank must then call it)."""

    def __init__(self, shape: tuple[int, ...], eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(shape, dtype=torch.float64))

    @torch.no_grad()
    def update(
        self, x: torch.Tensor, across_ranks: bool = False, valid: torch.Tensor | None = None
    ) -> None:
        """Fold a batch x (..., *shape) into the statistics; with `across_ranks` (and a
        process group) the union of every rank's batch, combined with the same parallel
        update: n = sum n_k, mean_b = sum n_k mean_k / n, m2_b = sum (m2_k + n_k mean_k^2) -
        n mean_b^2. valid (...) bool (x's leading dims): only the entries marked True count
        (padding does not)."""
        x = x.detach().double()
        if valid is not None:
            x = x[valid.bool()]
        x = x.reshape(-1, *self.mean.shape)
        n = x.shape[0]
        mean_b = x.mean(0) if n else torch.zeros_like(self.mean)
        m2_b = ((x - mean_b) ** 2).sum(0)
        if across_ranks and dist.is_available() and dist.is_initialized():
            n_mean = torch.stack([torch.full_like(mean_b, n), n * mean_b, m2_b + n * mean_b**2])
            dist.all_reduce(n_mean, op=dist.ReduceOp.SUM)
            n = float(n_mean[0].flatten()[0])
            mean_b = n_mean[1] / n
            m2_b = (n_mean[2] - n * mean_b**2).clamp(min=0)
        if n == 0:
            return
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta**2 * self.count * n / total
        self.count.fill_(total)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.count.clamp(min=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("standardiser has no statistics yet (update it in training)")
        return (x - self.mean.to(x.dtype)) / torch.sqrt(self.var + self.eps).to(x.dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sqrt(self.var + self.eps).to(x.dtype) + self.mean.to(x.dtype)


class Standardizer(nn.Module):
    """y = (x - m) / s per coordinate, with m and s = sqrt(var + eps) estimated once (`fit`) over
    all the data given, stored as buffers, and not changed afterwards."""

    def __init__(self, shape: tuple[int, ...], eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Exact pooled mean and variance of batches (..., *shape), accumulated in float64."""
        acc = RunningStandardizer(tuple(self.mean.shape)).to(self.mean.device)
        for x in batches:
            acc.update(x)
        if acc.count == 0:
            raise ValueError("cannot fit a standardiser on no data")
        self.mean.copy_(acc.mean)
        self.std.copy_(torch.sqrt(acc.var + self.eps))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("standardiser has no statistics yet (fit it first)")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """x = m + s y."""
        if not self.fitted:
            raise RuntimeError("standardiser has no statistics yet (fit it first)")
        return y * self.std.to(y.dtype) + self.mean.to(y.dtype)
