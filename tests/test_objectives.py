"""The training objectives of the processes layer: one function per objective.

Each is checked against a frozen, verbatim copy of the stage code it replaced (same values, same
random draws, same gradients) and on closed-form cases (the MeanFlow identity on a linear flow).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from diladiff.config import ConfigError
from diladiff.methods.diladiff.meanflow import (
    DERIVATIVES,
    directional_derivative,
    meanflow_loss,
    sample_t_r,
)
from diladiff.processes.gaussian import diffuse, x0_prediction_loss
from diladiff.processes.masking import (
    loss_weight,
    mask_tokens,
    masked_diffusion_loss,
    subs_log_probs,
    subs_logits,
)


def grads(params):
    out = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


# --------------------------------------------------------------------------- masking (MDLM)

V, W, MASK = 11, 6, 10


def toy_denoiser(seed=0):
    """A trunk (embedding + tanh) and a vocabulary head (linear), with parameters."""
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(V, W)
    head = torch.nn.Linear(W, V)
    return (lambda x_t: torch.tanh(emb(x_t))), head, [*emb.parameters(), *head.parameters()]


def reference_masked_loss(hidden_fn, head, x0, t, weight, mask_id, generator):
    """Frozen copy of methods.mdlm.stage.masked_diffusion_loss + masked_nll before the refactor."""
    x_t = mask_tokens(x0, t, mask_id, generator)
    hidden = hidden_fn(x_t)
    sel = x_t == mask_id
    logits = subs_logits(head(hidden[sel]), mask_id)
    nll, rows = F.cross_entropy(logits, x0[sel], reduction="none"), sel.nonzero()[:, 0]
    return (weight[rows] * nll).sum() / x0.numel()


def masked_inputs(seed=1, batch=5, length=9):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK, (batch, length), generator=g)
    t = torch.rand(batch, generator=g).clamp(min=0.05)
    return x0, t


@pytest.mark.parametrize("kind", ["elbo", "constant"])
def test_masked_diffusion_loss_matches_mdlm(kind):
    ref = reference_masked_loss
    hidden_fn, head, params = toy_denoiser()
    x0, t = masked_inputs()
    w = loss_weight(t, kind)
    g_new, g_old = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    new = masked_diffusion_loss(hidden_fn, head, x0, t, w, MASK, g_new)
    new.backward()
    grads_new = grads(params)
    old = ref(hidden_fn, head, x0, t, w, MASK, g_old)
    old.backward()
    assert torch.equal(new, old)
    assert all(torch.equal(a, b) for a, b in zip(grads_new, grads(params), strict=True))
    assert torch.equal(g_new.get_state(), g_old.get_state())  # the same draws, consumed alike


def test_masked_diffusion_loss_closed_form():
    """A head that ignores its input gives uniform SUBS probabilities over the V - 1 non-mask
    tokens: loss = (1 / (B L)) sum_b w_b (#masked in row b) log(V - 1)."""
    x0, t = masked_inputs(batch=6, length=20)
    w = loss_weight(t, "elbo")
    hidden_fn = lambda x_t: torch.zeros(*x_t.shape, W)  # noqa: E731
    head = lambda h: torch.zeros(h.shape[0], V)  # noqa: E731
    loss = masked_diffusion_loss(hidden_fn, head, x0, t, w, MASK, torch.Generator().manual_seed(3))
    x_t = mask_tokens(x0, t, MASK, torch.Generator().manual_seed(3))
    counts = (x_t == MASK).sum(1).float()
    expected = (w * counts).sum() * math.log(V - 1) / x0.numel()
    torch.testing.assert_close(loss, expected)


def test_masked_diffusion_loss_head_sees_masked_rows_only():
    x0, t = masked_inputs()
    seen = []
    hidden_fn, head, _ = toy_denoiser()

    def spy(h):
        seen.append(h.shape[0])
        return head(h)

    masked_diffusion_loss(hidden_fn, spy, x0, t, t, MASK, torch.Generator().manual_seed(2))
    x_t = mask_tokens(x0, t, MASK, torch.Generator().manual_seed(2))
    assert seen == [int((x_t == MASK).sum())]


def test_subs_never_predicts_mask_and_copies_unmasked():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, V, generator=g)
    x_t = torch.randint(0, V, (3, 4), generator=g)
    x_t[0, :2] = MASK
    logp = subs_log_probs(logits.clone(), x_t, MASK)
    assert torch.isneginf(logp[..., MASK]).all()
    keep = x_t != MASK
    assert torch.equal(logp[keep].argmax(-1), x_t[keep])
    assert torch.equal(logp[keep].amax(-1), torch.zeros(int(keep.sum())))
    torch.testing.assert_close(logp[~keep].exp().sum(-1), torch.ones(int((~keep).sum())))


# --------------------------------------------------------------------------- Gaussian (LaDiff)

D_WARP = 1.7


def toy_x0_fn(seed=0):
    """A clean-latent predictor with parameters that uses t and (optionally) z_sc."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(4, 4)
    sc = torch.nn.Linear(4, 4)

    def x0_fn(z_t, t, z_sc=None):
        out = lin(z_t) * (1 - t).view(-1, 1, 1)
        return out if z_sc is None else out + sc(z_sc)

    return x0_fn, [*lin.parameters(), *sc.parameters()]


def reference_ladiff_loss(x0_fn, z, t_eps, d, generator, self_condition):
    """Frozen copy of LaDiff.diffusion_loss before the refactor (self.x0 -> x0_fn)."""
    t = t_eps + (1 - 2 * t_eps) * torch.rand(z.shape[0], generator=generator, device=z.device)
    eps = torch.randn(z.shape, generator=generator, device=z.device)
    z_t = diffuse(z, t, eps, d)
    z_sc = None
    if self_condition:
        with torch.no_grad():
            z_sc = x0_fn(z_t, t).detach()
    return ((x0_fn(z_t, t, z_sc) - z) ** 2).mean()


@pytest.mark.parametrize("self_condition", [False, True])
def test_x0_prediction_loss_matches_ladiff(self_condition):
    ref = reference_ladiff_loss
    x0_fn, params = toy_x0_fn()
    z = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(4))
    g_new, g_old = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    new = x0_prediction_loss(x0_fn, z, 1e-3, D_WARP, g_new, self_condition)
    new.backward()
    grads_new = grads(params)
    old = ref(x0_fn, z, 1e-3, D_WARP, g_old, self_condition)
    old.backward()
    assert torch.equal(new, old)
    assert all(torch.equal(a, b) for a, b in zip(grads_new, grads(params), strict=True))
    assert torch.equal(g_new.get_state(), g_old.get_state())


def test_x0_prediction_loss_exact_predictor_is_zero_and_self_conditioning_is_stopgrad():
    z = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(0))
    calls = []

    def oracle(z_t, t, z_sc=None):
        calls.append((torch.is_grad_enabled(), z_sc))
        return z.clone()

    loss = x0_prediction_loss(oracle, z, 1e-3, D_WARP, torch.Generator().manual_seed(1), True)
    assert float(loss) == 0.0
    (sc_grad, sc_in), (main_grad, main_sc) = calls
    assert not sc_grad and sc_in is None  # first pass: no gradient, no self-conditioning
    assert main_grad and torch.equal(main_sc, z)  # second pass conditioned on the first
    x0_prediction_loss(oracle, z, 1e-3, D_WARP, None, False)
    assert calls[-1][1] is None and len(calls) == 3


def test_x0_prediction_loss_time_range():
    seen = []

    def x0_fn(z_t, t, z_sc=None):
        seen.append(t)
        return z_t

    z = torch.zeros(4096, 1, 1)
    x0_prediction_loss(x0_fn, z, 0.1, D_WARP, torch.Generator().manual_seed(0), False)
    assert seen[0].min() >= 0.1 and seen[0].max() <= 0.9
    assert seen[0].min() < 0.11 and seen[0].max() > 0.89


# --------------------------------------------------------------------------- MeanFlow (DiLaDiff)


def toy_u_fn(seed=0, dtype=torch.float32):
    """u(z, t, r) = (z A) t^2 + b sin(r) + c t r: closed form, nonlinear in t and r."""
    torch.manual_seed(seed)
    a = torch.nn.Parameter(0.3 * torch.randn(4, 4, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(4, dtype=dtype))
    c = torch.nn.Parameter(torch.randn(4, dtype=dtype))

    def u_fn(z, t, r):
        t3, r3 = t.view(-1, 1, 1), r.view(-1, 1, 1)
        return (z @ a) * t3**2 + b * torch.sin(r3) + c * t3 * r3

    return u_fn, [a, b, c]


def meanflow_inputs(seed=0, batch=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(batch, 3, 4, generator=g, dtype=dtype)
    v = torch.randn(batch, 3, 4, generator=g, dtype=dtype)
    t = torch.tensor([0.9, 0.6, 0.4, 0.2], dtype=dtype)[:batch]
    r = torch.tensor([0.5, 0.6, 0.1, 0.05], dtype=dtype)[:batch]  # one r = t row
    return v, z_t, t, r


def reference_meanflow(u_fn, v, z_t, t, r, tangent_weight, p, c, derivative, fd_eps):
    """Frozen copy of DiLaDiff.meanflow_terms + the loss lines of DiLaDiff.forward before the
    refactor (self.average_velocity(., ., ., z_sc) -> u_fn)."""
    tangents = (v, torch.ones_like(t), torch.zeros_like(r))
    u, dudt = directional_derivative(u_fn, (z_t, t, r), tangents, derivative, fd_eps)
    interval = (t - r).view(-1, *([1] * (z_t.dim() - 1)))
    u_tgt = (v - tangent_weight * interval * dudt).detach()
    err = ((u - u_tgt) ** 2).flatten(1).mean(1)
    loss = (err / (err.detach() + c) ** p).mean()
    return loss, {"loss": loss.detach(), "mse": err.mean().detach()}


@pytest.mark.parametrize("derivative", DERIVATIVES)
def test_meanflow_loss_matches_diladiff(derivative):
    ref = reference_meanflow
    u_fn, params = toy_u_fn()
    v, z_t, t, r = meanflow_inputs()
    args = (u_fn, v, z_t, t, r, 0.7, 0.5, 1e-3, derivative, 1e-3)
    new, m_new = meanflow_loss(*args)
    new.backward()
    grads_new = grads(params)
    old, m_old = ref(*args)
    old.backward()
    assert torch.equal(new, old)
    assert m_new.keys() == m_old.keys() == {"loss", "mse"}
    assert all(torch.equal(m_new[k], m_old[k]) for k in m_new)
    assert not m_new["loss"].requires_grad and not m_new["mse"].requires_grad
    assert all(torch.equal(a, b) for a, b in zip(grads_new, grads(params), strict=True))


def test_meanflow_loss_closed_form_target():
    """u = (z A) t^2 + b sin r + c t r:  du/dt along (v, 1, 0) = (v A) t^2 + 2 (z A) t + c r;
    with p = 0 the loss is the plain mean squared error to that target."""
    u_fn, (a, b, c) = toy_u_fn(dtype=torch.float64)
    v, z_t, t, r = meanflow_inputs(dtype=torch.float64)
    t3, r3 = t.view(-1, 1, 1), r.view(-1, 1, 1)
    with torch.no_grad():
        u = u_fn(z_t, t, r)
        dudt = (v @ a) * t3**2 + 2 * (z_t @ a) * t3 + c * r3
        expected = ((u - (v - 0.8 * (t3 - r3) * dudt)) ** 2).mean()
    for derivative, tol in (("jvp", 1e-12), ("finite_difference", 1e-7)):
        loss, metrics = meanflow_loss(u_fn, v, z_t, t, r, 0.8, 0.0, 1e-3, derivative)
        torch.testing.assert_close(loss, expected, rtol=tol, atol=tol)
        torch.testing.assert_close(metrics["mse"], expected, rtol=tol, atol=tol)


def test_meanflow_loss_adaptive_weighting():
    """err_b / (err_b + c)^p per example; the weight is a constant for the gradient."""
    u_fn, _ = toy_u_fn(dtype=torch.float64)
    v, z_t, t, r = meanflow_inputs(dtype=torch.float64)
    plain, _ = meanflow_loss(u_fn, v, z_t, t, r, 1.0, 0.0, 0.0)
    full, m = meanflow_loss(u_fn, v, z_t, t, r, 1.0, 1.0, 0.0)
    torch.testing.assert_close(plain, m["mse"])
    torch.testing.assert_close(full, torch.tensor(1.0, dtype=torch.float64))  # err / err
    assert full.requires_grad


@pytest.mark.parametrize("derivative", DERIVATIVES)
def test_meanflow_identity_on_a_linear_flow(derivative):
    """For dz/dt = a * z (a per coordinate) the exact average velocity over [r, t] is
    u(z_t, t, r) = (z_t - z_r) / (t - r) = (1 - exp(-a (t - r))) z_t / (t - r), and v = a z_t:
    the MeanFlow target v - (t - r) du/dt equals u, so the loss vanishes."""
    g = torch.Generator().manual_seed(0)
    rate = torch.randn(3, 4, generator=g, dtype=torch.float64)
    z_t = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.95, 0.7, 0.5, 0.3, 0.1], dtype=torch.float64)
    r = torch.tensor([0.05, 0.6, 0.2, 0.29, 0.0], dtype=torch.float64)

    def u_exact(z, tt, rr):
        h = (tt - rr).view(-1, 1, 1)
        return -torch.expm1(-rate * h) * z / h

    v = rate * z_t
    loss, m = meanflow_loss(u_exact, v, z_t, t, r, 1.0, 0.0, 1e-3, derivative, 1e-4)
    assert float(m["mse"]) < (1e-24 if derivative == "jvp" else 1e-12)
    # a wrong velocity field (here 0) breaks the identity
    _, m_bad = meanflow_loss(u_exact, torch.zeros_like(v), z_t, t, r, 1.0, 0.0, 1e-3, derivative)
    assert float(m_bad["mse"]) > 1e-3


def test_meanflow_loss_at_r_equals_t_is_flow_matching():
    """r = t: the tangent term vanishes and the target is v itself."""
    u_fn, _ = toy_u_fn(dtype=torch.float64)
    v, z_t, t, _ = meanflow_inputs(dtype=torch.float64)
    loss, _ = meanflow_loss(u_fn, v, z_t, t, t, 1.0, 0.0, 1e-3)
    with torch.no_grad():
        expected = ((u_fn(z_t, t, t) - v) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_directional_derivative_methods_agree_and_unknown_method_raises():
    u_fn, _ = toy_u_fn(dtype=torch.float64)
    v, z_t, t, r = meanflow_inputs(dtype=torch.float64)
    tangents = (v, torch.ones_like(t), torch.zeros_like(r))
    u1, d1 = directional_derivative(u_fn, (z_t, t, r), tangents, "jvp")
    u2, d2 = directional_derivative(u_fn, (z_t, t, r), tangents, "finite_difference", 1e-4)
    torch.testing.assert_close(u1, u2)
    torch.testing.assert_close(d1, d2, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="meanflow.derivative"):
        directional_derivative(u_fn, (z_t, t, r), tangents, "backward")


def test_sample_t_r_properties():
    t, r = sample_t_r(20000, -0.4, 1.0, 0.25, torch.Generator().manual_seed(0), "cpu")
    assert t.shape == r.shape == (20000,)
    assert (t >= r).all() and (r > 0).all() and (t < 1).all()
    share = float((t == r).float().mean())
    assert abs(share - 0.25) < 0.015
    t0, r0 = sample_t_r(2000, 0.0, 1.0, 0.0, torch.Generator().manual_seed(1), "cpu")
    assert (t0 > r0).all()
    t1, r1 = sample_t_r(2000, 0.0, 1.0, 1.0, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(t1, r1)
    # t and r are the max and min of two LogitNormal(m, s) draws: logit(r) has mean below m
    assert float(torch.logit(r0).mean()) < 0.0 < float(torch.logit(t0).mean())
