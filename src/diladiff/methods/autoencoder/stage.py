"""Stage 1: the text auto-encoder, fine-tuned from an MDLM.

    h = standardise(BERT(x_0))                       frozen features (L x d_bert)
    z = standardise(Perceiver(augment(h)))           latent (N_z x d_z)
    p_theta(x_0 | x_t, z) = MDLM decoder + cross-attention to augment(z)

Loss: the MDLM loss with the decoder conditioned on z (the paper's eq. 8;
docs/methods/autoencoder.md). Augmentation (training only): half the batch has feature
positions masked with p_mask_h, the other half Gaussian noise of std sigma_h; latent vectors
are masked with p_mask_z, and with p_drop the whole latent is replaced by N(0, I) so the
decoder also remains a plain MDLM.

The features come in one of two ways. When the feature model's tokenizer is data.tokenizer (the
presets: minilm-l6 for both), h = BERT(x_0) on the decoder's ids, L positions. Otherwise (e.g.
data.tokenizer=bpe-4096) each row is decoded to text and tokenised by the feature model's
tokenizer (features.RetokenizedFeatures): at most feature_max_len positions, right-padded, with
a mask that the standardiser's statistics, the augmentation and the Perceiver's cross-attention
respect.

Feature cache (autoencoder.feature_cache): h of every packed row (train and validation) is
computed once, stored as fp16 on disk (features/cache.py) under
$DILADIFF_CACHE/features/<key> (or data.cache_dir/features), and read instead of running the
feature model; rows not in it (sampled text, another data set) are computed live. With the
cache on, live features are rounded to fp16 too, so a row's features do not depend on where
they came from. A new run opens it in `prepare`, or builds it there (progress bar) when the run
reads at least as many rows as there are ((max_steps or total_steps) x batch_size: otherwise
building costs more feature-model calls than it saves); a resumed run opens it on its first
training step. The key: feature model, layer, compute dtype, feature_max_len (cross path), the
packed data's manifest. Rows are stored without their padding.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diladiff.config import (
    Config,
    ConfigError,
    DivisibleBy,
    NotEmpty,
    OneOf,
    Range,
    Satisfies,
    preset_base,
    register_section,
)
from diladiff.data.packing import PackedData
from diladiff.data.tokenizer import (
    TOKENIZER_DIR,
    check_same_tokenizer,
    load_tokenizer,
    tokenizer_identity,
)
from diladiff.errors import CheckpointError
from diladiff.features import (
    FEATURE_CACHE_VERSION,
    FEATURE_PRECISIONS,
    TRUNCATION_WARN_SHARE,
    FeatureCache,
    FeatureModel,
    RetokenizedFeatures,
    feature_dtype,
    fits,
)
from diladiff.methods.autoencoder.cross_attention import LatentCrossAttention
from diladiff.nets.perceiver import PerceiverCompressor
from diladiff.nets.standardize import RunningStandardizer
from diladiff.nets.token_denoiser import TokenDenoiser
from diladiff.runtime import cache_root
from diladiff.stages.base import Stage, register_stage
from diladiff.stages.masked import MaskedDiffusionStage


def _autoencoder_preset(preset: str) -> AutoencoderConfig:
    """The section at a preset; "-4x" halves d_z (4x compression instead of 2x)."""
    base = preset_base(preset)
    if base == "paper":
        cfg = AutoencoderConfig()
    elif base == "cpu":  # a 32 x 64 latent of MiniLM features in MiniLM's own tokenizer
        cfg = AutoencoderConfig(
            feature_model="minilm-l6",
            num_latents=32,
            latent_dim=64,
            perceiver_heads=4,
            feature_cache=True,
        )
    else:  # tiny, small: d_bert = 384 (minilm-l6); compression L d_bert / (N_z d_z) = 2
        d_z = {"tiny": 384, "small": 768}[base]
        cfg = AutoencoderConfig(
            feature_model="minilm-l6",
            num_latents=32,
            latent_dim=d_z,
            perceiver_heads=d_z // 64,
            feature_cache=True,  # 0.8 GB (tiny), 6.3 GB (small) of fp16 features
        )
    if preset.endswith("-4x"):
        cfg.latent_dim //= 2
    return cfg


def _tables_with_rope(position_embeddings: bool, cfg) -> str | None:
    """With RoPE (and no absolute table) a fully masked row gives the decoder the same state at
    every position, so without the tables every position reads the latent alike."""
    if not position_embeddings and cfg.model.positions == "rope":
        return (
            "autoencoder.position_embeddings=false with model.positions=rope: a fully masked "
            "row's positions would all read the latent alike (keep the tables or use learned)"
        )
    return None


def _cross_attn_spec(spec: str, cfg: Config) -> None:
    """autoencoder.cross_attn_after names blocks of model.depth (ConfigError otherwise)."""
    cross_attention_blocks(spec, cfg.model.depth)


@register_section("autoencoder", _autoencoder_preset)
@dataclass
class AutoencoderConfig:
    """Stage 1: frozen BERT features -> Perceiver -> latent z (N_z x d_z) -> MDLM decoder."""

    # Hub name, path, or "minilm-l6".
    feature_model: Annotated[str, NotEmpty()] = "bert-base-uncased"
    feature_layer: int = -1  # hidden-state index (-1 = last layer)
    # The frozen encoder's compute precision: "auto" = bf16 on CUDA and on CPUs with native bf16
    # (AVX512-BF16 / AMX), fp32 elsewhere; or "fp32" / "bf16".
    feature_precision: Annotated[str, OneOf(FEATURE_PRECISIONS)] = "auto"
    # When the feature model's tokenizer is not data.tokenizer, rows are decoded and tokenised
    # again: at most this many feature positions per row (longer rows are cut; the share cut is
    # logged as feat_truncated); 0 = 2 x data.seq_len. Also the Perceiver's position tables'
    # length then. Unused when the tokenizers agree (L positions).
    feature_max_len: Annotated[int, Range(ge=1, unset=0, means="2 x data.seq_len")] = 0
    # Compute the frozen features of every packed row once and read them from an fp16 cache
    # on disk (module docstring; built when the run reads at least as many rows as there are);
    # rows not in it are computed live. Off at paper size (the features of openwebtext would
    # take ~1.5 TB); a cache over feature_cache_max_gb is not built (a warning; live features).
    feature_cache: bool = False
    feature_cache_max_gb: Annotated[float, Range(ge=0)] = 16.0
    num_latents: Annotated[int, Range(ge=1)] = 64  # N_z
    # d_z; compression = L * d_bert / (N_z * d_z) = 2 at paper size
    latent_dim: Annotated[int, Range(ge=1)] = 768
    # Perceiver width; 0 = latent_dim (the paper's choice). A width below d_z leaves
    # d_z - width directions of every latent vector without variance.
    perceiver_width: Annotated[
        int, Range(ge=1, unset=0, same_as="latent_dim"), DivisibleBy("perceiver_heads")
    ] = 0
    perceiver_depth: Annotated[int, Range(ge=1)] = 2
    perceiver_heads: Annotated[int, Range(ge=1)] = 12
    # Feature augmentation (training only): half the batch has positions of h masked with
    # p_mask_h, the other half Gaussian noise of std sigma_h. (Values not given in the paper:
    # docs/methods/autoencoder.md#configuration.)
    p_mask_h: Annotated[float, Range(ge=0, le=1)] = 0.15
    sigma_h: Annotated[float, Range(ge=0)] = 0.1
    # Latent augmentation: each latent vector masked with p_mask_z; with p_drop the whole latent
    # is replaced by N(0, I) (the paper's value was lost; it is above 0.5).
    p_mask_z: Annotated[float, Range(ge=0, le=1)] = 0.1
    p_drop: Annotated[float, Range(ge=0, le=1)] = 0.6
    # A latent-dropout schedule for small scale (not in the paper; 0 = the paper's constant
    # p_drop): p_drop rises linearly from p_drop_initial at step 0 to p_drop at this step, so the
    # decoder first learns to read the latent, then to do without it (`latent_dropout`).
    p_drop_warmup_steps: Annotated[int, Range(ge=0)] = 0
    p_drop_initial: Annotated[float, Range(ge=0, le=1)] = 0.0
    # The share of training rows fully masked (t = 1), where only the latent tells the row
    # (not in the paper; 0 = the paper's t ~ U[0, 1] for every row).
    full_mask_share: Annotated[float, Range(ge=0, le=1)] = 0.0
    # Decoder blocks followed by a cross-attention layer ("first,last", "all" or indices "0,5").
    cross_attn_after: Annotated[str, Satisfies(_cross_attn_spec)] = "first,last"
    # Position tables on the queries/keys between sequence and latent (nets/positions.py;
    # sinusoidal at init, learned). Not in the paper (docs/methods/autoencoder.md#deviations):
    # without them a small, briefly trained MDLM decoder's masked positions all ask the latent
    # the same question and the latent goes unused (methods/autoencoder/cross_attention.py).
    # False = the paper's architecture as described.
    position_embeddings: Annotated[bool, Satisfies(_tables_with_rope)] = True
    # Warm-ups: new parameters (encoder + cross-attention) and the pretrained decoder; the
    # decoder's learning rate is decoder_lr_scale x train.lr (1 = the paper's single rate).
    encoder_warmup_steps: Annotated[int, Range(ge=0)] = 1000
    decoder_warmup_steps: Annotated[int, Range(ge=0)] = 10000
    decoder_lr_scale: Annotated[float, Range(ge=0)] = 1.0


def latent_dropout(step: int, p_drop: float, warmup_steps: int, initial: float) -> float:
    """The whole-latent dropout probability at `step`:

    p(step) = initial + (p_drop - initial) min(1, step / warmup_steps)    (warmup_steps > 0)
    p(step) = p_drop                                                      (warmup_steps = 0)
    """
    if warmup_steps <= 0:
        return p_drop
    return initial + (p_drop - initial) * min(1.0, step / warmup_steps)


def cross_attention_blocks(spec: str, depth: int) -> list[int]:
    """Block indices from "first,last" / "all" / "0,5" / "" (sorted, unique, in range)."""
    if spec.strip() == "all":
        return list(range(depth))
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
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """First half of the batch: each position replaced by `mask_vec` with probability p_mask.
    Second half: h + N(0, sigma^2). Never both on one example. valid (B, L) bool: padded
    positions (False) are left as they are (the same draws are made either way)."""
    half = h.shape[0] // 2
    u = torch.rand(h.shape[:2], generator=generator, device=h.device)
    masked = (u < p_mask) & (torch.arange(h.shape[0], device=h.device) < half).unsqueeze(1)
    noise = torch.randn(h.shape, generator=generator, device=h.device) * sigma
    noise[:half] = 0
    if valid is not None:
        masked = masked & valid
        noise = noise * valid.unsqueeze(-1)
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
    demo_steps = 400  # make demo <= 15 minutes on 2 cores, install included (README)
    check_steps = 800  # its decoder memorises the check's rows from the MDLM's start

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
        elif preset == "cpu":
            # The latent path at small scale (issue 26's measured causes; RESULTS.md): MiniLM's
            # layer -3 (a linear probe reads token identity 97% from it, 78% from the last),
            # the latent read after every block, the decoder at the full rate, latent dropout
            # from 0 to the paper's 0.6 over 400 steps, a tenth of the rows fully masked.
            tc.lr, tc.total_steps = 1e-3, 800
            ac.encoder_warmup_steps, ac.decoder_warmup_steps = 50, 100
            ac.feature_layer, ac.cross_attn_after, ac.decoder_lr_scale = -3, "all", 1.0
            ac.p_drop_warmup_steps, ac.p_drop_initial, ac.full_mask_share = 400, 0.0, 0.1

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)  # sets mask_id (a tokenizer without one fails)
        ac, mc = cfg.autoencoder, cfg.model
        self.seq_len = cfg.data.seq_len
        self.features = FeatureModel(ac.feature_model, ac.feature_layer, ac.feature_precision)
        # Same vocabulary: the fast path, the model reads the decoder's ids (L positions).
        # Else rows are decoded and tokenised again (`retokenized`, set up on first use).
        self.cross_tokenizer = (
            self.features.tokenizer_identity()["vocab_sha256"] != tokenizer_identity["vocab_sha256"]
        )
        # Feature positions per row: L on the fast path, else at most feature_max_len.
        self.feature_len = self.seq_len
        if self.cross_tokenizer:
            self.feature_len = ac.feature_max_len or 2 * self.seq_len
        self._retokenized: RetokenizedFeatures | None = None
        self._feature_cache: FeatureCache | None = None
        self._cache_hits: float | None = None  # share of the last batch read from the cache
        self._truncated: float | None = None  # share of the last live rows cut
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
            # Feature positions: up to feature_len; the latents' centres start spread over L,
            # the order of a row's feature length in any tokenizer.
            max_len=self.feature_len if ac.position_embeddings else 0,
            centre_span=self.seq_len,
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
    def retokenized(self) -> RetokenizedFeatures:
        """The cross-tokenizer path's decode-and-tokenise step (the decoder's tokenizer loaded
        from data.tokenizer on first use, unless `use_decoder_tokenizer` gave it)."""
        if self._retokenized is None:
            self.use_decoder_tokenizer(load_tokenizer(self.cfg.data))
        return self._retokenized

    def use_decoder_tokenizer(self, tok) -> None:
        """The tokenizer of the decoder's rows (data.tokenizer), for the cross-tokenizer path;
        it must be the one this stage was built for."""
        check_same_tokenizer(
            self.tokenizer_identity, tokenizer_identity(tok), "the auto-encoder's rows"
        )
        if self.cross_tokenizer:
            self._retokenized = RetokenizedFeatures(self.features, tok, self.feature_len)

    @property
    def compression(self) -> float:
        """(L x d_bert) / (N_z x d_z)."""
        ac = self.cfg.autoencoder
        return self.seq_len * self.features.dim / (ac.num_latents * ac.latent_dim)

    def summary(self) -> str:
        ac = self.cfg.autoencoder
        where = ""
        if self.cross_tokenizer:
            where += f" on rows re-tokenised by its own tokenizer (<= {self.feature_len})"
        if self._feature_cache is not None:
            where += f", cached in {self._feature_cache.folder}"
        return (
            f"{super().summary()}; features {ac.feature_model} (d={self.features.dim}){where}, "
            "Perceiver "
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

    def attach(self, data: PackedData, device, tokenizer) -> None:
        """Every start of a run (new or resumed): the decoder's tokenizer for the
        cross-tokenizer path, and the feature cache over `data`'s rows (when
        autoencoder.feature_cache)."""
        self.use_tokenizer(tokenizer)
        self.attach_feature_cache(data, device)

    def use_tokenizer(self, tokenizer) -> None:
        self.use_decoder_tokenizer(tokenizer)

    # ------------------------------------------------------------------ features
    def live_features(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The feature model's h of rows x0 and its mask `valid` (None: all L positions);
        rounded to fp16 when the feature cache is on (as the cached features are)."""
        if self.cross_tokenizer:
            h, valid = self.retokenized(x0)
            self._truncated = self.retokenized.last_truncated_share
        else:
            h, valid = self.features(x0), None
        if self.cfg.autoencoder.feature_cache:
            h = h.half().float()
        return h, valid

    def frozen_features(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h (B, F, d_bert) of clean rows x0 and its mask `valid` (B, F) bool (None: every
        position is a feature): from the feature cache where it holds the row, else live."""
        cache = self._feature_cache
        idx = cache.lookup(x0) if cache is not None else None
        if idx is None or not (idx >= 0).any():
            self._cache_hits = 0.0 if cache is not None else None
            return self.live_features(x0)
        hit = idx >= 0
        self._cache_hits = float(hit.mean())
        h, lengths = cache.load(idx[hit], x0.device)
        if not hit.all():  # the rows not cached, computed live, put in their places
            miss = np.nonzero(~hit)[0]
            h_miss, v_miss = self.live_features(x0[torch.from_numpy(miss).to(x0.device)])
            len_miss = (
                torch.full((len(miss),), h_miss.shape[1], device=x0.device)
                if v_miss is None
                else v_miss.sum(1)
            )
            f = max(h.shape[1], h_miss.shape[1])
            parts = ((np.nonzero(hit)[0], h, lengths), (miss, h_miss, len_miss))
            h = x0.new_zeros((len(x0), f, self.features.dim), dtype=torch.float32)
            lengths = x0.new_zeros(len(x0))
            for rows, h_part, len_part in parts:
                rows = torch.from_numpy(rows).to(x0.device)
                h[rows] = F.pad(h_part, (0, 0, 0, f - h_part.shape[1]))
                lengths[rows] = len_part.to(lengths.dtype)
        if not self.cross_tokenizer:
            return h, None  # every row has its L positions
        f = max(int(lengths.max()), 1)  # the batch's longest row, as the live path pads
        valid = torch.arange(f, device=x0.device).unsqueeze(0) < lengths.unsqueeze(1)
        return h[:, :f], valid

    def feature_cache_key(self, data: PackedData, device) -> dict:
        """What the cached features depend on (features/cache.py)."""
        ac = self.cfg.autoencoder
        manifest = json.dumps(data.manifest, sort_keys=True)
        return {
            "version": FEATURE_CACHE_VERSION,
            "feature_model": ac.feature_model,
            "layer": ac.feature_layer,
            "dtype": str(feature_dtype(ac.feature_precision, torch.device(device))),
            "retokenized": self.cross_tokenizer,
            "max_len": self.feature_len,
            "data": hashlib.sha256(manifest.encode()).hexdigest(),
        }

    def positions_per_row(self, data: PackedData, sample: int = 256) -> float:
        """Feature positions per packed row: L, or across tokenizers the mean over `sample`
        training rows spread over the split (tokenised only: the model does not run); warns
        when more than TRUNCATION_WARN_SHARE of them are cut at feature_max_len."""
        if not self.cross_tokenizer:
            return float(self.seq_len)
        idx = np.unique(np.linspace(0, len(data.train) - 1, sample).astype(np.int64))
        ids = self.retokenized.feature_ids(torch.from_numpy(data.train[idx].astype(np.int64)))
        lengths = np.array([len(x) for x in ids])
        cut = float(np.mean(lengths > self.feature_len))
        if cut > TRUNCATION_WARN_SHARE:
            warnings.warn(
                f"{cut:.1%} of {len(ids)} sampled rows have more than feature_max_len="
                f"{self.feature_len} feature tokens (median {np.median(lengths):g}) and are cut "
                "there; raise autoencoder.feature_max_len",
                stacklevel=2,
            )
        return float(np.mean(np.minimum(lengths, self.feature_len)))

    def attach_feature_cache(
        self, data: PackedData, device, progress: bool | None = None, build: bool | None = None
    ) -> FeatureCache | None:
        """Open, or build, the feature cache of `data`'s train and validation rows (when
        autoencoder.feature_cache; the main process builds while the others wait). `build`
        (default: whether the run reads at least as many rows as the cache would hold,
        (train.max_steps or total_steps) x batch_size; else building costs more than it saves)
        False: only open an existing cache. Over feature_cache_max_gb or the free disk space:
        a warning, and features are computed live."""
        ac = self.cfg.autoencoder
        if not ac.feature_cache:
            return None
        tokenizer_dir = Path(data.folder) / TOKENIZER_DIR  # the copy packed with the rows
        if self.cross_tokenizer and self._retokenized is None and tokenizer_dir.is_dir():
            self.use_decoder_tokenizer(load_tokenizer(str(tokenizer_dir)))
        device = torch.device(device)
        dc = self.cfg.data
        root = (Path(dc.cache_dir).expanduser() if dc.cache_dir else cache_root()) / "features"
        rows = len(data.train) + len(data.val)
        if build is None:
            tc = self.cfg.train
            build = (tc.max_steps or tc.total_steps) * tc.batch_size >= rows
        per_row = self.positions_per_row(data)
        why = build and fits(root, rows, per_row, self.features.dim, ac.feature_cache_max_gb)
        if why:
            warnings.warn(
                f"no feature cache built: {why}; features are computed live", stacklevel=2
            )
            build = False  # one built before is still used
        distributed = dist.is_available() and dist.is_initialized()
        main = not distributed or dist.get_rank() == 0
        show = self.cfg.train.progress if progress is None else progress

        def compute(rows: torch.Tensor):
            h, valid = self.live_features(rows.to(device))
            lengths = torch.full((len(rows),), h.shape[1]) if valid is None else valid.sum(1).cpu()
            return h, lengths

        def open_or_build(build: bool):
            return FeatureCache.open_or_build(
                root,
                self.feature_cache_key(data, device),
                [data.train, data.val],
                compute,
                self.feature_len,
                self.features.dim,
                batch_size=self.cfg.train.micro_batch_size or self.cfg.train.batch_size,
                progress=show and main,
                build=build,
            )

        self.features.encoder.to(device)
        with torch.no_grad():
            cache = open_or_build(build) if main else None
            if distributed:
                dist.barrier()
            if not main:
                cache = open_or_build(build)
        self._feature_cache = cache
        return cache

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        self._cache_hits = self._truncated = None
        loss, metrics = super().forward(batch, generator)
        if self._cache_hits is not None:
            metrics["feat_cache_hit"] = self._cache_hits  # share of rows read from the cache
        if self._truncated is not None:  # share of the rows computed live cut at feature_max_len
            metrics["feat_truncated"] = self._truncated
        return loss, metrics

    # ------------------------------------------------------------------ model
    def encode(
        self, x0: torch.Tensor, generator: torch.Generator | None = None, train: bool = False
    ) -> torch.Tensor:
        """Standardised latent z (B, N_z, d_z) of clean rows x0 (feature augmentation if train).
        h has L positions, or with another tokenizer than the feature model's up to
        feature_max_len, padded and masked (`valid`) in the statistics, the augmentation and
        the Perceiver."""
        ac = self.cfg.autoencoder
        h, valid = self.frozen_features(x0)
        if train and self.training:
            self.feat_norm.update(h, across_ranks=True, valid=valid)
        h = self.feat_norm(h)
        if train:
            h = augment_features(h, self.h_mask, ac.p_mask_h, ac.sigma_h, generator, valid)
        z = self.encoder(h, valid)
        if train and self.training:
            self.z_norm.update(z, across_ranks=True)
        return self.z_norm(z)

    def on_step(self, step: int) -> None:
        self.step = step

    def condition(self, x0, generator, train):
        z = self.encode(x0, generator, train)
        if train:
            ac = self.cfg.autoencoder
            p_drop = latent_dropout(
                getattr(self, "step", 0), ac.p_drop, ac.p_drop_warmup_steps, ac.p_drop_initial
            )
            z = augment_latent(z, self.z_mask, ac.p_mask_z, p_drop, generator)
        return z

    def training_times(self, batch: int, generator, device) -> torch.Tensor:
        """The MDLM's times with a share `full_mask_share` of the rows (each row by a coin from
        `generator`) fully masked, t = 1."""
        t = super().training_times(batch, generator, device)
        share = self.cfg.autoencoder.full_mask_share
        if share > 0:
            full = torch.rand(batch, generator=generator, device=device) < share
            t = torch.where(full, torch.ones_like(t), t)
        return t

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
