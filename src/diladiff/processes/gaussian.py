"""The variance-preserving Gaussian process with the warped tangent schedule (pure math).

    z_t = alpha_t z + sigma_t eps,   alpha_t^2 = 1 / (1 + d^2 tan^2(pi t / 2)),
    sigma_t^2 = 1 - alpha_t^2,       log-SNR(t) = -2 log(d tan(pi t / 2)).

Written with the angle phi_t = atan2(d sin(pi t/2), cos(pi t/2)), alpha_t = cos phi_t and
sigma_t = sin phi_t, so that t = 0 and t = 1 are exact and the derivatives stay finite:

    phi'_t = (pi / 2) d / (cos^2(pi t/2) + d^2 sin^2(pi t/2)),
    alpha'_t = -sigma_t phi'_t,   sigma'_t = alpha_t phi'_t.
"""

from __future__ import annotations

import math

import torch


def _angle(t: torch.Tensor, d: float) -> torch.Tensor:
    x = 0.5 * math.pi * t
    return torch.atan2(d * torch.sin(x), torch.cos(x))


def alpha_sigma(t: torch.Tensor, d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t)."""
    phi = _angle(t, d)
    return torch.cos(phi), torch.sin(phi)


def alpha_sigma_derivatives(t: torch.Tensor, d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d alpha_t / dt, d sigma_t / dt)."""
    x = 0.5 * math.pi * t
    dphi = 0.5 * math.pi * d / (torch.cos(x) ** 2 + d**2 * torch.sin(x) ** 2)
    alpha, sigma = alpha_sigma(t, d)
    return -sigma * dphi, alpha * dphi


def log_snr(t: torch.Tensor, d: float) -> torch.Tensor:
    """log(alpha_t^2 / sigma_t^2) = -2 log(d tan(pi t / 2))."""
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
