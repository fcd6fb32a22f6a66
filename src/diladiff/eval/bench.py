"""Sampling speed: wall time per batch, tokens/s and network calls, measured in one process
after a warm-up batch, with device synchronisation around every timed batch."""

from __future__ import annotations

import time

import torch

from diladiff.sampling.generate import inference_autocast, synchronize


@torch.no_grad()
def bench_sampling(
    stage,
    settings,
    batch_sizes=(1, 8, 32),
    repeats: int = 3,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[dict]:
    device = torch.device(device)
    rows = []
    for batch in batch_sizes:
        gen = torch.Generator(device).manual_seed(seed)
        with inference_autocast(device):
            stage.sample(batch, settings, gen, device)  # warm-up (allocations, kernels)
            times, stats = [], {}
            for _ in range(repeats):
                synchronize(device)
                t0 = time.perf_counter()
                _, stats = stage.sample(batch, settings, gen, device)
                synchronize(device)
                times.append(time.perf_counter() - t0)
        wall = sorted(times)[len(times) // 2]  # median
        rows.append(
            {
                "batch": batch,
                "wall_s_per_batch": wall,
                "tokens_per_s": batch * stage.seq_len / wall,
                "repeats": repeats,
                **stats,
            }
        )
    return rows


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of dict rows."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
