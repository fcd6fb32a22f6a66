import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diladiff.methods.duo.process import (
    DualityMap,
    corrupt,
    diffusion_loss,
    gaussian_latent,
    log_linear_alpha,
    posterior,
    prior_sample,
    sigma_from_alpha,
)

F64 = torch.float64


def _states(v_full: int, excluded: int) -> torch.Tensor:
    states = torch.ones(v_full, dtype=torch.bool)
    states[excluded] = False
    return states


def _transition(a: float, states: torch.Tensor) -> torch.Tensor:
    """Q[x, y] = q(y | x) = a [x = y] + (1 - a) u[y] over the full vocabulary (rows of
    non-states are unused)."""
    u = states.to(F64) / states.sum()
    return a * torch.eye(states.numel(), dtype=F64) + (1 - a) * u


def _closed_form(log_x_theta, x_t, x0, alpha, dalpha, states):
    """The spec's closed form, literally (float64, sums over the states)."""
    v = states.sum().to(F64)
    a = torch.as_tensor(alpha, dtype=F64).reshape(-1, 1, 1)
    da = torch.as_tensor(dalpha, dtype=F64).reshape(-1, 1)
    xbar = v * a * F.one_hot(x0, states.numel()).to(F64) + 1 - a
    xbt = v * a * log_x_theta.exp() + 1 - a
    xbar_i = xbar.gather(-1, x_t.unsqueeze(-1))
    xbt_i = xbt.gather(-1, x_t.unsqueeze(-1))
    xbar, xbt = xbar[..., states], xbt[..., states]
    s = (xbar / xbar_i * torch.log(xbt_i * xbar / (xbt * xbar_i))).sum(-1)
    return da / (v * a[..., 0]) * (v / xbar_i[..., 0] - v / xbt_i[..., 0] - s)


def _random_case(v_full, excluded, batch, length, scale, gen, dtype=F64):
    states = _states(v_full, excluded)
    ids = states.nonzero().squeeze(-1)
    x0 = ids[torch.randint(0, ids.numel(), (batch, length), generator=gen)]
    other = ids[torch.randint(0, ids.numel(), (batch, length), generator=gen)]
    x_t = torch.where(torch.rand(batch, length, generator=gen) < 0.5, x0, other)
    logits = scale * torch.randn(batch, length, v_full, generator=gen, dtype=dtype)
    logits = logits.masked_fill(~states, -math.inf)
    return states, x0, x_t, logits


# --- schedule and forward process ---------------------------------------------------------


def test_log_linear_schedule_and_sigma():
    t = torch.tensor([0.0, 0.5, 1.0])
    alpha, dalpha = log_linear_alpha(t)
    assert torch.allclose(alpha, torch.tensor([1.0, 1 - 0.4995, 1e-3]))
    assert torch.equal(dalpha, torch.full_like(t, -(1 - 1e-3)))
    assert log_linear_alpha(0.25, eps=0.0) == (0.75, -1.0)
    assert torch.allclose(sigma_from_alpha(alpha), -alpha.log())
    assert sigma_from_alpha(1.0) == 0.0


def test_corrupt_matches_the_uniform_marginal_and_never_emits_the_mask():
    states = _states(6, excluded=2)  # V = 5 states: 0, 1, 3, 4, 5
    g = torch.Generator().manual_seed(0)
    n = 100_000
    alpha = torch.tensor([0.0, 0.3, 0.8])
    x0 = torch.full((3, n), 4)
    x_t = corrupt(x0, alpha, states, g)
    assert (x_t != 2).all()
    for b, a in enumerate(alpha.tolist()):
        freq = torch.bincount(x_t[b], minlength=6).double() / n
        expect = torch.full((6,), (1 - a) / 5, dtype=F64)
        expect[4] += a
        expect[2] = 0.0
        se = (expect * (1 - expect) / n).sqrt()
        assert ((freq - expect).abs() <= 5 * se + 1e-12).all(), (a, freq, expect)
    # alpha per token (B, L), and the extremes
    alpha_bl = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).repeat(1, 500)
    x_t = corrupt(torch.full((2, 1000), 3), alpha_bl, states, g)
    assert (x_t[alpha_bl == 1.0] == 3).all() and (x_t != 2).all()
    prior = prior_sample((20_000,), states, g)
    assert set(prior.unique().tolist()) == {0, 1, 3, 4, 5}


# --- posterior -----------------------------------------------------------------------------


@pytest.mark.parametrize("a_s,a_t", [(0.9, 0.6), (0.5, 0.05), (1.0, 0.97), (0.02, 0.001)])
def test_posterior_matches_bayes_by_enumeration(a_s, a_t):
    states = _states(5, excluded=1)
    ids = states.nonzero().squeeze(-1).tolist()
    q_s = _transition(a_s, states)  # q(x_s | x_0)
    q_ts = _transition(a_t / a_s, states)  # q(x_t | x_s)
    pairs = [(x0, xt) for x0 in ids for xt in ids]
    x0 = torch.tensor([[p[0] for p in pairs]])
    x_t = torch.tensor([[p[1] for p in pairs]])
    got = posterior(F.one_hot(x0, 5).to(F64), x_t, a_s, a_t, states)
    for n, (i0, it) in enumerate(pairs):
        joint = q_ts[:, it] * q_s[i0]  # q(x_t | x_s) q(x_s | x_0), over x_s
        joint[~states] = 0.0
        assert torch.allclose(got[0, n], joint / joint.sum(), atol=1e-12, rtol=0)
    # (B,) alphas give the same rows
    got_b = posterior(
        F.one_hot(x0, 5).to(F64).expand(2, -1, -1),
        x_t.expand(2, -1),
        torch.tensor([a_s, a_s], dtype=F64),
        torch.tensor([a_t, a_t], dtype=F64),
        states,
    )
    assert torch.allclose(got_b, got.expand(2, -1, -1), atol=1e-14, rtol=0)


def test_posterior_of_a_distribution_is_the_mean_parameterisation():
    states = _states(5, excluded=1)
    ids = states.nonzero().squeeze(-1)
    g = torch.Generator().manual_seed(1)
    a_s, a_t = 0.7, 0.35
    x = torch.rand(1, 1, 5, generator=g, dtype=F64).masked_fill(~states, 0.0)
    x = x / x.sum()
    u = states.to(F64) / 4
    for it in ids.tolist():
        got = posterior(x, torch.tensor([[it]]), a_s, a_t, states)[0, 0]
        # the normalised product formula
        prod = (a_t / a_s * F.one_hot(torch.tensor(it), 5) + (1 - a_t / a_s) * u) * (
            a_s * x[0, 0] + (1 - a_s) * u
        )
        assert torch.allclose(got, prod / prod.sum(), atol=1e-14, rtol=0)
        # = sum_x0 w(x0) q(x_s | x_t, x0), w(x0) ∝ x[x0] q(x_t | x0)
        lik = _transition(a_t, states)[:, it]
        w = x[0, 0] * lik
        w = w / w.sum()
        onehots = F.one_hot(ids, 5).to(F64).unsqueeze(0)
        rows = posterior(onehots, torch.full((1, 4), it), a_s, a_t, states)[0]
        assert torch.allclose(got, (w[ids].unsqueeze(-1) * rows).sum(0), atol=1e-14, rtol=0)
        assert abs(float(got.sum()) - 1) < 1e-14 and got[1] == 0.0


# --- the continuous-time ELBO ---------------------------------------------------------------

ALPHAS = [1e-3, 0.05, 0.3, 0.7, 0.99, 0.999]


def test_diffusion_loss_is_zero_at_the_truth_and_positive_elsewhere():
    states, x0, x_t, logits = _random_case(12, 5, 6, 30, 3.0, torch.Generator().manual_seed(2))
    alpha = torch.tensor(ALPHAS, dtype=F64)
    dalpha = torch.full((6,), -0.999, dtype=F64)
    exact = torch.full((6, 30, 12), -math.inf, dtype=F64).scatter(-1, x0.unsqueeze(-1), 0.0)
    assert (diffusion_loss(exact, x_t, x0, alpha, dalpha, states) == 0).all()
    loss = diffusion_loss(logits.log_softmax(-1), x_t, x0, alpha, dalpha, states)
    assert loss.shape == (6, 30) and (loss > 0).all()


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_diffusion_loss_equals_the_closed_form_and_its_gradient(scale):
    states, x0, x_t, logits = _random_case(12, 5, 6, 30, scale, torch.Generator().manual_seed(3))
    alpha = torch.tensor(ALPHAS, dtype=F64)
    dalpha = torch.full_like(alpha, -1.0)
    lx = logits.log_softmax(-1).requires_grad_()
    lx_ref = lx.detach().clone().requires_grad_()
    loss = diffusion_loss(lx, x_t, x0, alpha, dalpha, states)
    ref = _closed_form(lx_ref, x_t, x0, alpha, dalpha, states)
    assert torch.allclose(loss, ref, rtol=1e-9, atol=1e-12)
    weights = torch.randn(6, 30, dtype=F64)
    (loss * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.allclose(lx.grad, lx_ref.grad, rtol=1e-9, atol=1e-9)
    assert (lx.grad[..., 5] == 0).all()


def test_diffusion_loss_accepts_alpha_shapes_and_low_precision_inputs():
    states, x0, x_t, logits = _random_case(12, 5, 3, 8, 2.0, torch.Generator().manual_seed(8))
    lx = logits.log_softmax(-1)
    alpha = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    ref = diffusion_loss(lx, x_t, x0, alpha, -1.0, states)
    per_token = diffusion_loss(lx, x_t, x0, alpha[:, None].expand(3, 8), -torch.ones(3, 8), states)
    assert torch.allclose(per_token, ref, rtol=1e-12)
    scalar = diffusion_loss(lx, x_t, x0, 0.5, -1.0, states)
    assert torch.allclose(scalar[1], ref[1], rtol=1e-12)
    lx16 = logits.to(torch.bfloat16).log_softmax(-1).requires_grad_()
    loss16 = diffusion_loss(lx16, x_t, x0, alpha.float(), -1.0, states)
    assert loss16.dtype == torch.float32 and torch.allclose(loss16.double(), ref, rtol=0.1)
    loss16.sum().backward()
    assert lx16.grad.dtype == torch.bfloat16 and torch.isfinite(lx16.grad).all()


def test_diffusion_loss_gradcheck_through_log_softmax():
    states, x0, x_t, logits = _random_case(7, 2, 3, 4, 2.0, torch.Generator().manual_seed(4))
    logits = logits.masked_fill(~states, -1e4).requires_grad_()  # finite for gradcheck
    alpha = torch.tensor([0.02, 0.5, 0.99], dtype=F64)

    def f(z):
        lx = z.log_softmax(-1).masked_fill(~states, -math.inf)
        return diffusion_loss(lx, x_t, x0, alpha, -1.0, states)

    assert torch.autograd.gradcheck(f, (logits,))


def test_diffusion_loss_float32_is_accurate_at_a_large_vocabulary():
    """The spec warns of cancellations (1/c ~ V a / (1 - a) ~ 3e7 here); the stable form keeps
    float32 close to float64 on the same inputs, and is robust to the ~1e-5 normalisation error
    of a float32 log_softmax over 30k ids (to which the literal closed form is sensitive)."""
    g = torch.Generator().manual_seed(5)
    states, x0, x_t, logits = _random_case(30522, 103, 8, 16, 2.0, g, dtype=torch.float32)
    logits.scatter_add_(-1, x0.unsqueeze(-1), torch.full((8, 16, 1), 12.0))  # a decent model
    lx = logits.log_softmax(-1)
    alpha = torch.tensor([1e-3, 0.05, 0.3, 0.6, 0.9, 0.99, 0.999, 0.9995])
    loss32 = diffusion_loss(lx, x_t, x0, alpha, -1.0, states)
    loss64 = diffusion_loss(lx.double(), x_t, x0, alpha.double(), -1.0, states)
    assert loss32.dtype == torch.float32
    assert ((loss32.double() - loss64).abs() <= 1e-5 * loss64 + 1e-7).all()
    lx_exact = lx.double().log_softmax(-1)  # renormalised in float64
    ref = _closed_form(lx_exact, x_t, x0, alpha.double(), -1.0, states)
    exact = diffusion_loss(lx_exact, x_t, x0, alpha.double(), -1.0, states)
    assert torch.allclose(exact, ref, rtol=1e-8, atol=1e-12)
    assert ((loss32.double() - ref).abs() <= 1e-4 * ref + 1e-7).all()


def test_diffusion_loss_integrates_to_the_limit_of_the_discrete_elbo():
    """For a fixed model x_theta(x_t, t) and L = 1: int_{eps}^1 E_{x_t} L dt equals the limit of
    sum_i E_{x_t} KL(q(x_s | x_t, x_0) || p_theta(x_s | x_t)) over a grid of N steps; the gap
    is O(1/N) (its sign depends on the model)."""
    v_full, eps = 5, 1e-3
    states = _states(v_full, excluded=2)
    ids = states.nonzero().squeeze(-1)
    n_states, x0 = ids.numel(), 3
    g = torch.Generator().manual_seed(6)
    w1 = torch.randn(v_full, v_full, generator=g, dtype=F64)
    w2 = torch.randn(v_full, generator=g, dtype=F64)

    def log_x_theta(t):  # (N,) -> (N, V, V_full) for x_t = each state
        t = t[:, None, None]
        logits = w1[ids] * (1.5 - t) + w2 * torch.sin(3 * t)
        return logits.masked_fill(~states, -math.inf).log_softmax(-1)

    def marginal(a):  # q(x_t = state | x_0), (N, V)
        return a[:, None] * (ids == x0) + (1 - a[:, None]) / n_states

    # continuous: Gauss-Legendre in log t over [eps, 1]
    nodes, weights = np.polynomial.legendre.leggauss(200)
    tau = torch.tensor((nodes + 1) / 2 * -math.log(eps) + math.log(eps))
    t = tau.exp()
    alpha, dalpha = log_linear_alpha(t, eps)
    x_t, x0s = ids.expand(t.numel(), -1), torch.full((t.numel(), n_states), x0)
    loss = diffusion_loss(log_x_theta(t), x_t, x0s, alpha, dalpha, states)
    quad_w = torch.tensor(weights * -math.log(eps) / 2) * t
    integral = float(((marginal(alpha) * loss).sum(-1) * quad_w).sum())

    def discrete(n):
        grid = torch.linspace(eps, 1, n + 1, dtype=F64)
        (a_s, _), (a_t, _) = log_linear_alpha(grid[:-1], eps), log_linear_alpha(grid[1:], eps)
        x_t, x0s = ids.expand(n, -1), torch.full((n, n_states), x0)
        q = posterior(F.one_hot(x0s, v_full).to(F64), x_t, a_s, a_t, states)
        p = posterior(log_x_theta(grid[1:]).exp(), x_t, a_s, a_t, states)
        kl = torch.where(q > 0, q * (q.log() - p.log()), torch.zeros_like(q)).sum(-1)
        return float((marginal(a_t) * kl).sum())

    gaps = [discrete(n) - integral for n in (1000, 4000)]
    assert integral > 0
    assert abs(gaps[1]) < 1e-3 * integral
    assert 3.5 < gaps[0] / gaps[1] < 4.5  # O(1/N)
    richardson = (4 * (integral + gaps[1]) - (integral + gaps[0])) / 3
    assert abs(richardson - integral) < 0.1 * abs(gaps[1])  # the 1/N term is the whole gap


# --- the duality map ------------------------------------------------------------------------


def test_duality_map_for_two_states_is_erf():
    """V = 2: p = P(m + e1 > e2) = Phi(m / sqrt 2), so alpha = 2 p - 1 = erf(m / 2)."""
    dm = DualityMap(2, gamma_min=-4.0, gamma_max=3.0, points=701)
    m = torch.exp(-0.5 * dm.gammas)
    assert torch.allclose(dm.alphas, torch.erf(m / 2), atol=1e-13, rtol=0)
    dalpha = -0.5 * m * torch.exp(-(m**2) / 4) / math.sqrt(math.pi)
    assert torch.allclose(dm.dalphas, dalpha, atol=1e-13, rtol=0)


def test_duality_map_against_monte_carlo():
    v, n = 8, 200_000
    dm = DualityMap(v, gamma_min=-4.0, gamma_max=1.0)
    rng = np.random.default_rng(0)
    for gamma in (-3.0, -1.5, 0.5):
        m = math.exp(-gamma / 2)
        eps = rng.standard_normal((n, v))
        eps[:, 0] += m
        p_hat = float((eps.argmax(1) == 0).mean())
        a = float(dm.alpha(torch.tensor(gamma, dtype=F64)))
        p = a + (1 - a) / v
        assert abs(p_hat - p) < 4 * math.sqrt(p * (1 - p) / n), (gamma, p_hat, p)


def test_duality_map_reference_values_for_gpt2():
    dm = DualityMap(50257)
    gamma = torch.tensor([-3.55, -3.0, -1.85], dtype=F64)
    ref = torch.tensor([0.94547, 0.59624, 0.04932], dtype=F64)
    assert torch.allclose(dm.alpha(gamma), ref, atol=2e-4, rtol=0)
    assert (dm.alphas.diff() < 0).all() and (dm.dalphas < 0).all()
    # the analytic derivative against a central difference of the table
    h = (dm.gamma_max - dm.gamma_min) / (dm.points - 1)
    fd = (dm.alphas[2:] - dm.alphas[:-2]) / (2 * h)
    assert torch.allclose(dm.dalphas[1:-1], fd, atol=2e-6, rtol=0)
    # ... and of the interpolant off the grid
    g = torch.tensor([-4.2, -3.3, -2.01, -1.3], dtype=F64)
    fd = (dm.alpha(g + 1e-3) - dm.alpha(g - 1e-3)) / 2e-3
    assert torch.allclose(dm.dalpha_dgamma(g), fd, atol=1e-5, rtol=0)
    # clipping outside the range, dtype follows gamma
    out = dm.alpha(torch.tensor([-9.0, 0.0]))
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), dm.alphas[[0, -1]], atol=1e-7, rtol=0)


def test_gaussian_latent_argmax_is_a_uniform_state_corruption():
    states = _states(9, excluded=4)  # V = 8
    dm = DualityMap(8, gamma_min=-4.0, gamma_max=1.0)
    gamma = torch.tensor([-3.0, -1.0, 0.5])
    n = 40_000
    x0 = torch.full((3, n), 6)
    w = gaussian_latent(x0, gamma, states, torch.Generator().manual_seed(7))
    assert w.shape == (3, n, 9) and (w[..., 4] == -math.inf).all()
    assert torch.isfinite(w[..., states]).all()
    z = w.argmax(-1)
    assert (z != 4).all()
    alpha = dm.alpha(gamma)
    for b in range(3):
        freq = torch.bincount(z[b], minlength=9).double() / n
        expect = torch.full((9,), (1 - float(alpha[b])) / 8, dtype=F64)
        expect[6] += float(alpha[b])
        expect[4] = 0.0
        se = (expect * (1 - expect) / n).sqrt()
        assert ((freq - expect).abs() <= 5 * se + 1e-12).all(), (b, freq, expect)


def test_gaussian_latent_is_the_variance_preserving_mix_of_the_one_hot_and_the_noise():
    """w = sqrt(sigmoid(-gamma)) onehot(x_0) + sqrt(sigmoid(gamma)) eps, eps the generator's one
    (B, L, V_full) normal draw: signal^2 + noise variance = 1 at every gamma. The argmax test
    above cannot see a common rescaling of both parts (argmax is scale-free); this one can."""
    states = _states(7, excluded=2)
    gamma = torch.tensor([-4.0, -1.5, 0.0, 2.0])
    x0 = torch.tensor([[0, 3, 6, 1, 4, 5]]).repeat(4, 1)
    w = gaussian_latent(x0, gamma, states, torch.Generator().manual_seed(11))
    eps = torch.randn((4, 6, 7), generator=torch.Generator().manual_seed(11))
    signal2, noise2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)  # alpha^2, sigma^2
    want = signal2.sqrt().view(-1, 1, 1) * F.one_hot(x0, 7) + noise2.sqrt().view(-1, 1, 1) * eps
    assert torch.allclose(w[..., states], want[..., states], rtol=0, atol=1e-6)
    assert (w[..., 2] == -math.inf).all()
    # the moments over many draws: E w[x0] = signal, Var w_j = noise^2, so signal^2 + var = 1
    n = 20_000
    w = gaussian_latent(torch.full((4, n), 3), gamma, states, torch.Generator().manual_seed(12))
    at_x0, var = w[..., 3].double().mean(1), w[..., states].double().var(1).mean(-1)
    se_mean, se_var = (noise2.double() / n).sqrt(), noise2.double() * (2 / n) ** 0.5
    assert ((at_x0 - signal2.double().sqrt()).abs() <= 5 * se_mean).all(), at_x0
    assert ((var - noise2.double()).abs() <= 5 * se_var).all(), var
    assert torch.allclose(at_x0**2 + var, torch.ones(4, dtype=F64), atol=0.03)
