"""LADD ("Latent-Augmented Discrete Diffusion Models", Shariatian et al. 2025; method page:
docs/methods/ladd.md): masked diffusion over the augmented state (tokens x, latent z), with z
from a frozen pooled-embedding encoder and one two-stream MM-DiT denoising both channels.

    z0 = encoder(x0)                 frozen; chunk-mean pooled to N_z vectors, clipped to d_z
    x_t = mask(x0, t_x)              linear alpha = 1 - t
    Co-LADD: z0 L2-normalised per vector; z_t = a_t z0 + s_t eps, VP "sqrt" schedule
             a_t^2 = sqrt(1 - t); shared time t_z = t_x; latent dropout p_tau (per row: z_t and
             z0 set to 0, the row left out of L_z)
    Di-LADD: codes = VQ(z0) (cosine, EMA codebook; methods/ladd/vq.py), masked like tokens
             with their own mask code, independent t_z; the network reads codebook vectors
             (z_mask where masked)
    logits_x, out_z = MMDiT(x_t, z_in, t_z)
    L = L_x + lambda_z L_z (+ L_VQ),   L_x = (1/BL) sum_masked -log p(x0 | x_t, z_t)  (w = 1),
    Co: L_z = mean (z_hat - z0)^2 over kept rows;  Di: L_z = (1/B N_z) sum_masked CE over codes.

Held-out (eval mode) the forward also gives the token channel's bound, weight 1/t instead of 1:
an upper bound on the tokens' NLL given a latent path of the text's own encoder latent, not on
-log p(x) of the model (`token_nll_bound`; `diladiff eval-ppl` reports it for a LADD run).

Di-LADD's two-stage recipe is `ladd.stage1_steps` (lambda_z = 0 before that step). Generation
(methods/ladd/sampler.py): "joint" (one network call updates both channels; DDIM for Co-LADD's
latent) or "sequential" (the latent first with the tokens all masked, then the tokens with the
latent fixed), `sample.inference`. Sequential inference feeds the MM-DiT all-masked tokens beside a
partly noised latent, then a clean latent at t_z = 0 beside masked tokens: Di-LADD (independent
times) trains on both, Co-LADD only with ladd.independent_times = true; a Co-LADD run trained with
shared times (the paper's recipe; the authors give sequential Co-LADD its own latent network and
omit it for text, docs/methods/ladd.md#inference) samples joint only (`check_inference`).

The latent's schedules are LADD's own (Co-LADD: VP "sqrt"; Di-LADD: masked, linear):
`diffusion.schedule` (the latent stages' tangent or fitted VP schedule) does not apply and a
value other than its default is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

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
from diladiff.data.tokenizer import check_same_tokenizer
from diladiff.features import FEATURE_PRECISIONS
from diladiff.methods.ladd.encoder import PooledLatentEncoder, input_dropout_rows
from diladiff.methods.ladd.mmdit import MMDiT
from diladiff.processes.gaussian import sqrt_alpha_sigma
from diladiff.processes.masking import mask_tokens, sample_times, subs_logits
from diladiff.stages.base import Stage, register_stage
from diladiff.stages.latent import DiffusionConfig

INFERENCES = ("joint", "sequential")


def _ladd_preset(preset: str) -> LADDConfig:
    """The paper's OpenWebText-like networks at `paper` (Qwen3 encoder); CPU- and
    one-GPU-sized ones reading the presets' tokenizer's encoder (minilm-l6) otherwise."""
    base = preset_base(preset)
    if base == "paper":
        return LADDConfig()
    if base == "small":
        return LADDConfig(encoder="minilm-l6", width=512, depth=8, heads=8)
    return LADDConfig(encoder="minilm-l6", width=128, depth=3, heads=4, cond_dim=64, num_codes=257)


@register_section("ladd", _ladd_preset)
@dataclass
class LADDConfig:
    """LADD's encoder, latent, MM-DiT and recipe (docs/methods/ladd.md#configuration; [P] paper,
    [C] code)."""

    # The frozen encoder: hub name, path or alias; it must use data.tokenizer's vocabulary
    # [P: Qwen3-Embedding-0.6B; offline stand-in minilm-l6]. Last hidden layer [C].
    encoder: Annotated[str, NotEmpty()] = "Qwen/Qwen3-Embedding-0.6B"
    encoder_layer: int = -1
    encoder_precision: Annotated[str, OneOf(FEATURE_PRECISIONS)] = "auto"
    # N_z [P: 16, 64 on OWT; 32, 128 on LM1B]: pooled from the L encoder positions.
    # At most data.seq_len (checked when the stage is built: other stages' runs may use any L).
    num_latents: Annotated[int, Range(ge=1)] = 16
    # d_z: the first d_z dimensions (Matryoshka clip) [C]; at most the encoder's width.
    latent_dim: Annotated[int, Range(ge=1)] = 32
    # Encoder-input dropout: p_r ~ U[0, input_dropout_max] per row, one coin per row blanks
    # the encoder's input embedding at every position masked in x_t [C]; 0 = off.
    input_dropout_max: Annotated[float, Range(ge=0, le=1)] = 0.9
    # Co-LADD latent dropout p_tau [C: 0.15].
    latent_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.15
    # Co-LADD: t_z = t_x [P] unless True (then the MM-DiT also sees the (t_x, t_z) pairs that
    # sequential inference visits, which it needs: a shared-time run samples joint only).
    # Di-LADD always draws them independently [P].
    independent_times: bool = False
    lambda_z: Annotated[float, Range(ge=0)] = 1.0  # [P/C]
    # Di-LADD: K codes including the mask code (VQ codebook K - 1) [C: 512-8192].
    num_codes: Annotated[int, Range(ge=3)] = 8192
    # Di-LADD two-stage training: lambda_z = 0 before this step [C: 50k on OWT]; 0 = none.
    stage1_steps: Annotated[int, Range(ge=0)] = 0
    # Sequential inference: latent steps N_y when sample.cont_steps is 0 [C: 8].
    latent_steps: Annotated[int, Range(ge=1)] = 8
    # MM-DiT [P/C: 768 x 12, 12 heads, cond 128, dropout 0.1].
    width: Annotated[
        int, Range(ge=1), DivisibleBy("heads", factor=2, why="an even head width for RoPE")
    ] = 768
    depth: Annotated[int, Range(ge=1)] = 12
    heads: Annotated[int, Range(ge=1)] = 12
    cond_dim: Annotated[int, Range(ge=1)] = 128
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1
    t_eps: Annotated[float, Range(gt=0, lt=1)] = 1e-4  # t ~ low-discrepancy U[t_eps, 1] [C]


class LADD(Stage):
    """What Co-LADD and Di-LADD share: the frozen encoder, the MM-DiT, the token loss."""

    latent_kind: ClassVar[str] = ""  # "continuous" or "discrete"
    generation = "joint"  # methods/ladd/sampler.py
    eval_samplers = ({"inference": "joint"}, {"inference": "sequential"})
    optional = True  # a sibling method: the pipeline trains it when asked (--stages co-ladd)
    budget_share = 0.25
    demo_steps = 300

    @classmethod
    def preset_changes(cls, cfg: Config, preset: str) -> None:
        """The authors' optimiser (AdamW lr 3e-4, wd 0.03, 2.5k warm-up then constant, EMA
        0.9999 [C]); at `paper` their encoder's tokenizer."""
        tc = cfg.train
        tc.weight_decay, tc.schedule = 0.03, "constant"
        if preset == "paper":
            cfg.data.tokenizer = cfg.ladd.encoder
            tc.lr, tc.warmup_steps, tc.total_steps, tc.ema = 3e-4, 2500, 1_000_000, 0.9999
        elif preset == "tiny":
            tc.lr, tc.total_steps = 1e-3, 600

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        lc = cfg.ladd
        check_latent_schedule(cfg)
        self.seq_len = cfg.data.seq_len
        vocab = int(tokenizer_identity["vocab_size"])
        mask_id = tokenizer_identity.get("mask_id")
        # A tokenizer without a mask token gets one extra id, as the authors do for Qwen3.
        self.mask_id = vocab if mask_id is None else int(mask_id)
        self.vocab_size = max(vocab, self.mask_id + 1)
        if lc.num_latents > cfg.data.seq_len:
            raise ConfigError(
                f"ladd.num_latents={lc.num_latents} must be at most data.seq_len="
                f"{cfg.data.seq_len} (the latent pools the row's positions)"
            )
        self.encoder = PooledLatentEncoder(
            lc.encoder,
            lc.encoder_layer,
            lc.encoder_precision,
            num_latents=lc.num_latents,
            latent_dim=lc.latent_dim,
            normalize=self.latent_kind == "continuous",
        )
        check_same_tokenizer(
            tokenizer_identity,
            self.encoder.features.tokenizer_identity(),
            f"ladd.encoder {lc.encoder!r} vs data.tokenizer {cfg.data.tokenizer!r}",
        )
        self.latent_shape = (lc.num_latents, lc.latent_dim)
        self.step = 0  # set by on_step (Di-LADD's stage switch depends on it: exact resume)

    # ------------------------------------------------------------------ shared pieces
    def on_step(self, step: int) -> None:
        self.step = step

    @classmethod
    def trained_inferences(cls, cfg: Config) -> tuple[str, ...]:
        """The inference modes (methods/ladd/sampler.py) whose network inputs a run of `cfg` trains
        on (read from the config alone: no encoder or network is built)."""
        return INFERENCES

    @property
    def inferences(self) -> tuple[str, ...]:
        """The inference modes (methods/ladd/sampler.py) whose network inputs training covered."""
        return self.trained_inferences(self.cfg)

    def check_inference(self, inference: str) -> None:
        """ConfigError (one line) for an inference mode this run's network was not trained for."""
        if inference not in self.inferences:
            raise ConfigError(
                f"this {self.kind} run was not trained for {inference} inference; "
                f"use {' or '.join(self.inferences)}"
            )

    def summary(self) -> str:
        m = matched_mdlm(self.cfg)
        return (
            f"a size-matched MDLM: model.depth={m['depth']} model.width={m['width']} "
            f"model.heads={m['heads']}"
        )

    def mm_dit(self, latent_in: int, latent_out: int) -> MMDiT:
        """The two-stream denoiser: latent vectors of width latent_in in, latent_out per
        latent position out (d_z for Co-LADD's x0-prediction, K code logits for Di-LADD)."""
        lc, mc = self.cfg.ladd, self.cfg.model
        return MMDiT(
            self.vocab_size,
            self.seq_len,
            lc.num_latents,
            latent_in,
            latent_out,
            lc.width,
            lc.depth,
            lc.heads,
            lc.cond_dim,
            mc.mlp_ratio,
            lc.dropout,
            mc.attention,
        )

    def network_dims(self) -> dict:
        """What the compute accounting needs: blocks, width, L and N_z."""
        lc = self.cfg.ladd
        return {
            "blocks": lc.depth,
            "width": lc.width,
            "seq_len": self.seq_len,
            "num_latents": lc.num_latents,
        }

    def encode(self, x0: torch.Tensor, x_t: torch.Tensor | None, generator) -> torch.Tensor:
        """z0 of clean rows; while training, the encoder-input dropout blanks the positions
        masked in x_t of the rows its coin picks."""
        blank = None
        if self.training and x_t is not None and self.cfg.ladd.input_dropout_max > 0:
            rows = input_dropout_rows(
                x0.shape[0], self.cfg.ladd.input_dropout_max, generator, x0.device
            )
            blank = (x_t == self.mask_id) & rows.unsqueeze(1)
        return self.encoder(x0, blank)

    def token_loss(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """L_x = (1 / B L) sum over masked positions of -log p(x0 | x_t, z) (weight 1), SUBS: the
        training loss, not a bound (the bound weighs each row by 1 / t: token_nll_bound)."""
        return masked_nll(logits, x0, x_t, self.mask_id).sum() / x0.numel()

    def eval_metrics(self, logits, x0, x_t, t) -> dict[str, torch.Tensor]:
        """What a held-out forward adds to the training metrics (eval mode only, so training
        is untouched): the token channel's bound, token_nll_bound, at the token times t."""
        if self.training:
            return {}
        bound = token_nll_bound(logits.detach(), x0, x_t, t, self.mask_id).mean()
        return {"token_nll_bound": bound}

    @torch.no_grad()
    def token_bound(self, x0: torch.Tensor, mc_samples: int, generator, batch: int = 64) -> dict:
        """token_nll_bound of rows x0 (eval mode), in nats per token, averaged over the rows and
        `mc_samples` draws of each (fresh times, masks and latent noise: forward's draws); its
        Monte Carlo standard error from the spread of the per-draw means."""
        if self.training:
            raise RuntimeError("token_bound needs eval mode (no dropout, no latent dropout)")
        draws = []
        for _ in range(mc_samples):
            total = 0.0
            for rows in x0.split(batch):
                _, metrics = self(rows, generator)
                total += float(metrics["token_nll_bound"]) * len(rows)
            draws.append(total / len(x0))
        mean = sum(draws) / len(draws)
        var = sum((d - mean) ** 2 for d in draws) / (len(draws) - 1) if len(draws) > 1 else 0.0
        return {"nll_bound": mean, "nll_bound_mc_stderr": math.sqrt(var / len(draws))}

    def times(self, n: int, generator, device) -> torch.Tensor:
        return sample_times(n, generator, True, self.cfg.ladd.t_eps, device)

    @torch.no_grad()
    def evaluate(self, batches, generator):
        """Held-out: the training losses (val_loss_x: the token loss at weight 1, not a bound)
        and, in eval mode, the token channel's bound given the row's own latent path,
        val_token_nll_bound (token_nll_bound: an upper bound on the token channel's NLL given that
        path, not on -log p(x) of the generative model; the paper's data Val PPL
        (docs/methods/ladd.md#evaluation) is exp of it), with val_token_ppl_bound =
        exp(val_token_nll_bound)."""
        sums: dict[str, float] = {}
        n = 0
        for x0 in batches:
            _, metrics = self(x0, generator)
            for k, v in metrics.items():
                sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + float(v) * len(x0)
            n += len(x0)
        out = {k: v / n for k, v in sums.items()}
        if "val_token_nll_bound" in out:
            out["val_token_ppl_bound"] = math.exp(min(out["val_token_nll_bound"], 700.0))
        return out


@register_stage("co-ladd")
class CoLADD(LADD):
    latent_kind = "continuous"
    # Shared times by default [P], which do not train sequential inference (module docstring).
    eval_samplers = ({"inference": "joint"},)

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        self.net = self.mm_dit(cfg.ladd.latent_dim, cfg.ladd.latent_dim)

    def summary(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        lc = self.cfg.ladd
        return (
            f"co-ladd: MM-DiT {n / 1e6:.2f}M parameters; latent {lc.num_latents} x {lc.latent_dim} "
            f"from {lc.encoder!r} (L2-normalised), sqrt schedule, "
            f"{'independent' if lc.independent_times else 'shared'} times; {super().summary()}"
        )

    def latent_times(self, t: torch.Tensor, generator) -> torch.Tensor:
        return self.times(t.shape[0], generator, t.device) if self.cfg.ladd.independent_times else t

    @classmethod
    def trained_inferences(cls, cfg: Config) -> tuple[str, ...]:
        """Joint always; sequential only after training with independent times (module
        docstring): shared times show the network neither sequential phase's inputs."""
        return INFERENCES if cfg.ladd.independent_times else ("joint",)

    def check_inference(self, inference: str) -> None:
        if inference not in self.inferences:
            raise ConfigError(
                f"this co-ladd run was trained with shared times (ladd.independent_times=false), "
                f"so its network never saw {inference} inference's inputs (all tokens masked "
                f"beside a noisy latent, then a clean latent at t_z = 0): sample it with "
                f"--inference joint, or train with ladd.independent_times=true"
            )

    @torch.no_grad()
    def reference_latent(self, x0: torch.Tensor) -> torch.Tensor:
        """The clean latent z0 (B, N_z, d_z) of rows x0, the encoder's (no input dropout): what
        sampling holds fixed at t_z = 0 for a reference text (methods/ladd/sampler.py)."""
        return self.encoder(x0)

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        """One micro-batch of Co-LADD (module docstring). Draws, in order: t, the token mask,
        the input-dropout coins, [t_z], eps, the latent-dropout coins."""
        lc = self.cfg.ladd
        x0 = batch
        t = self.times(x0.shape[0], generator, x0.device)
        x_t = mask_tokens(x0, t, self.mask_id, generator)
        with torch.no_grad():
            z0 = self.encode(x0, x_t, generator)
        t_z = self.latent_times(t, generator)
        a, s = sqrt_alpha_sigma(t_z, lc.t_eps)
        eps = torch.randn(z0.shape, generator=generator, device=z0.device)
        z_t = a.view(-1, 1, 1) * z0 + s.view(-1, 1, 1) * eps
        drop = torch.rand(x0.shape[0], generator=generator, device=x0.device) < lc.latent_dropout
        if not self.training:
            drop = torch.zeros_like(drop)
        keep = (~drop).view(-1, 1, 1).to(z0.dtype)
        z_t, z0 = z_t * keep, z0 * keep
        logits, z_hat = self.net(x_t, z_t, t_z)
        loss_x = self.token_loss(logits, x0, x_t)
        kept = ~drop
        loss_z = ((z_hat[kept].float() - z0[kept]) ** 2).mean() if kept.any() else z_hat.sum() * 0
        loss = loss_x + lc.lambda_z * loss_z
        metrics = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_z": loss_z.detach()}
        return loss, metrics | self.eval_metrics(logits, x0, x_t, t)


@register_stage("di-ladd")
class DiLADD(LADD):
    latent_kind = "discrete"

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        from diladiff.methods.ladd.vq import CodeQuantizer

        lc = cfg.ladd
        self.vq = CodeQuantizer(lc.latent_dim, lc.num_codes)
        self.net = self.mm_dit(lc.latent_dim, lc.num_codes)

    def summary(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        lc = self.cfg.ladd
        return (
            f"di-ladd: MM-DiT {n / 1e6:.2f}M parameters; {lc.num_latents} codes of "
            f"{lc.num_codes - 1} (+ mask), dim {lc.latent_dim}, from {lc.encoder!r}; "
            f"stage 1 (lambda_z = 0) for {lc.stage1_steps} steps; {super().summary()}"
        )

    @property
    def code_mask_id(self) -> int:
        return self.vq.mask_id

    @torch.no_grad()
    def reference_latent(self, x0: torch.Tensor) -> torch.Tensor:
        """The codes (B, N_z) of rows x0: the encoder's latent, quantised (nearest codebook
        vector; eval mode, so the codebook is not updated). What sampling holds fixed for a
        reference text (methods/ladd/sampler.py)."""
        return self.vq.quantize(self.encoder(x0))[1]

    def lambda_z(self) -> float:
        lc = self.cfg.ladd
        return 0.0 if self.training and self.step < lc.stage1_steps else lc.lambda_z

    def code_loss(self, logits_z: torch.Tensor, codes: torch.Tensor, codes_t: torch.Tensor):
        """L_z = (1 / B N_z) sum over masked codes of -log p(code | x_t, z_t) (SUBS on codes)."""
        return masked_nll(logits_z, codes, codes_t, self.code_mask_id).sum() / codes.numel()

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        """One micro-batch of Di-LADD (module docstring). Draws, in order: t_x, the token mask,
        the input-dropout coins, the VQ's seed, t_z, the code mask."""
        x0 = batch
        t_x = self.times(x0.shape[0], generator, x0.device)
        x_t = mask_tokens(x0, t_x, self.mask_id, generator)
        with torch.no_grad():
            z_e = self.encode(x0, x_t, generator)
        z_q, codes, vq_loss = self.vq.quantize(z_e, generator)
        t_z = self.times(x0.shape[0], generator, x0.device)
        codes_t = mask_tokens(codes, t_z, self.code_mask_id, generator)
        # the quantised vectors of this call (the codebook before its EMA update), as the authors
        logits_x, logits_z = self.net(x_t, self.vq.embed(codes_t, z_q), None)
        loss_x = self.token_loss(logits_x, x0, x_t)
        loss_z = self.code_loss(logits_z, codes, codes_t)
        loss = loss_x + self.lambda_z() * loss_z + vq_loss
        metrics = {
            "loss": loss.detach(),
            "loss_x": loss_x.detach(),
            "loss_z": loss_z.detach(),
            "vq_loss": vq_loss.detach(),
            "codes_used": torch.tensor(float(codes.unique().numel())),
        }
        return loss, metrics | self.eval_metrics(logits_x, x0, x_t, t_x)


def token_nll_bound(
    logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, mask_id: int
) -> torch.Tensor:
    """Per row b (B,): (1 / L) (1 / t_b) sum over l with x_t^l = mask of
    -log p_theta(x0^l | x_t, z_in) (SUBS), in nats per token: one draw of the token channel's
    continuous-time masked-diffusion bound (alpha_t = 1 - t, so the ELBO weight
    -alpha'_t / (1 - alpha_t) is 1 / t; the training loss L_x takes weight 1 instead).

    What it bounds. Fix the latent input the network reads at each time t, a path zeta(t),
    drawn independently of the token mask given x0. The reverse token process that conditions
    its step at t on zeta(t) has

        -log p_theta(x0 | zeta) <= int_0^1 (1 / t) E_{x_t ~ q(. | x0)} sum_{l masked}
                                    -log p_theta(x0^l | x_t, zeta(t)) dt,

    for every zeta (its posterior q(x_s | x_t, x0) does not involve zeta). LADD's forward draws
    zeta(t) from the row's own encoder latent as in training (Co-LADD: z_t = a_t z0 + s_t eps at
    t_z = t, or at an independent t_z with ladd.independent_times; Di-LADD: its codes masked at
    an independent t_z), so the mean over rows and draws estimates an upper bound on
    E_zeta[-log p_theta(x0 | zeta)] / L: the token channel's NLL given a latent path of the text
    itself. Times are drawn on [t_eps, 1] (the trained range), which leaves out the integral's
    [0, t_eps) slice: O(t_eps) per token, as in MDLM's continuous-time bound.

    What it does not bound: -log p(x0) under LADD's generative model, which samples the latent
    rather than reading the text's: that needs the latent channel's cost too (the joint ELBO's
    latent terms; docs/methods/ladd.md#evaluation). The latent carries information about x0, so this
    figure is not comparable with an MDLM's bound on -log p(x0)."""
    return masked_nll(logits, x0, x_t, mask_id) / (t.float() * x0.shape[1])


def masked_nll(
    logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, mask_id: int
) -> torch.Tensor:
    """Per row b (B,): sum over l with x_t^l = mask of -log p_theta(x0^l | ...) under SUBS
    (float32, the mask id never predicted): the one masked cross-entropy of both channels'
    losses (tokens, Di-LADD's codes) and of token_nll_bound, which differ only in the weight."""
    sel = x_t == mask_id
    nll = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
    nll[sel] = F.cross_entropy(subs_logits(logits[sel], mask_id), x0[sel], reduction="none")
    return nll.sum(1)


def check_latent_schedule(cfg: Config) -> None:
    """ConfigError (one line) when diffusion.schedule is not its default: LADD's latent runs on
    its own schedules (module docstring), so the setting would be silently ignored."""
    default = DiffusionConfig().schedule
    if cfg.diffusion.schedule != default:
        raise ConfigError(
            f"diffusion.schedule={cfg.diffusion.schedule} does not apply to LADD (its latent uses "
            f"the VP 'sqrt' schedule (co-ladd) or masking (di-ladd)): leave it at {default!r}"
        )


def matched_mdlm(cfg: Config) -> dict[str, int]:
    """The MDLM transformer (model.depth, model.width, model.heads) whose blocks hold as many
    parameters as this LADD's MM-DiT blocks, one block deeper (head width 64; 32 or 16 below width
    512): the paper's size matching (a 768 x 12 MM-DiT, 184M in its blocks, against an MDLM of
    1024 x 13 [P]). Counted on the meta device: nothing is allocated."""
    from diladiff.nets.transformer import Block

    lc = cfg.ladd
    with torch.device("meta"):
        net = MMDiT(8, 8, 1, 1, 1, lc.width, lc.depth, lc.heads, lc.cond_dim, cfg.model.mlp_ratio)
        target = net.parameter_count(blocks_only=True)
        depth = lc.depth + 1

        def heads(width: int) -> int:  # head width 64; 32 (or 16) in small networks
            return width // 64 if width >= 512 else width // (32 if width % 32 == 0 else 16)

        def blocks(width: int) -> int:
            block = Block(width, heads(width), cfg.model.mlp_ratio, 0, cfg.model.qk_norm)
            return depth * sum(p.numel() for p in block.parameters())

        widths = [*range(16, 512, 16), *range(512, 8193, 64)]
        width = min(widths, key=lambda w: abs(blocks(w) - target))
    return {"depth": depth, "width": width, "heads": heads(width)}
