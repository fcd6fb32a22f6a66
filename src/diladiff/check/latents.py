"""The check's latent references: the exact prior of the K rows' latents (what a perfect
latent prior samples) and where prior samples land relative to those latents."""

from __future__ import annotations

import torch

from diladiff.check.plan import CheckPlan


def exact_prior_x0(targets_p: torch.Tensor, d: float):
    """The exact x0-prediction for a prior whose data are the K target latents (prior space),
    E[z_0 | z_t] = sum_k softmax_k(-||z_t - alpha_t z_k||^2 / (2 sigma_t^2)) z_k, as an
    x0_fn(z_t, t, z_sc) for the LaDiff samplers (self-conditioning ignored). Sampling with it
    tests the sampler and the decoding path without the learned prior."""
    from diladiff.processes.gaussian import alpha_sigma

    flat = targets_p.flatten(1).double()

    def x0_fn(z_t, t, z_sc=None):
        alpha, sigma = alpha_sigma(t.double(), d)
        diff = z_t.flatten(1).double()[:, None, :] - alpha[:, None, None] * flat[None]
        logits = -(diff**2).sum(-1) / (2 * sigma[:, None] ** 2)
        return (logits.softmax(-1) @ flat).to(z_t.dtype).view_as(z_t)

    return x0_fn


def batches(n: int, size: int):
    """(start, size) of the batches of `size` that make up n rows."""
    for start in range(0, n, size):
        yield start, min(size, n - start)


@torch.no_grad()
def exact_prior_latents(stage, targets_p, plan: CheckPlan, device, cont_steps: int):
    """N latents (prior space) from the LaDiff Euler sampler driven by `exact_prior_x0`."""
    from diladiff.sampling.latent import euler_ode_sample

    gen = torch.Generator(device).manual_seed(plan.seed)
    sched, shape = stage.schedule, stage.latent_shape
    x0_fn = exact_prior_x0(targets_p.to(device), sched)
    zs = [
        euler_ode_sample(x0_fn, (b, *shape), cont_steps, sched, gen, device)[0].cpu()
        for _, b in batches(plan.num_samples, plan.batch_size)
    ]
    return torch.cat(zs)


def latent_landing(z_p: torch.Tensor, targets_p: torch.Tensor) -> dict:
    """Where prior samples land relative to the K encoder latents (prior space): the median
    distance to the nearest target over the median nearest-neighbour distance among targets
    (<< 1: on a training latent; ~1 or more: between them), and how many targets are hit."""
    a, b = z_p.flatten(1).double(), targets_p.flatten(1).double()
    d = torch.cdist(a, b)
    nearest, which = d.min(1)
    tt = torch.cdist(b, b)
    tt.fill_diagonal_(float("inf"))
    spacing = tt.min(1).values.median()
    return {
        "nn_ratio_median": float(nearest.median() / spacing),
        "targets_nearest": len(set(which.tolist())),
        "sq_norm_mean": float((a**2).sum(1).mean() / a.shape[1]),
        "target_sq_norm_mean": float((b**2).sum(1).mean() / b.shape[1]),
    }
