"""Stage 0: MDLM, the masked diffusion language model (SUBS parameterisation).

Loss (per sequence, divided by L):  w(t) * sum_{l : x_t^l = m} -log p_theta(x_0^l | x_t),
with t ~ U[eps, 1] (antithetic) and alpha_t = 1 - t. With w = 1/t its expectation is an upper
bound on -log p(x_0) (the ELBO); validation always reports that bound as a perplexity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diladiff.config import Config
from diladiff.nets.token_denoiser import TokenDenoiser
from diladiff.processes.masking import elbo_weight, loss_weight, mask_tokens, sample_times
from diladiff.sampling.masked import TokenDecoder, sample_masked, subs_log_probs, subs_logits
from diladiff.stages.base import Stage, register_stage

__all__ = ["MDLM", "MaskedDiffusionStage", "masked_diffusion_loss", "subs_log_probs"]


def masked_nll(head, hidden: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, mask_id: int):
    """-log p_theta(x_0^l | x_t) at the masked positions only (the vocabulary head runs on those
    rows alone), with the batch row of each."""
    sel = x_t == mask_id
    logits = subs_logits(head(hidden[sel]), mask_id)
    return F.cross_entropy(logits, x0[sel], reduction="none"), sel.nonzero()[:, 0]


def masked_diffusion_loss(
    hidden_fn,
    head,
    x0: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean over the batch of w(t) * sum_{masked l} -log p_theta(x_0^l | x_t) / L."""
    x_t = mask_tokens(x0, t, mask_id, generator)
    nll, rows = masked_nll(head, hidden_fn(x_t), x0, x_t, mask_id)
    return (weight[rows] * nll).sum() / x0.numel()


class MaskedDiffusionStage(Stage):
    """Shared by every stage whose output is a masked-diffusion token denoiser: the loss, the
    ELBO bound and the validation metrics, given `hidden(x_t, cond)` and `head`."""

    mask_id: int
    seq_len: int

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

    @torch.no_grad()
    def decode_tokens(self, batch: int, settings, generator, device, progress=False, cond=None):
        """`batch` rows decoded from all-masked input in N_disc = settings.steps steps,
        conditioned on `cond` (None for the plain MDLM); returns (ids, stats dict)."""
        ids, stats = sample_masked(
            self.token_decoder(cond),
            batch,
            self.seq_len,
            self.mask_id,
            settings,
            generator,
            device,
            progress,
        )
        return ids, {"disc_nfe": stats.nfe, "disc_steps_taken": stats.steps}

    def log_probs(self, x_t: torch.Tensor, cond=None) -> torch.Tensor:
        """log p_theta(x_0 | x_t[, cond]), shape (B, L, V), SUBS applied."""
        return self.token_decoder(cond).log_probs(x_t)

    def loss(self, x0, t, weight, generator, cond=None):
        return masked_diffusion_loss(
            lambda x_t: self.hidden(x_t, cond), self.head, x0, t, weight, self.mask_id, generator
        )

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        mc = self.cfg.mdlm
        cond = self.condition(batch, generator, train=True)
        t = sample_times(batch.shape[0], generator, mc.antithetic, mc.t_eps, batch.device)
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


@register_stage("mdlm")
class MDLM(MaskedDiffusionStage):
    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        self.mask_id = int(tokenizer_identity["mask_id"])
        self.seq_len = cfg.data.seq_len
        self.net = TokenDenoiser(cfg.model, tokenizer_identity["vocab_size"], cfg.data.seq_len)

    def hidden(self, x_t, cond=None):
        return self.net.hidden(x_t)

    @property
    def head(self):
        return self.net.head

    @torch.no_grad()
    def sample(self, batch: int, settings, generator: torch.Generator, device, progress=False):
        """Token ids (batch, L) by masked-diffusion decoding; returns (ids, stats dict)."""
        return self.decode_tokens(batch, settings, generator, device, progress)
