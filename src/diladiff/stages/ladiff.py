"""Stage 2: LaDiff, a continuous diffusion prior over the frozen auto-encoder's latents.

Two latent spaces. The decoder reads z_ae = ae.encode(x0) (the auto-encoder's own
standardisation, fixed while it trained). The prior works in

    z = (z_ae - m) / s        per coordinate (N_z x d_z),

with m, s the mean and standard deviation of z_ae over clean training rows, estimated once from
the frozen encoder when a LaDiff run starts (`prepare`), so that the prior's data has zero-mean,
unit-variance coordinates; z_ae = m + s z maps a prior sample back for decoding.

Training: t ~ U[eps, 1 - eps]; z_t = alpha_t z + sigma_t eps (tangent schedule, warping d);
x0-prediction loss ||z_psi(z_t, t, z_sc) - z||^2, where on a `self_cond_prob` share of the
batches z_sc = stopgrad(z_psi(z_t, t, 0)) (else 0).

Generation: z ~ probability-flow ODE (Euler, N_cont steps, self-conditioning from the previous
step), z_ae = m + s z, then N_disc steps of masked-diffusion decoding conditioned on z_ae.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from diladiff.config import Config
from diladiff.data.packing import PackedData
from diladiff.errors import CheckpointError
from diladiff.features import Standardizer
from diladiff.nets.latent_denoiser import LatentDenoiser
from diladiff.processes.gaussian import diffuse
from diladiff.sampling.latent import euler_ode_sample
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
        # Prior space <-> decoder space; estimated by `fit_prior_space`, saved with the weights.
        self.prior_norm = Standardizer(self.latent_shape)
        self._register_load_state_dict_pre_hook(
            _identity_prior_norm_for_old_checkpoints, with_module=True
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.ae.eval()  # frozen: never updates its running statistics
        return self

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    # ------------------------------------------------------------------ latent spaces
    @torch.no_grad()
    def fit_prior_space(self, data: PackedData, device) -> None:
        """Estimate the prior-space standardisation m, s from the frozen encoder's latents
        z_ae = ae.encode(x0) of `diffusion.latent_stats_rows` clean training rows (drawn with
        the run's seed; all rows if there are fewer)."""
        rows = data.train
        n = self.cfg.diffusion.latent_stats_rows
        n = len(rows) if n <= 0 else min(n, len(rows))
        rng = np.random.default_rng([self.cfg.train.seed, 0x5747])
        idx = np.sort(rng.choice(len(rows), size=n, replace=False))
        batch = self.cfg.train.micro_batch_size or self.cfg.train.batch_size
        self.to(device)
        self.ae.eval()  # clean rows: no feature augmentation
        chunks = (
            torch.from_numpy(np.asarray(rows[idx[i : i + batch]], dtype=np.int64)).to(device)
            for i in range(0, n, batch)
        )
        self.prior_norm.fit(self.ae.encode(x0) for x0 in chunks)

    def to_prior_space(self, z_ae: torch.Tensor) -> torch.Tensor:
        """z = (z_ae - m) / s."""
        return self.prior_norm(z_ae)

    def to_decoder_space(self, z: torch.Tensor) -> torch.Tensor:
        """z_ae = m + s z."""
        return self.prior_norm.inverse(z)

    @torch.no_grad()
    def prior_latents(self, x0: torch.Tensor) -> torch.Tensor:
        """The prior's data: the frozen encoder's latent of clean rows, in prior space."""
        return self.to_prior_space(self.ae.encode(x0))

    # ------------------------------------------------------------------ generation
    def sample_latent(self, batch: int, settings, generator, device) -> tuple[torch.Tensor, int]:
        """(z, network calls): a prior sample of `batch` latents, in prior space."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, z_ae: torch.Tensor, settings, generator, device, progress=False):
        """Tokens from masked-diffusion decoding conditioned on decoder-space latents z_ae
        (B, N_z, d_z); stats: disc_nfe, disc_steps_taken, decode_s."""
        z = z_ae.to(device)
        batch = z.shape[0]
        _sync(device)
        t1 = time.perf_counter()
        ids, stats = self.ae.decode_tokens(batch, settings, generator, device, progress, cond=z)
        _sync(device)
        return ids, {**stats, "decode_s": time.perf_counter() - t1}

    @torch.no_grad()
    def sample(self, batch: int, settings, generator: torch.Generator, device, progress=False):
        """Latent (prior space), mapped to decoder space, then tokens; stats split the time
        between the two (latent overhead)."""
        _sync(device)
        t0 = time.perf_counter()
        z, cont_nfe = self.sample_latent(batch, settings, generator, device)
        z_ae = self.to_decoder_space(z)
        _sync(device)
        t1 = time.perf_counter()
        ids, st = self.decode(z_ae, settings, generator, device, progress)
        return ids, {**st, "cont_nfe": cont_nfe, "latent_s": t1 - t0}


def _identity_prior_norm_for_old_checkpoints(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the prior had its own standardisation trained the prior on
    ae.encode(x0) itself: the identity map (m = 0, s = 1) reproduces them exactly."""
    key = prefix + "prior_norm."
    if key + "mean" in state_dict or prefix + "ae.z_norm.mean" not in state_dict:
        return
    warnings.warn(
        "checkpoint without a prior-space standardisation (older version): using the "
        "identity, the map its prior was trained with",
        stacklevel=2,
    )
    state_dict[key + "mean"] = torch.zeros(module.latent_shape)
    state_dict[key + "std"] = torch.ones(module.latent_shape)
    state_dict[key + "fitted"] = torch.ones((), dtype=torch.bool)


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

    def prepare(self, data: PackedData, device) -> None:
        """A new run: the prior-space standardisation from the frozen encoder."""
        self.fit_prior_space(data, device)

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

    def sample_latent(self, batch, settings, generator, device):
        steps = settings.cont_steps or self.cfg.sample.cont_steps or 200
        return euler_ode_sample(
            self.x0, (batch, *self.latent_shape), steps, self.cfg.diffusion.d, generator, device
        )
