import math

import pytest
import torch

from diladiff.processes.gaussian import (
    alpha_sigma,
    alpha_sigma_derivatives,
    angle_time_grid,
    forward_transition,
    gamma_jump_time,
    log_snr,
    velocity_from_x0,
    x0_from_velocity,
)
from diladiff.sampling.latent import euler_ode_sample, meanflow_sample, meanflow_step


@pytest.mark.parametrize("d", [2.0, 5.0, 10.0, 15.0])
def test_tangent_schedule(d):
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    a, s = alpha_sigma(t, d)
    assert torch.allclose(a**2 + s**2, torch.ones_like(t))
    assert a[0] == 1 and abs(a[-1]) < 1e-12 and (a.diff() < 0).all()
    inner = t[1:-1]
    assert torch.allclose(
        log_snr(inner, d), torch.log(alpha_sigma(inner, d)[0] ** 2 / alpha_sigma(inner, d)[1] ** 2)
    )
    assert torch.allclose(log_snr(inner, d), -2 * torch.log(d * torch.tan(math.pi * inner / 2)))
    assert torch.allclose(
        alpha_sigma(inner, d)[0] ** 2, 1 / (1 + d**2 * torch.tan(math.pi * inner / 2) ** 2)
    )
    h = 1e-6
    da, ds = alpha_sigma_derivatives(inner, d)
    fa = (alpha_sigma(inner + h, d)[0] - alpha_sigma(inner - h, d)[0]) / (2 * h)
    fs = (alpha_sigma(inner + h, d)[1] - alpha_sigma(inner - h, d)[1]) / (2 * h)
    assert torch.allclose(da, fa, atol=1e-5) and torch.allclose(ds, fs, atol=1e-5)


def test_larger_d_spends_more_time_at_high_noise():
    t = torch.tensor([0.3])
    assert alpha_sigma(t, 15.0)[1] > alpha_sigma(t, 5.0)[1] > alpha_sigma(t, 2.0)[1]


def test_velocity_and_x0_are_inverse_maps():
    g = torch.Generator().manual_seed(0)
    z_t, z_hat = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    v = velocity_from_x0(z_t, z_hat, t, 10.0)
    assert torch.allclose(x0_from_velocity(z_t, v, t, 10.0), z_hat, atol=1e-4)


def gaussian_posterior_mean(mu, std, d):
    """Exact E[z | z_t] for z ~ N(mu, diag(s^2)): mu + a s^2 / (a^2 s^2 + sigma^2) (z_t - a mu)."""

    def fn(z_t, t, z_sc=None):
        a, s = alpha_sigma(t.double(), d)
        a, s = a.view(-1, 1, 1), s.view(-1, 1, 1)
        return mu + a * std**2 / (a**2 * std**2 + s**2) * (z_t.double() - a * mu)

    return fn


def test_euler_ode_integrates_a_gaussian_prior():
    mu = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    # Standardised latents have unit-scale coordinates. (A much sharper coordinate, std 0.1,
    # comes out ~20% too narrow at 200 uniform Euler steps with d = 10: few steps fall where
    # sigma_t ~ 0.1, a property of the uniform grid, not of the ODE.)
    std = torch.tensor([[0.5, 1.5, 1.0]], dtype=torch.float64)
    z, nfe = euler_ode_sample(
        gaussian_posterior_mean(mu, std, 10.0),
        (20000, 1, 3),
        200,
        10.0,
        torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    assert nfe == 200
    flat = z.view(-1, 3)
    assert torch.allclose(flat.mean(0), mu[0], atol=0.03)
    assert torch.allclose(flat.std(0), std[0], rtol=0.05)
    cov = torch.cov(flat.T)
    assert (cov - torch.diag(torch.diag(cov))).abs().max() < 0.03


def test_self_conditioning_input_is_zero_on_the_first_step_then_the_last_prediction():
    seen = []

    def fn(z_t, t, z_sc):
        seen.append(z_sc.clone())
        return torch.full_like(z_t, float(len(seen)))

    euler_ode_sample(fn, (2, 3, 4), 3, 10.0, torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], torch.zeros(2, 3, 4))
    assert torch.equal(seen[1], torch.full((2, 3, 4), 1.0))
    assert torch.equal(seen[2], torch.full((2, 3, 4), 2.0))


def exact_average_velocity(mu, std, d):
    """The exact average velocity of the Gaussian prior's PF-ODE: for a 1-D Gaussian each
    ODE path is z_t = alpha_t mu + m_t xi with m_t = sqrt(alpha_t^2 s^2 + sigma_t^2), so
    u(z_t, t, r) = (z_t - z_r) / (t - r) in closed form."""

    def u(z_t, t, r):
        a_t, s_t = (x.view(-1, 1, 1) for x in alpha_sigma(t.double(), d))
        a_r, s_r = (x.view(-1, 1, 1) for x in alpha_sigma(r.double(), d))
        m_t = torch.sqrt(a_t**2 * std**2 + s_t**2)
        m_r = torch.sqrt(a_r**2 * std**2 + s_r**2)
        xi = (z_t.double() - a_t * mu) / m_t
        z_r = a_r * mu + m_r * xi
        return (z_t.double() - z_r) / (t - r).double().view(-1, 1, 1)

    return u


@pytest.mark.parametrize("steps", [1, 5])
def test_meanflow_sampler_with_the_exact_flow_map_lands_on_the_prior(steps):
    mu = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    std = torch.tensor([[0.3, 2.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    z, nfe = meanflow_sample(
        exact_average_velocity(mu, std, 10.0), (20000, 1, 2), steps, 10.0, g, dtype=torch.float64
    )
    assert nfe == steps
    flat = z.view(-1, 2)
    assert torch.allclose(flat.mean(0), mu[0], atol=0.04)
    assert torch.allclose(flat.std(0), std[0], rtol=0.03)
    # gamma-sampling re-noises along the exact forward process: the marginal is unchanged.
    z2, _ = meanflow_sample(
        exact_average_velocity(mu, std, 10.0),
        (20000, 1, 2),
        steps,
        10.0,
        g,
        gamma=0.5,
        dtype=torch.float64,
    )
    assert torch.allclose(z2.view(-1, 2).std(0), std[0], rtol=0.03)


@pytest.mark.parametrize("d", [2.0, 10.0])
@pytest.mark.parametrize("steps", [1, 5, 16])
def test_angle_time_grid_turns_equal_angles(d, steps):
    g = angle_time_grid(steps, d)
    assert g.shape == (steps + 1,) and g[0] == 1.0 and g[-1] == 0.0 and (g.diff() < 0).all()
    alpha, _ = alpha_sigma(g, d)
    turned = torch.acos(alpha.clamp(max=1.0)).diff()  # the angle phi_t = acos(alpha_t)
    assert torch.allclose(turned, torch.full_like(turned, -0.5 * math.pi / steps), atol=1e-9)


def test_the_uniform_grid_leaves_most_of_the_angle_to_its_last_jump():
    """Why DiLaDiff samples on the angle grid: at d = 10 the uniform grid's last of 5 jumps
    turns 81% of the way from noise to data; the angle grid's turns 20%."""
    alpha, _ = alpha_sigma(torch.tensor([0.2], dtype=torch.float64), 10.0)
    assert 0.80 < float(torch.acos(alpha)) / (0.5 * math.pi) < 0.82
    last = angle_time_grid(5, 10.0)[-2:]
    a, _ = alpha_sigma(last, 10.0)
    assert math.isclose(float(torch.acos(a[0]) - torch.acos(a[1])) / (0.5 * math.pi), 0.2)


def nsr(t: float, d: float) -> float:
    a, s = alpha_sigma(torch.tensor(t, dtype=torch.float64), d)
    return float(s / a)


@pytest.mark.parametrize("d", [5.0, 10.0])
@pytest.mark.parametrize("r", [0.05, 0.2, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.3, 0.5, 0.9])
def test_gamma_jump_time_leaves_a_gamma_squared_share_of_fresh_noise(d, r, gamma):
    s = gamma_jump_time(r, gamma)
    assert 0 < s < r
    # CTM in noise-to-signal terms: nsr(s) = sqrt(1 - gamma^2) nsr(r)
    assert math.isclose(nsr(s, d), math.sqrt(1 - gamma**2) * nsr(r, d), rel_tol=1e-9)
    assert math.isclose(
        s, 2 / math.pi * math.atan(math.sqrt(1 - gamma**2) * math.tan(math.pi * r / 2))
    )
    # the forward kernel s -> r then adds fresh noise worth gamma^2 of the noise variance at r
    ratio, std = forward_transition(s, r, d)
    sigma_r = float(alpha_sigma(torch.tensor(r, dtype=torch.float64), d)[1])
    assert math.isclose(std**2 / sigma_r**2, gamma**2, rel_tol=1e-9)


def test_gamma_jump_time_end_points():
    assert gamma_jump_time(0.37, 0.0) == 0.37
    assert gamma_jump_time(0.37, 1.0) == 0.0
    assert gamma_jump_time(1.0, 0.5) == 1.0
    with pytest.raises(ValueError):
        gamma_jump_time(0.5, 1.5)


def point_mass_average_velocity(d):
    """Data z = 0: every PF-ODE path is z_t = sigma_t xi, so z_s = (sigma_s / sigma_t) z_t and
    u(z_t, t, s) = (z_t - z_s) / (t - s) exactly."""

    def u(z_t, t, s):
        sig_t = alpha_sigma(t.double(), d)[1].view(-1, 1)
        sig_s = alpha_sigma(s.double(), d)[1].view(-1, 1)
        return z_t * (1 - sig_s / sig_t) / (t - s).double().view(-1, 1)

    return u


@pytest.mark.parametrize("t,r", [(1.0, 0.8), (0.8, 0.6), (0.4, 0.2), (0.2, 0.1)])
@pytest.mark.parametrize("gamma", [0.1, 0.3, 0.7])
def test_gamma_step_injects_a_gamma_squared_share_of_fresh_noise(t, r, gamma):
    """One sampling step on data z = 0: z_r keeps the variance sigma_r^2, and the share of it
    not explained by z_t (1 - corr^2) is the fresh noise, gamma^2."""
    d, n = 10.0, 200_000
    g = torch.Generator().manual_seed(0)
    sigma_t = float(alpha_sigma(torch.tensor(t, dtype=torch.float64), d)[1])
    sigma_r = float(alpha_sigma(torch.tensor(r, dtype=torch.float64), d)[1])
    z_t = sigma_t * torch.randn(n, 1, generator=g, dtype=torch.float64)
    z_r = meanflow_step(point_mass_average_velocity(d), z_t, t, r, d, gamma, g)
    assert abs(z_r.var().item() / sigma_r**2 - 1) < 0.01
    corr = torch.corrcoef(torch.stack([z_t.flatten(), z_r.flatten()]))[0, 1].item()
    assert abs((1 - corr**2) - gamma**2) < 0.01


def test_gamma_zero_step_is_the_deterministic_jump():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    state = g.get_state()
    u = point_mass_average_velocity(10.0)
    out = meanflow_step(u, z, 0.7, 0.3, 10.0, 0.0, g)
    expect = z - 0.4 * u(z, torch.full((5,), 0.7), torch.full((5,), 0.3))
    assert torch.allclose(out, expect) and torch.equal(g.get_state(), state)  # no noise drawn
