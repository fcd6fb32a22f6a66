"""Stage 2: LaDiff, a continuous diffusion prior over the frozen auto-encoder's latents
(prior space: stages/latent.py).

Training: x0-prediction loss (processes.gaussian.x0_prediction_loss) on prior-space latents
z of clean rows: t ~ U[eps, 1 - eps], z_t = alpha_t z + sigma_t eps (tangent schedule, warping
d, or the fitted schedule: diffusion.schedule, stages/latent.py), loss ||z_psi(z_t, t, z_sc) -
z||^2, where on a `self_cond_prob` share of the batches z_sc = stopgrad(z_psi(z_t, t, 0))
(else 0).

Generation (sampling/): z ~ probability-flow ODE (the "ode_euler" latent sampler, N_cont
steps, self-conditioning from the previous step), z_ae = m + s z, then N_disc steps of
masked-diffusion decoding conditioned on z_ae.
"""

from __future__ import annotations

import torch

from diladiff.config import Config
from diladiff.data.packing import PackedData
from diladiff.methods.autoencoder import Autoencoder
from diladiff.nets.latent_denoiser import LatentDenoiser
from diladiff.processes.gaussian import x0_prediction_loss
from diladiff.stages.base import Stage, register_stage
from diladiff.stages.latent import LatentStage, schedule_name


@register_stage("ladiff")
class LaDiff(LatentStage):
    parents = {"autoencoder": "autoencoder"}
    inherits = ("model", "data", "mdlm", "autoencoder")
    eval_samplers = ({"cont_steps": 200}, {"cont_steps": 5})
    latent_sampler = "ode_euler"  # sampling.latent.LATENT_SAMPLERS
    autoencoder_class = Autoencoder  # the frozen auto-encoder of its parent run
    budget_share = 0.15
    demo_steps = 150
    check_steps = 800  # a prior over the K latents of the check's rows

    @classmethod
    def preset_changes(cls, cfg: Config, preset: str) -> None:
        """The paper's learning rate; this project's schedule lengths and prior sizes (width =
        d_z: see PriorConfig); 200 Euler steps of the probability-flow ODE by default."""
        tc, pc = cfg.train, cfg.prior
        cfg.sample.latent_sampler, cfg.sample.cont_steps = cls.latent_sampler, 200
        if preset == "paper":
            tc.lr, tc.total_steps, tc.warmup_steps = 2e-4, 500_000, 1000
        elif preset == "small":
            tc.lr, tc.total_steps = 3e-4, 4000
            pc.depth, pc.width, pc.heads = 8, 768, 12
        elif preset == "tiny":
            tc.lr, tc.total_steps = 1e-3, 600
            pc.depth, pc.width, pc.heads = 3, 384, 6
            cfg.diffusion.latent_stats_rows = 2048
        elif preset == "cpu":  # 32 x 64 latents: width 128 >= d_z
            tc.lr, tc.total_steps = 1e-3, 2000
            pc.depth, pc.width, pc.heads = 4, 128, 4
            cfg.diffusion.latent_stats_rows = 4096

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        self.prior = LatentDenoiser(*self.latent_shape, cfg.prior, cfg.model.attention)

    def init_from_parents(self, parents: dict[str, Stage]) -> None:
        """The frozen auto-encoder: a copy of the trained one (EMA weights)."""
        self.ae.load_state_dict(parents["autoencoder"].state_dict())

    def prepare(self, data: PackedData, device) -> None:
        """A new run: the prior-space standardisation from the frozen encoder."""
        self.fit_prior_space(data, device)

    def summary(self) -> str:
        n = sum(p.numel() for p in self.prior.parameters())
        return (
            f"ladiff: prior {n / 1e6:.2f}M parameters over latents {self.latent_shape}, "
            f"{schedule_name(self.cfg.diffusion)}"
        )

    def x0(self, z_t, t, z_sc=None):
        """z_psi(z_t, t, z_sc): the clean-latent prediction."""
        return self.prior(z_t, t, z_sc)

    def diffusion_loss(self, z, generator, self_condition: bool):
        dc = self.cfg.diffusion
        return x0_prediction_loss(self.x0, z, dc.t_eps, self.schedule, generator, self_condition)

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        z = self.prior_latents(batch)
        sc = bool(
            torch.rand((), generator=generator, device=batch.device)
            < self.cfg.diffusion.self_cond_prob
        )
        loss = self.diffusion_loss(z, generator, sc)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, batches, generator):
        plain, selfc, n = 0.0, 0.0, 0
        for x0 in batches:
            z = self.prior_latents(x0)
            plain += self.diffusion_loss(z, generator, False).item() * len(x0)
            selfc += self.diffusion_loss(z, generator, True).item() * len(x0)
            n += len(x0)
        return {"val_loss": plain / n, "val_loss_self_cond": selfc / n}
