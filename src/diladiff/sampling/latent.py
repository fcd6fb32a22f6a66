"""Latent samplers: the probability-flow ODE of the VP tangent schedule (LaDiff) and the
MeanFlow average-velocity sampler (DiLaDiff).

Every sampler in LATENT_SAMPLERS has one signature,

    sampler(model, shape, settings: LatentSettings, generator, device) -> (z, network calls)

and draws prior-space latents z of `shape` from z_1 ~ N(0, I). `model` is a latent stage; a
sampler names what it calls on it (the ODE: `model.x0(z_t, t, z_sc)`; MeanFlow:
`model.self_conditioned_u(z_t, t, r)`) and the schedule it integrates (`model.cfg.diffusion.d`).
`sample_latent(stage, batch, settings, ...)` dispatches on `settings.sampler`; a new sampler is
one function registered with `@register_latent_sampler(NAME)`, selected with
`sample.latent_sampler=NAME`. The algorithms themselves (euler_ode_sample, meanflow_sample)
take plain functions, so they also run on exact denoisers (check/parallel_decoding.py).

Euler on the PF-ODE, t_0 = 1 > t_1 > ... > t_N = 0 uniform:

    z_hat_i = z_psi(z_{t_i}, t_i, z_sc_i)     (z_sc_0 = 0, then z_sc_{i+1} = z_hat_i)
    z_{t_{i+1}} = z_{t_i} + (t_{i+1} - t_i) * v(z_{t_i}, z_hat_i, t_i)

MeanFlow, with the average velocity u over [r, t] and gamma-sampling (CTM): jump to the time s
with nsr(s) = sqrt(1 - gamma^2) nsr(r) (nsr = sigma / alpha; processes.gaussian.gamma_jump_time),
then re-noise from s to r with the exact VP forward transition q(z_r | z_s):

    z_s = z_t - (t - s) u(z_t, t, s)
    z_r = (alpha_r / alpha_s) z_s + sqrt(sigma_r^2 - (alpha_r sigma_s / alpha_s)^2) n,  n ~ N(0, I)

so that a share gamma^2 of the noise variance sigma_r^2 at r is fresh. gamma = 0 is the
deterministic jump z_r = z_t - (t - r) u(z_t, t, r); gamma = 1 jumps to clean data (s = 0) and
re-noises it to r.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diladiff.config import ConfigError
from diladiff.processes.gaussian import forward_transition, gamma_jump_time, velocity_from_x0
from diladiff.registry import registrar

LATENT_SAMPLERS: dict[str, Callable] = {}
register_latent_sampler = registrar(LATENT_SAMPLERS)


@dataclass(frozen=True)
class LatentSettings:
    """How a latent stage draws its latent (from the sample.* config: sampling.generate)."""

    sampler: str  # a name in LATENT_SAMPLERS
    steps: int  # N_cont
    gamma: float = 0.0  # gamma-sampling of MeanFlow jumps

    def __post_init__(self):
        if self.sampler not in LATENT_SAMPLERS:
            raise ConfigError(
                f"unknown latent sampler {self.sampler!r}; choose one of {sorted(LATENT_SAMPLERS)}"
            )
        if self.steps < 1:
            raise ConfigError(f"cont_steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma must be in [0, 1], got {self.gamma}")


@torch.no_grad()
def sample_latent(stage, batch: int, settings: LatentSettings, generator, device):
    """(z, network calls): `batch` prior-space latents of a latent stage."""
    shape = (batch, *stage.latent_shape)
    return LATENT_SAMPLERS[settings.sampler](stage, shape, settings, generator, device)


@register_latent_sampler("ode_euler")
def ode_euler(model, shape, settings: LatentSettings, generator, device):
    """Euler on the probability-flow ODE with the model's self-conditioned x0-prediction;
    one network call per step."""
    if settings.gamma:
        raise ConfigError("gamma-sampling applies to the meanflow sampler, not ode_euler")
    d = model.cfg.diffusion.d
    return euler_ode_sample(model.x0, shape, settings.steps, d, generator, device)


@register_latent_sampler("meanflow")
def meanflow(model, shape, settings: LatentSettings, generator, device):
    """MeanFlow jumps of the model's average velocity with gamma-sampling; two network calls
    per step (the self-conditioning pass, then the jump)."""
    d = model.cfg.diffusion.d
    z, calls = meanflow_sample(
        model.self_conditioned_u, shape, settings.steps, d, generator, device, settings.gamma
    )
    return z, 2 * calls


@torch.no_grad()
def euler_ode_sample(
    x0_fn: Callable,
    shape: tuple[int, ...],
    steps: int,
    d: float,
    generator: torch.Generator | None,
    device="cpu",
    self_condition: bool = True,
    dtype=torch.float32,
) -> tuple[torch.Tensor, int]:
    """z_0 from z_1 ~ N(0, I) by `steps` Euler steps of the PF-ODE; returns (z_0, network calls).
    x0_fn(z_t, t, z_sc) -> z_hat, t of shape (B,)."""
    if steps < 1:
        raise ValueError(f"cont_steps must be >= 1, got {steps}")
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    z_sc = torch.zeros_like(z)
    grid = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    for i in range(steps):
        t = grid[i].expand(shape[0]).to(dtype)
        z_hat = x0_fn(z, t, z_sc if self_condition else None).to(dtype)
        v = velocity_from_x0(z, z_hat, t, d)
        z = z + float(grid[i + 1] - grid[i]) * v
        z_sc = z_hat
    return z, steps


@torch.no_grad()
def meanflow_sample(
    u_fn: Callable,
    shape: tuple[int, ...],
    steps: int,
    d: float,
    generator: torch.Generator | None,
    device="cpu",
    gamma: float = 0.0,
    dtype=torch.float32,
) -> tuple[torch.Tensor, int]:
    """z_0 from z_1 ~ N(0, I) in `steps` average-velocity jumps; u_fn(z_t, t, r) -> u.
    Returns (z_0, number of u_fn calls)."""
    if steps < 1:
        raise ValueError(f"cont_steps must be >= 1, got {steps}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for t, r in zip(grid[:-1], grid[1:], strict=True):
        z = meanflow_step(u_fn, z, t, r, d, gamma, generator)
    return z, steps


def meanflow_step(
    u_fn: Callable,
    z: torch.Tensor,
    t: float,
    r: float,
    d: float,
    gamma: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One gamma-sampling step from t to r < t: the jump to s = gamma_jump_time(r, gamma), then
    the forward transition s -> r (skipped when s = r)."""
    s = gamma_jump_time(r, gamma)
    b = z.shape[0]
    tt = torch.full((b,), t, device=z.device, dtype=z.dtype)
    ss = torch.full((b,), s, device=z.device, dtype=z.dtype)
    z = z - (t - s) * u_fn(z, tt, ss).to(z.dtype)
    if s < r:
        ratio, std = forward_transition(s, r, d)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = ratio * z + std * noise
    return z
