"""Sampling the augmented state (tokens x, latent z) of a LADD stage (methods/ladd/stage.py)
with its one two-stream network, on the grid t_k = 1 - k (1 - T_MIN) / N, k = 0..N
[C: linspace(1, 1e-5)].

Token reveal at a step t -> s (both channels of Di-LADD, the tokens of Co-LADD): the masked
decoding strategies of sampling/masked.py ("ancestral": each masked position revealed with
probability (alpha_s - alpha_t) / (1 - alpha_t), its value drawn from the tempered SUBS
distribution; "topk": the most confident), fed with the network's logits of that step.

- joint (one network call per step updates both channels; docs/methods/ladd.md#inference):
    Co-LADD:  logits, z_hat = net(x, z, t_k);  z <- DDIM(z, z_hat, t_k -> t_{k+1});
              x <- reveal(x, logits, t_k -> t_{k+1})
    Di-LADD:  logits_x, logits_z = net(x, embed(codes));
              codes <- reveal(codes, logits_z, t'_min(k, N') -> t'_min(k+1, N'));
              x <- reveal(x, logits_x, t_k -> t_{k+1})
              the codes on their own grid t'_j = 1 - j (1 - T_MIN) / N', j = 0..N' (N' =
              JointSettings.code_steps, default N_z, the latent positions [C
              `diladd/sampling.py`: ts_latent[min(i, len - 1)], num_inference_steps_latent =
              latent_sequence_length]): with N' < N they are all but revealed after N' steps
              and then held; with N' > N whatever is still masked stays so.
    then one noise-removal call fills every position still masked (and z <- z_hat): N + 1 calls.
- sequential (the latent first, then the tokens given it):
    A) N_y steps on the latent with every token masked (Co-LADD: DDIM to t = 0; Di-LADD: code
       reveal down to t = 0, the last step revealing all);
    B) N steps on the tokens with the latent fixed (Co-LADD: t_z = 0), then the noise-removal
       call: N_y + N + 1 calls.
  Only for a network trained on both phases' inputs (`stage.check_inference`: ConfigError):
  Co-LADD trained with shared times (t_z = t_x, the paper's recipe) never saw phase A's
  all-masked tokens beside a partly noised latent nor phase B's clean latent at t_z = 0 beside
  masked tokens (docs/methods/ladd.md#deviations: the authors' sequential Co-LADD has its own
  latent network and feeds the MM-DiT clean latents at t_z = 0 in training; they omit it for text).

Code reveals are untempered ancestral draws: the token channel's strategy, temperature and
top-p (sample.*) apply to the tokens only, as the authors temper the data channel alone [C:
the latent sampler has its own logit processors, none by default].

DDIM (eta = 0) on the sqrt schedule: z_s = a_s z_hat + s_s (z_t - a_t z_hat) / s_t
(processes.gaussian.ddim_step).

Conditioning (sampling.conditioning). A canvas (prompt, suffix, infill) is clamped as MDLM's:
the token stream starts from it instead of all-masked rows, a reveal only touches masked
positions, so the given tokens never change, and the token channel's times are scaled by the
masked share M / L (top-k spreads the M masked positions over the N steps; the latent's times
are not scaled). The latent is still sampled from the prior, jointly: every network call reads
the given tokens through the joint attention, so the latent is guided by them (sequential
inference: its latent steps see the canvas). A reference text (`latent_from`) replaces the
sampled latent by the stage's encoder latent of it (`stage.reference_latent`: Co-LADD's clean
z0, held at t_z = 0; Di-LADD's codes, all revealed): no latent steps, only the token steps
(N + 1 calls, as the second part of sequential inference).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from diladiff.config import ConfigError
from diladiff.processes.gaussian import ddim_step, sqrt_alpha_sigma
from diladiff.processes.masking import subs_logits
from diladiff.sampling.conditioning import canvas_start
from diladiff.sampling.generate import register_generation
from diladiff.sampling.masked import (
    STRATEGIES,
    SamplerSettings,
    draws_from_logits,
    sampling_logits,
)
from diladiff.stages.protocols import InferenceModes

INFERENCES = ("joint", "sequential")
T_MIN = 1e-5  # the grid's last time before the noise-removal call [C]


@dataclass(frozen=True)
class JointSettings:
    """How a LADD stage's two channels are sampled (from sample.inference / cont_steps)."""

    inference: str = "joint"
    latent_steps: int = 8  # N_y of sequential inference
    code_steps: int = 0  # N' of joint Di-LADD's code grid; 0 = N_z (the latent positions) [C]

    def __post_init__(self):
        if self.inference not in INFERENCES:
            raise ConfigError(f"inference must be one of {INFERENCES}, not {self.inference!r}")
        if self.latent_steps < 1:
            raise ConfigError(f"latent steps must be >= 1, got {self.latent_steps}")
        if self.code_steps < 0:
            raise ConfigError(f"code steps must be >= 0 (0 = N_z), got {self.code_steps}")


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


def code_settings(tokens: SamplerSettings) -> SamplerSettings:
    """The code channel's reveal: ancestral, temperature 1, no top-p (module docstring); the
    token settings' remaining fields (its draw's precision, the sampler path) kept."""
    return replace(tokens, strategy="ancestral", temperature=1.0, top_p=1.0)


def code_grid_step(grid: list[float], k: int) -> tuple[float, float]:
    """(t'_min(k, N'), t'_min(k+1, N')) of a code grid t'_0..t'_N' at token step k: the codes'
    times for that step, equal (no reveal) once k >= N' [C]."""
    last = len(grid) - 1
    return grid[min(k, last)], grid[min(k + 1, last)]


def _times(t: float, batch: int, device) -> torch.Tensor:
    return torch.full((batch,), t, device=device)


def _ddim(z: torch.Tensor, z_hat: torch.Tensor, t: float, s: float, eps: float) -> torch.Tensor:
    a_t, s_t = sqrt_alpha_sigma(torch.tensor(t, dtype=torch.float64), eps)
    a_s, s_s = sqrt_alpha_sigma(torch.tensor(s, dtype=torch.float64), eps)
    return ddim_step(z, z_hat.to(z.dtype), float(a_t), float(s_t), float(a_s), float(s_s))


@torch.no_grad()
def joint_settings(sc, stage) -> JointSettings:
    """LADD's own sampling settings from the run's sample.* (GenerationSettings.method):
    sample.inference and N_cont (sample.cont_steps, default ladd.latent_steps); an inference
    the network was not trained for is a ConfigError here, before any sampling starts."""
    stage.check_inference(sc.inference)
    return JointSettings(sc.inference, sc.cont_steps or stage.cfg.ladd.latent_steps)


@register_generation("joint", latent_from=True, settings=joint_settings)
def sample_joint(stage, batch: int, settings, generator, device, progress: bool = False):
    """(batch, L) token ids of a LADD stage and stats (disc_nfe: network calls, cont_nfe:
    latent-only calls of sequential inference); `settings` a GenerationSettings with .method
    (JointSettings) and .condition (a canvas of given tokens, a reference text's ids: module
    docstring)."""
    tok, js, cond = settings.tokens, settings.method, settings.condition
    if isinstance(stage, InferenceModes):  # LADD stages; test stubs may lack it
        stage.check_inference(js.inference)  # before a network call wasted on a refused mode
    device = torch.device(device)
    x, share = canvas_start(cond.canvas_tensor(), batch, stage.seq_len, stage.mask_id, device)
    ref = None
    if cond.latent_ids is not None:  # the reference text's latent (module docstring)
        x_ref = torch.tensor(cond.latent_ids, dtype=torch.long, device=device)
        ref = stage.reference_latent(x_ref[None])
    n = tok.steps
    grid = time_grid(n)
    sample = _co_ladd if stage.latent_kind == "continuous" else _di_ladd
    x, calls, latent_calls = sample(stage, x, grid, share, tok, js, generator, ref)
    return x, {"disc_nfe": calls, "disc_steps_taken": n, "cont_nfe": latent_calls}


def _co_ladd(stage, x, grid, share, tok: SamplerSettings, js: JointSettings, generator, ref):
    """Co-LADD's loops; x the starting token rows, `share` their masked share (the token
    times are scaled by it), `ref` None or a clean latent (1, N_z, d_z) to hold fixed."""
    eps_t = stage.cfg.ladd.t_eps
    b, device = x.shape[0], x.device
    calls = latent_calls = 0
    if ref is None:
        z = torch.randn((b, *stage.latent_shape), generator=generator, device=device)
    else:
        z = ref.to(device).expand(b, *stage.latent_shape)
    joint = ref is None and js.inference == "joint"  # the latent moves with the tokens
    if ref is None and js.inference == "sequential":
        ygrid = time_grid(js.latent_steps, 0.0)
        for t, s in zip(ygrid[:-1], ygrid[1:], strict=True):
            _, z_hat = stage.net(x, z, _times(t, b, device))
            z = _ddim(z, z_hat, t, s, eps_t)
            latent_calls += 1
    if not joint:
        z_time = torch.zeros(b, device=device)  # the latent is clean from here on
    for t, s in zip(grid[:-1], grid[1:], strict=True):
        if joint:
            z_time = _times(t, b, device)
        logits, z_hat = stage.net(x, z, z_time)
        calls += 1
        if joint:
            z = _ddim(z, z_hat, t, s, eps_t)
        x = reveal(x, logits, stage.mask_id, share * t, share * s, tok, generator)
    if joint:
        z_time = _times(grid[-1], b, device)
    logits, _ = stage.net(x, z, z_time)  # the noise-removal call
    x = reveal(x, logits, stage.mask_id, share * grid[-1], 0.0, tok, generator)
    return x, calls + 1 + latent_calls, latent_calls


def _di_ladd(stage, x, grid, share, tok: SamplerSettings, js: JointSettings, generator, ref):
    """Di-LADD's loops; arguments as _co_ladd's, `ref` None or codes (1, N_z), all revealed
    (then the code reveals are no-ops)."""
    b, device = x.shape[0], x.device
    cmask, n_z = stage.code_mask_id, stage.latent_shape[0]
    code = code_settings(tok)
    if ref is None:
        codes = torch.full((b, n_z), cmask, dtype=torch.long, device=device)
    else:
        codes = ref.to(device).expand(b, n_z)
    calls = latent_calls = 0
    if ref is None and js.inference == "sequential":
        ygrid = time_grid(js.latent_steps, 0.0)
        for t, s in zip(ygrid[:-1], ygrid[1:], strict=True):
            _, logits_z = stage.net(x, stage.vq.embed(codes), None)
            codes = reveal(codes, logits_z, cmask, t, s, code, generator)
            latent_calls += 1
    cgrid = time_grid(js.code_steps or n_z)
    for k, (t, s) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        logits_x, logits_z = stage.net(x, stage.vq.embed(codes), None)
        calls += 1
        ct, cs = code_grid_step(cgrid, k)
        if js.inference == "joint" and cs < ct:
            codes = reveal(codes, logits_z, cmask, ct, cs, code, generator)
        x = reveal(x, logits_x, stage.mask_id, share * t, share * s, tok, generator)
    logits_x, _ = stage.net(x, stage.vq.embed(codes), None)  # the noise-removal call
    x = reveal(x, logits_x, stage.mask_id, share * grid[-1], 0.0, tok, generator)
    return x, calls + 1 + latent_calls, latent_calls
