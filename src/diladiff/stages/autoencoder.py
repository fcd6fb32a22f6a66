"""Stage 1: the text auto-encoder, fine-tuned from an MDLM.

    h = standardise(BERT(x_0))                       frozen features (L x d_bert)
    z = standardise(Perceiver(augment(h)))           latent (N_z x d_z)
    p_theta(x_0 | x_t, z) = MDLM decoder + cross-attention to augment(z)

Loss: the MDLM loss with the decoder conditioned on z (DESIGN.md eq. 8). Augmentation (training
only): half the batch has feature positions masked with p_mask_h, the other half Gaussian noise
of std sigma_h; latent vectors are masked with p_mask_z, and with p_drop the whole latent is
replaced by N(0, I) so the decoder also remains a plain MDLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diladiff.config import Config, ConfigError, preset_base, register_section
from diladiff.data.tokenizer import check_same_tokenizer
from diladiff.errors import CheckpointError
from diladiff.features import FeatureModel, RunningStandardizer
from diladiff.nets.cross_attention import LatentCrossAttention
from diladiff.nets.perceiver import PerceiverCompressor
from diladiff.nets.token_denoiser import TokenDenoiser
from diladiff.stages.base import Stage, register_stage
from diladiff.stages.masked import MaskedDiffusionStage


def _autoencoder_preset(preset: str) -> AutoencoderConfig:
    """The section at a preset; "-4x" halves d_z (4x compression instead of 2x)."""
    base = preset_base(preset)
    if base == "paper":
        cfg = AutoencoderConfig()
    else:  # tiny, small: d_bert = 384 (minilm-l6); compression L d_bert / (N_z d_z) = 2
        d_z = {"tiny": 384, "small": 768}[base]
        cfg = AutoencoderConfig(
            feature_model="minilm-l6", num_latents=32, latent_dim=d_z, perceiver_heads=d_z // 64
        )
    if preset.endswith("-4x"):
        cfg.latent_dim //= 2
    return cfg


@register_section("autoencoder", _autoencoder_preset)
@dataclass
class AutoencoderConfig:
    """Stage 1: frozen BERT features -> Perceiver -> latent z (N_z x d_z) -> MDLM decoder."""

    feature_model: str = "bert-base-uncased"  # hub name, path, or "minilm-l6"
    feature_layer: int = -1  # hidden-state index (-1 = last layer)
    # The frozen encoder's compute precision: "auto" = bf16 on CUDA and on CPUs with native bf16
    # (AVX512-BF16 / AMX), fp32 elsewhere; or "fp32" / "bf16".
    feature_precision: str = "auto"
    num_latents: int = 64  # N_z
    latent_dim: int = 768  # d_z; compression = L * d_bert / (N_z * d_z) = 2 at paper size
    # Perceiver width; 0 = latent_dim (the paper's choice). A width below d_z leaves
    # d_z - width directions of every latent vector without variance.
    perceiver_width: int = 0
    perceiver_depth: int = 2
    perceiver_heads: int = 12
    # Feature augmentation (training only): half the batch has positions of h masked with
    # p_mask_h, the other half Gaussian noise of std sigma_h. (Values not given in DESIGN.md.)
    p_mask_h: float = 0.15
    sigma_h: float = 0.1
    # Latent augmentation: each latent vector masked with p_mask_z; with p_drop the whole latent
    # is replaced by N(0, I) (the paper's value was lost; it is above 0.5).
    p_mask_z: float = 0.1
    p_drop: float = 0.6
    # Decoder blocks followed by a cross-attention layer ("first,last" or indices "0,5").
    cross_attn_after: str = "first,last"
    # Position tables on the queries/keys between sequence and latent (nets/positions.py;
    # sinusoidal at init, learned). Not in DESIGN.md: without them a small, briefly trained
    # MDLM decoder's masked positions all ask the latent the same question and the latent goes
    # unused (nets/cross_attention.py). False = the paper's architecture as described.
    position_embeddings: bool = True
    # Warm-ups: new parameters (encoder + cross-attention) and the pretrained decoder; the
    # decoder's learning rate is decoder_lr_scale x train.lr (1 = the paper's single rate).
    encoder_warmup_steps: int = 1000
    decoder_warmup_steps: int = 10000
    decoder_lr_scale: float = 1.0


def cross_attention_blocks(spec: str, depth: int) -> list[int]:
    """Block indices from "first,last" / "0,5" / "" (sorted, unique, in range)."""
    out = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        idx = {"first": 0, "last": depth - 1}.get(item)
        if idx is None:
            try:
                idx = int(item) % depth
            except ValueError:
                raise ConfigError(f"autoencoder.cross_attn_after: bad block {item!r}") from None
        out.add(idx)
    return sorted(out)


def augment_features(
    h: torch.Tensor,
    mask_vec: torch.Tensor,
    p_mask: float,
    sigma: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """First half of the batch: each position replaced by `mask_vec` with probability p_mask.
    Second half: h + N(0, sigma^2). Never both on one example."""
    half = h.shape[0] // 2
    u = torch.rand(h.shape[:2], generator=generator, device=h.device)
    masked = (u < p_mask) & (torch.arange(h.shape[0], device=h.device) < half).unsqueeze(1)
    noise = torch.randn(h.shape, generator=generator, device=h.device) * sigma
    noise[:half] = 0
    return torch.where(masked.unsqueeze(-1), mask_vec.to(h.dtype), h + noise)


def augment_latent(
    z: torch.Tensor,
    mask_vec: torch.Tensor,
    p_mask: float,
    p_drop: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Each latent vector replaced by `mask_vec` with probability p_mask; then, per example with
    probability p_drop, the whole latent replaced by N(0, I) noise."""
    b, n, _ = z.shape
    vec_masked = torch.rand(b, n, generator=generator, device=z.device) < p_mask
    z = torch.where(vec_masked.unsqueeze(-1), mask_vec.to(z.dtype), z)
    dropped = torch.rand(b, generator=generator, device=z.device) < p_drop
    noise = torch.randn(z.shape, generator=generator, device=z.device)
    return torch.where(dropped.view(b, 1, 1), noise.to(z.dtype), z)


@register_stage("autoencoder")
class Autoencoder(MaskedDiffusionStage):
    parents = {"init_from": "mdlm"}
    inherits = ("model", "data", "mdlm")
    eval_samplers = ()  # not a generator: the pipeline's recon report and controls use it
    reports = ("recon",)
    budget_share = 0.25
    demo_steps = 600

    @classmethod
    def preset_changes(cls, cfg: Config, preset: str) -> None:
        """The paper's fine-tuning learning rate; this project's schedule lengths."""
        tc, ac = cfg.train, cfg.autoencoder
        if preset == "paper":
            tc.lr, tc.total_steps, tc.warmup_steps = 5e-5, 100_000, 1000
        elif preset == "small":
            tc.lr, tc.total_steps = 2e-4, 3000
            ac.encoder_warmup_steps, ac.decoder_warmup_steps = 100, 500
        elif preset == "tiny":
            tc.lr = 2e-3
            tc.total_steps = 600  # the latent starts to pay off between 250 and 500 steps
            ac.decoder_lr_scale = 0.1
            ac.encoder_warmup_steps, ac.decoder_warmup_steps = 20, 100

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)  # sets mask_id (a tokenizer without one fails)
        ac, mc = cfg.autoencoder, cfg.model
        self.seq_len = cfg.data.seq_len
        self.features = FeatureModel(ac.feature_model, ac.feature_layer, ac.feature_precision)
        check_same_tokenizer(
            tokenizer_identity,
            self.features.tokenizer_identity(),
            f"feature model {ac.feature_model!r} vs data.tokenizer {cfg.data.tokenizer!r}",
        )
        d_bert = self.features.dim
        table_len = cfg.data.seq_len if ac.position_embeddings else 0  # 0: no position tables
        self.feat_norm = RunningStandardizer((d_bert,))
        self.h_mask = nn.Parameter(torch.zeros(d_bert))
        self.encoder = PerceiverCompressor(
            d_bert,
            ac.perceiver_width or ac.latent_dim,
            ac.num_latents,
            ac.latent_dim,
            ac.perceiver_depth,
            ac.perceiver_heads,
            mc.attention,
            max_len=table_len,
        )
        # A square random projection is ill-conditioned (its smallest singular values are
        # ~1/d of its largest): orthogonal, it gives every latent direction the variance of
        # the Perceiver's output in that direction.
        nn.init.orthogonal_(self.encoder.proj.weight)
        self.z_norm = RunningStandardizer((ac.num_latents, ac.latent_dim))
        self.z_mask = nn.Parameter(torch.zeros(ac.latent_dim))
        self.decoder = TokenDenoiser(mc, tokenizer_identity["vocab_size"], cfg.data.seq_len)
        self.decoder.embed.weight.requires_grad_(False)  # frozen token embedding table
        self.cross = nn.ModuleDict(
            {
                str(i): LatentCrossAttention(
                    mc.width,
                    ac.latent_dim,
                    mc.heads,
                    mc.qk_norm,
                    mc.attention,
                    max_len=table_len,
                    num_latents=ac.num_latents,
                )
                for i in cross_attention_blocks(ac.cross_attn_after, mc.depth)
            }
        )

    @classmethod
    def warmups(cls, cfg: Config) -> dict[str, int]:
        # Both parameter groups carry their own warm-up (param_groups): train.warmup_steps unused.
        ac = cfg.autoencoder
        return {
            "autoencoder.encoder_warmup_steps": ac.encoder_warmup_steps,
            "autoencoder.decoder_warmup_steps": ac.decoder_warmup_steps,
        }

    @property
    def compression(self) -> float:
        """(L x d_bert) / (N_z x d_z)."""
        ac = self.cfg.autoencoder
        return self.seq_len * self.features.dim / (ac.num_latents * ac.latent_dim)

    def summary(self) -> str:
        ac = self.cfg.autoencoder
        return (
            f"{super().summary()}; features {ac.feature_model} (d={self.features.dim}), Perceiver "
            f"width {ac.perceiver_width or ac.latent_dim}, latent "
            f"N_z={ac.num_latents} x d_z={ac.latent_dim}, compression "
            f"(L x d_bert)/(N_z x d_z) = {self.compression:g}x, cross-attention after "
            f"blocks {sorted(int(k) for k in self.cross)}"
        )

    # ------------------------------------------------------------------ parents
    def init_from_parents(self, parents: dict[str, Stage]) -> None:
        """Start the decoder from the MDLM `parents['init_from']` (its EMA weights)."""
        mdlm = parents["init_from"]
        where = f"--init-from ({mdlm.kind})"
        check_same_tokenizer(mdlm.tokenizer_identity, self.tokenizer_identity, where)
        if mdlm.cfg.model != self.cfg.model or mdlm.seq_len != self.seq_len:
            raise CheckpointError(f"{where}: its model/seq_len differ from this config")
        self.decoder.load_state_dict(mdlm.net.state_dict())

    # ------------------------------------------------------------------ model
    def encode(
        self, x0: torch.Tensor, generator: torch.Generator | None = None, train: bool = False
    ) -> torch.Tensor:
        """Standardised latent z (B, N_z, d_z) of clean rows x0 (feature augmentation if train)."""
        ac = self.cfg.autoencoder
        h = self.features(x0)
        if train and self.training:
            self.feat_norm.update(h, across_ranks=True)
        h = self.feat_norm(h)
        if train:
            h = augment_features(h, self.h_mask, ac.p_mask_h, ac.sigma_h, generator)
        z = self.encoder(h)
        if train and self.training:
            self.z_norm.update(z, across_ranks=True)
        return self.z_norm(z)

    def condition(self, x0, generator, train):
        z = self.encode(x0, generator, train)
        if train:
            ac = self.cfg.autoencoder
            z = augment_latent(z, self.z_mask, ac.p_mask_z, ac.p_drop, generator)
        return z

    def hidden(self, x_t: torch.Tensor, cond=None) -> torch.Tensor:
        if cond is None:
            raise ValueError("the auto-encoder's decoder needs a latent z")
        hooks = {int(i): (lambda h, layer=layer: layer(h, cond)) for i, layer in self.cross.items()}
        return self.decoder.hidden(x_t, after_block=hooks)

    @property
    def head(self):
        return self.decoder.head

    def param_groups(self) -> list[dict]:
        """New parameters (encoder, mask vectors, cross-attention) warm up over
        encoder_warmup_steps; the pretrained decoder over decoder_warmup_steps, at
        decoder_lr_scale times the learning rate."""
        ac = self.cfg.autoencoder
        new = [
            p
            for n, p in self.named_parameters()
            if p.requires_grad and not n.startswith("decoder.")
        ]
        old = [
            p for n, p in self.named_parameters() if p.requires_grad and n.startswith("decoder.")
        ]
        return [
            {"params": new, "warmup_steps": ac.encoder_warmup_steps},
            {
                "params": old,
                "warmup_steps": ac.decoder_warmup_steps,
                "lr_scale": ac.decoder_lr_scale,
            },
        ]
