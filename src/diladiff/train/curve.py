"""The training curve of a run folder: log.jsonl -> curve.png (loss and every evaluation
metric against the step), rewritten at the end of each training command."""

from __future__ import annotations

import json
import math
from pathlib import Path

from diladiff.plotting import pyplot, save


def write_training_curve(run_dir: str | Path) -> Path | None:
    """Plot run_dir/log.jsonl into run_dir/curve.png: the training loss (log scale when
    positive) in the first panel, each evaluation metric in its own; None without a log."""
    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "event" not in r]
    evals: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("event") == "eval":
            for k, v in r.items():
                if k not in ("step", "event") and isinstance(v, int | float) and math.isfinite(v):
                    evals.setdefault(k, []).append((r["step"], v))
    panels = [("training loss", train), *((f"eval {k}", v) for k, v in sorted(evals.items()))]
    panels = [(name, pts) for name, pts in panels if pts]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (name, pts) in zip(axes[0], panels, strict=True):
        steps, values = zip(*pts, strict=True)
        ax.plot(steps, values, marker="." if len(pts) < 20 else None)
        if min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.suptitle(run_dir.name)
    out = run_dir / "curve.png"
    save(fig, out)
    return out
