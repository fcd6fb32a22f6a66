"""The fitted time reparameterisation of the VP latent process (`diffusion.schedule=fitted`,
paper App. D.3; the equations below are reconstructed: the paper's text does not give them;
docs/methods/ladiff.md#fitted-schedule).

The decoder's error rate against the std s of Gaussian noise added to its (unit-variance)
latent is fitted by the four-parameter tanh model (processes/tanh_fit.py; `diladiff analyze
robustness` writes the fit),

    err(s) = a + b tanh(c (s - e)),   b > 0, c > 0.

A VP latent z_t = alpha_t z + sigma_t eps is, rescaled by 1 / alpha_t, the latent plus noise of
std s_t = sigma_t / alpha_t = tan(phi_t) (alpha_t = cos phi_t, sigma_t = sin phi_t): the setting
of the robustness curve. The share of the decoder's error rise from the clean latent (s = 0) to
the tanh's upper asymptote a + b (s = infinity: no information left) that noise s has caused is

    rho(s) = (err(s) - err(0)) / (a + b - err(0)) = (tanh(c (s - e)) + tanh(c e)) / (1 + tanh(c e)),

increasing from rho(0) = 0 to rho(inf) = 1 (a and b cancel: only c and e shape the schedule).
The fitted schedule spends time in proportion to that error change, plus a share lambda
(`diffusion.fitted_angle_share`) spread evenly over the angle:

    T(phi) = (1 - lambda) rho(tan phi) + lambda (2 / pi) phi,      phi in [0, pi / 2],
    phi_t  = T^{-1}(t),   alpha_t = cos phi_t,   sigma_t = sin phi_t,
    phi'_t = 1 / T'(phi_t),
    T'(phi) = (1 - lambda) c sech^2(c (tan phi - e)) (1 + tan^2 phi) / (1 + tanh(c e))
              + 2 lambda / pi.

So the decoder's error rate along the schedule is linear in t up to the angle share,

    err(s_t) = err(0) + (a + b - err(0)) (t - lambda (2 / pi) phi_t) / (1 - lambda),

and equivalently the process is the linear-variance VP (sigma^2 = tau, alpha^2 = 1 - tau) run in
the reparameterised time tau(t) = sin^2(phi_t) = s_t^2 / (1 + s_t^2). Why the angle share: with
lambda = 0 the map is err linear in t exactly, but the error saturates at the asymptote (a
steep decoder is useless by s ~ 1) and the last instant of t would have to cover every noise
level from there to pure noise (phi'_t -> infinity at t = 1, an infinite velocity where the
samplers start, and no training time at high noise, where the prior forms the text's global
structure; nor, when the knee lies at large s, at low noise). lambda > 0 bounds the rate,
phi'_t <= pi / (2 lambda), and keeps a share lambda of the time spread over every noise level;
lambda = 1 is the uniform-angle schedule (the tangent schedule with d = 1).

The end points are exact: t = 0 is the clean latent (phi = 0), t = 1 pure noise (phi = pi / 2,
where the error reaches the tanh's upper asymptote; the error is clipped below at err(0), the
clean latent's, not the tanh's lower asymptote a - b, which lies at negative s). alpha_t and
sigma_t are monotone in t.

The noise std of the robustness curve is measured in the decoder's standardised latent (unit
variance per coordinate); the prior's space standardises that latent again (stages/latent.py),
with a std close to 1 (robustness.json's `latent_std`), so s is used as is in prior space.

T^{-1} is computed in float64: a table of T on 2,048 equal angle cells brackets t, then
safeguarded Newton steps (bisection when a step leaves the bracket) converge to rounding, and a
last Newton correction from the detached root makes phi_t differentiable in t with the exact
derivative 1 / T'(phi_t) (also under torch.func.jvp, which MeanFlow's loss uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diladiff.processes.tanh_fit import TanhCurve

TABLE_CELLS = 2048
MAX_NEWTON = 60
NEWTON_TOL = 1e-14  # |T(phi) - t| at which the root is taken (then one more correction)
# The smallest share (1 + tanh(c e)) / 2 of the tanh's rise that must lie at s > 0.
MIN_RISE_SHARE = 1e-6


@dataclass(frozen=True)
class FittedSchedule:
    """The fitted VP schedule (module docstring): the tanh fit (a, b, c, e) of the decoder's
    error rate and the angle share lambda. Passed wherever processes.gaussian takes `d`."""

    a: float
    b: float
    c: float
    e: float
    angle_share: float = 0.1
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        values = (self.a, self.b, self.c, self.e, self.angle_share)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"the tanh fit and angle share must be finite, got {values}")
        if self.b <= 0 or self.c <= 0:
            raise ValueError(
                f"the tanh fit must rise with the noise (b > 0 and c > 0), got b={self.b:g}, "
                f"c={self.c:g}"
            )
        if not 0.0 < self.angle_share <= 1.0:
            raise ValueError(f"the angle share must be in (0, 1], got {self.angle_share:g}")
        if self.rise_share() < MIN_RISE_SHARE:
            raise ValueError(
                f"the fitted error rate is already at its maximum for the clean latent "
                f"(c*e = {self.c * self.e:.3g}): no error rise left to reparameterise"
            )

    @property
    def curve(self) -> TanhCurve:
        """err(s), the fitted error rate."""
        return TanhCurve(self.a, self.b, self.c, self.e)

    def rise_share(self) -> float:
        """(1 + tanh(c e)) / 2: the share of the tanh's rise that lies at s > 0 (stable)."""
        return 1.0 / (1.0 + math.exp(min(-2.0 * self.c * self.e, 700.0)))

    # ------------------------------------------------------------------ the map phi -> t
    def normalised_error(self, s: torch.Tensor) -> torch.Tensor:
        """rho(s) = (err(s) - err(0)) / (a + b - err(0)), in [0, 1] for s >= 0."""
        return (torch.tanh(self.c * (s - self.e)) + math.tanh(self.c * self.e)) / (
            2.0 * self.rise_share()
        )

    def time_at_angle(self, phi: torch.Tensor) -> torch.Tensor:
        """T(phi) = (1 - lambda) rho(tan phi) + lambda (2 / pi) phi (phi in [0, pi / 2])."""
        lam = self.angle_share
        return (1 - lam) * self.normalised_error(torch.tan(phi)) + lam * (2 / math.pi) * phi

    def time_rate(self, phi: torch.Tensor) -> torch.Tensor:
        """T'(phi) >= 2 lambda / pi (finite at phi = pi / 2: sech^2 underflows to 0 first)."""
        lam, s = self.angle_share, torch.tan(phi)
        rho_rate = self.c / (2.0 * self.rise_share()) / torch.cosh(self.c * (s - self.e)) ** 2
        return (1 - lam) * rho_rate * (1 + s**2) + lam * 2 / math.pi

    # ------------------------------------------------------------------ the schedule t -> phi
    def _table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._tables:
            phi = torch.linspace(0, math.pi / 2, TABLE_CELLS + 1, dtype=torch.float64)
            t = self.time_at_angle(phi)
            t[0], t[-1] = 0.0, 1.0
            self._tables[key] = (phi.to(device), t.to(device))
        return self._tables[key]

    def _root(self, t: torch.Tensor) -> torch.Tensor:
        """phi with T(phi) = t (float64, no gradient), t clamped into [0, 1]."""
        t = t.detach().to(torch.float64).clamp(0.0, 1.0)
        phis, times = self._table(t.device)
        k = torch.searchsorted(times, t).clamp(1, TABLE_CELLS)
        lo, hi = phis[k - 1], phis[k]
        t_lo, t_hi = times[k - 1], times[k]
        phi = lo + (hi - lo) * ((t - t_lo) / (t_hi - t_lo)).clamp(0.0, 1.0)
        for _ in range(MAX_NEWTON):
            f = self.time_at_angle(phi) - t
            if not bool((f.abs() > NEWTON_TOL).any()):
                break
            lo = torch.where(f < 0, phi, lo)
            hi = torch.where(f > 0, phi, hi)
            step = phi - f / self.time_rate(phi)
            inside = (step > lo) & (step < hi)
            phi = torch.where(f == 0, phi, torch.where(inside, step, 0.5 * (lo + hi)))
        phi = torch.where(t <= 0, torch.zeros_like(phi), phi)
        return torch.where(t >= 1, torch.full_like(phi, math.pi / 2), phi)

    def _angle64(self, t: torch.Tensor) -> torch.Tensor:
        phi0 = self._root(t)
        t64 = t.to(torch.float64)
        # one Newton correction from the detached root: the value stays phi0 (up to rounding),
        # the derivative in t is 1 / T'(phi0), exact, for autograd and forward-mode AD
        phi = phi0 + (t64 - self.time_at_angle(phi0)) / self.time_rate(phi0)
        # the end points exactly (shifting the value only, so the derivative is kept)
        end = torch.where(t64 <= 0, 0.0, torch.where(t64 >= 1, math.pi / 2, phi.detach()))
        return (phi + (end - phi.detach())).clamp(0.0, math.pi / 2)

    def angle(self, t: torch.Tensor) -> torch.Tensor:
        """phi_t = T^{-1}(t), in t's dtype (alpha_t = cos phi_t, sigma_t = sin phi_t)."""
        return self._angle64(t).to(t.dtype)

    def angle_rate(self, t: torch.Tensor) -> torch.Tensor:
        """phi'_t = 1 / T'(phi_t), in t's dtype (<= pi / (2 lambda))."""
        return (1.0 / self.time_rate(self._angle64(t))).to(t.dtype)

    def noise_to_signal(self, t: torch.Tensor) -> torch.Tensor:
        """s_t = sigma_t / alpha_t = tan(phi_t)."""
        return torch.tan(self._angle64(t)).to(t.dtype)


def parse_tanh(text: str) -> tuple[float, float, float, float]:
    """(a, b, c, e) from "a,b,c,e" (commas or spaces; robustness.json's tanh_fit, in order)."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ValueError(f"expected four numbers a,b,c,e, got {text!r}")
    return values
