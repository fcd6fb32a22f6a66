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
    """One row per batch size: medians over `repeats` timed batches after one warm-up batch.
    Latent stages add latent_s, decode_s and latent_overhead = latent_s / decode_s."""
    device = torch.device(device)
    rows = []
    for batch in batch_sizes:
        gen = torch.Generator(device).manual_seed(seed)
        with inference_autocast(device):
            stage.sample(batch, settings, gen, device)  # warm-up (allocations, kernels)
            runs = []
            for _ in range(repeats):
                synchronize(device)
                t0 = time.perf_counter()
                _, stats = stage.sample(batch, settings, gen, device)
                synchronize(device)
                runs.append({"wall": time.perf_counter() - t0, **stats})
        med = {k: median([r[k] for r in runs]) for k in runs[0]}
        wall = med.pop("wall")
        row = {
            "batch": batch,
            "wall_s_per_batch": wall,
            "tokens_per_s": batch * stage.seq_len / wall,
            "repeats": repeats,
            **med,
        }
        if "latent_s" in row:
            row["latent_overhead"] = row["latent_s"] / row["decode_s"]
        rows.append(row)
    return rows


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


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
