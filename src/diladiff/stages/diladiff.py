"""Stage 3: DiLaDiff, MeanFlow self-distillation of the LaDiff prior (teacher frozen).

Student average velocity over [r, t], parameterised through the teacher's x0-prediction head:

    u_eta(z_t, t, r) = alpha'_t x_eta + sigma'_t (z_t - alpha_t x_eta) / sigma_t,
    x_eta = net_eta(z_t, t, z_sc, r)

where net_eta is the teacher's network plus a zero-initialised embedding of (t - r), so at
initialisation u_eta(z_t, t, t) is exactly the teacher's velocity. The MeanFlow target is

    u_tgt = v_psi(z_t, t) - w_k (t - r) (v_psi . d_z u_eta + d_t u_eta)

with the bracket the Jacobian-vector product of u_eta along the tangent (v_psi, 1, 0) and w_k a
linear warm-up from 0 to 1. Loss: ||u_eta - stopgrad(u_tgt)||^2 / stopgrad(||.||^2 + c)^p per
example. t, r ~ LogitNormal(m, s) (t the larger), and r = t on a share of the examples.

Self-conditioning. The teacher's velocity v_psi is self-conditioned on its own first pass,
z_psi(z_t, t, z_psi(z_t, t, 0)). The student's self-conditioning input is, per example,

    z_sc = X(u_eta(z_t, t, t; 0))  (stop-gradient)  with probability student_self_cond_prob,
    z_sc = 0                                         otherwise,

where X(u) = (sigma_t u - sigma'_t z_t) / (alpha'_t sigma_t - sigma'_t alpha_t) is the clean
estimate implied by a velocity (processes.gaussian.x0_from_velocity). Sampling runs the same two
passes per step: the r = t pass with z_sc = 0, then the jump self-conditioned on its X.
The latents are the teacher's prior-space latents (its standardisation is copied with it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diladiff.config import Config, ConfigError
from diladiff.errors import CheckpointError
from diladiff.nets.latent_denoiser import LatentDenoiser
from diladiff.processes.gaussian import diffuse, velocity_from_x0, x0_from_velocity
from diladiff.sampling.latent import meanflow_sample
from diladiff.stages.base import register_stage
from diladiff.stages.ladiff import LatentStage

DERIVATIVES = ("jvp", "finite_difference")


def sample_t_r(batch: int, mean: float, std: float, r_equals_t: float, generator, device):
    """(t, r) with t >= r, each LogitNormal(mean, std); r = t with probability r_equals_t."""
    a = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    b = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = torch.rand(batch, generator=generator, device=device) < r_equals_t
    return t, torch.where(same, t, r)


def directional_derivative(fn, primals, tangents, method: str = "jvp", eps: float = 1e-3):
    """(fn(*primals), d/de fn(primals + e * tangents) at e = 0).

    "jvp": exact forward-mode AD (torch.func.jvp; attention must support it: the explicit
    "math" backend does, the fused SDPA kernels do not). "finite_difference": the central
    difference (fn(p + eps T) - fn(p - eps T)) / (2 eps), computed without gradients; the first
    output is then a plain forward call."""
    if method == "jvp":
        return torch.func.jvp(fn, primals, tangents)
    if method == "finite_difference":
        with torch.no_grad():
            plus = fn(*(p + eps * t for p, t in zip(primals, tangents, strict=True)))
            minus = fn(*(p - eps * t for p, t in zip(primals, tangents, strict=True)))
        return fn(*primals), (plus - minus) / (2 * eps)
    raise ConfigError(f"meanflow.derivative must be one of {DERIVATIVES}, not {method!r}")


@register_stage("diladiff")
class DiLaDiff(LatentStage):
    parent_key = "teacher"
    inherits = ("model", "data", "mdlm", "autoencoder", "prior", "diffusion")

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        self.teacher = LatentDenoiser(*self.latent_shape, cfg.prior, cfg.model.attention)
        self.teacher.requires_grad_(False)
        # The student differentiates through forward-mode AD: explicit attention when jvp.
        backend = "math" if cfg.meanflow.derivative == "jvp" else cfg.model.attention
        self.student = LatentDenoiser(*self.latent_shape, cfg.prior, backend, with_interval=True)
        self.tangent_weight = 1.0  # set by on_step during training

    def init_from_parents(self, parents: dict) -> None:
        from diladiff.runs import load_run

        src = parents.get("teacher")
        teacher, _ = load_run(Path(src))
        if teacher.kind != "ladiff":
            raise CheckpointError(f"--teacher {src} is a {teacher.kind} run, not a ladiff run")
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
        d = self.cfg.diffusion.d
        z_sc = self.teacher(z_t, t)
        return velocity_from_x0(z_t, self.teacher(z_t, t, z_sc), t, d), z_sc

    def average_velocity(self, z_t, t, r, z_sc=None):
        """u_eta(z_t, t, r) = velocity implied by the student's clean estimate."""
        return velocity_from_x0(z_t, self.student(z_t, t, z_sc, r), t, self.cfg.diffusion.d)

    @torch.no_grad()
    def student_self_condition(self, z_t, t, keep: torch.Tensor | None = None):
        """z_sc = X(u_eta(z_t, t, t; 0)) on the rows where `keep` is True (all if None), zeros
        on the others: the first pass of a sampling step, without gradients."""
        d = self.cfg.diffusion.d
        if keep is None:
            return x0_from_velocity(z_t, self.average_velocity(z_t, t, t), t, d)
        z_sc = torch.zeros_like(z_t)
        if keep.any():  # the pass runs on the kept rows only
            zk, tk = z_t[keep], t[keep]
            z_sc[keep] = x0_from_velocity(zk, self.average_velocity(zk, tk, tk), tk, d).to(z_sc)
        return z_sc

    def meanflow_terms(self, z_t, t, r, v, z_sc):
        """(u, u_tgt): the student's average velocity and the stop-gradient MeanFlow target."""
        mf = self.cfg.meanflow
        fn = lambda z, tt, rr: self.average_velocity(z, tt, rr, z_sc)  # noqa: E731
        u, dudt = directional_derivative(
            fn, (z_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)), mf.derivative, mf.fd_eps
        )
        interval = (t - r).view(-1, *([1] * (z_t.dim() - 1)))
        return u, (v - self.tangent_weight * interval * dudt).detach()

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
        z_t = diffuse(z, t, torch.randn(z.shape, generator=generator, device=z.device), dc.d)
        return z_t, t, r

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        mf = self.cfg.meanflow
        z_t, t, r = self.draw(batch, generator)
        v, _ = self.teacher_velocity(z_t, t)
        keep = torch.rand(len(t), generator=generator, device=t.device) < mf.student_self_cond_prob
        z_sc = self.student_self_condition(z_t, t, keep)
        u, u_tgt = self.meanflow_terms(z_t, t, r, v, z_sc)
        err = ((u - u_tgt) ** 2).flatten(1).mean(1)
        loss = (err / (err.detach() + mf.adaptive_c) ** mf.adaptive_p).mean()
        return loss, {"loss": loss.detach(), "mse": err.mean().detach()}

    @torch.no_grad()
    def evaluate(self, batches, generator):
        """Errors with the student self-conditioned as at sampling (on its r = t pass)."""
        total, fm, n = 0.0, 0.0, 0
        for x0 in batches:
            z_t, t, r = self.draw(x0, generator)
            v, _ = self.teacher_velocity(z_t, t)
            z_sc = self.student_self_condition(z_t, t)
            u, u_tgt = self.meanflow_terms(z_t, t, r, v, z_sc)
            total += float(((u - u_tgt) ** 2).mean()) * len(x0)
            fm += float(((self.average_velocity(z_t, t, t, z_sc) - v) ** 2).mean()) * len(x0)
            n += len(x0)
        return {"val_mse": total / n, "val_flow_matching_mse": fm / n}

    # ------------------------------------------------------------------ sampling
    def self_conditioned_u(self, z_t, t, r):
        """Two calls: the r = t pass gives the clean estimate used as self-conditioning."""
        return self.average_velocity(z_t, t, r, self.student_self_condition(z_t, t))

    def sample_latent(self, batch, settings, generator, device):
        steps = settings.cont_steps or self.cfg.sample.cont_steps or 5
        z, calls = meanflow_sample(
            self.self_conditioned_u,
            (batch, *self.latent_shape),
            steps,
            self.cfg.diffusion.d,
            generator,
            device,
            gamma=settings.gamma or self.cfg.sample.gamma,
        )
        return z, 2 * calls
