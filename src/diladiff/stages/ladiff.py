"""Stage 2: LaDiff, a continuous diffusion prior over the frozen auto-encoder's latents.

Training: z = standardised encoder latent of clean text; t ~ U[eps, 1 - eps];
z_t = alpha_t z + sigma_t eps (tangent schedule, warping d); x0-prediction loss
||z_psi(z_t, t, z_sc) - z||^2, where on a `self_cond_prob` share of the batches
z_sc = stopgrad(z_psi(z_t, t, 0)) (else 0).

Generation: z ~ probability-flow ODE (Euler, N_cont steps, self-conditioning from the previous
step), then N_disc steps of masked-diffusion decoding conditioned on z.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diladiff.config import Config
from diladiff.errors import CheckpointError
from diladiff.nets.latent_denoiser import LatentDenoiser
from diladiff.processes.gaussian import diffuse
from diladiff.sampling.latent import euler_ode_sample
from diladiff.sampling.masked import sample_masked
from diladiff.stages.autoencoder import Autoencoder
from diladiff.stages.base import Stage, register_stage


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class LatentStage(Stage):
    """A frozen auto-encoder plus a latent prior: latent sampling, then decoding."""

    frozen_parent: str = "ae"

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        self.ae = Autoencoder(cfg, tokenizer_identity).requires_grad_(False)
        self.seq_len, self.mask_id = self.ae.seq_len, self.ae.mask_id
        self.latent_shape = (cfg.autoencoder.num_latents, cfg.autoencoder.latent_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        self.ae.eval()  # frozen: never updates its running statistics
        return self

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    @torch.no_grad()
    def latents(self, x0: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's standardised latent of clean rows (the prior's data)."""
        return self.ae.encode(x0)

    def sample_latent(self, batch: int, settings, generator, device) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, batch: int, settings, generator: torch.Generator, device, progress=False):
        """Latent, then tokens; stats split the time between the two (latent overhead)."""
        _sync(device)
        t0 = time.perf_counter()
        z, cont_nfe = self.sample_latent(batch, settings, generator, device)
        _sync(device)
        t1 = time.perf_counter()
        ids, st = sample_masked(
            lambda x: self.ae.log_probs(x, z),
            batch,
            self.seq_len,
            self.mask_id,
            settings,
            generator,
            device,
            progress,
        )
        _sync(device)
        t2 = time.perf_counter()
        return ids, {
            "disc_nfe": st.nfe,
            "disc_steps_taken": st.steps,
            "cont_nfe": cont_nfe,
            "latent_s": t1 - t0,
            "decode_s": t2 - t1,
        }


@register_stage("ladiff")
class LaDiff(LatentStage):
    parent_key = "autoencoder"
    inherits = ("model", "data", "mdlm", "autoencoder")

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        self.prior = LatentDenoiser(*self.latent_shape, cfg.prior, cfg.model.attention)

    def init_from_parents(self, parents: dict) -> None:
        from diladiff.runs import load_run

        src = parents.get("autoencoder")
        ae, _ = load_run(Path(src))
        if ae.kind != "autoencoder":
            raise CheckpointError(f"--autoencoder {src} is a {ae.kind} run, not an autoencoder run")
        self.ae.load_state_dict(ae.state_dict())

    def summary(self) -> str:
        n = sum(p.numel() for p in self.prior.parameters())
        return (
            f"ladiff: prior {n / 1e6:.2f}M parameters over latents {self.latent_shape}, "
            f"tangent schedule d={self.cfg.diffusion.d}"
        )

    # ------------------------------------------------------------------ the prior
    def x0(self, z_t, t, z_sc=None):
        """z_psi(z_t, t, z_sc): the clean-latent prediction."""
        return self.prior(z_t, t, z_sc)

    def diffusion_loss(self, z, generator, self_condition: bool):
        dc = self.cfg.diffusion
        t = dc.t_eps + (1 - 2 * dc.t_eps) * torch.rand(
            z.shape[0], generator=generator, device=z.device
        )
        eps = torch.randn(z.shape, generator=generator, device=z.device)
        z_t = diffuse(z, t, eps, dc.d)
        z_sc = None
        if self_condition:
            with torch.no_grad():
                z_sc = self.x0(z_t, t).detach()
        return ((self.x0(z_t, t, z_sc) - z) ** 2).mean()

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        z = self.latents(batch)
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
            z = self.latents(x0)
            plain += self.diffusion_loss(z, generator, False).item() * len(x0)
            selfc += self.diffusion_loss(z, generator, True).item() * len(x0)
            n += len(x0)
        return {"val_loss": plain / n, "val_loss_self_cond": selfc / n}

    def sample_latent(self, batch, settings, generator, device):
        steps = settings.cont_steps or self.cfg.sample.cont_steps or 200
        return euler_ode_sample(
            self.x0, (batch, *self.latent_shape), steps, self.cfg.diffusion.d, generator, device
        )
