"""The base of every stage that generates a continuous latent and decodes it with a masked
token decoder (LaDiff, DiLaDiff): the latent diffusion process's config section, the two latent
spaces, and what the samplers (sampling/latent.py, sampling/generate.py) need.

Two latent spaces. The decoder reads z_ae = ae.encode(x0) (the auto-encoder's own
standardisation, fixed while it trained). The prior works in

    z = (z_ae - m) / s        per coordinate (N_z x d_z),

with m, s the mean and standard deviation of z_ae over clean training rows, estimated once from
the frozen encoder when a run starts (`fit_prior_space`), so that the prior's data has
zero-mean, unit-variance coordinates; z_ae = m + s z maps a prior sample back for decoding.

The auto-encoder is a frozen copy of a parent run, of the class `autoencoder_class` (LaDiff,
DiLaDiff: the Autoencoder stage), when `frozen_autoencoder` is True; a method that trains its
encoder and decoder with the prior sets it False and provides `latent_dims`, `encode_clean` and its
decoding itself: `latent_decoding` says how sampling/generate.py turns a latent into tokens
("masked": N_disc steps of the masked decoder `decoder_stage`; "direct": one call of the stage's
`decode(z)`, LDLM). A method whose latents are not standardised for the prior (LDLM learns their
scale) sets `standardised_prior` False: the prior space is then the decoder space.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Annotated, ClassVar

import numpy as np
import torch

from diladiff.config import Config, ConfigError, OneOf, Range, Satisfies, register_section
from diladiff.data.packing import PackedData
from diladiff.nets.standardize import Standardizer
from diladiff.processes.fitted_schedule import FittedSchedule, parse_tanh
from diladiff.stages.base import Stage
from diladiff.stages.masked import MaskedDiffusionStage


def _fitted_parameters(_, cfg: Config) -> None:
    """A fitted schedule needs a tanh fit that gives an invertible map (ConfigError otherwise)."""
    if cfg.diffusion.schedule == "fitted":
        vp_schedule(cfg.diffusion)


@register_section("diffusion")
@dataclass
class DiffusionConfig:
    """The latent process: VP, warped tangent schedule alpha_t^2 = 1/(1 + d^2 tan^2(pi t/2)),
    or the fitted time reparameterisation (processes/fitted_schedule.py)."""

    d: Annotated[float, Range(gt=0)] = 10.0
    # "tangent" (the warping d above) or "fitted": the time follows the decoder's error rate
    # against latent noise, err(s) = a + b tanh(c (s - e)) (`diladiff analyze robustness` of
    # the auto-encoder run writes the fit: its "schedule_override"), with a share
    # fitted_angle_share of the time spread evenly over the angle (alpha_t = cos phi_t).
    schedule: Annotated[str, OneOf(SCHEDULES)] = "tangent"
    # "a,b,c,e" (robustness.json's tanh_fit), for schedule=fitted
    fitted_tanh: Annotated[str, Satisfies(_fitted_parameters)] = ""
    fitted_angle_share: Annotated[float, Range(gt=0, le=1)] = 0.1
    self_cond_prob: Annotated[float, Range(ge=0, le=1)] = 0.5
    # t ~ U[t_eps, 1 - t_eps]
    t_eps: Annotated[float, Range(gt=0, lt=0.5)] = 1e-4
    # Clean training rows (drawn at random) whose frozen-encoder latents give the prior-space
    # standardisation, estimated once when a LaDiff run starts; 0 or more than there are = all.
    latent_stats_rows: Annotated[int, Range(ge=0)] = 4096


SCHEDULES = ("tangent", "fitted")


def vp_schedule(dc) -> float | FittedSchedule:
    """What processes.gaussian takes as its schedule for a diffusion config: the warping d
    (tangent) or the FittedSchedule; ConfigError (one line) for an unknown schedule, a fitted
    one without parameters, or parameters that give no invertible map."""
    kind = getattr(dc, "schedule", "tangent")
    if kind == "tangent":
        return dc.d
    if kind != "fitted":
        raise ConfigError(f"diffusion.schedule must be one of {SCHEDULES}, not {kind!r}")
    if not dc.fitted_tanh.strip():
        raise ConfigError(
            "diffusion.schedule=fitted needs diffusion.fitted_tanh=a,b,c,e (the tanh_fit of "
            "`diladiff analyze robustness` on the auto-encoder)"
        )
    return _fitted(dc.fitted_tanh, dc.fitted_angle_share)


@functools.lru_cache(maxsize=16)
def _fitted(text: str, angle_share: float) -> FittedSchedule:
    try:
        return FittedSchedule(*parse_tanh(text), angle_share=angle_share)
    except ValueError as exc:
        raise ConfigError(f"diffusion.fitted_tanh / fitted_angle_share: {exc}") from None


def schedule_name(dc, short: bool = False) -> str:
    """The latent schedule in words (summaries); `short`: "tangent d=10" or "fitted" (legends)."""
    if getattr(dc, "schedule", "tangent") == "fitted":
        if short:
            return "fitted"
        return f"fitted schedule (tanh {dc.fitted_tanh}; angle share {dc.fitted_angle_share:g})"
    return f"tangent d={dc.d:g}" if short else f"tangent schedule d={dc.d:g}"


class LatentStage(Stage):
    """A latent prior plus a masked token decoder: latent sampling, then decoding."""

    frozen_autoencoder: ClassVar[bool] = True
    # The frozen auto-encoder's stage class (a method's stage, set by the method).
    autoencoder_class: ClassVar[type[Stage] | None] = None
    latent_decoding: ClassVar[str] = "masked"
    standardised_prior: ClassVar[bool] = True
    generation = "latent"
    # The latent sampler (a name in sampling.latent.LATENT_SAMPLERS) the stage's presets set
    # as sample.latent_sampler.
    latent_sampler: ClassVar[str] = ""

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        if self.frozen_autoencoder:
            if self.autoencoder_class is None:
                raise TypeError(
                    f"{type(self).__name__} has a frozen auto-encoder: set autoencoder_class"
                )
            self.ae = self.autoencoder_class(cfg, tokenizer_identity).requires_grad_(False)
            self.seq_len, self.mask_id = self.ae.seq_len, self.ae.mask_id
        self.latent_shape = self.latent_dims(cfg)
        vp_schedule(cfg.diffusion)  # a bad schedule is a ConfigError before anything runs
        if self.standardised_prior:
            # Prior space <-> decoder space; estimated by `fit_prior_space`, saved with the weights.
            self.prior_norm = Standardizer(self.latent_shape)
            self._register_load_state_dict_pre_hook(
                _identity_prior_norm_for_old_checkpoints, with_module=True
            )

    @classmethod
    def latent_dims(cls, cfg: Config) -> tuple[int, int]:
        """(N_z, d_z) of the latent this stage generates."""
        return (cfg.autoencoder.num_latents, cfg.autoencoder.latent_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_autoencoder:
            self.ae.eval()  # frozen: never updates its running statistics
        return self

    def attach(self, data: PackedData, device, tokenizer) -> None:
        """The frozen auto-encoder's per-run attachments (its feature cache: the one its own
        run built for the same data, so the prior's steps skip the feature model too)."""
        if self.frozen_autoencoder:
            self.ae.attach(data, device, tokenizer)

    def use_tokenizer(self, tokenizer) -> None:
        if self.frozen_autoencoder:
            self.ae.use_tokenizer(tokenizer)

    @property
    def schedule(self) -> float | FittedSchedule:
        """The latent process's schedule (`vp_schedule` of the diffusion section)."""
        return vp_schedule(self.cfg.diffusion)

    @property
    def decoder_stage(self) -> MaskedDiffusionStage:
        """The masked token decoder conditioned on decoder-space latents z_ae."""
        return self.ae

    def encode_clean(self, x0: torch.Tensor) -> torch.Tensor:
        """Decoder-space latents z_ae of clean rows x0 (no augmentation)."""
        return self.ae.encode(x0)

    # ------------------------------------------------------------------ latent spaces
    @torch.no_grad()
    def fit_prior_space(self, data: PackedData, device) -> None:
        """Estimate the prior-space standardisation m, s from the frozen encoder's latents
        z_ae of `diffusion.latent_stats_rows` clean training rows (drawn with the run's seed;
        all rows if there are fewer)."""
        self.to(device)
        if self.frozen_autoencoder:
            self.ae.eval()  # clean rows: no feature augmentation
        chunks = self.clean_row_batches(data, self.cfg.diffusion.latent_stats_rows, 0x5747, device)
        self.prior_norm.fit(self.encode_clean(x0) for x0 in chunks)

    def clean_row_batches(self, data: PackedData, rows: int, salt: int, device):
        """Batches (micro-batch size) of `rows` clean training rows drawn without replacement
        with the run's seed and `salt`, in index order; rows <= 0 or more than there are: all."""
        train = data.train
        n = len(train) if rows <= 0 else min(rows, len(train))
        rng = np.random.default_rng([self.cfg.train.seed, salt])
        idx = np.sort(rng.choice(len(train), size=n, replace=False))
        batch = self.cfg.train.micro_batch_size or self.cfg.train.batch_size
        return (
            torch.from_numpy(np.asarray(train[idx[i : i + batch]], dtype=np.int64)).to(device)
            for i in range(0, n, batch)
        )

    def to_prior_space(self, z_ae: torch.Tensor) -> torch.Tensor:
        """z = (z_ae - m) / s (the identity without `standardised_prior`)."""
        return self.prior_norm(z_ae) if self.standardised_prior else z_ae

    def to_decoder_space(self, z: torch.Tensor) -> torch.Tensor:
        """z_ae = m + s z (the identity without `standardised_prior`)."""
        return self.prior_norm.inverse(z) if self.standardised_prior else z

    @torch.no_grad()
    def prior_latents(self, x0: torch.Tensor) -> torch.Tensor:
        """The prior's data: the encoder's latent of clean rows, in prior space."""
        return self.to_prior_space(self.encode_clean(x0))


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


def decodes_directly(stage) -> bool:
    """Whether `stage` turns its latent into tokens in one call (latent_decoding "direct",
    LDLM): no N_disc axis to sweep or report."""
    return isinstance(stage, LatentStage) and stage.latent_decoding == "direct"
