"""Sample diversity measured on the generator's own token ids.

- Unigram entropy (nats) of sample i: H_i = -sum_v p_iv log p_iv, p_iv = count_i(v) / n_i;
  reported as the mean over samples. Low entropy = repetitive samples.
- n-gram repetition rate rep_n = 1 - unique n-grams / n-grams (pooled per sample, averaged),
  and diversity = prod_{n=2}^{4} (1 - rep_n).
- distinct_n = #unique n-grams / #n-grams, both counted over the whole sample set (Li et al.
  2016's distinct-n); corpus_diversity = prod_{n=2}^{4} distinct_n (LDLM's "Div"): repeats
  across samples count, unlike in `diversity`. Any hashable items: token ids here, words in
  eval/ngram.py.
"""

from __future__ import annotations

import math
from collections import Counter


def unigram_entropy(ids: list[int]) -> float:
    if not ids:
        return 0.0
    n = len(ids)
    return -sum(c / n * math.log(c / n) for c in Counter(ids).values())


def repetition_rate(ids: list[int], n: int) -> float:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def diversity_metrics(samples: list[list[int]]) -> dict:
    out = {"entropy": sum(unigram_entropy(s) for s in samples) / len(samples)}
    diversity = 1.0
    for n in (2, 3, 4):
        rep = sum(repetition_rate(s, n) for s in samples) / len(samples)
        out[f"rep_{n}"] = rep
        diversity *= 1 - rep
    out["diversity"] = diversity
    return out


def distinct_n(samples: list[list], n: int) -> float:
    """distinct-n = |U_n| / N_n, N_n = sum_i max(len_i - n + 1, 0) the n-grams (windows inside
    one sample, never across two) and U_n the set of distinct ones over all samples; nan when
    no sample has n items."""
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def corpus_diversity(samples: list[list[int]]) -> float:
    """Corpus-level n-gram diversity (LDLM's "Div"):

        Div = prod_{n=2}^{4}  |U_n| / N_n,

    N_n = sum_i max(len_i - n + 1, 0), the number of n-grams (windows inside one sample, never
    across two), and U_n the set of distinct n-grams over all samples. 1 when no n-gram occurs
    twice anywhere in the set; two copies of one sample halve every ratio. An n with no n-grams
    at all (every sample shorter than n) contributes a factor 1."""
    div = 1.0
    for n in (2, 3, 4):
        d = distinct_n(samples, n)
        if not math.isnan(d):
            div *= d
    return div
