"""LDLM's process pieces: the encoder gradient warm-up, adaptive timestep sampling, the VP SDE
rate and DDPM posterior, and the reverse-SDE / ancestral latent samplers (docs/methods/ldlm.md).
"""

import math
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from diladiff.config import ConfigError
from diladiff.methods.ldlm.adaptive_time import AdaptiveTimeSampler
from diladiff.methods.ldlm.encoder_warmup import gradient_warmup, partial_stop_gradient
from diladiff.processes.gaussian import alpha_sigma, ddpm_posterior, drift_rate
from diladiff.sampling.latent import (
    LatentSettings,
    ddpm_sample,
    euler_maruyama_sample,
    sample_latent,
)

# ------------------------------------------------------------------ gradient warm-up


@pytest.mark.parametrize(
    ("frac", "gamma"), [(0.5, 0.054), (0.7, 0.305), (0.8, 0.568), (0.9, 0.830)]
)
def test_gradient_warmup_matches_the_papers_values(frac, gamma):
    assert gradient_warmup(int(frac * 10_000), 10_000) == pytest.approx(gamma, abs=1e-3)


def test_gradient_warmup_ends():
    assert gradient_warmup(0, 10_000) == 0.0
    assert gradient_warmup(0, 10_000, gamma_min=0.1) == pytest.approx(0.1)
    assert gradient_warmup(10_000, 10_000) == 1.0
    assert gradient_warmup(50_000, 10_000) == 1.0
    assert gradient_warmup(0, 0) == 1.0  # no warm-up
    ramp = [gradient_warmup(s, 1000) for s in range(0, 1001, 10)]
    assert all(b > a for a, b in zip(ramp, ramp[1:], strict=False))


@pytest.mark.parametrize("gamma", [0.0, 0.3, torch.tensor(0.7)])
def test_partial_stop_gradient_keeps_the_value_and_scales_the_gradient(gamma):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64)
    y = partial_stop_gradient(x, gamma)
    assert torch.equal(y, x)
    ((y**2) * w).sum().backward()
    assert torch.allclose(x.grad, float(gamma) * 2 * x.detach() * w)


# ------------------------------------------------------------------ adaptive timestep sampling


def smoothstep(u):
    """A loss curve with L(0) = 0, L(1) = 1 and L'(0) = L'(1) = 0: the target F is L itself."""
    return 3 * u**2 - 2 * u**3


def concave(u):
    """A loss curve rising three times faster at u = 0 than at u = 1: F(u) = u (3 - u) / 2."""
    return u * (3 - u) / 2


def fit(curve, batches=1000, batch=256, noise=0.3, seed=0, **kwargs):
    """A sampler fed per-example losses curve(u) (1 + noise N(0, 1)) at u drawn from itself,
    then refreshed."""
    ats = AdaptiveTimeSampler(**kwargs)
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        u = ats.sample(batch, g, "cpu")
        loss = curve(u.double()) * (1 + noise * torch.randn(batch, generator=g, dtype=u.dtype))
        ats.update(u, loss)
    ats.refresh()
    return ats


def ks_distance(samples, cdf):
    """sup |F_n - F| of the empirical distribution of `samples` against `cdf`."""
    x = samples.double().sort().values
    n = len(x)
    f = cdf(x)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(k / n - f, f - (k - 1) / n).max())


# KS critical value at level 0.001: P(sqrt(n) D_n > 1.95) ~ 0.001 for continuous F.
KS_001 = 1.95


def test_uniform_before_the_first_refresh():
    ats = AdaptiveTimeSampler(bins=100)
    assert torch.equal(ats.probs, torch.full((100,), 0.01, dtype=torch.float64))
    ats.refresh()  # no data yet: stays uniform
    assert torch.allclose(ats.probs, torch.full((100,), 0.01, dtype=torch.float64))
    n = 20_000
    u = ats.sample(n, torch.Generator().manual_seed(1), "cpu")
    assert u.dtype == torch.float32 and u.shape == (n,)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert ks_distance(u, lambda x: x) < KS_001 / math.sqrt(n)
    grid = ats.time_grid(8)
    assert torch.allclose(grid, torch.linspace(1, 0, 9, dtype=torch.float64), atol=1e-12)


def test_samples_follow_the_slope_of_the_loss_curve():
    """p(u) = L'(u) / L(1), so F(u) = L(u) for the smoothstep curve. Fed exact losses, the
    fitted F is off by O(1 / N^2) only, so n = 20k draws pass the KS test at level 0.001
    (1.95 / sqrt(n) = 0.014) and a chi-square test over 20 groups of 5 bins (19 dof: 43.8)."""
    ats = fit(smoothstep, noise=0.0)
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert (ats.cdf(grid) - smoothstep(grid)).abs().max() < 2e-3
    n = 20_000
    u = ats.sample(n, torch.Generator().manual_seed(2), "cpu")
    assert ks_distance(u, smoothstep) < KS_001 / math.sqrt(n)
    edges = torch.linspace(0, 1, 21, dtype=torch.float64)
    expected = n * smoothstep(edges).diff()
    counts = torch.histc(u.double(), bins=20, min=0, max=1)
    assert float(((counts - expected) ** 2 / expected).sum()) < 43.8


def test_the_ema_averages_noisy_losses():
    """Per-example losses with 10% noise: the EMA (decay 0.99, ~2.5 examples per edge and
    batch) leaves an error of about 0.01 in F; the draws follow the fitted F exactly."""
    ats = fit(smoothstep, noise=0.1)
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert (ats.cdf(grid) - smoothstep(grid)).abs().max() < 0.025
    n = 20_000
    u = ats.sample(n, torch.Generator().manual_seed(2), "cpu")
    assert ks_distance(u, ats.cdf) < KS_001 / math.sqrt(n)


def test_a_step_in_the_loss_draws_all_samples_there():
    ats = fit(lambda u: (u >= 0.505).double(), noise=0.0)
    u = ats.sample(20_000, torch.Generator().manual_seed(3), "cpu")
    # only the floored bins (99 x 1e-6 of the mass) lie away from the step
    assert float(((u >= 0.49) & (u < 0.52)).double().mean()) > 0.999
    assert float(ats.probs.min()) == pytest.approx(1e-6, rel=0.01)
    grid = ats.time_grid(32)
    assert ((grid[1:-1] > 0.49) & (grid[1:-1] < 0.52)).all()


def test_cdf_and_inverse_cdf_invert_each_other():
    ats = fit(smoothstep, batches=200)
    u = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    assert torch.allclose(ats.inverse_cdf(ats.cdf(u)), u, atol=1e-12, rtol=0)
    assert torch.allclose(ats.cdf(ats.inverse_cdf(u)), u, atol=1e-12, rtol=0)
    edges = torch.arange(101, dtype=torch.float64) / 100
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), ats.probs.cumsum(0)])
    assert torch.allclose(ats.cdf(edges), cum, atol=1e-12)
    assert float(ats.cdf(torch.tensor(0.0))) == 0.0 and float(ats.cdf(torch.tensor(1.0))) == 1.0
    assert ats.cdf(u.float()).dtype == torch.float32
    assert (ats.cdf(u).diff() > 0).all()  # every bin keeps probability


@pytest.mark.parametrize("steps", [1, 7, 128])
def test_time_grid_is_a_decreasing_warp_from_1_to_0(steps):
    ats = fit(smoothstep, batches=200)
    grid = ats.time_grid(steps)
    assert grid.dtype == torch.float64 and grid.shape == (steps + 1,)
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert (grid.diff() < 0).all()
    t = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    assert torch.allclose(ats.cdf(grid), t, atol=1e-12)


def test_update_splits_losses_between_edges_and_starts_an_edge_at_its_first_data():
    ats = AdaptiveTimeSampler(bins=10, ema=0.9)
    # u = 0.25: weight 1/2 at edges 2 and 3; u = 0.375: 1/4 at edge 3, 3/4 at edge 4;
    # u = 0.0625: edges 0 and 1 (3/8, 5/8)
    ats.update(torch.tensor([0.25, 0.375, 0.0625]), torch.tensor([2.0, 5.0, 7.0]))
    assert ats.seen.tolist() == [True] * 5 + [False] * 6
    assert ats.loss_ema[0] == 0  # Lhat_0 = 0 always
    assert ats.loss_ema[1] == pytest.approx(7.0)  # first data: set directly
    assert ats.loss_ema[2] == pytest.approx(2.0)
    assert ats.loss_ema[3] == pytest.approx((0.5 * 2 + 0.25 * 5) / 0.75)
    assert ats.loss_ema[4] == pytest.approx(5.0)
    ats.update(torch.tensor([0.125]), torch.tensor([1.0]))  # edges 1 and 2
    assert ats.loss_ema[1] == pytest.approx(0.9 * 7.0 + 0.1 * 1.0)  # then the EMA
    assert ats.loss_ema[2] == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)
    assert ats.loss_ema[3] == pytest.approx((0.5 * 2 + 0.25 * 5) / 0.75)  # no weight: kept
    # unseen edges are interpolated (held flat past the last seen one): p stays a density
    ats.refresh()
    assert torch.isclose(ats.probs.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (ats.probs > 0).all()


def test_state_dict_round_trip_resumes_the_same_draws():
    ats = fit(smoothstep, batches=200)
    state = ats.state_dict()
    assert set(state) == {"loss_ema", "seen", "probs"}
    other = AdaptiveTimeSampler()
    other.load_state_dict(state)
    a = ats.sample(1000, torch.Generator().manual_seed(7), "cpu")
    b = other.sample(1000, torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(a, b)
    for s in (ats, other):
        s.update(a, smoothstep(a.double()))
        s.refresh()
    assert all(torch.equal(x, y) for x, y in zip(ats.buffers(), other.buffers(), strict=True))


def _ddp_update(rank, world, port, u, losses, out):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        ats = AdaptiveTimeSampler(bins=10)
        ats.update(u[rank], losses[rank])
        out[rank] = {k: v.clone() for k, v in ats.state_dict().items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_replicas_aggregate_their_batches():
    """Two gloo ranks with different batches end with the buffers of one process that saw
    both batches."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(2, 64, generator=g)
    losses = smoothstep(u.double())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        procs = [
            ctx.Process(target=_ddp_update, args=(r, 2, port, u, losses, out)) for r in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert all(p.exitcode == 0 for p in procs)
        states = [dict(out[0]), dict(out[1])]
    single = AdaptiveTimeSampler(bins=10)
    single.update(u.reshape(-1), losses.reshape(-1))
    for k, v in single.state_dict().items():
        assert torch.equal(states[0][k], states[1][k])
        assert torch.allclose(states[0][k].double(), v.double(), atol=1e-12)


# ------------------------------------------------------------------ the VP SDE and posterior


@pytest.mark.parametrize("d", [1.0, 3.0, 10.0])
def test_drift_rate_is_minus_the_log_alpha_squared_slope(d):
    t = torch.linspace(0.01, 0.97, 97, dtype=torch.float64)
    h = 1e-6

    def neg_log_a2(x):
        return -2 * torch.log(alpha_sigma(x, d)[0])

    fd = (neg_log_a2(t + h) - neg_log_a2(t - h)) / (2 * h)
    assert torch.allclose(drift_rate(t, d), fd, rtol=1e-6)
    tan = torch.tan(math.pi * t / 2)
    spec = math.pi * d**2 * tan * (1 + tan**2) / (1 + d**2 * tan**2)
    assert torch.allclose(drift_rate(t, d), spec, rtol=1e-10)
    assert drift_rate(torch.tensor(0.0, dtype=torch.float64), d) == 0
    assert torch.isfinite(drift_rate(torch.tensor(0.999, dtype=torch.float64), d))


@pytest.mark.parametrize(("s", "t"), [(0.1, 0.2), (0.3, 0.9), (0.0, 0.5), (0.6, 1.0)])
def test_ddpm_posterior_is_the_conditional_of_the_joint_gaussian(s, t):
    """(z0, z_s, z_t) with z0 ~ N(0, v0), z_s = alpha_s z0 + sigma_s e1 and z_t = alpha_{t|s}
    z_s + sigma_{t|s} e2 are jointly Gaussian: condition z_s on (z0, z_t) by the Schur
    complement."""
    d, v0 = 3.0, 1.7
    a_s, sig_s = (float(x) for x in alpha_sigma(torch.tensor(s, dtype=torch.float64), d))
    a_t, sig_t = (float(x) for x in alpha_sigma(torch.tensor(t, dtype=torch.float64), d))
    # Cov(z0, z_s) = a_s v0, Cov(z0, z_t) = a_t v0, Var z_s = a_s^2 v0 + sig_s^2,
    # Cov(z_s, z_t) = (a_t / a_s) Var z_s, Var z_t = a_t^2 v0 + sig_t^2
    var_s = a_s**2 * v0 + sig_s**2
    cov = torch.tensor(
        [
            [v0, a_s * v0, a_t * v0],
            [a_s * v0, var_s, a_t / a_s * var_s],
            [a_t * v0, a_t / a_s * var_s, a_t**2 * v0 + sig_t**2],
        ],
        dtype=torch.float64,
    )
    obs = [0, 2]
    k = cov[1, obs] @ torch.linalg.inv(cov[obs][:, obs])
    cond_var = cov[1, 1] - k @ cov[obs, 1]
    z0 = torch.tensor([0.8, -1.3], dtype=torch.float64)
    zt = torch.tensor([0.4, 2.1], dtype=torch.float64)
    want = k[0] * z0 + k[1] * zt
    mean, std = ddpm_posterior(zt, z0, t, s, d)
    assert torch.allclose(mean, want, atol=1e-10)
    assert std == pytest.approx(math.sqrt(max(float(cond_var), 0.0)), abs=1e-7)
    # the batched form agrees, time per example
    mean_b, std_b = ddpm_posterior(
        torch.stack([zt, zt]),
        torch.stack([z0, z0]),
        torch.tensor([t, t], dtype=torch.float64),
        torch.tensor([s, s], dtype=torch.float64),
        d,
    )
    assert torch.allclose(mean_b, torch.stack([mean, mean]), atol=1e-12)
    assert torch.allclose(std_b.reshape(-1), torch.full((2,), std, dtype=torch.float64))


def test_ddpm_posterior_at_s_zero_is_the_prediction():
    zt, z0 = torch.randn(3, 4), torch.randn(3, 4)
    mean, std = ddpm_posterior(zt, z0, 0.3, 0.0, 3.0)
    assert torch.equal(mean, z0) and std == 0.0
    mean, std = ddpm_posterior(zt, z0, torch.full((3,), 0.3), torch.zeros(3), 3.0)
    assert torch.equal(mean, z0) and (std == 0).all()
    with pytest.raises(ValueError):
        ddpm_posterior(zt, z0, 0.3, 0.5, 3.0)


# ------------------------------------------------------------------ the samplers

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
STD = torch.tensor([0.7, 1.3], dtype=torch.float64)


def exact_denoiser(mu, std, d):
    """E[z0 | z_t] of data z0 ~ N(mu, std^2) per coordinate: mu + alpha std^2 (z_t - alpha mu)
    / (alpha^2 std^2 + sigma^2); ignores the self-conditioning input."""

    def x0(z_t, t, z_sc=None):
        a, s = (x.double().view(-1, 1, 1) for x in alpha_sigma(t.double(), d))
        gain = a * std**2 / (a**2 * std**2 + s**2)
        return mu + gain * (z_t.double() - a * mu)

    return x0


N_SAMPLES = 4000


def assert_matches_the_data(z):
    """Mean within 4 standard errors (std / sqrt(n)) plus 0.01, std within 4 of theirs
    (std / sqrt(2 n), 4.5% at n = 4000) plus 3% for the discretisation: at 200 steps DDPM's
    std comes out 2-3% low (each ancestral step drops the posterior variance of z0 given z_t,
    an O(1 / N) deficit: 6% at 100 steps, 1.6% at 400), Euler-Maruyama's within 1-2%."""
    flat = z.reshape(-1, 2).double()
    n = len(flat)
    assert ((flat.mean(0) - MU).abs() < 4 * STD / math.sqrt(n) + 0.01).all(), flat.mean(0)
    rel = (flat.std(0) / STD - 1).abs()
    assert (rel < 4 / math.sqrt(2 * n) + 0.03).all(), flat.std(0)


def warped_grid(steps):
    """A monotone, non-uniform grid 1 -> 0: steps crowd near both ends."""
    t = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return 0.5 - 0.5 * torch.cos(math.pi * t)


@pytest.mark.parametrize("sampler", [euler_maruyama_sample, ddpm_sample])
@pytest.mark.parametrize("grid", ["uniform", "warped", "adaptive"])
def test_samplers_with_the_exact_denoiser_land_on_the_data(sampler, grid):
    """The output is the x0-prediction at the last grid time t_{N-1} > 0, which shrinks the
    spread by std / sqrt(std^2 + nsr(t_{N-1})^2): every grid here ends with a short step (an
    adaptive grid does when L'(0) > 0, as for the `concave` curve)."""
    d, steps = 3.0, 200
    g = None
    if grid == "warped":
        g = warped_grid(steps)
    elif grid == "adaptive":
        g = fit(concave, batches=200).time_grid(steps)
    z, nfe = sampler(
        exact_denoiser(MU, STD, d),
        (N_SAMPLES, 1, 2),
        steps,
        d,
        torch.Generator().manual_seed(0),
        "cpu",
        g,
        dtype=torch.float64,
    )
    assert nfe == steps and z.shape == (N_SAMPLES, 1, 2) and z.dtype == torch.float64
    assert_matches_the_data(z)


@pytest.mark.parametrize("sampler", [euler_maruyama_sample, ddpm_sample])
def test_samplers_self_condition_on_the_last_prediction_and_return_it(sampler):
    seen, times = [], []

    def fn(z_t, t, z_sc):
        seen.append(z_sc.clone())
        times.append(float(t[0]))
        return torch.full_like(z_t, float(len(seen)))

    grid = torch.tensor([1.0, 0.6, 0.2, 0.0], dtype=torch.float64)
    z, nfe = sampler(fn, (2, 3, 4), 3, 3.0, torch.Generator().manual_seed(0), "cpu", grid)
    assert nfe == 3 and times == pytest.approx([1.0, 0.6, 0.2])
    assert torch.equal(seen[0], torch.zeros(2, 3, 4))
    assert torch.equal(seen[1], torch.full((2, 3, 4), 1.0))
    assert torch.equal(seen[2], torch.full((2, 3, 4), 2.0))
    assert torch.equal(z, torch.full((2, 3, 4), 3.0))  # the last prediction
    with pytest.raises(ValueError):
        sampler(fn, (2, 3, 4), 3, 3.0, None, "cpu", torch.tensor([1.0, 0.2, 0.6, 0.0]))


class _Model:
    """What the registered samplers call on a latent stage: x0, cfg.diffusion.d and, when it
    warps the grid, time_grid."""

    def __init__(self, grid=None):
        self.cfg = SimpleNamespace(diffusion=SimpleNamespace(d=3.0))
        self.latent_shape = (1, 2)
        self.times = []
        self._x0 = exact_denoiser(MU, STD, 3.0)
        if grid is not None:
            self.time_grid = lambda steps: grid(steps)

    def x0(self, z_t, t, z_sc=None):
        self.times.append(float(t[0]))
        return self._x0(z_t, t, z_sc).to(z_t.dtype)


@pytest.mark.parametrize("name", ["sde_euler", "ddpm", "ode_euler"])
def test_registered_samplers_use_the_models_time_grid(name):
    steps = 5
    plain, warped = _Model(), _Model(warped_grid)
    settings = LatentSettings(name, steps)
    z, nfe = sample_latent(plain, 3, settings, torch.Generator().manual_seed(0), "cpu")
    assert nfe == steps and z.shape == (3, 1, 2)
    assert plain.times == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2], abs=1e-6)
    sample_latent(warped, 3, settings, torch.Generator().manual_seed(0), "cpu")
    assert warped.times == pytest.approx(warped_grid(steps)[:-1].tolist(), abs=1e-6)
    with pytest.raises(ConfigError):
        sample_latent(plain, 3, LatentSettings(name, steps, gamma=0.5), None, "cpu")
