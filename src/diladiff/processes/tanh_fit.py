"""The four-parameter tanh model of the decoder's error rate against the std of noise added to
its latent (paper App. D.3), its least-squares fit and its inverse (pure math):

    err(s) = a + b tanh(c (s - e)),   b > 0, c > 0,
    s(err) = e + atanh((err - a) / b) / c      for |err - a| < b.

The fit is a small nonlinear least squares in float64: the points are first scaled to unit
range in both s and err (so the tiny error-rate differences of a robust decoder do not fall
below the optimiser's tolerances), then L-BFGS on (a, log b, log c, e) runs from a few starts
(knee at the lower quarter, middle, upper quarter of the s range; steep and gentle) and the
lowest squared error wins; the result is mapped back to the original units. Error rates that
are constant, or fall as the noise grows (negative correlation: not this model), are refused
(ValueError).
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


def _fit_unit(s: torch.Tensor, y: torch.Tensor, start: tuple, steps: int):
    params = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [params],
        max_iter=steps,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def loss_fn():
        a, log_b, log_c, e = params
        return ((a + log_b.exp() * torch.tanh(log_c.exp() * (s - e)) - y) ** 2).mean()

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        loss = float(loss_fn())
    return (loss if math.isfinite(loss) else math.inf), params.detach().tolist()


def fit_tanh(noise_std, error, steps: int = 500) -> TanhCurve:
    """Least-squares fit of err(s) = a + b tanh(c (s - e)) to points (noise_std, error)."""
    s = torch.as_tensor(noise_std, dtype=torch.float64).flatten()
    y = torch.as_tensor(error, dtype=torch.float64).flatten()
    if len(s) != len(y) or len(s) < 4:
        raise ValueError(f"need at least 4 (noise_std, error) points of equal count, not {len(s)}")
    s_mid, s_half = float(s.min() + s.max()) / 2, float(s.max() - s.min()) / 2
    y_mid, y_half = float(y.min() + y.max()) / 2, float(y.max() - y.min()) / 2
    if s_half <= 0 or y_half <= 1e-12 * max(1.0, abs(y_mid)):
        raise ValueError("the error rate (or the noise std) is constant: nothing to fit")
    su, yu = (s - s_mid) / s_half, (y - y_mid) / y_half  # both in [-1, 1]
    if float(torch.corrcoef(torch.stack([su, yu]))[0, 1]) < 0:
        raise ValueError("the error rate falls with the noise std: not the tanh model (b, c > 0)")
    best = (math.inf, None)
    for e0 in (-0.5, 0.0, 0.5):
        for c0 in (1.0, 4.0):
            best = min(
                best, _fit_unit(su, yu, (0.0, 0.0, math.log(c0), e0), steps), key=lambda r: r[0]
            )
    if best[1] is None:
        raise RuntimeError("the tanh fit did not converge")
    a, log_b, log_c, e = best[1]
    return TanhCurve(
        a=y_mid + y_half * a,
        b=y_half * math.exp(log_b),
        c=math.exp(log_c) / s_half,
        e=s_mid + s_half * e,
    )
