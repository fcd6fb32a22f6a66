"""Paired bootstrap intervals of the difference between two generators on the same seeds.

Sample i of generator A and sample i of generator B come from the same seed and index, so
they are resampled together: each of B = 1000 resamples (numpy default_rng(0)) draws n indices
with replacement, I_1..I_n, and recomputes the statistic of A on those samples minus that of B
on the same samples. The interval is the 2.5th and 97.5th percentiles of the B differences.
Noise shared by the two samples of a pair (the same latent, the same seed) cancels in the
difference, which is why a paired interval can exclude 0 where the two unpaired intervals
overlap. It reflects the sampling noise of the n pairs, not a change of seed in training.

Statistics (per resample, over the drawn indices I):
- pooled perplexity (GenPPL, ngram_ppl):  exp(sum_I S_i / sum_I n_i), S_i the NLL sum
  (nats) and n_i the tokens or words of sample i; reported as ppl_A - ppl_B and as the
  log-ratio ln(ppl_A / ppl_B) = sum_I S^A / sum_I n^A - sum_I S^B / sum_I n^B;
- pooled share (seen n-grams): sum_I x_i / sum_I d_i;
- mean (copy span): mean_I x_i.
"""

from __future__ import annotations

import math

import numpy as np

from diladiff.errors import DataError

PAIRED_RESAMPLES = 1000
PAIRED_SEED = 0
PAIRED_DESCRIPTION = (
    f"paired 95% percentile bootstrap of A - B over sample indices ({PAIRED_RESAMPLES} "
    f"resamples, numpy seed {PAIRED_SEED}; sample i of both from the same seed and index)"
)


def paired_indices(n: int, resamples: int = PAIRED_RESAMPLES, seed: int = PAIRED_SEED):
    """(resamples, n) indices drawn with replacement, shared by both generators."""
    if n < 1:
        raise ValueError("a paired bootstrap needs at least one pair")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _pairs(*arrays) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64) for a in arrays]
    if any(a.ndim != 1 or len(a) != len(out[0]) for a in out):
        raise ValueError("paired statistics need one value per sample, the same n for A and B")
    return out


def _interval(values: np.ndarray, level: float) -> list[float]:
    lo, hi = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _pooled(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """sum_I num / sum_I den per resample (nan where a resample has no denominator)."""
    d = den[idx].sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(d > 0, num[idx].sum(axis=-1) / np.where(d > 0, d, 1), np.nan)


def paired_perplexity_difference(
    nll_a,
    n_a,
    nll_b,
    n_b,
    resamples: int = PAIRED_RESAMPLES,
    seed: int = PAIRED_SEED,
    level: float = 0.95,
) -> dict:
    """Pooled perplexity ppl = exp(sum_i S_i / sum_i n_i) of A and B and the paired interval of

        diff      = ppl_A - ppl_B
        log_ratio = ln(ppl_A / ppl_B) = sum S^A / sum n^A - sum S^B / sum n^B

    over the same resampled indices (module docstring). Samples without tokens add 0 to both
    sums, so they stay in (the pairing is by index)."""
    sa, na, sb, nb = _pairs(nll_a, n_a, nll_b, n_b)
    if na.sum() <= 0 or nb.sum() <= 0:
        raise ValueError("a paired perplexity needs scored tokens in both generators")
    full = np.arange(len(sa))
    la, lb = _pooled(sa, na, full), _pooled(sb, nb, full)
    idx = paired_indices(len(sa), resamples, seed)
    ra, rb = _pooled(sa, na, idx), _pooled(sb, nb, idx)
    return {
        "a": float(np.exp(la)),
        "b": float(np.exp(lb)),
        "diff": float(np.exp(la) - np.exp(lb)),
        "ci95": _interval(np.exp(ra) - np.exp(rb), level),
        "log_ratio": float(la - lb),
        "log_ratio_ci95": _interval(ra - rb, level),
    }


def paired_ratio_difference(
    num_a,
    den_a,
    num_b,
    den_b,
    resamples: int = PAIRED_RESAMPLES,
    seed: int = PAIRED_SEED,
    level: float = 0.95,
) -> dict:
    """A pooled share r = sum_i x_i / sum_i d_i of A and B (e.g. seen bigrams / bigrams) and
    the paired interval of diff = r_A - r_B."""
    xa, da, xb, db = _pairs(num_a, den_a, num_b, den_b)
    full = np.arange(len(xa))
    ra, rb = float(_pooled(xa, da, full)), float(_pooled(xb, db, full))
    idx = paired_indices(len(xa), resamples, seed)
    return {
        "a": ra,
        "b": rb,
        "diff": ra - rb,
        "ci95": _interval(_pooled(xa, da, idx) - _pooled(xb, db, idx), level),
    }


def paired_mean_difference(
    x_a,
    x_b,
    resamples: int = PAIRED_RESAMPLES,
    seed: int = PAIRED_SEED,
    level: float = 0.95,
) -> dict:
    """Means of a per-sample value (e.g. copy span) of A and B and the paired interval of
    diff = mean_i x^A_i - mean_i x^B_i (= mean_i (x^A_i - x^B_i))."""
    xa, xb = _pairs(x_a, x_b)
    idx = paired_indices(len(xa), resamples, seed)
    d = xa - xb
    return {
        "a": float(xa.mean()),
        "b": float(xb.mean()),
        "diff": float(d.mean()),
        "ci95": _interval(d[idx].mean(axis=1), level),
    }


def excludes_zero(ci) -> bool:
    """Whether an interval [lo, hi] lies entirely on one side of 0 (a significant difference
    at its level); False for a missing or nan interval."""
    if not ci or any(math.isnan(v) for v in ci):
        return False
    return ci[0] > 0 or ci[1] < 0


# --------------------------------------------------------------------------- result files


def _check_paired(a: dict, b: dict) -> int:
    pa, pb = a.get("protocol", {}), b.get("protocol", {})
    if pa.get("version") != pb.get("version"):
        raise DataError(f"protocols differ ({pa.get('version')} vs {pb.get('version')})")
    na, nb = pa.get("num_samples"), pb.get("num_samples")
    if na != nb:
        raise DataError(f"not paired: {na} vs {nb} samples")
    sa, sb = pa.get("sample_seed"), pb.get("sample_seed")
    if sa != sb:
        raise DataError(f"not paired: sample seeds {sa} vs {sb}")
    return na


def _ngram_reference(result: dict) -> tuple:
    """The n-gram LM settings and training text of a result, whichever run folder held it."""
    tm = result.get("protocol", {}).get("text_metrics") or {}
    ref = {k: v for k, v in (tm.get("reference") or {}).items() if k != "run"}
    return tm.get("lm"), ref


def compare_results(a: dict, b: dict) -> list[dict]:
    """Paired differences A - B of two result records (eval/evaluate.py) of the same sample
    count and seed: GenPPL, ngram_ppl (when both have it; the same n-gram reference),
    seen_bigrams, seen_trigrams and copy_span, from their `per_sample` lists. One row per
    metric: metric, a, b, diff, ci95, excludes_zero (and log_ratio for perplexities)."""
    _check_paired(a, b)
    ps_a, ps_b = a.get("per_sample", {}), b.get("per_sample", {})
    rows = []
    if "nll_sum" in ps_a and "nll_sum" in ps_b:
        res = paired_perplexity_difference(
            ps_a["nll_sum"], ps_a["tokens"], ps_b["nll_sum"], ps_b["tokens"]
        )
        rows.append({"metric": "gen_ppl", **res})
    if "ngram_nll_sum" in ps_a and "ngram_nll_sum" in ps_b:
        if _ngram_reference(a) != _ngram_reference(b):
            raise DataError("the two results' n-gram metrics use different training texts")
        wa, wb = ps_a["words"], ps_b["words"]
        res = paired_perplexity_difference(ps_a["ngram_nll_sum"], wa, ps_b["ngram_nll_sum"], wb)
        rows.append({"metric": "ngram_ppl", **res})
        for n, name in ((2, "seen_bigrams"), (3, "seen_trigrams")):
            da = [max(m - n + 1, 0) for m in wa]
            db = [max(m - n + 1, 0) for m in wb]
            res = paired_ratio_difference(ps_a[f"seen_{n}"], da, ps_b[f"seen_{n}"], db)
            rows.append({"metric": name, **res})
        res = paired_mean_difference(ps_a["copy_span"], ps_b["copy_span"])
        rows.append({"metric": "copy_span", **res})
    for row in rows:
        row["excludes_zero"] = excludes_zero(row["ci95"])
    return rows
