"""Uniform-state (DUO) ancestral sampling: N_disc reverse steps of the posterior, then a last
noise-removal step.

From x_1 ~ uniform over the states, on the grid t_i = 1 - i (1 - t_min) / N (t_min = 1e-5, as
the authors' code) with the log-linear schedule alpha_t = 1 - (1 - 1e-3) t, each step t -> s
draws every position from

    p_theta(x_s | x_t) = q(x_s | x_t, x = x_theta(x_t, sigma_t))

(methods.duo.process.posterior, drawn as a mixture)

with x_theta the denoiser's distribution over the states, tempered and nucleus-filtered before
it enters the posterior (as the authors' current code applies top-p), and the posterior in
float64. The last step at t_min (one more network call, so NFE = N_disc + 1):

- "ancestral": the posterior with alpha_s = 1 (which nearly always keeps x_t);
- "greedy_tail": the argmax of x_theta at every position (the DiLaDiff paper's DUO sampler,
  the authors' `noise_removal=greedy`): lower GenPPL, lower entropy.

The denoiser is time-conditioned, so every step runs it afresh (no reuse as in MDLM).

Conditioning on a canvas (a prompt, a suffix, infilling; sampling.conditioning) is the clamp
("replacement") inpainting of uniform-state diffusion, as SEDD projects its samples for prompts
and infilling: x_1 is uniform noise with the given tokens in place, and after every step (the
last one, greedy or ancestral, too) the given positions are overwritten with the given tokens,
so the denoiser always reads them clean and they never change; only the other positions are
sampled. (The given tokens are not re-noised to x_t: every state is a token here, so a clean
token reads as one the forward process kept.)
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from diladiff.methods.duo.process import log_linear_alpha, prior_sample, sigma_from_alpha
from diladiff.sampling.conditioning import clamp
from diladiff.sampling.generate import register_generation
from diladiff.sampling.masked import (
    CHUNK_VALUES,
    SamplerSettings,
    gumbel_argmax,
    register_strategy,
    sampling_logits,
)

T_MIN = 1e-5  # the last time of the grid (the authors' sampling eps)
UNIFORM_STRATEGIES = ("ancestral", "greedy_tail")


@register_strategy("greedy_tail")
def _greedy_tail_is_not_a_masked_strategy(*args, **kwargs):
    raise ValueError("strategy 'greedy_tail' is for uniform-state (DUO) sampling only")


def _x_theta(stage, x: torch.Tensor, t: float, settings: SamplerSettings) -> torch.Tensor:
    """The denoiser's distribution over the states at x_t, tempered and nucleus-filtered, as
    float64 log-probabilities (B, L, V) (-inf off the states)."""
    alpha, _ = log_linear_alpha(torch.full((x.shape[0],), t, device=x.device))
    logp = stage.log_x_theta(x, sigma_from_alpha(alpha))
    return sampling_logits(logp.double(), settings).log_softmax(dim=-1)


def _draw_posterior(log_x, x, a_s: float, a_t: float, states, settings, generator):
    """x_s ~ q(x_s | x_t, x_theta) at every position, without forming the (B, L, V) posterior.

    With u = 1/V on the states and a_ts = a_t / a_s, the posterior (methods.duo.process.posterior)
    is the mixture

        q  ∝  w_keep delta(x_t) + w_move r,    r = a_s x_theta + (1 - a_s) u,
        w_keep = a_ts (a_s x_theta[x_t] + (1 - a_s) / V),   w_move = (1 - a_ts) / V,

    so a position keeps x_t with probability w_keep / (w_keep + w_move), else draws from r:
    from x_theta with probability a_s (a Gumbel-max draw, only at those positions), else
    uniformly over the states. Exactly q's distribution, at a fraction of the cost."""
    n_states = states.sum().to(torch.float64)
    flat_logx, flat_x = log_x.flatten(0, 1), x.flatten()
    p_here = flat_logx.gather(-1, flat_x.unsqueeze(-1)).squeeze(-1).exp()  # x_theta[x_t]
    a_ts = a_t / a_s
    w_keep = a_ts * (a_s * p_here + (1.0 - a_s) / n_states)
    w_move = (1.0 - a_ts) / n_states
    u = torch.rand((2, len(flat_x)), generator=generator, device=x.device, dtype=torch.float64)
    move = u[0] * (w_keep + w_move) >= w_keep
    from_model = move & (u[1] < a_s)
    from_uniform = move & ~(u[1] < a_s)
    out = flat_x.clone()
    out[from_uniform] = prior_sample((int(from_uniform.sum()),), states, generator)
    rows = flat_logx[from_model]
    step = max(1, CHUNK_VALUES // flat_logx.shape[-1])
    drawn = [
        gumbel_argmax(rows[i : i + step], generator, settings.float64_gumbel)
        for i in range(0, len(rows), step)
    ]
    if drawn:
        out[from_model] = torch.cat(drawn)
    return out.view_as(x)


@torch.no_grad()
@register_generation("uniform")
def generate_uniform(stage, batch: int, settings, generator, device, progress: bool = False):
    """The "uniform" generation kind (sampling.generate): `sample_uniform` with the run's
    token settings and canvas."""
    canvas = settings.condition.canvas_tensor()
    return sample_uniform(stage, batch, settings.tokens, generator, device, progress, canvas)


def sample_uniform(
    stage,
    batch: int,
    settings: SamplerSettings,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    canvas: torch.Tensor | None = None,
):
    """(batch, L) token ids of a uniform-state stage (one with `states`, `seq_len`, `mask_id`
    and `log_x_theta(x_t, sigma)`), and stats {disc_nfe, disc_steps_taken}; `canvas` (L,):
    given tokens, clamped at every step (module docstring), and mask_id where to sample."""
    if settings.strategy not in UNIFORM_STRATEGIES:
        raise ValueError(
            f"uniform-state sampling takes strategy {UNIFORM_STRATEGIES}, not {settings.strategy!r}"
        )
    states = stage.states.to(device)
    if canvas is None:
        keep = lambda x: x  # noqa: E731
    else:
        if canvas.shape != (stage.seq_len,):
            raise ValueError(f"a canvas has {stage.seq_len} positions, got {tuple(canvas.shape)}")
        canvas = canvas.to(device)
        keep = lambda x: clamp(x, canvas, stage.mask_id)  # noqa: E731
    x = keep(prior_sample((batch, stage.seq_len), states, generator))  # x_1 ~ uniform
    n = settings.steps
    grid = [1.0 - i * (1.0 - T_MIN) / n for i in range(n + 1)]
    alpha = lambda t: log_linear_alpha(t)[0]  # noqa: E731  (python floats: float64)
    for i in tqdm(range(n), desc="decoding", disable=not progress, leave=False):
        t, s = grid[i], grid[i + 1]
        log_x = _x_theta(stage, x, t, settings)
        x = keep(_draw_posterior(log_x, x, alpha(s), alpha(t), states, settings, generator))
    log_x = _x_theta(stage, x, grid[-1], settings)
    if settings.strategy == "greedy_tail":
        x = log_x.argmax(dim=-1)
    else:  # noise removal: the posterior towards alpha_s = 1
        x = _draw_posterior(log_x, x, 1.0, alpha(grid[-1]), states, settings, generator)
    return keep(x), {"disc_nfe": n + 1, "disc_steps_taken": n}
