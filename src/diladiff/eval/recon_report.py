"""`diladiff eval-recon`: the auto-encoder against the MDLM it started from.

Perplexity bound (discrete-ratio estimator) and token recovery, overall and per masking ratio,
for a run and (for an auto-encoder) its parent MDLM on the same held-out rows, Monte Carlo
draws and seed, plus the auto-encoder's decoder given z ~ N(0, I) instead of its latent (so the
latent's share of any gain is visible); latent robustness = recovery when N(0, sigma^2) noise
is added to the latent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diladiff.data.packing import prepare_data
from diladiff.eval.recon import discrete_ratio_bound, full_mask_recovery, stage_denoiser
from diladiff.plotting import pyplot, save
from diladiff.runs import load_run, run_parents
from diladiff.stages.protocols import LatentConditioned


def heldout_rows(stage, tok, count: int, device) -> torch.Tensor:
    data = prepare_data(stage.cfg.data, tok, progress=False)
    return torch.from_numpy(np.asarray(data.val[:count], dtype=np.int64)).to(device)


def recon_report(
    run_dir: Path,
    sequences: int = 64,
    mc_samples: int = 128,
    seed: int = 0,
    device="cpu",
    noise_levels=(0.0, 0.25, 0.5, 1.0, 2.0),
    weights: str = "ema",
) -> dict:
    stage, tok = load_run(run_dir, which=weights, device=device)
    x0 = heldout_rows(stage, tok, sequences, device)

    def measure(s, noise=0.0, samples=mc_samples, replace_latent=False):
        gen = torch.Generator(device).manual_seed(seed)
        log_probs, condition = stage_denoiser(s, noise, gen, replace_latent)
        return discrete_ratio_bound(log_probs, x0, s.mask_id, samples, gen, condition=condition)

    name = f"{stage.kind} ({Path(run_dir).name})"
    out = {"runs": {name: measure(stage)}, "robustness": []}
    if isinstance(stage, LatentConditioned):
        # Control: the same decoder with z ~ N(0, I); the gap to the row above is the latent's.
        out["runs"][f"{name}, z ~ N(0, I)"] = measure(stage, replace_latent=True)
        gen = torch.Generator(device).manual_seed(seed)
        out["full_mask_recovery"] = full_mask_recovery(stage, x0, gen)
    parent = next(iter(run_parents(run_dir).values()), None)
    if parent and Path(parent).is_dir():
        base, _ = load_run(parent, device=device)
        out["runs"][f"{base.kind} ({Path(parent).name})"] = measure(base)
    if isinstance(stage, LatentConditioned):
        for sigma in noise_levels:
            r = measure(stage, sigma, max(8, mc_samples // 8))
            out["robustness"].append(
                {"latent_noise_std": sigma, "recovery": r["recovery"], "ppl_bound": r["ppl_bound"]}
            )
    return out


def plot_recon(report: dict, path: Path, title: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, res in report["runs"].items():
        mid = [(b["ratio_low"] + b["ratio_high"]) / 2 for b in res["per_ratio"]]
        axes[0].plot(mid, [b["recovery"] for b in res["per_ratio"]], "o-", label=name)
        axes[1].plot(
            mid,
            [b["nll_per_masked_token"] for b in res["per_ratio"]],
            "o-",
            label=f"{name}: ppl bound {res['ppl_bound']:.1f}",
        )
    axes[0].set_ylabel("token recovery (argmax = clean token)")
    axes[1].set_ylabel("NLL per masked token (nats)")
    for ax in axes:
        ax.set_xlabel("masking ratio l / L")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save(fig, path)
