"""The variance-preserving Gaussian process with the warped tangent schedule (pure math).

    z_t = alpha_t z + sigma_t eps,   alpha_t^2 = 1 / (1 + d^2 tan^2(pi t / 2)),
    sigma_t^2 = 1 - alpha_t^2,       log-SNR(t) = -2 log(d tan(pi t / 2)).

Written with the angle phi_t = atan2(d sin(pi t/2), cos(pi t/2)), alpha_t = cos phi_t and
sigma_t = sin phi_t, so that t = 0 and t = 1 are exact and the derivatives stay finite:

    phi'_t = (pi / 2) d / (cos^2(pi t/2) + d^2 sin^2(pi t/2)),
    alpha'_t = -sigma_t phi'_t,   sigma'_t = alpha_t phi'_t.

Noise-to-signal ratio nsr(t) = sigma_t / alpha_t = d tan(pi t / 2) = tan(phi_t). The forward
transition from s to r > s is q(z_r | z_s) = N((alpha_r / alpha_s) z_s, sigma_r^2 -
(alpha_r sigma_s / alpha_s)^2), i.e. a share 1 - nsr(s)^2 / nsr(r)^2 of the noise variance
sigma_r^2 at r is fresh. gamma-sampling (CTM) picks s with nsr(s) = sqrt(1 - gamma^2) nsr(r),
so that this share is gamma^2.

The SDE view (`drift_rate`): dz = -beta_t z / 2 dt + sqrt(beta_t) dW with
beta_t = -d log alpha_t^2 / dt = 2 tan(phi_t) phi'_t. The reverse-time step of ancestral
(DDPM) sampling is the exact posterior q(z_s | z_t, z_0) (`ddpm_posterior`).

The x0-prediction training objective (LaDiff's) is `x0_prediction_loss`.

Every function here that takes the warping `d` also takes a schedule object in its place (the
fitted schedule, processes/fitted_schedule.py: `diffusion.schedule=fitted`), which gives the
angle phi_t (`angle(t)`), its rate phi'_t (`angle_rate(t)`) and the time at an angle
(`time_at_angle(phi)`); alpha_t = cos phi_t and sigma_t = sin phi_t as above, and everything
else follows from them (beta_t = 2 tan(phi_t) phi'_t, log-SNR = -2 log tan(phi_t)).

LADD's Co-LADD latent uses another VP schedule, "sqrt" (`sqrt_alpha_sigma`), with the
authors' clamp of alpha_t^2 into [eps, 1 - eps]:

    alpha_t^2 = (1 - 2 eps) sqrt(1 - t) + eps,   sigma_t^2 = 1 - alpha_t^2,

and deterministic DDIM (eta = 0) steps from t to s < t given an x0-estimate z_hat
(`ddim_step`): z_s = alpha_s z_hat + sigma_s (z_t - alpha_t z_hat) / sigma_t.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _tangent(d) -> bool:
    """True for the tangent schedule's warping d; False for a schedule object (module
    docstring)."""
    return not hasattr(d, "angle_rate")


def _angle(t: torch.Tensor, d: float) -> torch.Tensor:
    if not _tangent(d):
        return d.angle(t)
    x = 0.5 * math.pi * t
    return torch.atan2(d * torch.sin(x), torch.cos(x))


def alpha_sigma(t: torch.Tensor, d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t)."""
    phi = _angle(t, d)
    return torch.cos(phi), torch.sin(phi)


def _angle_rate(t: torch.Tensor, d: float) -> torch.Tensor:
    if not _tangent(d):
        return d.angle_rate(t)
    x = 0.5 * math.pi * t
    return 0.5 * math.pi * d / (torch.cos(x) ** 2 + d**2 * torch.sin(x) ** 2)


def alpha_sigma_derivatives(t: torch.Tensor, d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d alpha_t / dt, d sigma_t / dt)."""
    dphi = _angle_rate(t, d)
    alpha, sigma = alpha_sigma(t, d)
    return -sigma * dphi, alpha * dphi


def drift_rate(t: torch.Tensor, d: float) -> torch.Tensor:
    """beta(t) = -d log alpha_t^2 / dt = 2 tan(phi_t) phi'_t
    = pi d^2 tan(pi t/2) (1 + tan^2(pi t/2)) / (1 + d^2 tan^2(pi t/2)): the rate of the VP
    SDE dz = -beta z / 2 dt + sqrt(beta) dW that has these marginals. Finite for t < 1;
    beta -> infinity as t -> 1 (samplers clip t). A schedule object: 2 tan(phi_t) phi'_t."""
    if not _tangent(d):
        return 2.0 * torch.tan(d.angle(t)) * d.angle_rate(t)
    return 2.0 * d * torch.tan(0.5 * math.pi * t) * _angle_rate(t, d)


def log_snr(t: torch.Tensor, d: float) -> torch.Tensor:
    """log(alpha_t^2 / sigma_t^2) = -2 log(d tan(pi t / 2)) (a schedule: -2 log tan(phi_t))."""
    if not _tangent(d):
        return -2 * torch.log(torch.tan(d.angle(t)))
    return -2 * torch.log(d * torch.tan(0.5 * math.pi * t))


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape + (1,) * (like.dim() - a.dim()))


def diffuse(z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, d: float) -> torch.Tensor:
    """z_t = alpha_t z + sigma_t eps (t of shape (B,))."""
    alpha, sigma = alpha_sigma(t, d)
    return _bcast(alpha, z) * z + _bcast(sigma, z) * eps


def velocity_from_x0(
    z_t: torch.Tensor, z_hat: torch.Tensor, t: torch.Tensor, d: float
) -> torch.Tensor:
    """Probability-flow velocity dz_t/dt = alpha'_t z_hat + sigma'_t eps_hat, with
    eps_hat = (z_t - alpha_t z_hat) / sigma_t."""
    alpha, sigma = alpha_sigma(t, d)
    da, ds = alpha_sigma_derivatives(t, d)
    eps_hat = (z_t - _bcast(alpha, z_t) * z_hat) / _bcast(sigma, z_t)
    return _bcast(da, z_t) * z_hat + _bcast(ds, z_t) * eps_hat


def x0_from_velocity(z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, d: float) -> torch.Tensor:
    """The clean-data estimate implied by a velocity (inverse of velocity_from_x0, affine):
    v = alpha' z + sigma' (z_t - alpha z) / sigma  =>  z = (sigma v - sigma' z_t) /
    (alpha' sigma - sigma' alpha)."""
    alpha, sigma = alpha_sigma(t, d)
    da, ds = alpha_sigma_derivatives(t, d)
    a, s, da, ds = (_bcast(x, z_t) for x in (alpha, sigma, da, ds))
    return (s * v - ds * z_t) / (da * s - ds * a)


def angle_time_grid(steps: int, d: float) -> torch.Tensor:
    """steps + 1 decreasing times evenly spaced in the schedule's angle phi_t (float64):

        phi_{t_i} = (pi / 2) (1 - i / steps),  i.e.  t_i = (2 / pi) atan(tan(phi_{t_i}) / d).

    Each step then turns the same angle between noise and signal (alpha = cos phi). The uniform
    grid in t does not: at d = 10 its last of 5 steps, 0.2 -> 0, turns 81% of the whole angle
    (phi_0.2 = atan(10 tan(0.1 pi)) = 72.9 deg of 90). A schedule object: t_i =
    time_at_angle(phi_{t_i})."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    phi = 0.5 * math.pi * torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if not _tangent(d):
        t = d.time_at_angle(phi)
    else:
        t = 2.0 / math.pi * torch.atan2(torch.sin(phi), d * torch.cos(phi))  # atan(tan(phi)/d)
    t[0], t[-1] = 1.0, 0.0  # cos(pi / 2) is 6e-17, not 0: the end points exactly
    return t


def gamma_jump_time(r: float, gamma: float, d=None) -> float:
    """The time s <= r that gamma-sampling (CTM) jumps to before re-noising back to r:
    nsr(s) = sqrt(1 - gamma^2) nsr(r), i.e. s = (2/pi) atan(sqrt(1 - gamma^2) tan(pi r / 2)).

    d cancels (nsr = d tan(pi t / 2)): the tangent schedule needs no `d` (None or a number).
    A schedule object: phi_s = atan2(sqrt(1 - gamma^2) sin phi_r, cos phi_r), s =
    time_at_angle(phi_s). Written with atan2 so that r = 1 is exact (s = 1 for gamma < 1, s = 0
    for gamma = 1). gamma = 0 gives s = r; gamma = 1 gives s = 0."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if gamma == 0.0:  # exactly r, not r up to rounding: the deterministic jump draws no noise
        return float(r)
    if d is not None and not _tangent(d):
        if gamma == 1.0 or r >= 1.0:  # the end points exactly
            return 0.0 if gamma == 1.0 else 1.0
        phi = d.angle(torch.tensor(float(r), dtype=torch.float64))
        k = math.sqrt(1.0 - gamma**2)
        return float(d.time_at_angle(torch.atan2(k * torch.sin(phi), torch.cos(phi))))
    x = 0.5 * math.pi * r
    return 2.0 / math.pi * math.atan2(math.sqrt(1.0 - gamma**2) * math.sin(x), math.cos(x))


def forward_transition(s: float, r: float, d: float) -> tuple[float, float]:
    """(ratio, std) of the exact VP forward kernel q(z_r | z_s) = N(ratio z_s, std^2), s <= r:
    ratio = alpha_r / alpha_s, std^2 = sigma_r^2 - ratio^2 sigma_s^2."""
    if s > r:
        raise ValueError(f"forward transition needs s <= r, got s={s}, r={r}")
    a_s, sig_s = alpha_sigma(torch.tensor(s, dtype=torch.float64), d)
    a_r, sig_r = alpha_sigma(torch.tensor(r, dtype=torch.float64), d)
    ratio = a_r / a_s
    return float(ratio), float((sig_r**2 - (ratio * sig_s) ** 2).clamp(min=0).sqrt())


def ddpm_posterior(
    z_t: torch.Tensor,
    z_hat: torch.Tensor,
    t: float | torch.Tensor,
    s: float | torch.Tensor,
    d: float,
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(mean, std) of the exact VP posterior q(z_s | z_t, z_0 = z_hat), 0 <= s <= t, t > 0:

        alpha_{t|s} = alpha_t / alpha_s,   sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2,
        mean = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 z_hat,
        var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2.

    s = 0 gives mean z_hat, std 0 exactly. s and t are floats (coefficients in float64; std a
    float) or (B,) tensors (coefficients in their dtype, broadcast over z_t's trailing dims;
    std a tensor)."""
    if isinstance(t, torch.Tensor) or isinstance(s, torch.Tensor):
        tt = torch.as_tensor(t, device=z_t.device)
        ss = torch.as_tensor(s, device=z_t.device)
        c_t, c_hat, std = (_bcast(x, z_t) for x in _posterior_coefficients(tt, ss, d))
    else:
        if not 0.0 <= s <= t or t <= 0.0:
            raise ValueError(f"the posterior needs 0 <= s <= t and t > 0, got s={s}, t={t}")
        coef = _posterior_coefficients(
            torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64), d
        )
        c_t, c_hat, std = (float(x) for x in coef)
    return c_t * z_t + c_hat * z_hat, std


def _posterior_coefficients(
    t: torch.Tensor, s: torch.Tensor, d: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight of z_t, weight of z_hat, std) of ddpm_posterior."""
    a_t, sig_t = alpha_sigma(t, d)
    a_s, sig_s = alpha_sigma(s, d)
    ratio = a_t / a_s
    var_ts = (sig_t**2 - ratio**2 * sig_s**2).clamp(min=0)  # >= 0 up to rounding
    c_t = ratio * sig_s**2 / sig_t**2
    c_hat = a_s * var_ts / sig_t**2
    return c_t, c_hat, (var_ts * sig_s**2 / sig_t**2).sqrt()


def x0_prediction_loss(
    x0_fn: Callable[..., torch.Tensor],
    z: torch.Tensor,
    t_eps: float,
    d: float,
    generator: torch.Generator | None,
    self_condition: bool,
) -> torch.Tensor:
    """The x0-prediction objective of a latent diffusion prior, for clean latents z (B, ...):

        t ~ U[eps, 1 - eps],  eps ~ N(0, I),  z_t = alpha_t z + sigma_t eps,
        z_sc = stopgrad(x0_fn(z_t, t)) if self_condition else None (the network's zero input),
        loss = mean ||x0_fn(z_t, t, z_sc) - z||^2     (mean over batch and coordinates).

    x0_fn(z_t, t, z_sc=None) -> clean-latent prediction. Draws t then eps from `generator`.
    """
    t = t_eps + (1 - 2 * t_eps) * torch.rand(z.shape[0], generator=generator, device=z.device)
    eps = torch.randn(z.shape, generator=generator, device=z.device)
    z_t = diffuse(z, t, eps, d)
    z_sc = None
    if self_condition:
        with torch.no_grad():
            z_sc = x0_fn(z_t, t).detach()
    return ((x0_fn(z_t, t, z_sc) - z) ** 2).mean()


def sqrt_alpha_sigma(
    t: torch.Tensor | float, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the "sqrt" VP schedule (LADD, the authors'
    SqrtContinuousNoiseSampling): alpha_t^2 = (1 - 2 eps) sqrt(1 - t) + eps, sigma_t^2 =
    1 - alpha_t^2. The clamp keeps alpha_t^2 in [eps, 1 - eps], so sigma_t > 0 at t = 0 and
    alpha_t > 0 at t = 1. A float t gives float64 tensors."""
    t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, torch.Tensor) else t
    a2 = (1 - 2 * eps) * torch.sqrt((1 - t).clamp(min=0)) + eps
    return a2.sqrt(), (1 - a2).sqrt()


def ddim_step(
    z_t: torch.Tensor,
    z_hat: torch.Tensor,
    alpha_t: torch.Tensor | float,
    sigma_t: torch.Tensor | float,
    alpha_s: torch.Tensor | float,
    sigma_s: torch.Tensor | float,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from t to s with an x0-estimate z_hat: keep the implied
    noise eps_hat = (z_t - alpha_t z_hat) / sigma_t and re-noise to s,

        z_s = alpha_s z_hat + sigma_s eps_hat.

    Coefficients are floats, 0-d tensors or (B,) tensors (broadcast over z_t's trailing dims).
    With (alpha_s, sigma_s) = (1, 0) it returns z_hat; on the path z_t = alpha_t z0 + sigma_t
    eps with z_hat = z0 it lands on alpha_s z0 + sigma_s eps."""
    a_t, s_t, a_s, s_s = (
        _bcast(c, z_t) if isinstance(c, torch.Tensor) and c.dim() > 0 else c
        for c in (alpha_t, sigma_t, alpha_s, sigma_s)
    )
    return a_s * z_hat + s_s * (z_t - a_t * z_hat) / s_t
