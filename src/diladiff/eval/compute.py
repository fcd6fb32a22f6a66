"""Backbone compute of a sample and iso-compute comparison (LADD's accounting, paper Table 12).

One call of a transformer of n_blocks blocks of width w over L_eff positions costs

    GFLOPs = n_blocks (12 L_eff w^2 + 2 L_eff^2 w) / 1e9,

the qkv + output projections (4 L w^2) and the x4 MLP (8 L w^2) plus the scores and the
weighted sum (2 L^2 w). These are multiply-adds (one per weight and position), although the
paper speaks of "2 FLOPs per FMA": this is the form that reproduces its per-step figures (LM1B
MDLM 21.37, LADD-128 22.95, ...). Embeddings, adaLN and output heads are left out, as there.

    L_eff = L            an MDLM call,
    L_eff = L + N_z      an MM-DiT call: every call of this library's LADD samplers, joint or
                         sequential (methods/ladd/sampler.py: the sequential sampler's latent steps
                         run the same MM-DiT, its token stream all masked beside the latent).

The paper's accounting charges sequential LADD's latent steps at L_eff = N_z
(docs/methods/ladd.md#compute-accounting, reconstructed from its tables' n/a pattern): right for a
latent-only network (the authors' sequential Co-LADD has one), not for the network this library
runs, so it is not used here:
the totals charge what runs (at L = 512, N_z = 16, 8 latent and 8 + 1 token steps: 850
GFLOPs where N_z-priced latent steps would give 461).

How many calls a sample takes is the caller's: LADD's samplers take N steps plus one final
"noise-removal" call that fills the remaining masks (N + 1 in all); whether the paper counted
that call is not stated, so every total below takes its call counts explicitly.

A quality measured at a few step counts is compared at a fixed budget by linear interpolation
between the two measured points around it; outside the measured range it is None ("n/a"),
never extrapolated. Pure python: no torch.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence


def gflops_per_call(n_blocks: int, width: int, seq_len_eff: int) -> float:
    """n_blocks (12 L_eff w^2 + 2 L_eff^2 w) / 1e9: multiply-adds (in billions) of one call."""
    if min(n_blocks, width, seq_len_eff) < 0:
        raise ValueError("n_blocks, width and seq_len_eff must be non-negative")
    return n_blocks * (12 * seq_len_eff * width**2 + 2 * seq_len_eff**2 * width) / 1e9


def network_calls(steps: int, noise_removal: bool = True) -> int:
    """Calls of a masked sampler with `steps` steps: one per step, plus the final call that
    fills every position still masked when noise_removal."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return steps + int(noise_removal)


def mdlm_gflops(calls: int, n_blocks: int, width: int, seq_len: int) -> float:
    """A sample of `calls` DiT calls over L = seq_len tokens."""
    return calls * gflops_per_call(n_blocks, width, seq_len)


def ladd_joint_gflops(
    calls: int, n_blocks: int, width: int, seq_len: int, num_latents: int
) -> float:
    """Joint LADD: every call denoises both streams, L_eff = L + N_z."""
    return calls * gflops_per_call(n_blocks, width, seq_len + num_latents)


def ladd_sequential_gflops(
    latent_calls: int,
    token_calls: int,
    n_blocks: int,
    width: int,
    seq_len: int,
    num_latents: int,
) -> float:
    """Sequential LADD: the latent calls, then the token calls (latent fixed), each an MM-DiT
    call over the L + N_z positions it runs on: the latent calls read the all-masked token
    stream too (module docstring), so they cost as much as a token call."""
    calls = latent_calls + token_calls
    return ladd_joint_gflops(calls, n_blocks, width, seq_len, num_latents)


def interpolate_at_budget(
    points: Iterable[tuple[float, float]], budgets: Sequence[float]
) -> list[float | None]:
    """Value at each budget, linear in GFLOPs between the measured (gflops, value) points around
    it; None outside [min gflops, max gflops]. Points may come in any order; two at the same
    GFLOPs are ambiguous and rejected."""
    pts = sorted((float(g), float(v)) for g, v in points)
    xs = [g for g, _ in pts]
    if any(a == b for a, b in zip(xs, xs[1:], strict=False)):
        raise ValueError(f"two measured points at the same GFLOPs: {pts}")
    out: list[float | None] = []
    for budget in budgets:
        if not xs or budget < xs[0] or budget > xs[-1]:
            out.append(None)
            continue
        i = bisect_left(xs, budget)
        if xs[i] == budget:
            out.append(pts[i][1])
            continue
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        out.append(y0 + (y1 - y0) * (budget - x0) / (x1 - x0))
    return out


def doubling_budgets(gflops: Iterable[float]) -> list[float]:
    """Budgets 2^k GFLOPs (k any integer) from the smallest to the largest of `gflops`: the
    default columns of an iso-compute table (the paper's are 50 * 2^k, at its scale)."""
    values = [float(g) for g in gflops if g > 0]
    if not values:
        return []
    k, top = math.ceil(math.log2(min(values))), max(values)
    out = []
    while 2.0**k <= top:
        out.append(2.0**k)
        k += 1
    return out
