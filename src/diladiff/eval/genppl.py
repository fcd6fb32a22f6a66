"""Generative perplexity: token-pooled exp(total NLL / total tokens) under a causal LM scorer.

    GenPPL = exp( sum_i sum_j nll_ij / sum_i n_i )

over the re-tokenised samples i and their tokens j (the first real token included, scored
after the prepended boundary token). The per-sample median of exp(mean_j nll_ij) is reported
beside it, since a few degenerate samples can dominate a pooled mean.

Confidence interval (`gen_ppl_ci95`): percentile bootstrap over samples. Each of B = 1000
resamples (numpy seed 0) draws n samples with replacement and recomputes the token-pooled
GenPPL exp(sum_i S_i / sum_i n_i) from the per-sample NLL sums S_i and token counts n_i; the
interval is the 2.5th and 97.5th percentiles of the B values. It reflects sampling noise of
the n samples (generator and scorer held fixed), not a change of seed in training.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from diladiff.eval.scorer import Scorer

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_DESCRIPTION = (
    f"gen_ppl_ci95: 95% percentile bootstrap over samples ({BOOTSTRAP_RESAMPLES} resamples with "
    f"replacement, numpy seed {BOOTSTRAP_SEED}), token-pooled GenPPL recomputed per resample"
)


def generative_perplexity(scorer: Scorer, texts: list[str], batch_size: int = 16) -> dict:
    return pooled_perplexity(scorer.token_nll(texts, batch_size))


def bootstrap_ppl_interval(
    nll_sums,
    token_counts,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the token-pooled perplexity exp(sum S / sum n).

    Resamples the samples (pairs (S_i, n_i): per-sample NLL sum in nats and token count) with
    replacement `resamples` times from numpy's default_rng(seed) and returns the (1 - level) / 2
    and (1 + level) / 2 quantiles of the recomputed perplexities. Samples without tokens must
    be left out by the caller (a resample of them only would have no tokens)."""
    sums = np.asarray(nll_sums, dtype=np.float64)
    counts = np.asarray(token_counts, dtype=np.float64)
    if sums.shape != counts.shape or sums.ndim != 1 or len(sums) == 0:
        raise ValueError("need one NLL sum and one token count per sample (at least one sample)")
    if (counts <= 0).any():
        raise ValueError("every bootstrapped sample needs at least one scored token")
    idx = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))
    ppl = np.exp(sums[idx].sum(axis=1) / counts[idx].sum(axis=1))
    lo, hi = np.quantile(ppl, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def per_sample_totals(nlls: list) -> dict:
    """Per-sample NLL sums (nats) and token counts, in sample order (empty samples: 0, 0); the
    pooled GenPPL and its bootstrap interval are functions of these two lists."""
    return {
        "nll_sum": [float(x.double().sum()) for x in nlls],
        "tokens": [int(x.numel()) for x in nlls],
    }


def pooled_perplexity(nlls: list) -> dict:
    """GenPPL, its bootstrap interval and the per-sample median from per-text token NLL
    tensors."""
    totals = per_sample_totals(nlls)
    scored = [(s, n) for s, n in zip(totals["nll_sum"], totals["tokens"], strict=True) if n > 0]
    if not scored:
        raise ValueError("no sample has a token to score (all samples are empty)")
    sums, counts = zip(*scored, strict=True)
    total, count = sum(sums), sum(counts)
    return {
        "gen_ppl": math.exp(total / count),
        "gen_ppl_ci95": list(bootstrap_ppl_interval(sums, counts)),
        "gen_ppl_median": statistics.median([math.exp(s / n) for s, n in scored]),
        "scored_tokens": count,
        "empty_samples": len(nlls) - len(scored),
    }
