"""Sampling the augmented state (tokens x, latent z) of a LADD stage (stages/ladd.py) with its
one two-stream network, on the grid t_k = 1 - k (1 - T_MIN) / N, k = 0..N [C: linspace(1, 1e-5)].

Token reveal at a step t -> s (both channels of Di-LADD, the tokens of Co-LADD): the masked
decoding strategies of sampling/masked.py ("ancestral": each masked position revealed with
probability (alpha_s - alpha_t) / (1 - alpha_t), its value drawn from the tempered SUBS
distribution; "topk": the most confident), fed with the network's logits of that step.

- joint (one network call per step updates both channels; SIBLINGS.md 2.6):
    Co-LADD:  logits, z_hat = net(x, z, t_k);  z <- DDIM(z, z_hat, t_k -> t_{k+1});
              x <- reveal(x, logits, t_k -> t_{k+1})
    Di-LADD:  logits_x, logits_z = net(x, embed(codes));  codes <- reveal(codes, logits_z, ...);
              x <- reveal(x, logits_x, ...)
    then one noise-removal call fills every position still masked (and z <- z_hat): N + 1 calls.
- sequential (the latent first, then the tokens given it):
    A) N_y steps on the latent with every token masked (Co-LADD: DDIM to t = 0; Di-LADD: code
       reveal down to t = 0, the last step revealing all);
    B) N steps on the tokens with the latent fixed (Co-LADD: t_z = 0), then the noise-removal
       call: N_y + N + 1 calls.

DDIM (eta = 0) on the sqrt schedule: z_s = a_s z_hat + s_s (z_t - a_t z_hat) / s_t
(processes.gaussian.ddim_step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diladiff.config import ConfigError
from diladiff.processes.gaussian import ddim_step, sqrt_alpha_sigma
from diladiff.processes.masking import subs_logits
from diladiff.sampling.masked import (
    STRATEGIES,
    SamplerSettings,
    draws_from_logits,
    sampling_logits,
)

INFERENCES = ("joint", "sequential")
T_MIN = 1e-5  # the grid's last time before the noise-removal call [C]


@dataclass(frozen=True)
class JointSettings:
    """How a LADD stage's two channels are sampled (from sample.inference / cont_steps)."""

    inference: str = "joint"
    latent_steps: int = 8  # N_y of sequential inference

    def __post_init__(self):
        if self.inference not in INFERENCES:
            raise ConfigError(f"inference must be one of {INFERENCES}, not {self.inference!r}")
        if self.latent_steps < 1:
            raise ConfigError(f"latent steps must be >= 1, got {self.latent_steps}")


def time_grid(steps: int, last: float = T_MIN) -> list[float]:
    """t_k = 1 - k (1 - last) / steps, k = 0..steps (python floats)."""
    return [1.0 - k * (1.0 - last) / steps for k in range(steps + 1)]


def reveal(
    x: torch.Tensor,
    logits: torch.Tensor,
    mask_id: int,
    t: float,
    s: float,
    settings: SamplerSettings,
    generator,
) -> torch.Tensor:
    """One masked-diffusion step t -> s of one channel (B, n) given the network's raw logits
    (B, n, V) at x: the strategy's reveal, tokens from the tempered SUBS distribution; s = 0
    reveals every masked position."""
    masked = x == mask_id
    if not masked.any():
        return x
    logp = subs_logits(logits, mask_id).log_softmax(-1)
    draw = draws_from_logits(sampling_logits(logp, settings), settings, generator)
    chosen, tokens = STRATEGIES[settings.strategy](draw, masked, t, s, settings, generator)
    return torch.where(chosen, tokens, x)


def _times(t: float, batch: int, device) -> torch.Tensor:
    return torch.full((batch,), t, device=device)


def _ddim(z: torch.Tensor, z_hat: torch.Tensor, t: float, s: float, eps: float) -> torch.Tensor:
    a_t, s_t = sqrt_alpha_sigma(torch.tensor(t, dtype=torch.float64), eps)
    a_s, s_s = sqrt_alpha_sigma(torch.tensor(s, dtype=torch.float64), eps)
    return ddim_step(z, z_hat.to(z.dtype), float(a_t), float(s_t), float(a_s), float(s_s))


@torch.no_grad()
def sample_joint(stage, batch: int, settings, generator, device, progress: bool = False):
    """(batch, L) token ids of a LADD stage and stats (disc_nfe: network calls, cont_nfe:
    latent-only calls of sequential inference); `settings` a GenerationSettings with .joint."""
    tok, js = settings.tokens, settings.joint
    device = torch.device(device)
    x = torch.full((batch, stage.seq_len), stage.mask_id, dtype=torch.long, device=device)
    n = tok.steps
    grid = time_grid(n)
    if stage.latent_kind == "continuous":
        x, calls, latent_calls = _co_ladd(stage, x, grid, tok, js, generator)
    else:
        x, calls, latent_calls = _di_ladd(stage, x, grid, tok, js, generator)
    return x, {"disc_nfe": calls, "disc_steps_taken": n, "cont_nfe": latent_calls}


def _co_ladd(stage, x, grid, tok: SamplerSettings, js: JointSettings, generator):
    eps_t = stage.cfg.ladd.t_eps
    b, device = x.shape[0], x.device
    z = torch.randn((b, *stage.latent_shape), generator=generator, device=device)
    calls = latent_calls = 0
    if js.inference == "sequential":
        ygrid = time_grid(js.latent_steps, 0.0)
        for t, s in zip(ygrid[:-1], ygrid[1:], strict=True):
            _, z_hat = stage.net(x, z, _times(t, b, device))
            z = _ddim(z, z_hat, t, s, eps_t)
            latent_calls += 1
        z_time = torch.zeros(b, device=device)  # the latent is clean from here on
    for t, s in zip(grid[:-1], grid[1:], strict=True):
        if js.inference == "joint":
            z_time = _times(t, b, device)
        logits, z_hat = stage.net(x, z, z_time)
        calls += 1
        if js.inference == "joint":
            z = _ddim(z, z_hat, t, s, eps_t)
        x = reveal(x, logits, stage.mask_id, t, s, tok, generator)
    if js.inference == "joint":
        z_time = _times(grid[-1], b, device)
    logits, _ = stage.net(x, z, z_time)  # the noise-removal call
    x = reveal(x, logits, stage.mask_id, grid[-1], 0.0, tok, generator)
    return x, calls + 1 + latent_calls, latent_calls


def _di_ladd(stage, x, grid, tok: SamplerSettings, js: JointSettings, generator):
    b, device = x.shape[0], x.device
    cmask = stage.code_mask_id
    codes = torch.full((b, stage.latent_shape[0]), cmask, dtype=torch.long, device=device)
    calls = latent_calls = 0
    if js.inference == "sequential":
        ygrid = time_grid(js.latent_steps, 0.0)
        for t, s in zip(ygrid[:-1], ygrid[1:], strict=True):
            _, logits_z = stage.net(x, stage.vq.embed(codes), None)
            codes = reveal(codes, logits_z, cmask, t, s, tok, generator)
            latent_calls += 1
    for t, s in zip(grid[:-1], grid[1:], strict=True):
        logits_x, logits_z = stage.net(x, stage.vq.embed(codes), None)
        calls += 1
        if js.inference == "joint":
            codes = reveal(codes, logits_z, cmask, t, s, tok, generator)
        x = reveal(x, logits_x, stage.mask_id, t, s, tok, generator)
    logits_x, _ = stage.net(x, stage.vq.embed(codes), None)  # the noise-removal call
    x = reveal(x, logits_x, stage.mask_id, grid[-1], 0.0, tok, generator)
    return x, calls + 1 + latent_calls, latent_calls
