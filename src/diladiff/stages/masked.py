"""The base of every stage whose output is a masked-diffusion token denoiser (MDLM, the
auto-encoder's decoder): its config section, its loss, its ELBO bound and validation metrics,
and the split of the denoiser that the samplers use (TokenDecoder).

Loss (per sequence, divided by L):  w(t) * sum_{l : x_t^l = m} -log p_theta(x_0^l | x_t),
with t ~ U[eps, 1] (antithetic) and alpha_t = 1 - t (processes.masking.masked_diffusion_loss).
With w = 1/t its expectation is an upper bound on -log p(x_0) (the ELBO); validation always
reports that bound as a perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch

from diladiff.config import Config, OneOf, Range, register_section
from diladiff.data.tokenizer import require_mask_id
from diladiff.processes.masking import (
    elbo_weight,
    loss_weight,
    masked_diffusion_loss,
    sample_times,
    subs_log_probs,
    subs_logits,
)
from diladiff.stages.base import Stage


@register_section("mdlm")
@dataclass
class MDLMConfig:
    """Masked diffusion (linear schedule alpha_t = 1 - t): the MDLM and every masked decoder."""

    # Loss weight w(t): "elbo" (1/t) or "constant" (1; the paper's lower-variance choice).
    loss_weight: Annotated[str, OneOf(("elbo", "constant"))] = "constant"
    antithetic: bool = True
    # t is drawn in [t_eps, 1] to keep 1/t finite.
    t_eps: Annotated[float, Range(gt=0, lt=1)] = 1e-3
    # Monte Carlo draws of t per validation sequence for the perplexity bound.
    eval_time_samples: Annotated[int, Range(ge=1)] = 4


@dataclass(frozen=True)
class TokenDecoder:
    """A token denoiser split where sampling needs it:

        p_theta(x_0^l | x_t) = softmax(SUBS(head(hidden(x_t)[l])))

    hidden: x_t (B, L) -> (B, L, W), the transformer trunk (any conditioning, e.g. on a latent z,
    bound in). head: (N, W) -> (N, V) raw logits, the vocabulary projection of chosen rows.
    """

    hidden: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    mask_id: int

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 SUBS logits of hidden-state rows (..., W) -> (..., V)."""
        return subs_logits(self.head(rows), self.mask_id)

    def log_probs(self, x_t: torch.Tensor) -> torch.Tensor:
        """log p_theta(x_0 | x_t), (B, L, V), SUBS applied (unmasked positions copy x_t)."""
        return subs_log_probs(self.head(self.hidden(x_t)), x_t, self.mask_id)


class MaskedDiffusionStage(Stage):
    """Shared by every stage whose output is a masked-diffusion token denoiser: the loss, the
    ELBO bound and the validation metrics, given `hidden(x_t, cond)` and `head`. Construction
    sets `mask_id`, and fails with a one-line DataError for a tokenizer without a mask token."""

    mask_id: int
    seq_len: int
    fsdp_per_block = True  # one condition and one denoiser pass per forward, on every rank

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        kind = self.kind or type(self).__name__
        self.mask_id = require_mask_id(
            tokenizer_identity, cfg.data.tokenizer, f"masked diffusion (stage {kind})"
        )

    def hidden(self, x_t: torch.Tensor, cond=None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def head(self):
        raise NotImplementedError

    def condition(self, x0: torch.Tensor, generator: torch.Generator | None, train: bool):
        """What the denoiser is conditioned on for clean rows x0 (None for the plain MDLM)."""
        return None

    def token_decoder(self, cond=None) -> TokenDecoder:
        """The denoiser given `cond` (a latent z, or None), split into trunk and head for the
        sampler: p_theta(x_0^l | x_t, cond) = softmax(SUBS(head(hidden(x_t, cond)[l])))."""
        return TokenDecoder(lambda x_t: self.hidden(x_t, cond), self.head, self.mask_id)

    def log_probs(self, x_t: torch.Tensor, cond=None) -> torch.Tensor:
        """log p_theta(x_0 | x_t[, cond]), shape (B, L, V), SUBS applied."""
        return self.token_decoder(cond).log_probs(x_t)

    def loss(self, x0, t, weight, generator, cond=None):
        return masked_diffusion_loss(
            lambda x_t: self.hidden(x_t, cond), self.head, x0, t, weight, self.mask_id, generator
        )

    def training_times(self, batch: int, generator, device) -> torch.Tensor:
        """The diffusion times of a training batch (antithetic U[t_eps, 1] by default)."""
        mc = self.cfg.mdlm
        return sample_times(batch, generator, mc.antithetic, mc.t_eps, device)

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        mc = self.cfg.mdlm
        cond = self.condition(batch, generator, train=True)
        t = self.training_times(batch.shape[0], generator, batch.device)
        loss = self.loss(batch, t, loss_weight(t, mc.loss_weight), generator, cond)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def nll_bound(
        self, x0: torch.Tensor, generator: torch.Generator, samples: int, cond=None
    ) -> torch.Tensor:
        """Monte Carlo estimate of the per-token ELBO bound E_t[(1/t) sum_masked -log p] / L,
        averaged over `samples` antithetic draws of t per sequence."""
        x0 = x0.repeat(samples, 1)
        if cond is not None:
            cond = cond.repeat(samples, *([1] * (cond.dim() - 1)))
        t = sample_times(x0.shape[0], generator, True, self.cfg.mdlm.t_eps, x0.device)
        return self.loss(x0, t, elbo_weight(t), generator, cond)

    @torch.no_grad()
    def evaluate(self, batches, generator):
        mc = self.cfg.mdlm
        total_loss, total_bound, n = 0.0, 0.0, 0
        for x0 in batches:
            cond = self.condition(x0, None, train=False)
            t = sample_times(x0.shape[0], generator, mc.antithetic, mc.t_eps, x0.device)
            loss = self.loss(x0, t, loss_weight(t, mc.loss_weight), generator, cond)
            total_loss += loss.item() * len(x0)
            bound = self.nll_bound(x0, generator, mc.eval_time_samples, cond)
            total_bound += bound.item() * len(x0)
            n += len(x0)
        bound = total_bound / n
        return {
            "val_loss": total_loss / n,
            "val_nll_bound": bound,
            "val_ppl_bound": math.exp(bound),
        }
