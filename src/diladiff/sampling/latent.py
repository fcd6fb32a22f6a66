"""Latent samplers: the probability-flow ODE of the VP tangent schedule (LaDiff), the
MeanFlow average-velocity sampler (DiLaDiff), and the reverse SDE and ancestral (DDPM) samplers
(LDLM).

Every sampler in LATENT_SAMPLERS has one signature,

    sampler(model, shape, settings: LatentSettings, generator, device, on_step=None)
        -> (z, network calls)

and draws prior-space latents z of `shape` from z_1 ~ N(0, I). `on_step(i, z)`, when given, is
called after each step i = 1..N with the latent the sampler holds then (after the last step:
the one it returns); it only observes (`diladiff serve` shows the steps), the draws are the
same. A registered sampler without the argument still works: `sample_latent` then reports its
result once, as step N.

`model` is a latent stage; a sampler names what it calls on it (the ODE, SDE and DDPM samplers:
`model.x0(z_t, t, z_sc)`; MeanFlow: `model.self_conditioned_u(z_t, t, r)`) and the schedule it
integrates (`model.cfg.diffusion`: the warping d of the tangent schedule, or the fitted
schedule; stages.latent.vp_schedule). The time grid t_0 = 1 > t_1 > ... > t_N = 0 is uniform
unless the model has `time_grid(N)` (N + 1 decreasing times; LDLM's adaptive timestep sampler
warps it: equal steps in its t = F(u)). `sample_latent(stage, batch, settings, ...)` dispatches
on `settings.sampler`; a new sampler is one function registered with
`@register_latent_sampler(NAME)`, selected with `sample.latent_sampler=NAME`. The algorithms
themselves (euler_ode_sample, meanflow_sample, euler_maruyama_sample, ddpm_sample) take plain
functions and an optional grid, so they also run on exact denoisers (check/parallel_decoding.py).

Euler on the PF-ODE:

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

Heun (2nd order, one Euler predictor and a trapezoidal corrector per step; the last step, to
t = 0 where the velocity is undefined (sigma = 0), is Euler, as in EDM): two network calls per
step but the last,

    v_i = v(z_{t_i}, z_hat_i, t_i),   z' = z_{t_i} + (t_{i+1} - t_i) v_i,
    z_{t_{i+1}} = z_{t_i} + (t_{i+1} - t_i) (v_i + v(z', z_psi(z', t_{i+1}, z_hat_i), t_{i+1})) / 2.

DPM-Solver++(2M) (Lu et al. 2022), multistep in the data prediction with lambda = log(alpha /
sigma), h_i = lambda_{t_{i+1}} - lambda_{t_i}, r_i = h_{i-1} / h_i, one call per step:

    D_i = (1 + 1 / (2 r_i)) z_hat_i - z_hat_{i-1} / (2 r_i)   (D_0 = z_hat_0; D = z_hat at
          the last step, and after an infinite h, i.e. from t = 1),
    z_{t_{i+1}} = (sigma_{t_{i+1}} / sigma_{t_i}) z_{t_i} - alpha_{t_{i+1}} (e^{-h_i} - 1) D_i,

which at t_N = 0 (sigma = 0, h = infinity) returns D = z_hat_{N-1}.

Euler-Maruyama on the reverse VP SDE (LDLM, docs/methods/ldlm.md#sampler), with the
x0-prediction's score, Delta_i = t_i - t_{i+1} and xi_i ~ N(0, I):

    z_hat_i = z_psi(z_{t_i}, t_i, z_sc_i)     (self-conditioned as above)
    score_i = -(z_{t_i} - alpha_{t_i} z_hat_i) / sigma_{t_i}^2,   b_i = beta(min(t_i, 0.95))
    z_{t_{i+1}} = z_{t_i} + Delta_i (b_i z_{t_i} / 2 + b_i score_i) + sqrt(b_i Delta_i) xi_i

(beta = processes.gaussian.drift_rate, clipped because beta(1) is infinite). Near t = 1
(alpha ~ 0, sigma ~ 1) one such step maps z ~ N(0, I) to (1 - b Delta / 2) z + sqrt(b Delta) xi,
of variance 1 + (b Delta)^2 / 4: past b Delta = 2 the drift flips z's sign and the variance
grows with the square of the step (LDLM's adaptive grid opens with a step of about 0.3 at
N = 32: b Delta ~ 12, z times -5). So a step with b_i Delta_i > 2 is taken as
m_i = ceil(b_i Delta_i / 2) equal sub-steps of the same formula, each with its own time's
alpha, sigma and b and its own xi, around the one prediction z_hat_i (no extra network call).
z's factor in a (sub-)step is 1 + b delta (1/2 - 1/sigma^2): where sigma ~ 1 it is
1 - b delta / 2, now in [0, 1]; towards t = 0, b / sigma^2 ~ 2 / t and delta <= t keep it in
[-1, 1] anyway. A grid with b_i Delta_i <= 2 everywhere (uniform from N = 21 up) gets the plain
step, draw for draw.
Ancestral (DDPM):
z_{t_{i+1}} ~ q(z_{t_{i+1}} | z_{t_i}, z_0 = z_hat_i), the exact VP posterior
(processes.gaussian.ddpm_posterior; no beta blow-up near t = 1). Both return the last
prediction z_hat_{N-1} (so the last step's update, which would only re-mix it with noise-free
terms, is skipped; for DDPM with t_N = 0 it is z_hat_{N-1} exactly).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diladiff.config import ConfigError
from diladiff.processes.gaussian import (
    alpha_sigma,
    angle_time_grid,
    ddpm_posterior,
    drift_rate,
    forward_transition,
    gamma_jump_time,
    velocity_from_x0,
)
from diladiff.registry import registrar
from diladiff.stages.latent import vp_schedule
from diladiff.stages.protocols import OwnTimeGrid

LATENT_SAMPLERS: dict[str, Callable] = {}
register_latent_sampler = registrar(LATENT_SAMPLERS)
# An optional observer of the sampling steps: on_step(step, z) (module docstring).
OnStep = Callable[[int, torch.Tensor], None] | None

# beta(t) is evaluated at min(t, SDE_BETA_CLIP): beta(1) is infinite (a value read from public
# code; docs/methods/ldlm.md#configuration).
SDE_BETA_CLIP = 0.95
# The largest beta * Delta of one Euler-Maruyama (sub-)step (module docstring).
SDE_MAX_BETA_STEP = 2.0


@dataclass(frozen=True)
class LatentSettings:
    """How a latent stage draws its latent (from the sample.* config: sampling.generate)."""

    sampler: str  # a name in LATENT_SAMPLERS
    steps: int  # N_cont
    gamma: float = 0.0  # gamma-sampling of MeanFlow jumps
    grid: str = ""  # sample.time_grid: "" (the model's), "uniform" or "angle"

    def __post_init__(self):
        if self.sampler not in LATENT_SAMPLERS:
            raise ConfigError(
                f"unknown latent sampler {self.sampler!r}; choose one of {sorted(LATENT_SAMPLERS)}"
            )
        if self.steps < 1:
            raise ConfigError(f"cont_steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.grid and self.grid not in TIME_GRIDS:
            raise ConfigError(f"sample.time_grid must be one of {TIME_GRIDS} or empty")


@torch.no_grad()
def sample_latent(
    stage, batch: int, settings: LatentSettings, generator, device, on_step: OnStep = None
):
    """(z, network calls): `batch` prior-space latents of a latent stage; `on_step(i, z)` after
    each step (module docstring)."""
    shape = (batch, *stage.latent_shape)
    sampler = LATENT_SAMPLERS[settings.sampler]
    if on_step is None:
        return sampler(stage, shape, settings, generator, device)
    if "on_step" in inspect.signature(sampler).parameters:
        return sampler(stage, shape, settings, generator, device, on_step=on_step)
    z, calls = sampler(stage, shape, settings, generator, device)  # a plug-in without the hook
    on_step(settings.steps, z)
    return z, calls


TIME_GRIDS = ("uniform", "angle")


def model_time_grid(model, steps: int, name: str = "") -> torch.Tensor | None:
    """The sampling grid: `name` ("uniform" in t, or "angle": processes.gaussian.
    angle_time_grid) when given (sample.time_grid), else `model.time_grid(steps)` when the
    model defines one (DiLaDiff, LDLM's adaptive timestep sampler), else None: uniform."""
    if name == "angle":
        return angle_time_grid(steps, vp_schedule(model.cfg.diffusion))
    if name == "uniform":
        return None
    return model.time_grid(steps) if isinstance(model, OwnTimeGrid) else None


def _without_gamma(settings: LatentSettings, name: str) -> None:
    if settings.gamma:
        raise ConfigError(f"gamma-sampling applies to the meanflow sampler, not {name}")


@register_latent_sampler("ode_euler")
def ode_euler(model, shape, settings: LatentSettings, generator, device, on_step=None):
    """Euler on the probability-flow ODE with the model's self-conditioned x0-prediction;
    one network call per step."""
    _without_gamma(settings, "ode_euler")
    d = vp_schedule(model.cfg.diffusion)
    grid = model_time_grid(model, settings.steps, settings.grid)
    return euler_ode_sample(
        model.x0, shape, settings.steps, d, generator, device, grid=grid, on_step=on_step
    )


@register_latent_sampler("meanflow")
def meanflow(model, shape, settings: LatentSettings, generator, device, on_step=None):
    """MeanFlow jumps of the model's average velocity with gamma-sampling; two network calls
    per step (the self-conditioning pass, then the jump)."""
    d = vp_schedule(model.cfg.diffusion)
    z, calls = meanflow_sample(
        model.self_conditioned_u,
        shape,
        settings.steps,
        d,
        generator,
        device,
        settings.gamma,
        grid=model_time_grid(model, settings.steps, settings.grid),
        on_step=on_step,
    )
    return z, 2 * calls


@register_latent_sampler("heun")
def heun(model, shape, settings: LatentSettings, generator, device, on_step=None):
    """Heun's method on the probability-flow ODE (Euler for the last step); 2N - 1 calls."""
    _without_gamma(settings, "heun")
    d = vp_schedule(model.cfg.diffusion)
    grid = model_time_grid(model, settings.steps, settings.grid)
    return heun_ode_sample(
        model.x0, shape, settings.steps, d, generator, device, grid=grid, on_step=on_step
    )


@register_latent_sampler("dpm_solver_2m")
def dpm_solver_2m(model, shape, settings: LatentSettings, generator, device, on_step=None):
    """DPM-Solver++(2M) on the probability-flow ODE; one call per step."""
    _without_gamma(settings, "dpm_solver_2m")
    d = vp_schedule(model.cfg.diffusion)
    grid = model_time_grid(model, settings.steps, settings.grid)
    return dpm_solver_2m_sample(
        model.x0, shape, settings.steps, d, generator, device, grid=grid, on_step=on_step
    )


@register_latent_sampler("sde_euler")
def sde_euler(model, shape, settings: LatentSettings, generator, device, on_step=None):
    """Euler-Maruyama on the reverse VP SDE with the model's self-conditioned x0-prediction;
    one network call per step. Returns the last x0-prediction."""
    _without_gamma(settings, "sde_euler")
    d = vp_schedule(model.cfg.diffusion)
    grid = model_time_grid(model, settings.steps, settings.grid)
    return euler_maruyama_sample(
        model.x0, shape, settings.steps, d, generator, device, grid, on_step=on_step
    )


@register_latent_sampler("ddpm")
def ddpm(model, shape, settings: LatentSettings, generator, device, on_step=None):
    """Ancestral sampling with the exact VP posterior around the model's self-conditioned
    x0-prediction; one network call per step. Returns the last x0-prediction."""
    _without_gamma(settings, "ddpm")
    d = vp_schedule(model.cfg.diffusion)
    grid = model_time_grid(model, settings.steps, settings.grid)
    return ddpm_sample(model.x0, shape, settings.steps, d, generator, device, grid, on_step=on_step)


def time_grid(steps: int, grid=None, device="cpu") -> torch.Tensor:
    """The float64 grid t_0 > ... > t_steps in [0, 1]: uniform from 1 to 0 when `grid` is None,
    else `grid` (any sequence of steps + 1 strictly decreasing times) checked."""
    if grid is None:
        return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    if g.shape != (steps + 1,):
        raise ValueError(f"a grid for {steps} steps has {steps + 1} times, got {tuple(g.shape)}")
    if not ((g.diff() < 0).all() and g[0] <= 1 and g[-1] >= 0):
        raise ValueError("a time grid must decrease strictly within [0, 1]")
    return g.to(device)


def _ode_start(steps, grid, shape, generator, device, dtype):
    """What the ODE samplers start from: the checked time grid and z_1 ~ N(0, I)."""
    if steps < 1:
        raise ValueError(f"cont_steps must be >= 1, got {steps}")
    grid = time_grid(steps, grid, device)
    return grid, torch.randn(shape, generator=generator, device=device, dtype=dtype)


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
    grid=None,
    on_step: OnStep = None,
) -> tuple[torch.Tensor, int]:
    """z_0 from z_1 ~ N(0, I) by `steps` Euler steps of the PF-ODE; returns (z_0, network calls).
    x0_fn(z_t, t, z_sc) -> z_hat, t of shape (B,). `grid`: steps + 1 decreasing times (default
    uniform 1 -> 0); on_step(i, z) after each step (module docstring)."""
    grid, z = _ode_start(steps, grid, shape, generator, device, dtype)
    z_sc = torch.zeros_like(z)
    for i in range(steps):
        t = grid[i].expand(shape[0]).to(dtype)
        z_hat = x0_fn(z, t, z_sc if self_condition else None).to(dtype)
        v = velocity_from_x0(z, z_hat, t, d)
        z = z + float(grid[i + 1] - grid[i]) * v
        z_sc = z_hat
        if on_step is not None:
            on_step(i + 1, z)
    return z, steps


@torch.no_grad()
def heun_ode_sample(
    x0_fn: Callable,
    shape: tuple[int, ...],
    steps: int,
    d: float,
    generator: torch.Generator | None,
    device="cpu",
    self_condition: bool = True,
    dtype=torch.float32,
    grid=None,
    on_step: OnStep = None,
) -> tuple[torch.Tensor, int]:
    """z_0 from z_1 ~ N(0, I) by `steps` Heun steps of the PF-ODE (module docstring); returns
    (z_0, network calls). Arguments as euler_ode_sample's."""
    grid, z = _ode_start(steps, grid, shape, generator, device, dtype)
    z_sc, calls = torch.zeros_like(z), 0

    def predict(z_t, t, sc):
        tt = t.expand(shape[0]).to(dtype)
        return tt, x0_fn(z_t, tt, sc if self_condition else None).to(dtype)

    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        tt, z_hat = predict(z, t, z_sc)
        v = velocity_from_x0(z, z_hat, tt, d)
        z_euler, z_sc, calls = z + float(s - t) * v, z_hat, calls + 1
        if s <= 0:  # the velocity at t = 0 divides by sigma_0 = 0
            z = z_euler
        else:
            ss, z_hat2 = predict(z_euler, s, z_hat)
            z = z + float(s - t) * 0.5 * (v + velocity_from_x0(z_euler, z_hat2, ss, d))
            z_sc, calls = z_hat2, calls + 1
        if on_step is not None:
            on_step(i + 1, z)
        if s <= 0:
            break
    return z, calls


@torch.no_grad()
def dpm_solver_2m_sample(
    x0_fn: Callable,
    shape: tuple[int, ...],
    steps: int,
    d: float,
    generator: torch.Generator | None,
    device="cpu",
    self_condition: bool = True,
    dtype=torch.float32,
    grid=None,
    on_step: OnStep = None,
) -> tuple[torch.Tensor, int]:
    """z_0 from z_1 ~ N(0, I) by `steps` DPM-Solver++(2M) steps (module docstring); returns
    (z_0, network calls). Arguments as euler_ode_sample's."""
    grid, z = _ode_start(steps, grid, shape, generator, device, dtype)
    alpha, sigma = (x.tolist() for x in alpha_sigma(grid.double().cpu(), d))
    lam = [
        math.log(a / s) if a > 0 and s > 0 else (math.inf if s == 0 else -math.inf)
        for a, s in zip(alpha, sigma, strict=True)
    ]
    z_sc = torch.zeros_like(z)
    previous, h_previous = None, math.inf
    for i in range(steps):
        tt = grid[i].expand(shape[0]).to(dtype)
        z_hat = x0_fn(z, tt, z_sc if self_condition else None).to(dtype)
        h = lam[i + 1] - lam[i]
        if previous is None or not math.isfinite(h) or not math.isfinite(h_previous):
            data = z_hat  # first order: the first step, the step from t = 1, the last step
        else:
            r = h_previous / h
            data = (1 + 0.5 / r) * z_hat - (0.5 / r) * previous
        z = (sigma[i + 1] / sigma[i]) * z - alpha[i + 1] * math.expm1(-h) * data
        previous, h_previous, z_sc = z_hat, h, z_hat
        if on_step is not None:
            on_step(i + 1, z)
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
    grid=None,
    on_step: OnStep = None,
) -> tuple[torch.Tensor, int]:
    """z_0 from z_1 ~ N(0, I) in `steps` average-velocity jumps; u_fn(z_t, t, r) -> u.
    Returns (z_0, number of u_fn calls). `grid`: steps + 1 decreasing times (default uniform
    1 -> 0); on_step(i, z) after each step (module docstring)."""
    if steps < 1:
        raise ValueError(f"cont_steps must be >= 1, got {steps}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    times = time_grid(steps, grid).tolist()
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    for i, (t, r) in enumerate(zip(times[:-1], times[1:], strict=True)):
        z = meanflow_step(u_fn, z, t, r, d, gamma, generator)
        if on_step is not None:
            on_step(i + 1, z)
    return z, steps


@torch.no_grad()
def euler_maruyama_sample(
    x0_fn: Callable,
    shape: tuple[int, ...],
    steps: int,
    d: float,
    generator: torch.Generator | None,
    device="cpu",
    grid=None,
    self_condition: bool = True,
    dtype=torch.float32,
    beta_clip: float = SDE_BETA_CLIP,
    on_step: OnStep = None,
) -> tuple[torch.Tensor, int]:
    """The last x0-prediction of `steps` Euler-Maruyama steps of the reverse VP SDE from
    z_1 ~ N(0, I) (module docstring); returns (z_hat, network calls). x0_fn(z_t, t, z_sc) ->
    z_hat, t of shape (B,); beta is evaluated at min(t, beta_clip). `grid`: steps + 1
    decreasing times (default uniform 1 -> 0). A step with beta * Delta above
    SDE_MAX_BETA_STEP is split into sub-steps around its one prediction (module docstring)."""

    def step(z, z_hat, t, s):
        beta = max(_clipped_beta(t, d, beta_clip), _clipped_beta(s, d, beta_clip))
        m = em_substeps(beta, t - s)
        times = [t - j * (t - s) / m for j in range(m)] + [s]
        for a, b in zip(times[:-2], times[1:-1], strict=True):  # all but the last sub-step
            mean, std = em_step(z, z_hat, a, b, d, beta_clip)
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = mean + std * noise
        return em_step(z, z_hat, times[-2], s, d, beta_clip)  # its noise: _x0_chain's draw

    return _x0_chain(
        x0_fn, shape, steps, grid, generator, device, dtype, self_condition, step, on_step
    )


def _clipped_beta(t: float, d, beta_clip: float) -> float:
    return float(drift_rate(torch.tensor(min(t, beta_clip), dtype=torch.float64), d))


def em_substeps(beta: float, delta: float, max_beta_step: float = SDE_MAX_BETA_STEP) -> int:
    """m = max(1, ceil(beta Delta / max_beta_step)): the equal sub-steps of an Euler-Maruyama
    step of length Delta whose (clipped) beta is at most `beta` (the larger at its two ends:
    beta is monotone in t on the tangent schedule), so that every sub-step has
    beta delta <= max_beta_step."""
    return max(1, math.ceil(beta * delta / max_beta_step))


def em_step(z: torch.Tensor, z_hat: torch.Tensor, t: float, s: float, d, beta_clip: float):
    """(mean, std) of one Euler-Maruyama step t -> s of the reverse VP SDE with the
    x0-prediction's score: b = beta(min(t, beta_clip)), score = -(z - alpha_t z_hat) / sigma_t^2,
    mean = z + (t - s) (b z / 2 + b score), std = sqrt(b (t - s))."""
    alpha, sigma = (float(x) for x in alpha_sigma(torch.tensor(t, dtype=torch.float64), d))
    beta = _clipped_beta(t, d, beta_clip)
    score = -(z - alpha * z_hat) / sigma**2
    return z + (t - s) * (0.5 * beta * z + beta * score), (beta * (t - s)) ** 0.5


@torch.no_grad()
def ddpm_sample(
    x0_fn: Callable,
    shape: tuple[int, ...],
    steps: int,
    d: float,
    generator: torch.Generator | None,
    device="cpu",
    grid=None,
    self_condition: bool = True,
    dtype=torch.float32,
    on_step: OnStep = None,
) -> tuple[torch.Tensor, int]:
    """The last x0-prediction of `steps` ancestral steps z_{t_{i+1}} ~ q(. | z_{t_i},
    z_0 = z_hat_i) from z_1 ~ N(0, I); returns (z_hat, network calls). x0_fn as in
    euler_maruyama_sample; `grid`: steps + 1 decreasing times (default uniform 1 -> 0)."""

    def step(z, z_hat, t, s):
        return ddpm_posterior(z, z_hat, t, s, d)

    return _x0_chain(
        x0_fn, shape, steps, grid, generator, device, dtype, self_condition, step, on_step
    )


def _x0_chain(
    x0_fn, shape, steps, grid, generator, device, dtype, self_condition, step, on_step=None
):
    """The loop the stochastic samplers share: from z_1 ~ N(0, I), at each time t_i the
    self-conditioned prediction z_hat_i, then z <- mean + std * noise with (mean, std) =
    step(z, z_hat_i, t_i, t_{i+1}); returns (the last z_hat, network calls). on_step(i, z)
    after each step: the new z, and after the last step the z_hat returned."""
    if steps < 1:
        raise ValueError(f"cont_steps must be >= 1, got {steps}")
    times = time_grid(steps, grid).tolist()
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    z_sc = torch.zeros_like(z)
    for i in range(steps):
        z_hat = _predict(x0_fn, z, times[i], z_sc if self_condition else None)
        z_sc = z_hat
        if i == steps - 1:
            if on_step is not None:
                on_step(steps, z_hat)
            break
        mean, std = step(z, z_hat, times[i], times[i + 1])
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = mean + std * noise
        if on_step is not None:
            on_step(i + 1, z)
    return z_hat, steps


def _predict(x0_fn: Callable, z: torch.Tensor, t: float, z_sc) -> torch.Tensor:
    """x0_fn at one time t for the whole batch, in z's dtype."""
    tt = torch.full((z.shape[0],), t, device=z.device, dtype=z.dtype)
    return x0_fn(z, tt, z_sc).to(z.dtype)


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
    s = gamma_jump_time(r, gamma, d)
    b = z.shape[0]
    tt = torch.full((b,), t, device=z.device, dtype=z.dtype)
    ss = torch.full((b,), s, device=z.device, dtype=z.dtype)
    z = z - (t - s) * u_fn(z, tt, ss).to(z.dtype)
    if s < r:
        ratio, std = forward_transition(s, r, d)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = ratio * z + std * noise
    return z
