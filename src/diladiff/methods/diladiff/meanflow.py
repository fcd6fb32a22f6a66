"""The MeanFlow identity and objective (pure math: networks enter only as callables).

For a flow dz_t/dt = v(z_t, t), the average velocity over [r, t] is

    u(z_t, t, r) = (1 / (t - r)) int_r^t v(z_s, s) ds,

and differentiating (t - r) u = int_r^t v ds in t along the trajectory gives the MeanFlow
identity

    u(z_t, t, r) = v(z_t, t) - (t - r) d/dt u(z_t, t, r),
    d/dt u = v . d_z u + d_t u,

the total derivative being the Jacobian-vector product of u along the tangent (v, 1, 0) in
(z_t, t, r). A network u_eta is trained to satisfy it with the stop-gradient target

    u_tgt = v(z_t, t) - w_k (t - r) (v . d_z u_eta + d_t u_eta),

w_k a tangent weight (a linear warm-up from 0 to 1 in DiLaDiff), and the adaptively weighted
loss  ||u_eta - stopgrad(u_tgt)||^2 / stopgrad(||.||^2 + c)^p  per example. t, r ~
LogitNormal(m, s) (t the larger), and r = t on a share of the examples (`sample_t_r`), where
the target is v itself (flow matching).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diladiff.config import ConfigError

DERIVATIVES = ("jvp", "finite_difference")


def sample_t_r(batch: int, mean: float, std: float, r_equals_t: float, generator, device):
    """(t, r) with t >= r, each LogitNormal(mean, std); r = t with probability r_equals_t."""
    a = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    b = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = torch.rand(batch, generator=generator, device=device) < r_equals_t
    return t, torch.where(same, t, r)


def directional_derivative(fn, primals, tangents, method: str = "jvp", eps: float = 1e-3):
    """(fn(*primals), d/de fn(primals + e * tangents) at e = 0).

    "jvp": exact forward-mode AD (torch.func.jvp; attention must support it: the explicit
    "math" backend does, the fused SDPA kernels do not). "finite_difference": the central
    difference (fn(p + eps T) - fn(p - eps T)) / (2 eps), computed without gradients; the first
    output is then a plain forward call."""
    if method == "jvp":
        return torch.func.jvp(fn, primals, tangents)
    if method == "finite_difference":
        with torch.no_grad():
            plus = fn(*(p + eps * t for p, t in zip(primals, tangents, strict=True)))
            minus = fn(*(p - eps * t for p, t in zip(primals, tangents, strict=True)))
        return fn(*primals), (plus - minus) / (2 * eps)
    raise ConfigError(f"meanflow.derivative must be one of {DERIVATIVES}, not {method!r}")


def meanflow_loss(
    u_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    v: torch.Tensor,
    z_t: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    tangent_weight: float,
    adaptive_p: float,
    adaptive_c: float,
    derivative: str = "jvp",
    fd_eps: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MeanFlow objective at (z_t, t, r), t and r of shape (B,), v = v(z_t, t) (B, ...):

        u, du/dt = u_fn(z_t, t, r), its directional derivative along (v, 1, 0),
        u_tgt = stopgrad(v - tangent_weight (t - r) du/dt),
        err_b = mean over the non-batch coordinates of (u - u_tgt)^2,
        loss = mean_b err_b / stopgrad(err_b + c)^p        (p = adaptive_p, c = adaptive_c).

    `derivative`: "jvp" (exact, torch.func.jvp) or "finite_difference" (central, step fd_eps).
    Returns (loss, {"loss": detached loss, "mse": mean_b err_b, detached}).
    """
    u, dudt = directional_derivative(
        u_fn, (z_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)), derivative, fd_eps
    )
    interval = (t - r).view(-1, *([1] * (z_t.dim() - 1)))
    u_tgt = (v - tangent_weight * interval * dudt).detach()
    err = ((u - u_tgt) ** 2).flatten(1).mean(1)
    loss = (err / (err.detach() + adaptive_c) ** adaptive_p).mean()
    return loss, {"loss": loss.detach(), "mse": err.mean().detach()}
