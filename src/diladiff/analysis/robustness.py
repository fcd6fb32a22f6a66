"""`diladiff analyze robustness RUN` (paper Fig. 10, App. D.3): the decoder's token recovery
against the std of Gaussian noise added to the encoder's latent (the auto-encoder's own
standardised space, where every coordinate has unit variance, so the std is relative), with the
four-parameter tanh model of the error rate 1 - recovery fitted to the curve
(processes.tanh_fit) and drawn over it. Recovery is eval/recon.py's: the share of masked tokens
whose argmax prediction is the clean token, over the discrete-ratio estimator's masks."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from diladiff.eval.recon import discrete_ratio_bound, stage_denoiser
from diladiff.processes.tanh_fit import fit_tanh

NOISE_LEVELS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


@torch.no_grad()
def robustness_curve(ae, x0, noise_levels=NOISE_LEVELS, mc_samples: int = 16, seed: int = 0):
    """Recovery and error rate per noise std, the fitted tanh curve (or why not)."""
    points = []
    for sigma in tqdm(noise_levels, desc="robustness", unit="level", leave=False):
        gen = torch.Generator(x0.device).manual_seed(seed)  # the same masks at every level
        log_probs, condition = stage_denoiser(ae, sigma, gen)
        r = discrete_ratio_bound(log_probs, x0, ae.mask_id, mc_samples, gen, condition=condition)
        points.append({"noise_std": sigma, "recovery": r["recovery"], "error": 1 - r["recovery"]})
    result = {"points": points, "rows": len(x0), "mc_samples": mc_samples, "seed": seed}
    try:
        curve = fit_tanh([p["noise_std"] for p in points], [p["error"] for p in points])
        result["tanh_fit"] = curve.to_dict()
    except (RuntimeError, ValueError) as exc:
        result["tanh_fit_error"] = str(exc)
    return result


def plot(result: dict, title: str):
    from diladiff.plotting import pyplot
    from diladiff.processes.tanh_fit import TanhCurve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    s = [p["noise_std"] for p in result["points"]]
    ax.plot(s, [p["error"] for p in result["points"]], "o", label="1 - recovery")
    if "tanh_fit" in result:
        grid = torch.linspace(min(s), max(s), 200, dtype=torch.float64)
        ax.plot(grid, TanhCurve(**result["tanh_fit"])(grid), "-", label="tanh fit")
    ax.set_xlabel("std of noise added to the latent")
    ax.set_ylabel("token error rate")
    ax.set_title(title)
    ax.legend()
    return fig
