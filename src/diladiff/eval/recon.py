"""Reconstruction measures: the discrete-ratio perplexity bound and token recovery.

Discrete-ratio (any-order) estimator of an upper bound on -log p(x), for L tokens:

    -log p(x) <= E_{l ~ U{1..L}} E_{M : |M| = l} [ (L / l) * sum_{i in M} -log p(x_i | x_{~M}) ]

estimated with `samples` Monte Carlo draws of (l, M) per sequence; reported per token
(divided by L) and as a perplexity exp(.). Recovery = the fraction of masked tokens whose
argmax prediction equals the clean token. Both are also reported per masking ratio l / L.
`log_probs(x_t, cond)` may be any denoiser: the MDLM ignores cond; the auto-encoder's decoder
is given the latent that `condition(x0)` computes once per clean sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from diladiff.eval.oracle import row_controls
from diladiff.processes.masking import mask_exactly
from diladiff.stages.protocols import LatentConditioned


@torch.no_grad()
def discrete_ratio_bound(
    log_probs: Callable[[torch.Tensor, object], torch.Tensor],
    x0: torch.Tensor,
    mask_id: int,
    samples: int = 128,
    generator: torch.Generator | None = None,
    ratio_bins: int = 10,
    batch_size: int = 64,
    condition: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """The bound and recovery over sequences x0 (N, L), overall and per masking-ratio bin."""
    n, length = x0.shape
    rows = x0.repeat_interleave(samples, dim=0)
    cond = None
    if condition is not None:  # once per sequence, then repeated with its rows
        cond = torch.cat([condition(x0[i : i + batch_size]) for i in range(0, n, batch_size)])
        cond = cond.repeat_interleave(samples, dim=0)
    total_terms, total_correct, total_masked = 0.0, 0, 0
    bins = [{"terms": 0.0, "draws": 0, "correct": 0, "masked": 0} for _ in range(ratio_bins)]
    for i in tqdm(range(0, len(rows), batch_size), desc="recon bound", unit="batch", leave=False):
        x = rows[i : i + batch_size]
        counts = torch.randint(1, length + 1, (len(x),), generator=generator, device="cpu").to(
            x.device
        )
        x_t = mask_exactly(x, counts, mask_id, generator)
        logp = log_probs(x_t, None if cond is None else cond[i : i + batch_size]).float()
        masked = x_t == mask_id
        nll = -logp.gather(-1, x.unsqueeze(-1)).squeeze(-1)
        nll = torch.where(masked, nll, torch.zeros_like(nll))
        correct = (logp.argmax(-1) == x) & masked
        terms = (length / counts) * nll.sum(-1)  # (L / l) * sum_M nll
        total_terms += float(terms.sum())
        total_correct += int(correct.sum())
        total_masked += int(masked.sum())
        which = ((counts - 1) * ratio_bins // length).tolist()
        for j, b in enumerate(which):
            bins[b]["terms"] += float(terms[j])
            bins[b]["draws"] += 1
            bins[b]["correct"] += int(correct[j].sum())
            bins[b]["masked"] += int(counts[j])
    nll_per_token = total_terms / len(rows) / length
    per_ratio = []
    for b, acc in enumerate(bins):
        if acc["draws"]:
            per_ratio.append(
                {
                    "ratio_low": b / ratio_bins,
                    "ratio_high": (b + 1) / ratio_bins,
                    "draws": acc["draws"],
                    "recovery": acc["correct"] / acc["masked"],
                    # mean masked-token NLL in this bin (the bound's integrand)
                    "nll_per_masked_token": acc["terms"] / acc["draws"] / length,
                }
            )
    return {
        "nll_bound": nll_per_token,
        "ppl_bound": math.exp(nll_per_token),
        "recovery": total_correct / max(total_masked, 1),
        "sequences": n,
        "mc_samples": samples,
        "per_ratio": per_ratio,
    }


@torch.no_grad()
def full_mask_recovery(
    stage, x0: torch.Tensor, generator: torch.Generator | None = None, batch_size: int = 64
) -> dict:
    """Argmax token recovery from all-masked rows (t = 1, one decoder call), the share of
    positions where argmax p(x_i | all masked, z) equals x0_i, for three latents z:

        own        the encoder latent of the row itself
        other_row  the encoder latent of the next row (row i gets row i + 1's): real, in
                   distribution, and uninformative about row i
        noise      z ~ N(0, I) in the auto-encoder's standardised space

    At full masking the latent is the decoder's only information about the row, so own -
    other_row is what the decoder reads from the latent (issue 26's gate for the latent path:
    >= 10 points at step 500), and other_row - noise what a real latent adds regardless of row.
    """
    own = torch.cat([stage.encode(x0[i : i + batch_size]) for i in range(0, len(x0), batch_size)])
    controls = row_controls(own, generator)
    out = {}
    for name, control in (
        ("own", "oracle"),
        ("other_row", "other_row_latent"),
        ("noise", "noise_latent"),
    ):
        z = controls[control]
        correct = 0
        for i in range(0, len(x0), batch_size):
            x = x0[i : i + batch_size]
            pred = stage.log_probs(torch.full_like(x, stage.mask_id), z[i : i + batch_size])
            correct += int((pred.argmax(-1) == x).sum())
        out[name] = correct / x0.numel()
    return out


def stage_denoiser(
    stage,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    replace_latent: bool = False,
):
    """(log_probs(x_t, cond), condition(x0) or None) for a trained stage: the MDLM as it is; a
    latent-conditioned decoder given its encoder's latent of x0 plus N(0, noise_std^2) noise
    (latent robustness), or with `replace_latent` given pure N(0, I) noise instead of the latent
    (the decoder on its own: what training's whole-latent replacement, p_drop, teaches it)."""
    if not isinstance(stage, LatentConditioned):
        return (lambda x_t, cond: stage.log_probs(x_t)), None

    def condition(x0):
        z = stage.encode(x0)
        if replace_latent:
            return torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        if noise_std:
            z = z + noise_std * torch.randn(z.shape, generator=generator, device=z.device)
        return z

    return stage.log_probs, condition
