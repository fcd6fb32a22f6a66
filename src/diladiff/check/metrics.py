"""Metrics of a generator against a known finite target: K distinct rows, each with
probability 1/K. Generated rows are (N, L) integer arrays; the K target rows are (K, L).

    validity   = #{n : x_n in R} / N
    coverage   = #{distinct valid rows} / K
    TV         = 1/2 sum_x |p_hat(x) - 1/K [x in R]|
               = 1/2 (sum_k |c_k / N - 1/K| + #{invalid} / N)
    token_err  = mean_n min_k Hamming(x_n, r_k) / L

A perfect sampler (N i.i.d. uniform draws from R) does not reach TV = 0 with finite N; its
expected TV is estimated by simulation (`perfect_sampler_tv`) and reported beside it.
"""

from __future__ import annotations

import numpy as np


def row_index(targets: np.ndarray) -> dict[bytes, int]:
    """Row bytes -> index into the K target rows (the rows must be distinct)."""
    index = {np.ascontiguousarray(r).tobytes(): k for k, r in enumerate(targets)}
    if len(index) != len(targets):
        raise ValueError("the target rows are not distinct")
    return index


def match_targets(samples: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each generated row, the index of the equal target row, or -1 (shape (N,))."""
    index = row_index(targets.astype(samples.dtype))
    return np.array(
        [index.get(np.ascontiguousarray(r).tobytes(), -1) for r in samples], dtype=np.int64
    )


def validity(matches: np.ndarray) -> float:
    """Share of generated rows equal to one of the K target rows."""
    return float((matches >= 0).mean())


def coverage(matches: np.ndarray, k: int) -> float:
    """Distinct valid rows generated, divided by K."""
    return len(set(matches[matches >= 0].tolist())) / k


def tv_to_uniform(matches: np.ndarray, k: int) -> float:
    """Total-variation distance between the empirical distribution of the generated rows and
    the uniform distribution over the K targets (invalid rows are mass the target lacks)."""
    n = len(matches)
    counts = np.bincount(matches[matches >= 0], minlength=k)
    invalid = int((matches < 0).sum())
    return 0.5 * (float(np.abs(counts / n - 1.0 / k).sum()) + invalid / n)


def perfect_sampler_tv(n: int, k: int, trials: int = 200, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of tv_to_uniform for N i.i.d. uniform draws over K rows, by simulation: the
    value an exact sampler gets at this sample count."""
    rng = np.random.default_rng(seed)
    tvs = [tv_to_uniform(rng.integers(0, k, size=n), k) for _ in range(trials)]
    return float(np.mean(tvs)), float(np.std(tvs))


def token_error(samples: np.ndarray, targets: np.ndarray, chunk: int = 64) -> float:
    """Mean over generated rows of the Hamming distance to the nearest target row, over L."""
    s = np.asarray(samples)
    t = np.asarray(targets).astype(s.dtype)
    best = np.empty(len(s), dtype=np.int64)
    for i in range(0, len(s), chunk):
        diff = (s[i : i + chunk, None, :] != t[None, :, :]).sum(-1)  # (chunk, K)
        best[i : i + chunk] = diff.min(1)
    return float(best.mean() / s.shape[1])


def summarise(samples: np.ndarray, targets: np.ndarray) -> dict:
    """Every metric of one generator setting."""
    matches = match_targets(samples, targets)
    k = len(targets)
    return {
        "num_samples": len(samples),
        "validity": validity(matches),
        "coverage": coverage(matches, k),
        "tv": tv_to_uniform(matches, k),
        "token_error": token_error(samples, targets),
    }


def exact_factorised_sample(
    targets: np.ndarray,
    n: int,
    n_disc: int,
    seed: int = 0,
    strategy: str = "ancestral",
    temperature: float = 1.0,
) -> np.ndarray:
    """N rows from a masked-diffusion sampler whose denoiser is *exact*: p(x_0^l | x_t) is the
    true conditional of the target distribution (uniform over the K rows consistent with the
    revealed tokens), raised to 1/temperature and renormalised, with the MDLM sampler's reveal
    rule: "ancestral" reveals each masked position with probability (t - s) / t at step t -> s
    (all at the last step); "topk" draws a token at every masked position and reveals the most
    confident (probability of the drawn token) until round(L * s) remain. Tokens revealed in one
    step are drawn independently (the factorised posterior), so two of them can belong to
    different rows; the row is then invalid, and the remaining positions are filled with the
    first row's tokens (any filling is invalid). This is the best any MDLM can do at N_disc."""
    from diladiff.processes.masking import unmask_probability

    if strategy not in ("ancestral", "topk"):
        raise ValueError(f"unknown strategy {strategy!r}")
    rng = np.random.default_rng(seed)
    k, length = targets.shape
    grid = [1.0 - i / n_disc for i in range(n_disc + 1)]
    out = np.empty((n, length), dtype=targets.dtype)
    for i in range(n):
        consistent = np.ones(k, dtype=bool)
        masked = np.ones(length, dtype=bool)
        row = targets[0].copy()
        for step in range(n_disc):
            t, s = grid[step], grid[step + 1]
            if strategy == "ancestral":
                p = 1.0 if s <= 0 else unmask_probability(t, s)
                pos = np.flatnonzero(masked & (rng.random(length) < p))
            else:
                pos = np.flatnonzero(masked)
            if len(pos) == 0:
                continue
            tokens, conf = _exact_draws(targets[consistent][:, pos], temperature, rng)
            if strategy == "topk":
                keep = int(masked.sum()) - round(length * s)
                order = np.argsort(-conf, kind="stable")[: max(keep, 0)]
                pos, tokens = pos[order], tokens[order]
            row[pos] = tokens
            masked[pos] = False
            consistent &= (targets[:, pos] == row[pos]).all(1)
            if not consistent.any():
                break  # no target row has these tokens: invalid whatever comes next
        out[i] = row
    return out


def _exact_draws(cands: np.ndarray, temperature: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """One token per column of `cands` (the consistent rows' tokens at the chosen positions)
    from the exact conditional (token counts / rows) tempered by 1/temperature, independently
    per column; also each drawn token's tempered probability (top-k's confidence)."""
    tokens = np.empty(cands.shape[1], dtype=cands.dtype)
    conf = np.empty(cands.shape[1])
    for j in range(cands.shape[1]):
        values, counts = np.unique(cands[:, j], return_counts=True)
        logw = np.log(counts) / temperature  # in log space: no overflow at low temperature
        w = np.exp(logw - logw.max())
        w /= w.sum()
        pick = rng.choice(len(values), p=w)
        tokens[j], conf[j] = values[pick], w[pick]
    return tokens, conf
