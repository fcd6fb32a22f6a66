"""MAUVE (Pillutla et al., 2021) with the `mauve-text` package, on the scorer's features
(final hidden state at the last token) of samples and reference texts."""

from __future__ import annotations

import torch

from diladiff.errors import DiladiffError
from diladiff.eval.scorer import Scorer


def mauve_score(
    scorer: Scorer, samples: list[str], references: list[str], seed: int = 25, batch_size: int = 16
) -> dict:
    return mauve_from_features(
        scorer.features(samples, batch_size), scorer.features(references, batch_size), seed
    )


def mauve_from_features(p: torch.Tensor, q: torch.Tensor, seed: int = 25) -> dict:
    """MAUVE between sample features p (N, D) and reference features q (M, D)."""
    try:
        import mauve
    except ImportError:
        raise DiladiffError("MAUVE needs `pip install mauve-text` (or pass --no-mauve)") from None
    out = mauve.compute_mauve(
        p_features=p.numpy(), q_features=q.numpy(), device_id=-1, verbose=False, seed=seed
    )
    return {"mauve": float(out.mauve), "mauve_num_buckets": int(out.num_buckets)}
