"""Sampling speed: wall time per batch, tokens/s and network calls, measured in one process
after a warm-up batch, with device synchronisation around every timed batch; and the token
samplers (fast vs reference) side by side in one process."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from tqdm.auto import tqdm

from diladiff.runtime import autocast, synchronize
from diladiff.sampling.generate import sample_batch


@torch.no_grad()
def bench_sampling(
    stage,
    settings,  # sampling.generate.GenerationSettings
    batch_sizes=(1, 8, 32),
    repeats: int = 3,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[dict]:
    """One row per batch size: medians over `repeats` timed batches after one warm-up batch.
    Latent stages add latent_s, decode_s and latent_overhead = latent_s / decode_s."""
    device = torch.device(device)
    rows = []
    for batch in tqdm(batch_sizes, desc="bench", unit="batch size", leave=False):
        gen = torch.Generator(device).manual_seed(seed)
        with autocast(device):
            sample_batch(stage, batch, settings, gen, device)  # warm-up (allocations, kernels)
            runs = [_timed_sample(stage, batch, settings, gen, device)[1] for _ in range(repeats)]
        rows.append(_row(stage, batch, runs))
    return rows


@torch.no_grad()
def compare_samplers(
    stage,
    settings,
    batch_sizes=(1, 8, 32),
    repeats: int = 3,
    device: torch.device | str = "cpu",
    seed: int = 0,
    samplers: tuple[str, ...] = ("reference", "fast"),
) -> list[dict]:
    """The token samplers side by side in one process: one row per (batch size, sampler).

    Each sampler gets a warm-up batch, then the timed batches alternate between the samplers,
    so that other load on shared cores falls on both alike. Every sampler's generator starts
    from `seed`, and the samplers consume it identically, so batch k of each should hold the
    same tokens: `same_tokens` is the share equal to the first sampler's (1.0 in float64; float32
    rounding of a head computed on fewer rows may, rarely, flip a near-tie).
    `speedup` = the first sampler's median wall time / this sampler's."""
    device = torch.device(device)
    rows = []
    for batch in tqdm(batch_sizes, desc="bench", unit="batch size", leave=False):
        variants = {
            name: dataclasses.replace(
                settings, tokens=dataclasses.replace(settings.tokens, sampler=name)
            )
            for name in samplers
        }
        gens = {name: torch.Generator(device).manual_seed(seed) for name in samplers}
        runs = {name: [] for name in samplers}
        ids = {name: [] for name in samplers}
        with autocast(device):
            for name in samplers:  # warm-up (allocations, kernels)
                sample_batch(stage, batch, variants[name], gens[name], device)
            for _ in range(repeats):
                for name in samplers:
                    out, run = _timed_sample(stage, batch, variants[name], gens[name], device)
                    runs[name].append(run)
                    ids[name].append(out)
        base = _row(stage, batch, runs[samplers[0]])
        for name in samplers:
            row = {"sampler": name, **_row(stage, batch, runs[name])}
            row["speedup"] = base["wall_s_per_batch"] / row["wall_s_per_batch"]
            same = torch.cat(ids[samplers[0]]) == torch.cat(ids[name])
            row["same_tokens"] = same.float().mean().item()
            rows.append(row)
    return rows


def _timed_sample(stage, batch, settings, gen, device) -> tuple[torch.Tensor, dict]:
    """One synchronised, timed sample_batch call: (ids, {"wall": seconds, **stats})."""
    synchronize(device)
    t0 = time.perf_counter()
    ids, stats = sample_batch(stage, batch, settings, gen, device)
    synchronize(device)
    return ids, {"wall": time.perf_counter() - t0, **stats}


def _row(stage, batch: int, runs: list[dict]) -> dict:
    """Medians of timed runs as a table row (tokens/s from the median wall time)."""
    med = {k: statistics.median([r[k] for r in runs]) for k in runs[0]}
    wall = med.pop("wall")
    row = {
        "batch": batch,
        "wall_s_per_batch": wall,
        "tokens_per_s": batch * stage.seq_len / wall,
        "repeats": len(runs),
        **med,
    }
    if "latent_s" in row:
        row["latent_overhead"] = row["latent_s"] / row["decode_s"]
    return row


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
