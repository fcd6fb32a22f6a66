"""Stage 3: DiLaDiff, MeanFlow self-distillation of the LaDiff prior (teacher frozen).

Student average velocity over [r, t], parameterised through the teacher's x0-prediction head:

    u_eta(z_t, t, r) = alpha'_t x_eta + sigma'_t (z_t - alpha_t x_eta) / sigma_t,
    x_eta = net_eta(z_t, t, z_sc, r)

where net_eta is the teacher's network plus a zero-initialised embedding of (t - r), so at
initialisation u_eta(z_t, t, t) is exactly the teacher's velocity. The objective is
methods.diladiff.meanflow.meanflow_loss with the teacher's self-conditioned velocity v_psi(z_t, t):

    u_tgt = v_psi(z_t, t) - w_k (t - r) (v_psi . d_z u_eta + d_t u_eta)

(the bracket a Jacobian-vector product; w_k a linear warm-up from 0 to 1), loss
||u_eta - stopgrad(u_tgt)||^2 / stopgrad(||.||^2 + c)^p per example. t, r ~ LogitNormal(m, s)
(t the larger; methods.diladiff.meanflow.sample_t_r), and r = t on a share of the examples.

Self-conditioning. The teacher's velocity v_psi is self-conditioned on its own first pass,
z_psi(z_t, t, z_psi(z_t, t, 0)). The student's self-conditioning input is, per example,

    z_sc = X(u_eta(z_t, t, t; 0))  (stop-gradient)  with probability student_self_cond_prob,
    z_sc = 0                                         otherwise,

where X(u) = (sigma_t u - sigma'_t z_t) / (alpha'_t sigma_t - sigma'_t alpha_t) is the clean
estimate implied by a velocity (processes.gaussian.x0_from_velocity). Sampling runs the same two
passes per step (the "meanflow" latent sampler: the r = t pass with z_sc = 0, then the jump
self-conditioned on its X), on the grid of `meanflow.time_grid` (default evenly spaced in the
schedule's angle, `time_grid`).
The latents are the teacher's prior-space latents (its standardisation is copied with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from diladiff.config import Config, ConfigError, OneOf, Range, register_section
from diladiff.methods.autoencoder import Autoencoder
from diladiff.methods.diladiff.meanflow import DERIVATIVES, meanflow_loss, sample_t_r
from diladiff.nets.latent_denoiser import LatentDenoiser
from diladiff.processes.gaussian import (
    angle_time_grid,
    diffuse,
    velocity_from_x0,
    x0_from_velocity,
)
from diladiff.stages.base import Stage, register_stage
from diladiff.stages.latent import LatentStage


@register_section("meanflow")
@dataclass
class MeanFlowConfig:
    """MeanFlow self-distillation of the prior (teacher frozen)."""

    r_equals_t_prob: Annotated[float, Range(ge=0, le=1)] = 0.25
    logit_normal_mean: float = -1.0
    logit_normal_std: Annotated[float, Range(ge=0)] = 1.0
    adaptive_p: Annotated[float, Range(ge=0)] = 1.0  # loss / (||delta||^2 + c)^p, detached
    adaptive_c: Annotated[float, Range(gt=0)] = 1e-3
    tangent_warmup_steps: Annotated[int, Range(ge=0)] = 10000
    # Share of training examples on which the student is self-conditioned on its own r = t
    # clean estimate (stop-gradient); the others get zeros, as the first pass of a sampling step.
    student_self_cond_prob: Annotated[float, Range(ge=0, le=1)] = 0.5
    # "jvp" (exact forward-mode AD) or "finite_difference" (central difference of step fd_eps;
    # the time embedding's 1000 t scale makes t-derivatives steep: keep fd_eps small).
    derivative: Annotated[str, OneOf(DERIVATIVES)] = "jvp"
    fd_eps: Annotated[float, Range(gt=0)] = 1e-4
    # The sampler's N_cont + 1 times: "angle" (evenly spaced in the schedule angle,
    # processes.gaussian.angle_time_grid) or "uniform" in t. The paper does not say; uniform in
    # t leaves 81% of the denoising to the last of 5 jumps at d = 10 (RESULTS.md, issue 11).
    time_grid: Annotated[str, OneOf("diladiff.sampling.latent:TIME_GRIDS")] = "angle"
    # Sinusoidal scale of the (t - r) embedding. New runs: 1 (py-meanflow embeds t - r as is;
    # at 1000, the teacher's scale for t, the jvp's d/dt through it is ~40x the true value and
    # the student fits the MeanFlow identity 4x worse: RESULTS.md, issue 11). 1000 is the
    # default only so that runs saved before this key existed load as they were trained.
    interval_scale: Annotated[float, Range(gt=0)] = 1000.0


@register_stage("diladiff")
class DiLaDiff(LatentStage):
    parents = {"teacher": "ladiff"}
    inherits = ("model", "data", "mdlm", "autoencoder", "prior", "diffusion")
    # N_cont 5, gamma 0 and the paper's gamma-sampling (about 0.1-0.3 is its best)
    eval_samplers = ({"cont_steps": 5, "gamma": 0.0}, {"cont_steps": 5, "gamma": 0.2})
    latent_sampler = "meanflow"  # sampling.latent.LATENT_SAMPLERS
    autoencoder_class = Autoencoder  # the frozen auto-encoder of its teacher run
    budget_share = 0.1
    # Past the tiny preset's 100-step tangent warm-up, then 50 steps at full weight.
    demo_steps = 150
    check_steps = 300  # distilling a teacher that already fits the check's K latents

    @classmethod
    def preset_changes(cls, cfg: Config, preset: str) -> None:
        """The paper's learning rate; this project's schedule lengths; 5 MeanFlow jumps; the
        (t - r) embedding at scale 1."""
        tc, mf = cfg.train, cfg.meanflow
        cfg.sample.latent_sampler, cfg.sample.cont_steps = cls.latent_sampler, 5
        mf.interval_scale = 1.0
        if preset == "paper":
            tc.lr, tc.total_steps, tc.warmup_steps = 5e-5, 100_000, 1000
        elif preset == "small":
            tc.lr, tc.total_steps = 1e-4, 2000
            mf.tangent_warmup_steps = 500
        elif preset in ("tiny", "cpu"):
            tc.lr, tc.total_steps, tc.warmup_steps = 5e-4, 300, 20
            mf.tangent_warmup_steps = 100

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        self.teacher = LatentDenoiser(*self.latent_shape, cfg.prior, cfg.model.attention)
        self.teacher.requires_grad_(False)
        # The student differentiates through forward-mode AD: explicit attention when jvp.
        backend = "math" if cfg.meanflow.derivative == "jvp" else cfg.model.attention
        self.student = LatentDenoiser(
            *self.latent_shape,
            cfg.prior,
            backend,
            with_interval=True,
            interval_scale=cfg.meanflow.interval_scale,
        )
        self.tangent_weight = 1.0  # set by on_step during training
        self.time_grid(1)  # an unknown meanflow.time_grid fails here, before training

    def init_from_parents(self, parents: dict[str, Stage]) -> None:
        """Auto-encoder, prior-space map and teacher from the LaDiff run; the student starts
        as the teacher (its interval embedding is zero-initialised)."""
        teacher = parents["teacher"]
        self.ae.load_state_dict(teacher.ae.state_dict())
        self.prior_norm.load_state_dict(teacher.prior_norm.state_dict())
        self.teacher.load_state_dict(teacher.prior.state_dict())
        missing, unexpected = self.student.load_state_dict(teacher.prior.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("dt_embed.") for k in missing)

    @classmethod
    def warmups(cls, cfg: Config) -> dict[str, int]:
        return {
            **super().warmups(cfg),
            "meanflow.tangent_warmup_steps": cfg.meanflow.tangent_warmup_steps,
        }

    def summary(self) -> str:
        n = sum(p.numel() for p in self.student.parameters())
        mf = self.cfg.meanflow
        return (
            f"diladiff: student {n / 1e6:.2f}M parameters, derivative={mf.derivative}, "
            f"tangent warm-up {mf.tangent_warmup_steps} steps"
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def on_step(self, step: int) -> None:
        warm = self.cfg.meanflow.tangent_warmup_steps
        self.tangent_weight = min(1.0, step / warm) if warm > 0 else 1.0

    # ------------------------------------------------------------------ velocities
    @torch.no_grad()
    def teacher_velocity(self, z_t, t):
        """The self-conditioned teacher's instantaneous velocity and its self-conditioning."""
        d = self.schedule
        z_sc = self.teacher(z_t, t)
        return velocity_from_x0(z_t, self.teacher(z_t, t, z_sc), t, d), z_sc

    def average_velocity(self, z_t, t, r, z_sc=None):
        """u_eta(z_t, t, r) = velocity implied by the student's clean estimate."""
        return velocity_from_x0(z_t, self.student(z_t, t, z_sc, r), t, self.schedule)

    @torch.no_grad()
    def student_self_condition(self, z_t, t, keep: torch.Tensor | None = None):
        """z_sc = X(u_eta(z_t, t, t; 0)) on the rows where `keep` is True (all if None), zeros
        on the others: the first pass of a sampling step, without gradients."""
        d = self.schedule
        if keep is None:
            return x0_from_velocity(z_t, self.average_velocity(z_t, t, t), t, d)
        z_sc = torch.zeros_like(z_t)
        if keep.any():  # the pass runs on the kept rows only
            zk, tk = z_t[keep], t[keep]
            z_sc[keep] = x0_from_velocity(zk, self.average_velocity(zk, tk, tk), tk, d).to(z_sc)
        return z_sc

    def loss_terms(self, z_t, t, r, v, z_sc):
        """The MeanFlow loss of the student u_eta(., ., .; z_sc) against the teacher's v."""
        mf = self.cfg.meanflow
        return meanflow_loss(
            lambda z, tt, rr: self.average_velocity(z, tt, rr, z_sc),
            v,
            z_t,
            t,
            r,
            self.tangent_weight,
            mf.adaptive_p,
            mf.adaptive_c,
            mf.derivative,
            mf.fd_eps,
        )

    def draw(self, x0, generator):
        mf, dc = self.cfg.meanflow, self.cfg.diffusion
        z = self.prior_latents(x0)
        t, r = sample_t_r(
            len(x0),
            mf.logit_normal_mean,
            mf.logit_normal_std,
            mf.r_equals_t_prob,
            generator,
            x0.device,
        )
        t = t.clamp(dc.t_eps, 1 - dc.t_eps)
        r = torch.minimum(r.clamp(0.0, 1 - dc.t_eps), t)
        z_t = diffuse(
            z, t, torch.randn(z.shape, generator=generator, device=z.device), self.schedule
        )
        return z_t, t, r

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        mf = self.cfg.meanflow
        z_t, t, r = self.draw(batch, generator)
        v, _ = self.teacher_velocity(z_t, t)
        keep = torch.rand(len(t), generator=generator, device=t.device) < mf.student_self_cond_prob
        z_sc = self.student_self_condition(z_t, t, keep)
        return self.loss_terms(z_t, t, r, v, z_sc)

    @torch.no_grad()
    def evaluate(self, batches, generator):
        """Errors with the student self-conditioned as at sampling (on its r = t pass)."""
        total, fm, n = 0.0, 0.0, 0
        for x0 in batches:
            z_t, t, r = self.draw(x0, generator)
            v, _ = self.teacher_velocity(z_t, t)
            z_sc = self.student_self_condition(z_t, t)
            total += float(self.loss_terms(z_t, t, r, v, z_sc)[1]["mse"]) * len(x0)
            fm += float(((self.average_velocity(z_t, t, t, z_sc) - v) ** 2).mean()) * len(x0)
            n += len(x0)
        return {"val_mse": total / n, "val_flow_matching_mse": fm / n}

    # ------------------------------------------------------------------ sampling
    def time_grid(self, steps: int) -> torch.Tensor | None:
        """The jumps' times (sampling.latent.model_time_grid): meanflow.time_grid."""
        grid = self.cfg.meanflow.time_grid
        if grid == "angle":
            return angle_time_grid(steps, self.schedule)
        if grid == "uniform":
            return None
        raise ConfigError(f"meanflow.time_grid must be 'angle' or 'uniform', not {grid!r}")

    def self_conditioned_u(self, z_t, t, r):
        """u(z_t, t, r) as at sampling, two calls: the r = t pass gives the clean estimate used
        as self-conditioning (the "meanflow" latent sampler's model)."""
        return self.average_velocity(z_t, t, r, self.student_self_condition(z_t, t))
