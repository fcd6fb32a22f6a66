"""LDLM ("How to Train Your Latent Diffusion Language Model Jointly With the Latent Space";
method page: docs/methods/ldlm.md): a continuous latent diffusion LM whose latent encoder is trained
together with the diffusion model and the decoders. No token diffusion, no parent run.

    h = standardise(E_h(x0))          frozen LM features (hub default gpt2, hidden_states[-3])
    z0 = E_z(h)                       Perceiver, N_z = L latents of width d_z (no compression)
    h_hat = D_h(z0 + sigma_dec eps)   Perceiver: L queries read the noisy latent
    logits = D_w(sg(h_hat))           small bidirectional transformer + vocabulary head

The latent is *not* standardised: its scale is learned and held in check by sigma_dec. The
prior is a VP process on z0 with the tangent schedule (diffusion.d = 3) and an x0-predicting
DiT with self-conditioning. The loss, all weights 1 (`ldlm_losses`):

    L = L_diff + L_h + L_w,
    L_diff = mean || z_psi(alpha_u z0d + sigma_u eps, u, z_sc) - z0d ||^2,
    z0d = sg(z0) + gamma(s) (z0 - sg(z0))      (forward z0; encoder gradient scaled by gamma)
    L_h = mean || h - D_h(z0 + sigma_dec eps_dec) ||^2,   L_w = CE(x0, D_w(sg(h_hat))).

The recipe's four parts are switches (ldlm.*), so the paper's ablation table can be rerun:
`recon_loss` (mse / ce / ce+mse), `encoder_warmup_steps` (gamma(s), 0 = none),
`adaptive_time` (u drawn from the adaptive timestep sampler, else uniform) and `sigma_dec`.

Generation (sampling/): z from the latent sampler (sample.latent_sampler: "sde_euler" by
default, "ddpm", "ode_euler"; the time grid warped by the adaptive sampler's F^-1), then one
decoder call: tokens = argmax D_w(D_h(z)) (`latent_decoding = "direct"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from diladiff.config import (
    Config,
    ConfigError,
    DivisibleBy,
    NotEmpty,
    OneOf,
    Range,
    preset_base,
    register_section,
)
from diladiff.data.packing import PackedData
from diladiff.data.tokenizer import check_same_tokenizer
from diladiff.features import FEATURE_PRECISIONS, FeatureModel
from diladiff.methods.ldlm.adaptive_time import AdaptiveTimeSampler
from diladiff.methods.ldlm.encoder_warmup import gradient_warmup, partial_stop_gradient
from diladiff.methods.ldlm.feature_decoder import FeatureTokenDecoder
from diladiff.nets.latent_denoiser import LatentDenoiser
from diladiff.nets.perceiver import PerceiverCompressor
from diladiff.nets.standardize import Standardizer
from diladiff.processes.gaussian import diffuse
from diladiff.stages.base import register_stage
from diladiff.stages.latent import LatentStage, schedule_name

RECON_LOSSES = ("mse", "ce", "ce+mse")


def _ldlm_preset(preset: str) -> LDLMConfig:
    """The paper's networks at `paper`; CPU- and one-GPU-sized ones otherwise, reading the
    presets' data tokenizer's encoder (minilm-l6: the paper's "BERT instead of GPT-2" variant,
    since the tiny and small presets' data are tokenised for it)."""
    base = preset_base(preset)
    if base == "paper":
        return LDLMConfig()  # sigma_dec = 3, the paper's final value
    # sigma_dec = 1 (the paper's ablation base) below `paper`: at the tiny preset's 600 steps
    # the reconstruction signal through decoder-input noise of std 3 does not hold against the
    # diffusion loss, the encoder's output becomes one constant latent and every sample is the
    # unigram's argmax (RESULTS.md: GenPPL 11,538, MAUVE 0.008; sigma_dec = 1: 824 and 0.59).
    # The paper's 3 comes from 500k steps at batch 512; the small preset's 6k steps are far
    # from that too (3 was not measured there), so it starts from 1 as well.
    if base == "small":
        return LDLMConfig(
            sigma_dec=1.0,
            feature_model="minilm-l6",
            latent_dim=384,
            encoder_width=512,
            encoder_heads=8,
            encoder_depth=4,
            hidden_decoder_depth=4,
            token_decoder_width=512,
            token_decoder_heads=8,
            encoder_warmup_steps=2000,
            ats_refresh_every=500,
        )
    return LDLMConfig(
        sigma_dec=1.0,
        feature_model="minilm-l6",
        latent_dim=64,
        encoder_width=128,
        encoder_heads=4,
        encoder_depth=2,
        hidden_decoder_depth=2,
        token_decoder_width=128,
        token_decoder_heads=4,
        token_decoder_depth=2,
        encoder_warmup_steps=300,
        ats_refresh_every=50,
    )


@register_section("ldlm", _ldlm_preset)
@dataclass
class LDLMConfig:
    """LDLM's auto-encoder and recipe (docs/methods/ldlm.md#configuration; [P] paper, [R]
    reconstructed)."""

    # The frozen LM: hub name, path or alias ("smollm2-135m": the offline causal-LM stand-in
    # for gpt2); it must use data.tokenizer's vocabulary. Third-to-last hidden state [P].
    feature_model: Annotated[str, NotEmpty()] = "gpt2"
    feature_layer: int = -3
    feature_precision: Annotated[str, OneOf(FEATURE_PRECISIONS)] = "auto"
    # Clean training rows whose features give the per-coordinate standardisation of h,
    # estimated once when a run starts; 0 = all.
    feature_stats_rows: Annotated[int, Range(ge=0)] = 4096
    # N_z; 0 = L (no compression [P])
    num_latents: Annotated[int, Range(ge=1, unset=0, same_as="data.seq_len")] = 0
    latent_dim: Annotated[int, Range(ge=1)] = 768  # d_z [P]
    # E_z and D_h: Perceivers of this width, depth and heads [P: 6 x 768, 12 heads].
    encoder_width: Annotated[int, Range(ge=1), DivisibleBy("encoder_heads")] = 768
    encoder_depth: Annotated[int, Range(ge=1)] = 6
    encoder_heads: Annotated[int, Range(ge=1)] = 12
    hidden_decoder_depth: Annotated[int, Range(ge=1)] = 6
    # D_w: 3 bidirectional layers [P], width 768, 12 heads [R].
    token_decoder_depth: Annotated[int, Range(ge=1)] = 3
    token_decoder_width: Annotated[int, Range(ge=1), DivisibleBy("token_decoder_heads")] = 768
    token_decoder_heads: Annotated[int, Range(ge=1)] = 12
    # Decoder-input noise: D_h reads z0 + sigma_dec eps [P: 3 final, 1 in the ablations];
    # 1 at the tiny, cpu and small presets (_ldlm_preset: 3 collapsed the latent at tiny).
    sigma_dec: Annotated[float, Range(ge=0)] = 3.0
    # "mse": L_h + L_w with L_w stopped at h_hat [P]; "ce": L_w alone, reaching E_z and D_h;
    # "ce+mse": both, L_w reaching E_z and D_h (the paper's Table 1 rows).
    recon_loss: Annotated[str, OneOf(RECON_LOSSES)] = "mse"
    # Diffusion-to-encoder gradient warm-up gamma(s) over this many steps (S_wu; 0 = none,
    # gamma = 1 throughout) [P: 10k ablations, 25k-50k main]; sigmoid ramp k, c [P];
    # gamma_min "about 0" [P] -> 0 [R].
    encoder_warmup_steps: Annotated[int, Range(ge=0)] = 10_000
    warmup_k: Annotated[float, Range(gt=0)] = 10.0
    warmup_c: float = 0.8
    warmup_gamma_min: Annotated[float, Range(ge=0, le=1)] = 0.0
    # Adaptive timestep sampling [P: 100 bins, refreshed every 5k steps]; EMA decay and
    # floor [R]. False = u ~ U[t_eps, 1 - t_eps].
    adaptive_time: bool = True
    ats_bins: Annotated[int, Range(ge=1)] = 100
    ats_ema: Annotated[float, Range(ge=0, lt=1)] = 0.99
    ats_refresh_every: Annotated[int, Range(ge=1)] = 5000
    ats_floor: Annotated[float, Range(gt=0, le=1)] = 1e-4


@register_stage("ldlm")
class LDLM(LatentStage):
    frozen_autoencoder = False
    standardised_prior = False  # z0's scale is learned (docs/methods/ldlm.md#components)
    latent_decoding = "direct"
    latent_sampler = "sde_euler"  # Euler-Maruyama [P]
    eval_samplers = ({"cont_steps": 32}, {"cont_steps": 128})
    optional = True  # a sibling method: the pipeline trains it when asked (--stages ldlm)
    budget_share = 0.3
    demo_steps = 300

    @classmethod
    def preset_changes(cls, cfg: Config, preset: str) -> None:
        """The paper's optimiser (AdamW lr 3e-4, wd 0.01, betas (0.9, 0.98), 5k warm-up, then
        constant) and schedule d = 3; at `paper` the GPT-2 tokenizer of its feature model."""
        tc, pc = cfg.train, cfg.prior
        cfg.diffusion.d = 3.0
        cfg.sample.latent_sampler, cfg.sample.cont_steps = cls.latent_sampler, 128
        tc.beta2, tc.weight_decay, tc.schedule = 0.98, 0.01, "constant"
        if preset == "paper":
            cfg.data.tokenizer = cfg.ldlm.feature_model
            tc.lr, tc.warmup_steps, tc.total_steps = 3e-4, 5000, 500_000
        elif preset == "small":
            tc.lr, tc.total_steps = 3e-4, 6000
            pc.depth, pc.width, pc.heads = 8, 512, 8
        elif preset == "tiny":
            tc.lr, tc.warmup_steps, tc.total_steps = 1e-3, 50, 600
            pc.depth, pc.width, pc.heads = 3, 128, 4

    @classmethod
    def latent_dims(cls, cfg: Config) -> tuple[int, int]:
        return (cfg.ldlm.num_latents or cfg.data.seq_len, cfg.ldlm.latent_dim)

    @classmethod
    def warmups(cls, cfg: Config) -> dict[str, int]:
        return {
            "train.warmup_steps": cfg.train.warmup_steps,
            "ldlm.encoder_warmup_steps": cfg.ldlm.encoder_warmup_steps,
        }

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        lc, mc = cfg.ldlm, cfg.model
        self.seq_len = L = cfg.data.seq_len
        mask_id = tokenizer_identity.get("mask_id")
        self.mask_id = None if mask_id is None else int(mask_id)  # unused: no token masking
        self.features = FeatureModel(lc.feature_model, lc.feature_layer, lc.feature_precision)
        check_same_tokenizer(
            tokenizer_identity,
            self.features.tokenizer_identity(),
            f"ldlm.feature_model {lc.feature_model!r} vs data.tokenizer {cfg.data.tokenizer!r}",
        )
        d_h = self.features.dim
        n_z, d_z = self.latent_shape
        self.feat_norm = Standardizer((d_h,))  # fitted once (prepare), dataset statistics [P]
        w, heads = lc.encoder_width, lc.encoder_heads
        self.encoder = PerceiverCompressor(
            d_h, w, n_z, d_z, lc.encoder_depth, heads, mc.attention, max_len=L
        )
        self.hidden_decoder = PerceiverCompressor(
            d_z, w, L, d_h, lc.hidden_decoder_depth, heads, mc.attention, max_len=n_z
        )
        self.token_decoder = FeatureTokenDecoder(
            d_h,
            int(tokenizer_identity["vocab_size"]),
            L,
            lc.token_decoder_width,
            lc.token_decoder_depth,
            lc.token_decoder_heads,
            mc.mlp_ratio,
            mc.qk_norm,
            mc.attention,
        )
        self.prior = LatentDenoiser(n_z, d_z, cfg.prior, mc.attention)
        self.time_sampler = AdaptiveTimeSampler(lc.ats_bins, lc.ats_ema, lc.ats_floor)
        # gamma(s), set by on_step; a tensor so that a compiled loss does not recompile.
        self.register_buffer("encoder_grad_scale", torch.ones(()), persistent=False)
        self.on_step(0)

    def summary(self) -> str:
        def count(m):
            return sum(p.numel() for p in m.parameters()) / 1e6

        lc = self.cfg.ldlm
        return (
            f"ldlm: E_z {count(self.encoder):.2f}M, D_h {count(self.hidden_decoder):.2f}M, "
            f"D_w {count(self.token_decoder):.2f}M, denoiser {count(self.prior):.2f}M over "
            f"latents {self.latent_shape}; features {lc.feature_model!r} "
            f"layer {lc.feature_layer}, sigma_dec {lc.sigma_dec}, recon {lc.recon_loss}, "
            f"warm-up {lc.encoder_warmup_steps} steps, adaptive time {lc.adaptive_time}, "
            f"{schedule_name(self.cfg.diffusion)}"
        )

    # ------------------------------------------------------------------ training state
    def on_step(self, step: int) -> None:
        """gamma(s) for this step; the adaptive time sampler's refresh every
        `ats_refresh_every` steps (deterministic in the step: exact resume)."""
        lc = self.cfg.ldlm
        self.encoder_grad_scale.fill_(
            gradient_warmup(
                step, lc.encoder_warmup_steps, lc.warmup_k, lc.warmup_c, lc.warmup_gamma_min
            )
        )
        if lc.adaptive_time and step > 0 and step % lc.ats_refresh_every == 0:
            self.time_sampler.refresh()

    @torch.no_grad()
    def prepare(self, data: PackedData, device) -> None:
        """A new run: the features' per-coordinate mean and std over `feature_stats_rows`
        clean training rows (drawn with the run's seed)."""
        self.to(device)
        chunks = self.clean_row_batches(data, self.cfg.ldlm.feature_stats_rows, 0x1D1E, device)
        self.feat_norm.fit(self.features(x0) for x0 in chunks)

    # ------------------------------------------------------------------ the auto-encoder
    def features_of(self, x0: torch.Tensor) -> torch.Tensor:
        """h = standardise(E_h(x0)) (B, L, d_h), no gradient."""
        return self.feat_norm(self.features(x0))

    def encode_clean(self, x0: torch.Tensor) -> torch.Tensor:
        """z0 = E_z(h) (B, N_z, d_z): the latent the prior models (not standardised)."""
        return self.encoder(self.features_of(x0))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """D_w(D_h(z)): token logits of a (clean) latent, no decoder noise [P]."""
        return self.token_decoder(self.hidden_decoder(z))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Token ids argmax D_w(D_h(z)) (docs/methods/ldlm.md#sampler; argmax is reconstructed)."""
        return self.logits(z).argmax(-1)

    def x0(self, z_t, t, z_sc=None):
        """z_psi(z_t, u, z_sc): the denoiser's clean-latent prediction (u = schedule time)."""
        return self.prior(z_t, t, z_sc)

    def time_grid(self, steps: int) -> torch.Tensor:
        """The sampling grid u_k = F^-1(1 - k / steps) (docs/methods/ldlm.md#adaptive-time,
        reconstructed: CDCD warps the sampling grid too); uniform without adaptive timestep
        sampling."""
        if self.cfg.ldlm.adaptive_time:
            return self.time_sampler.time_grid(steps)
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)

    def sample_times(self, n: int, generator, device) -> torch.Tensor:
        """u for a batch: from the adaptive sampler, else U[t_eps, 1 - t_eps]."""
        eps = self.cfg.diffusion.t_eps
        if self.cfg.ldlm.adaptive_time:
            u = self.time_sampler.sample(n, generator, device)
        else:
            u = torch.rand(n, generator=generator, device=device)
        return u.clamp(eps, 1 - eps) if self.cfg.ldlm.adaptive_time else eps + (1 - 2 * eps) * u

    # ------------------------------------------------------------------ the loss
    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        sc = bool(
            torch.rand((), generator=generator, device=batch.device)
            < self.cfg.diffusion.self_cond_prob
        )
        terms = ldlm_losses(self, batch, generator, sc, self.encoder_grad_scale)
        if self.training and self.cfg.ldlm.adaptive_time:
            self.time_sampler.update(terms["u"], terms["diff_per_example"].detach())
        lc = self.cfg.ldlm
        loss = terms["diff"]
        if lc.recon_loss != "ce":
            loss = loss + terms["hidden"]
        loss = loss + terms["token"]
        metrics = {
            "loss": loss.detach(),
            "diff": terms["diff"].detach(),
            "hidden_mse": terms["hidden"].detach(),
            "token_ce": terms["token"].detach(),
            "z0_std": terms["z0"].detach().std(),
            "gamma": self.encoder_grad_scale.clone(),
        }
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, batches, generator):
        """Held-out: the losses (u uniform, no self-conditioning, so that runs with and without
        adaptive time compare), and reconstruction from the clean latent (no decoder noise):
        token CE and argmax recovery. z0_std: the latent's coordinate std (its scale is learned)."""
        sums: dict[str, float] = {}
        n = 0
        for x0 in batches:
            terms = ldlm_losses(self, x0, generator, False, torch.ones(()), uniform_time=True)
            logits = self.logits(terms["z0"]).float()
            clean_ce = F.cross_entropy(logits.transpose(1, 2), x0)
            recovery = (logits.argmax(-1) == x0).float().mean()
            vals = {
                "val_diff": terms["diff"],
                "val_hidden_mse": terms["hidden"],
                "val_token_ce": terms["token"],
                "val_recon_ce": clean_ce,
                "val_token_recovery": recovery,
                "val_z0_std": terms["z0"].std(),
            }
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(x0)
            n += len(x0)
        out = {k: v / n for k, v in sums.items()}
        # The training loss's terms: L_h is left out by the recon_loss = ce ablation.
        out["val_loss"] = out["val_diff"] + out["val_token_ce"]
        if self.cfg.ldlm.recon_loss != "ce":
            out["val_loss"] += out["val_hidden_mse"]
        return out


def ldlm_losses(
    stage: LDLM,
    x0: torch.Tensor,
    generator: torch.Generator,
    self_condition: bool,
    gamma: torch.Tensor,
    uniform_time: bool = False,
) -> dict[str, torch.Tensor]:
    """One micro-batch of LDLM's joint objective (docs/methods/ldlm.md#losses), as its terms:

        h = standardise(E_h(x0)),  z0 = E_z(h),  h_hat = D_h(z0 + sigma_dec eps_dec)
        hidden = mean (h_hat - h)^2
        token  = CE(x0, D_w(sg(h_hat)))          (no stop-gradient unless recon_loss = mse)
        z0d    = sg(z0) + gamma (z0 - sg(z0))
        u ~ adaptive sampler (or uniform),  z_u = alpha_u z0d + sigma_u eps
        z_sc   = sg(z_psi(z_u, u, 0)) if self_condition else 0
        diff_per_example = mean_{l,k} (z_psi(z_u, u, z_sc) - z0d)^2,  diff = its batch mean

    Random draws, in order, from `generator`: eps_dec, u, eps. Also returns z0 and u."""
    lc = stage.cfg.ldlm
    dev = x0.device
    h = stage.features_of(x0)
    z0 = stage.encoder(h)
    eps_dec = torch.randn(z0.shape, generator=generator, device=dev)
    h_hat = stage.hidden_decoder(z0 + lc.sigma_dec * eps_dec)
    hidden = F.mse_loss(h_hat.float(), h)
    token_in = h_hat.detach() if lc.recon_loss == "mse" else h_hat
    token = F.cross_entropy(stage.token_decoder(token_in).float().transpose(1, 2), x0)
    z0d = partial_stop_gradient(z0, gamma.to(z0.dtype))
    if uniform_time:
        eps_t = stage.cfg.diffusion.t_eps
        u = eps_t + (1 - 2 * eps_t) * torch.rand(x0.shape[0], generator=generator, device=dev)
    else:
        u = stage.sample_times(x0.shape[0], generator, dev)
    eps = torch.randn(z0.shape, generator=generator, device=dev)
    z_u = diffuse(z0d, u, eps, stage.schedule)
    z_sc = None
    if self_condition:
        with torch.no_grad():
            z_sc = stage.x0(z_u, u).detach()
    per_example = ((stage.x0(z_u, u, z_sc).float() - z0d.float()) ** 2).mean(dim=(1, 2))
    return {
        "hidden": hidden,
        "token": token,
        "diff_per_example": per_example,
        "diff": per_example.mean(),
        "z0": z0,
        "u": u,
    }


@register_section("ldlm_decoder")
@dataclass
class LDLMDecoderConfig:
    """The post-trained small token decoder (docs/methods/ldlm.md#post-trained-decoder; paper): k
    transformer layers and a vocabulary head reading the noisy latent z0 + sigma eps directly (no
    D_h)."""

    # k [P: 1, 2, 3, 6 compared; 3 close to the joint decoder]
    layers: Annotated[int, Range(ge=1)] = 3
    sigma: Annotated[float, Range(ge=0)] = 3.0  # the decoder-input noise it trains with [P]


@register_stage("ldlm_decoder")
class LDLMDecoder(LDLM):
    """LDLM with a new token decoder trained afterwards on the frozen encoder (cross-entropy
    only); the latent prior, its adaptive time grid and the encoder are the parent's, frozen.
    Needs N_z = L (the decoder reads latent j as token position j)."""

    parents = {"init_from": "ldlm"}
    inherits = ("model", "data", "ldlm", "diffusion", "prior")
    budget_share = 0.1
    demo_steps = 200

    @classmethod
    def preset_changes(cls, cfg: Config, preset: str) -> None:
        """LDLM's optimiser and sampler; the paper trains 200k steps at batch 512 [P]."""
        super().preset_changes(cfg, preset)
        if preset == "paper":
            cfg.train.total_steps = 200_000

    @classmethod
    def warmups(cls, cfg: Config) -> dict[str, int]:
        return {"train.warmup_steps": cfg.train.warmup_steps}

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        if self.latent_shape[0] != self.seq_len:
            raise ConfigError(
                f"ldlm_decoder reads latent j as token j: it needs ldlm.num_latents = L "
                f"({self.seq_len}), not {self.latent_shape[0]}"
            )
        self.requires_grad_(False)
        lc, mc = cfg.ldlm, cfg.model
        self.post_decoder = FeatureTokenDecoder(
            self.latent_shape[1],
            int(tokenizer_identity["vocab_size"]),
            self.seq_len,
            lc.token_decoder_width,
            cfg.ldlm_decoder.layers,
            lc.token_decoder_heads,
            mc.mlp_ratio,
            mc.qk_norm,
            mc.attention,
        )

    def summary(self) -> str:
        n = sum(p.numel() for p in self.post_decoder.parameters())
        return (
            f"ldlm_decoder: {n / 1e6:.2f}M trainable parameters ({self.cfg.ldlm_decoder.layers} "
            f"layers reading z0 + {self.cfg.ldlm_decoder.sigma} eps); the rest of the parent frozen"
        )

    def init_from_parents(self, parents) -> None:
        """The parent LDLM's weights and buffers (its adaptive time grid too); the new decoder
        keeps its fresh initialisation."""
        missing, unexpected = self.load_state_dict(parents["init_from"].state_dict(), strict=False)
        if unexpected or any(not k.startswith("post_decoder.") for k in missing):
            raise ConfigError(f"parent run does not match: missing {missing}, extra {unexpected}")

    def prepare(self, data: PackedData, device) -> None:
        """Nothing to estimate: the feature statistics are the parent's."""

    def on_step(self, step: int) -> None:
        """No warm-up, no adaptive-time refresh: the prior is frozen."""

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The new decoder's token logits of a latent (read directly, no D_h)."""
        return self.post_decoder(z)

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        """CE(x0, decoder(z0 + sigma eps)) with z0 from the frozen encoder."""
        with torch.no_grad():
            z0 = self.encode_clean(batch)
        eps = torch.randn(z0.shape, generator=generator, device=z0.device)
        logits = self.post_decoder(z0 + self.cfg.ldlm_decoder.sigma * eps).float()
        loss = F.cross_entropy(logits.transpose(1, 2), batch)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, batches, generator):
        """Token CE and argmax recovery from the clean latent (what sampling decodes)."""
        ce, rec, n = 0.0, 0.0, 0
        for x0 in batches:
            logits = self.logits(self.encode_clean(x0)).float()
            ce += float(F.cross_entropy(logits.transpose(1, 2), x0)) * len(x0)
            rec += float((logits.argmax(-1) == x0).float().mean()) * len(x0)
            n += len(x0)
        return {"val_loss": ce / n, "val_token_recovery": rec / n}
