"""Device helpers shared by training, sampling and evaluation (torch and the standard library
only: this module sits in the lowest layer, beside config and errors).

    with autocast(device):              # bf16 autocast on CUDA, nothing elsewhere
    with autocast(device, "bf16"):      # bf16 autocast on any device; "fp32": nothing
    synchronize(device)                 # wait for queued CUDA work (no-op elsewhere)
    cache_root()                        # $DILADIFF_CACHE or ~/.cache/diladiff
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(device: torch.device | str, precision: str = "auto") -> str:
    """The precision "auto" stands for: "bf16" on CUDA, "fp32" elsewhere; others as given."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device | str, precision: str = "auto"):
    """A context manager for the forward pass. "auto": bf16 autocast on CUDA, fp32 (no autocast)
    elsewhere; "bf16": bf16 autocast on the device's type; "fp32": no autocast."""
    device = torch.device(device)
    precision = resolve_precision(device, precision)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA only; a no-op elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cache_root() -> Path:
    """The root of diladiff's caches (token arrays, converted scorers): $DILADIFF_CACHE, else
    ~/.cache/diladiff."""
    return Path(os.environ.get("DILADIFF_CACHE", Path.home() / ".cache" / "diladiff"))
