"""The probability-flow ODE log-likelihood of a VP diffusion with an x0-prediction denoiser
(pure math: the denoiser enters as a callable).

With the schedule z_t = alpha_t z_0 + sigma_t eps (processes.gaussian, tangent schedule of
sharpness d) and a denoiser z_hat = x0_fn(z_t, t) ~ E[z_0 | z_t], the PF-ODE is

    dz_t / dt = v(z_t, t) = alpha'_t z_hat + sigma'_t (z_t - alpha_t z_hat) / sigma_t

(processes.gaussian.velocity_from_x0). It carries the density along by the instantaneous change
of variables, d log p_t(z_t) / dt = -div v(z_t, t), so that integrating the joint state

    d/dt [z_t, delta_t] = [v(z_t, t), div v(z_t, t)],   z_{t0} = z,  delta_{t0} = 0,

from t0 (the schedule's t_eps or any later time) to 1 gives

    log p_{t0}(z) = log N(z_1; 0, I) + delta_1,
    log N(z_1; 0, I) = -||z_1||^2 / 2 - (D / 2) log(2 pi),   D = dimensions per row,

by an adaptive Runge-Kutta method (torchdiffeq's dopri5, i.e. RK45, with `rtol` / `atol`).
The divergence is Hutchinson's estimate with K = `probes` Rademacher vectors eps_k (entries
+-1, drawn once per trajectory and fixed along it, so that the integrand is one smooth
function of t), each by one vector-Jacobian product (torch.autograd.grad):

    div v ~ (1 / K) sum_k eps_k^T (dv / dz) eps_k,

unbiased (E[eps eps^T] = I) and exact for a diagonal Jacobian; or the exact trace
(`exact=True`: one product per dimension; for small latents and tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diladiff.processes.gaussian import velocity_from_x0


def pf_ode_log_likelihood(
    x0_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    d: float,
    t0: float,
    generator: torch.Generator | None = None,
    probes: int = 1,
    exact: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> tuple[torch.Tensor, int]:
    """(log p_{t0}(z) per row, in nats, (B,); function evaluations) for latents z (B, ...) at
    time t0, under the PF-ODE of the denoiser x0_fn(z_t, t) -> z_hat (t of shape (B,))."""
    from torchdiffeq import odeint  # lazily: the `analysis` extra

    b = z.shape[0]
    dims = z[0].numel()
    eps = None
    if not exact:  # Rademacher probes, fixed for the whole trajectory
        shape = (probes, *z.shape)
        eps = torch.randint(0, 2, shape, generator=generator, device=z.device).to(z.dtype) * 2 - 1
    calls = [0]

    def divergence(v, zz):
        if exact:
            flat = v.reshape(b, -1)
            total = torch.zeros(b, dtype=z.dtype, device=z.device)
            for i in range(dims):
                (g,) = torch.autograd.grad(flat[:, i].sum(), zz, retain_graph=True)
                total = total + g.reshape(b, -1)[:, i]
            return total
        total = torch.zeros(b, dtype=z.dtype, device=z.device)
        for k in range(probes):
            (g,) = torch.autograd.grad(v, zz, eps[k], retain_graph=k < probes - 1)
            total = total + (g * eps[k]).reshape(b, -1).sum(1)
        return total / probes

    def field(t, state):
        zz, _ = state
        calls[0] += 1
        with torch.enable_grad():
            zz = zz.detach().requires_grad_(True)
            tt = torch.full((b,), float(t), dtype=z.dtype, device=z.device)
            v = velocity_from_x0(zz, x0_fn(zz, tt).to(z.dtype), tt, d)
            div = divergence(v, zz)
        return v.detach(), div.detach()

    times = torch.tensor([t0, 1.0], dtype=z.dtype, device=z.device)
    zero = torch.zeros(b, dtype=z.dtype, device=z.device)
    z_path, integral = odeint(field, (z, zero), times, method="dopri5", rtol=rtol, atol=atol)
    z1 = z_path[-1]
    log_prior = -0.5 * (z1.reshape(b, -1) ** 2).sum(1) - 0.5 * dims * math.log(2 * math.pi)
    return log_prior + integral[-1], calls[0]
