"""The unigram baseline of a held-out bound: what a model that ignores context scores.

    p(v) = (c_v + 1) / (sum_u c_u + V)        (add-one smoothing of the training rows' counts)
    bound = -(1/N) sum_{n=1}^{N} log p(x_n)   (nats per token over the held-out rows' N tokens)

Every position counts, separators included, as in the masked-diffusion bound it is printed
beside (stages/masked.py `nll_bound`). A masked-diffusion model that has learnt nothing about
context sits at this line; one that has learnt language sits well below it.
"""

from __future__ import annotations

import math

import numpy as np


def unigram_bound(train_rows, heldout_rows, vocab_size: int) -> float:
    """Nats per token of the add-one unigram model of `train_rows` on `heldout_rows` (arrays of
    token ids, any shape)."""
    counts = np.bincount(np.asarray(train_rows).ravel(), minlength=vocab_size).astype(np.float64)
    log_p = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    held = np.asarray(heldout_rows).ravel()
    return float(-log_p[held].mean())
