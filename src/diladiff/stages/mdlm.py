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
from diladiff.stages.base import Stage, register_stage


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: log p_theta(x_0 | x_t) with the mask logit at -inf and unmasked positions copying
    their token (log-prob 0 on x_t^l, -inf elsewhere)."""
    logits = logits.float()
    logits[..., mask_id] = -math.inf
    logp = logits.log_softmax(dim=-1)
    keep = (x_t != mask_id).unsqueeze(-1)
    copy = torch.full_like(logp, -math.inf).scatter_(-1, x_t.unsqueeze(-1), 0.0)
    return torch.where(keep, copy, logp)


@register_stage("mdlm")
class MDLM(Stage):
    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        self.mask_id = int(tokenizer_identity["mask_id"])
        self.seq_len = cfg.data.seq_len
        self.net = TokenDenoiser(cfg.model, tokenizer_identity["vocab_size"], cfg.data.seq_len)

    # ---------------------------------------------------------------- the denoiser
    def log_probs(self, x_t: torch.Tensor) -> torch.Tensor:
        """log p_theta(x_0 | x_t), shape (B, L, V), SUBS applied."""
        return subs_log_probs(self.net(x_t), x_t, self.mask_id)

    def masked_nll(self, hidden: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor):
        """-log p_theta(x_0^l | x_t) at the masked positions only (the head runs on those
        rows alone), with the row index of each."""
        sel = x_t == self.mask_id
        logits = self.net.head(hidden[sel]).float()
        logits[:, self.mask_id] = -math.inf
        rows = sel.nonzero()[:, 0]
        return F.cross_entropy(logits, x0[sel], reduction="none"), rows

    def weighted_loss(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        weight: torch.Tensor,
        generator: torch.Generator,
        hidden_fn=None,
    ) -> torch.Tensor:
        """Mean over the batch of w(t) * sum of masked-token NLL / L."""
        x_t = mask_tokens(x0, t, self.mask_id, generator)
        hidden = (hidden_fn or self.net.hidden)(x_t)
        nll, rows = self.masked_nll(hidden, x0, x_t)
        return (weight[rows] * nll).sum() / x0.numel()

    # ---------------------------------------------------------------- training
    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        mc = self.cfg.mdlm
        t = sample_times(batch.shape[0], generator, mc.antithetic, mc.t_eps, batch.device)
        loss = self.weighted_loss(batch, t, loss_weight(t, mc.loss_weight), generator)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def nll_bound(self, x0: torch.Tensor, generator: torch.Generator, samples: int) -> torch.Tensor:
        """Monte Carlo estimate of the per-token ELBO bound E_t[(1/t) sum_masked -log p] / L,
        averaged over `samples` antithetic draws of t per sequence."""
        x0 = x0.repeat(samples, 1)
        t = sample_times(x0.shape[0], generator, True, self.cfg.mdlm.t_eps, x0.device)
        return self.weighted_loss(x0, t, elbo_weight(t), generator)

    @torch.no_grad()
    def evaluate(self, batches, generator):
        mc = self.cfg.mdlm
        total_loss, total_bound, n = 0.0, 0.0, 0
        for x0 in batches:
            t = sample_times(x0.shape[0], generator, mc.antithetic, mc.t_eps, x0.device)
            total_loss += self.weighted_loss(
                x0, t, loss_weight(t, mc.loss_weight), generator
            ).item() * len(x0)
            total_bound += self.nll_bound(x0, generator, mc.eval_time_samples).item() * len(x0)
            n += len(x0)
        bound = total_bound / n
        return {
            "val_loss": total_loss / n,
            "val_nll_bound": bound,
            "val_ppl_bound": math.exp(bound),
        }

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, batch: int, settings, generator: torch.Generator, device, progress=False):
        """Token ids (batch, L) by masked-diffusion decoding; returns (ids, stats dict)."""
        from diladiff.sampling.masked import sample_masked

        ids, stats = sample_masked(
            self.log_probs, batch, self.seq_len, self.mask_id, settings, generator, device, progress
        )
        return ids, {"disc_nfe": stats.nfe, "disc_steps_taken": stats.steps}
