"""The uniform-state discrete diffusion process of DUO ("The Diffusion Duality"), pure math.

State space. The [MASK] token is EXCLUDED: a boolean vector `states` (V_full,) is True for every
token id except the mask id, and V = states.sum() is the number of states. Every probability
vector is over the full vocabulary (V_full entries) and is zero at the non-states; log-probability
inputs carry -inf there. Let u = states / V be the uniform distribution over the states.

Forward process, independently per position (linear alpha, DUO's "log-linear" schedule):

    q(x_t | x_0) = Cat( alpha_t onehot(x_0) + (1 - alpha_t) u ),
    alpha_t = 1 - (1 - eps) t,   alpha_1 = eps > 0,

i.e. a token is kept with probability alpha_t, else replaced by a uniform draw over the V states
(which may return x_0 itself). Forward transitions compose: q(x_t | x_s) = Cat(alpha_ts
onehot(x_s) + (1 - alpha_ts) u) with alpha_ts = alpha_t / alpha_s, which gives the posterior
`posterior` and the continuous-time ELBO `diffusion_loss`. The denoiser is conditioned on
sigma = -log alpha_t (`sigma_from_alpha`), not on t.

Duality (DUO section 3; `DualityMap`, `gaussian_latent`). Embed x_0 in a Gaussian diffusion over
R^V, w = sqrt(sigmoid(-gamma)) onehot(x_0) + sqrt(sigmoid(gamma)) eps, eps ~ N(0, I). By the
symmetry of eps, z = argmax_{v in states} w_v equals x_0 with probability

    p(gamma) = P(argmax w = x_0) = int N(x; m, 1) Phi(x)^(V - 1) dx,   m = exp(-gamma / 2),

and is uniform over the other V - 1 states otherwise. That is exactly the uniform-state marginal
q(z | x_0) with alpha(gamma) = (V p(gamma) - 1) / (V - 1), since alpha + (1 - alpha) / V = p.
So the argmax of the Gaussian latent is a uniform-state corruption, and the ELBO of this module
applies to it with alpha = alpha(gamma_t), alpha' = d alpha / d gamma * d gamma / d t.
"""

from __future__ import annotations

import math

import torch

Scalar = torch.Tensor | float


def log_linear_alpha(t: Scalar, eps: float = 1e-3) -> tuple[Scalar, Scalar]:
    """(alpha_t, d alpha_t / dt) = (1 - (1 - eps) t, -(1 - eps)), shaped like t.

    eps > 0 keeps alpha_1 = eps away from 0 (the ELBO weight alpha' / (V alpha) diverges there).
    """
    alpha = 1.0 - (1.0 - eps) * t
    if isinstance(t, torch.Tensor):
        return alpha, torch.full_like(t, -(1.0 - eps))
    return alpha, -(1.0 - eps)


def sigma_from_alpha(alpha: Scalar) -> Scalar:
    """sigma = -log(alpha): the denoiser's time input."""
    if isinstance(alpha, torch.Tensor):
        return -torch.log(alpha)
    return -math.log(alpha)


def _state_ids(states: torch.Tensor) -> torch.Tensor:
    """The token ids of the states, ascending (V,)."""
    return states.nonzero().squeeze(-1)


def prior_sample(
    shape: tuple[int, ...] | torch.Size,
    states: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_1 ~ u^{shape}: i.i.d. uniform draws over the V states (never a non-state id), on the
    device of `states`."""
    ids = _state_ids(states)
    idx = torch.randint(0, ids.numel(), tuple(shape), generator=generator, device=states.device)
    return ids[idx]


def corrupt(
    x0: torch.Tensor,
    alpha: Scalar,
    states: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) = Cat(alpha onehot(x_0) + (1 - alpha) u), independently per token:

        keep = rand < alpha ;  x_t = where(keep, x_0, state_ids[randint(0, V)]),

    so P(x_t = x_0) = alpha + (1 - alpha) / V and P(x_t = j) = (1 - alpha) / V for every other
    state j. x0 (B, L) must hold state ids; alpha is a float, (B,) or (B, L). Consumes
    `generator` twice (rand, then randint, both of shape x0.shape).
    """
    alpha = torch.as_tensor(alpha, device=x0.device)
    if alpha.dim() == 1:
        alpha = alpha.unsqueeze(-1)
    keep = torch.rand(x0.shape, generator=generator, device=x0.device) < alpha
    return torch.where(keep, x0, prior_sample(x0.shape, states, generator))


def _per_row(a: Scalar, like: torch.Tensor) -> torch.Tensor:
    """A float, 0-dim, (B,) or (B, L) tensor as a tensor broadcastable against (B, L, V)."""
    a = torch.as_tensor(a, dtype=like.dtype, device=like.device)
    if a.dim() == 1:
        return a.reshape(-1, 1, 1)
    if a.dim() == 2:
        return a.unsqueeze(-1)
    return a


def posterior(
    x: torch.Tensor,
    x_t: torch.Tensor,
    alpha_s: Scalar,
    alpha_t: Scalar,
    states: torch.Tensor,
) -> torch.Tensor:
    """q(x_s | x_t, x) for s < t, with x (B, L, V_full) a distribution over the states (the
    one-hot of x_0, or the denoiser's x_theta: the "mean" parameterisation) and x_t ids (B, L):

        q(x_s | x_t, x)  ∝  (a_ts onehot(x_t) + (1 - a_ts) u) ⊙ (a_s x + (1 - a_s) u),
        a_ts = a_t / a_s,

    i.e. q(x_t | x_s) times the marginal sum_{x_0} x[x_0] q(x_s | x_0). Multiplied out (times V):

        numerator = V a_t x[x_t] e_{x_t} + (a_ts - a_t) e_{x_t} + (a_s - a_t) x
                    + (1 - a_ts)(1 - a_s) / V * states,

    normalised by its sum (= V a_t x[x_t] + 1 - a_t for a normalised x). Linear in x up to the
    normalisation: with x = x_theta it equals sum_{x_0} w(x_0) q(x_s | x_t, x_0) with weights
    w(x_0) ∝ x_theta[x_0] q(x_t | x_0). Zero at the non-states. Computed in x's dtype (pass
    float64 for sampling); alpha_s, alpha_t are floats or (B,) tensors; alpha_s = 1 is allowed
    (the final noise-removal step).
    """
    a_s = _per_row(alpha_s, x)
    a_t = _per_row(alpha_t, x)
    a_ts = a_t / a_s
    n_states = states.sum().to(x.dtype)
    idx = x_t.unsqueeze(-1)
    x_at_t = x.gather(-1, idx)
    num = (a_s - a_t) * x
    num.add_(((1 - a_ts) * (1 - a_s) / n_states) * states.to(x.dtype))
    num.scatter_add_(-1, idx, n_states * a_t * x_at_t + (a_ts - a_t))
    num.masked_fill_(~states, 0.0)
    return num.div_(num.sum(-1, keepdim=True))


# --------------------------------------------------------------------------------------------
# The continuous-time ELBO.

_SERIES_CUT = 0.1
_SERIES_TERMS = 18  # z^2 .. z^18: truncation below 1e-17 relative for |z| < 0.1


def _phi(z: torch.Tensor, log1p_z: torch.Tensor) -> torch.Tensor:
    """phi(z) = z - log(1 + z) >= 0 for z > -1, without cancellation near z = 0 (a Taylor series
    sum_{n >= 2} (-z)^n / n there). `log1p_z` is log(1 + z), computed by the caller from the
    most accurate ingredients (1 + z itself may round badly near z = -1)."""
    small = z.abs() < _SERIES_CUT
    zs = torch.where(small, z, torch.zeros_like(z))
    series = torch.zeros_like(z)
    for n in range(_SERIES_TERMS, 1, -1):
        series = (series + (1.0 if n % 2 == 0 else -1.0) / n) * zs
    series = series * zs
    return torch.where(small, series, z - log1p_z)


def _per_token(a: Scalar, like: torch.Tensor) -> torch.Tensor:
    """A float, (B,) or (B, L) as a (B, L)-broadcastable tensor of like's dtype."""
    a = torch.as_tensor(a, dtype=like.dtype, device=like.device)
    return a.unsqueeze(-1) if a.dim() == 1 else a


class _DiffusionLoss(torch.autograd.Function):
    """Forward: the stable form of `diffusion_loss` with one (B, L, V_full) temporary. Backward:
    the exact gradient of the closed form (what autograd of the literal formula would give),
    recomputed from log_x_theta with one (B, L, V_full) temporary (the returned gradient)."""

    @staticmethod
    def forward(ctx, log_x_theta, x_t, x0, alpha, dalpha, states):
        dtype = torch.promote_types(log_x_theta.dtype, torch.float32)
        lx = log_x_theta.to(dtype)
        a = _per_token(alpha, lx[..., 0])
        da = _per_token(dalpha, lx[..., 0])
        n = states.sum().to(dtype)  # V, kept as a tensor (no device sync)
        beta = n * a / (1 - a)  # V a / (1 - a)
        big_r = 1 + beta  # xbar[x0] / (1 - a)
        i, k = x_t.unsqueeze(-1), x0.unsqueeze(-1)
        x_i = lx.gather(-1, i).squeeze(-1).exp()
        x_k = lx.gather(-1, k).squeeze(-1).exp()

        y = lx.exp() if lx is log_x_theta else lx.exp_()  # the one (B, L, V_full) temporary
        y.scatter_(-1, k, 0.0)
        s = y.sum(-1)  # sum_{j != x0} x_j (= 1 - x[x0], accurate when small)
        lam = y.mul_(beta.unsqueeze(-1)).log1p_().sum(-1)  # sum_{j != x0} log(1 + beta x_j)
        del y
        bs = beta * s
        lam_rest = bs - lam  # sum_{j != x0} [beta x_j - log(1 + beta x_j)] >= 0

        # x_t = x0:  (V-1)/R phi(e) + (beta s)^2 / (q R) + lam_rest / R,  e = beta s / q
        q_k = 1 + beta * x_k
        e = bs / q_k
        f_eq = ((n - 1) * _phi(e, torch.log1p(e)) + bs * e + lam_rest) / big_r
        # x_t != x0: (V + beta) phi(-w / (1 + w)) + lam_rest + R phi(-beta s / R),  w = beta x_i
        w = beta * x_i
        u = bs / big_r
        # log(1 - u) = log(q / R): from u while u is small, from x_theta[x0] once it is not
        log_q_r = torch.log1p(beta * x_k) - torch.log1p(beta)
        log1p_mu = torch.where(u < 0.5, torch.log1p(-u), log_q_r)
        f_ne = (
            (n + beta) * _phi(-w / (1 + w), -torch.log1p(w)) + lam_rest + big_r * _phi(-u, log1p_mu)
        )
        loss = (-da / (n * a)) * torch.where(x_t == x0, f_eq, f_ne)

        ctx.save_for_backward(log_x_theta, x_t, x0, a, da, n)
        ctx.lx_dtype = dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        log_x_theta, x_t, x0, a, da, n = ctx.saved_tensors
        lx = log_x_theta.to(ctx.lx_dtype)
        grad = grad.to(ctx.lx_dtype)
        # With xbar_m = (1 - a) c_m (c_m = 1 + beta [m = x0]), xbt_m = (1 - a)(1 + beta x_m):
        # dL/dlog x_m = a' [ c_m / xbar_i / (exp(-log x_m) + beta)
        #                    + [m = i] x_i (V / xbt_i)(1 / xbt_i - 1 / xbar_i) ].
        beta = n * a / (1 - a)
        i, k = x_t.unsqueeze(-1), x0.unsqueeze(-1)
        xbar_i = (1 - a) * torch.where(x_t == x0, 1 + beta, torch.ones_like(beta))
        x_i = lx.gather(-1, i).squeeze(-1).exp()
        xbt_i = (1 - a) * (1 + beta * x_i)
        scale = da * grad
        out = lx.neg() if lx is log_x_theta else lx.neg_()
        out.exp_().add_(beta.unsqueeze(-1)).reciprocal_()  # x_m / (1 + beta x_m)
        out.mul_((scale / xbar_i).unsqueeze(-1))
        out.scatter_(-1, k, out.gather(-1, k) * (1 + beta).unsqueeze(-1))
        extra = scale * x_i * (n / xbt_i) * (1 / xbt_i - 1 / xbar_i)
        out.scatter_add_(-1, i, extra.unsqueeze(-1))
        return out.to(log_x_theta.dtype), None, None, None, None, None


def diffusion_loss(
    log_x_theta: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    alpha: Scalar,
    dalpha: Scalar,
    states: torch.Tensor,
) -> torch.Tensor:
    """Per-token integrand (B, L) of DUO's continuous-time ELBO (UDLM's form; DUO_BASE):

        L = (a' / (V a)) [ V / xbar_i - V / xbar_theta_i
                           - sum_{j in states} (xbar_j / xbar_i)
                               log( xbar_theta_i xbar_j / (xbar_theta_j xbar_i) ) ],
        xbar = V a onehot(x_0) + (1 - a),   xbar_theta = V a x_theta + (1 - a),   i = x_t,

    with a = alpha_t, a' = d alpha_t / dt < 0. int E_{x_t ~ q(x_t | x_0)} L dt over the time
    interval is the continuous-time limit of the ELBO's diffusion term sum_i E KL(q(x_s | x_t, x_0)
    || p_theta(x_s | x_t)) (`posterior` with x_theta); DUO adds no prior or reconstruction term.
    L >= 0, and L = 0 iff x_theta = onehot(x_0).

    Evaluated in a cancellation-free form. With r_j = xbar_j / xbar_i, rho_j = xbar_theta_j /
    xbar_theta_i (sum_j rho_j = V / xbar_theta_i), the bracket is minus the generalised KL
    sum_j r_j g(rho_j / r_j), g(y) = y - 1 - log y >= 0. Since xbar takes only two values, with
    beta = V a / (1 - a), R = 1 + beta, s = sum_{j != x_0} x_theta_j, q = 1 + beta x_theta[x_0],
    Lam = sum_{j != x_0} [beta x_theta_j - log(1 + beta x_theta_j)] and phi(z) = z - log(1 + z):

        x_t = x_0:   L = (-a' / (V a)) [ (V - 1) phi(beta s / q) + (beta s)^2 / q + Lam ] / R,
        x_t != x_0:  L = (-a' / (V a)) [ (V + beta) phi(-w / (1 + w)) + Lam + R phi(-beta s / R) ],
                     w = beta x_theta[x_t],

    every term >= 0. Only one (B, L, V_full) temporary is materialised, forward and backward.

    log_x_theta: (B, L, V_full) normalised log-probabilities (a log_softmax), -inf at the
    non-states; computed in its dtype promoted to at least float32. alpha (in (0, 1)) and dalpha:
    floats, (B,) or (B, L). Differentiable in log_x_theta only (custom backward). The backward is
    exactly autograd of the literal closed form; the forward reads 1 - x_theta[x_0] as s, which is
    the same function on the simplex, so gradients with respect to the logits under a log_softmax
    are exact (and the forward is robust to a float32 log_softmax's ~1e-5 normalisation error,
    which the literal closed form amplifies by up to V a / (1 - a)).
    """
    return _DiffusionLoss.apply(log_x_theta, x_t, x0, alpha, dalpha, states)


# --------------------------------------------------------------------------------------------
# The duality map.


class DualityMap:
    """alpha(gamma) of the argmax of the Gaussian latent (DUO eq. 10), tabulated in float64:

        p(gamma) = int N(x; m, 1) Phi(x)^(V - 1) dx,   m = exp(-gamma / 2),
        alpha(gamma) = (V p(gamma) - 1) / (V - 1),
        d alpha / d gamma = V / (V - 1) int -0.5 m (x - m) N(x; m, 1) Phi(x)^(V - 1) dx,

    on `points` equispaced gammas in [gamma_min, gamma_max]. Quadrature: the trapezoid rule on a
    uniform x-grid with step `du` covering [min m - 12, max m + 12] (beyond 12 standard deviations
    the Gaussian factor is below 1e-32 and Phi^(V-1) <= 1), with Phi^(V-1) = exp((V - 1)
    log_ndtr(x)). The integrands are smooth and decay like Gaussians, so the trapezoid rule
    converges spectrally: du = 0.05 already agrees with du = 0.005 to 2e-15.

    `alpha` interpolates the table linearly (error <= h^2 / 8 max|alpha''|, ~1e-7 for the default
    grid). `dalpha_dgamma` interpolates the analytic derivative linearly: O(h^2) accurate
    everywhere, while the finite-difference slope of the alpha interpolant is only O(h) away
    from the cell midpoints. Gammas outside [gamma_min, gamma_max] are clipped to the range
    without an error (both methods then return the boundary values); DUO clips the same way.
    """

    def __init__(
        self,
        num_states: int,
        gamma_min: float = -5.0,
        gamma_max: float = -1.0,
        points: int = 4097,
        du: float = 0.01,
    ) -> None:
        if num_states < 2:
            raise ValueError(f"need at least 2 states, got {num_states}")
        if not gamma_max > gamma_min or points < 2:
            raise ValueError("need gamma_min < gamma_max and points >= 2")
        self.num_states = num_states
        self.gamma_min, self.gamma_max, self.points = float(gamma_min), float(gamma_max), points
        f64 = torch.float64
        self.gammas = torch.linspace(gamma_min, gamma_max, points, dtype=f64)
        m = torch.exp(-0.5 * self.gammas)
        lo, hi = float(m.min()) - 12.0, float(m.max()) + 12.0
        n_u = int(math.ceil((hi - lo) / du)) + 1
        x = torch.linspace(lo, hi, n_u, dtype=f64)
        weights = torch.full((n_u,), (hi - lo) / (n_u - 1), dtype=f64)
        weights[0] *= 0.5
        weights[-1] *= 0.5
        log_f = (num_states - 1) * torch.special.log_ndtr(x) - 0.5 * math.log(2 * math.pi)
        p, dp = [], []
        for chunk in m.split(256):
            d = x - chunk.unsqueeze(-1)  # (chunk, n_u)
            dens = torch.exp(log_f - 0.5 * d * d)  # N(x; m, 1) Phi(x)^(V - 1)
            p.append(dens @ weights)
            dp.append((-0.5 * chunk) * ((d * dens) @ weights))
        v = float(num_states)
        self.alphas = (v * torch.cat(p) - 1) / (v - 1)
        self.dalphas = v / (v - 1) * torch.cat(dp)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _interp(self, which: int, gamma: torch.Tensor | float) -> torch.Tensor:
        gamma = torch.as_tensor(gamma)
        if gamma.device not in self._on:
            self._on[gamma.device] = (self.alphas.to(gamma.device), self.dalphas.to(gamma.device))
        table = self._on[gamma.device][which]
        pos = (gamma.to(torch.float64) - self.gamma_min) / (self.gamma_max - self.gamma_min)
        pos = pos.clamp(0.0, 1.0) * (self.points - 1)
        lo = pos.floor().clamp(max=self.points - 2).long()
        out = torch.lerp(table[lo], table[lo + 1], pos - lo)
        return out.to(gamma.dtype) if gamma.is_floating_point() else out

    def alpha(self, gamma: torch.Tensor | float) -> torch.Tensor:
        """alpha(gamma), linearly interpolated; in gamma's (floating) dtype, float64 otherwise."""
        return self._interp(0, gamma)

    def dalpha_dgamma(self, gamma: torch.Tensor | float) -> torch.Tensor:
        """d alpha / d gamma (< 0), the analytic derivative linearly interpolated."""
        return self._interp(1, gamma)


def gaussian_latent(
    x0: torch.Tensor,
    gamma: torch.Tensor,
    states: torch.Tensor,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w (B, L, V_full) = sqrt(sigmoid(-gamma)) onehot(x_0) + sqrt(sigmoid(gamma)) eps,
    eps ~ N(0, I) (drawn over all V_full ids, consuming `generator` once), and -inf at the
    non-states, so that argmax and softmax never pick them. gamma (B,) is -log SNR. argmax(w) is
    distributed as `corrupt(x0, DualityMap(V).alpha(gamma))`.
    """
    gamma = gamma.to(dtype).reshape(-1, 1, 1)
    w = torch.randn((*x0.shape, states.numel()), generator=generator, device=x0.device, dtype=dtype)
    w.mul_(torch.sigmoid(gamma).sqrt())
    signal = torch.sigmoid(-gamma).sqrt().expand(*x0.shape, 1)
    w.scatter_add_(-1, x0.unsqueeze(-1), signal)
    return w.masked_fill_(~states, -math.inf)
