"""Generative perplexity: token-pooled exp(total NLL / total tokens) under a causal LM scorer.

    GenPPL = exp( sum_i sum_j nll_ij / sum_i n_i )

over the re-tokenised samples i and their tokens j (the first real token included, scored
after the prepended boundary token). The per-sample median of exp(mean_j nll_ij) is reported
beside it, since a few degenerate samples can dominate a pooled mean.
"""

from __future__ import annotations

import math
import statistics

from diladiff.eval.scorer import Scorer


def generative_perplexity(scorer: Scorer, texts: list[str], batch_size: int = 16) -> dict:
    return pooled_perplexity(scorer.token_nll(texts, batch_size))


def pooled_perplexity(nlls: list) -> dict:
    """GenPPL and the per-sample median from per-text token NLL tensors."""
    scored = [x for x in nlls if x.numel() > 0]
    if not scored:
        raise ValueError("no sample has a token to score (all samples are empty)")
    total = sum(float(x.sum()) for x in scored)
    count = sum(x.numel() for x in scored)
    per_sample = [math.exp(float(x.mean())) for x in scored]
    return {
        "gen_ppl": math.exp(total / count),
        "gen_ppl_median": statistics.median(per_sample),
        "scored_tokens": count,
        "empty_samples": len(nlls) - len(scored),
    }
