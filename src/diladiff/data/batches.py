"""Deterministic batches from packed rows: the data position is a function of the step.

Example position p (counting from 0 over the whole run) lies in epoch e = p // N and is row
perm_e[p % N], where perm_e = randperm(N) seeded by (seed, e). A resumed run therefore sees the
same rows in the same order as an uninterrupted one, on any number of processes.
"""

from __future__ import annotations

import numpy as np
import torch


class RowSampler:
    def __init__(self, rows: np.ndarray, seed: int):
        if len(rows) == 0:
            raise ValueError("no rows to sample from")
        self.rows = rows
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(len(self.rows))
        return self._perms[epoch]

    def rows_at(self, start: int, count: int) -> torch.Tensor:
        """Rows for example positions start .. start + count - 1, as int64 (count, L)."""
        n = len(self.rows)
        idx = np.array([self._perm(p // n)[p % n] for p in range(start, start + count)])
        order = np.argsort(idx)  # sorted reads are faster on a memmap
        out = np.empty((count, self.rows.shape[1]), dtype=np.int64)
        out[order] = self.rows[idx[order]]
        return torch.from_numpy(out)

    def micro_batch(
        self, step: int, global_batch: int, micro: int, index: int, rank: int, world: int
    ) -> torch.Tensor:
        """The `index`-th micro-batch of process `rank` at optimizer step `step`."""
        per_rank = global_batch // world
        start = step * global_batch + rank * per_rank + index * micro
        return self.rows_at(start, micro)


def validation_batches(rows: np.ndarray, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """The first `max_batches` batches of the held-out rows, in order (0 = all)."""
    n = len(rows) if max_batches <= 0 else min(len(rows), batch_size * max_batches)
    return [
        torch.from_numpy(np.asarray(rows[i : i + batch_size], dtype=np.int64))
        for i in range(0, n, batch_size)
    ]
