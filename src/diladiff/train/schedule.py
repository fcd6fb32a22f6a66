"""Learning-rate factor as a pure function of the step (nothing to save, exact on resume).

f(k) = (k + 1) / W                                  for k < W (linear warm-up)
f(k) = m + (1 - m) * (1 + cos(pi * p)) / 2          p = (k - W) / (T - W), cosine to m
"""

from __future__ import annotations

import math


def lr_factor(
    step: int, warmup: int, total: int, kind: str = "cosine", min_ratio: float = 0.0
) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ValueError(f"unknown schedule {kind!r}; choose 'cosine' or 'constant'")
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
