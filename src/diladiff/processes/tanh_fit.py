"""The four-parameter tanh model of the decoder's error rate against the std of noise added to
its latent (paper App. D.3), its least-squares fit and its inverse (pure math):

    err(s) = a + b tanh(c (s - e)),   b > 0, c > 0,
    s(err) = e + atanh((err - a) / b) / c      for |err - a| < b.

The fit is a small nonlinear least squares (L-BFGS on a, log b, log c, e, in float64), started
from the data's range and midpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class TanhCurve:
    a: float
    b: float
    c: float
    e: float

    def __call__(self, s):
        return self.a + self.b * torch.tanh(
            self.c * (torch.as_tensor(s, dtype=torch.float64) - self.e)
        )

    def inverse(self, err):
        """The noise std at which the error rate is `err` (inside the curve's range)."""
        u = (torch.as_tensor(err, dtype=torch.float64) - self.a) / self.b
        if (u.abs() >= 1).any():
            raise ValueError(
                f"error rates must lie strictly within ({self.a - self.b:.4g}, "
                f"{self.a + self.b:.4g})"
            )
        return self.e + torch.atanh(u) / self.c

    def to_dict(self) -> dict:
        return asdict(self)


def fit_tanh(noise_std, error, steps: int = 200) -> TanhCurve:
    """Least-squares fit of err(s) = a + b tanh(c (s - e)) to points (noise_std, error)."""
    s = torch.as_tensor(noise_std, dtype=torch.float64)
    y = torch.as_tensor(error, dtype=torch.float64)
    lo, hi = float(y.min()), float(y.max())
    span = max(float(s.max() - s.min()), 1e-6)
    params = torch.tensor(
        [(lo + hi) / 2, math.log(max((hi - lo) / 2, 1e-4)), math.log(4 / span), float(s.mean())],
        dtype=torch.float64,
        requires_grad=True,
    )
    opt = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        a, log_b, log_c, e = params
        loss = ((a + log_b.exp() * torch.tanh(log_c.exp() * (s - e)) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    a, log_b, log_c, e = params.detach().tolist()
    return TanhCurve(a, math.exp(log_b), math.exp(log_c), e)
