"""`diladiff analyze robustness RUN` (paper Fig. 10, App. D.3): the decoder's token recovery
against the std s of Gaussian noise added to the encoder's latent, with the four-parameter tanh
model of the error rate 1 - recovery fitted to the curve (processes.tanh_fit) and drawn over it.

The noise is added where the decoder reads the latent: the auto-encoder's standardised space
(`encode`: every coordinate scaled to unit variance over the training rows), so s is relative to
the latent's per-coordinate std; `latent_std` in the JSON gives that std on the analysed rows.
Recovery is eval/recon.py's: the share of masked tokens whose argmax prediction is the clean
token, over the discrete-ratio estimator's masks (l ~ U{1..L} masked tokens per draw, from
partly masked to all masked). Common random numbers: every level uses the same masks and the
same noise direction (two generators reseeded per level), so the curve differs between levels
only by s.

With a fit, `schedule_override` gives the overrides that train a LaDiff prior on this
auto-encoder with the fitted time reparameterisation (processes/fitted_schedule.py):
`diffusion.schedule=fitted diffusion.fitted_tanh=a,b,c,e`."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from diladiff.analysis.common import encode, latent_scale
from diladiff.eval.recon import discrete_ratio_bound, stage_denoiser
from diladiff.processes.tanh_fit import fit_tanh

NOISE_LEVELS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


@torch.no_grad()
def robustness_curve(ae, x0, noise_levels=NOISE_LEVELS, mc_samples: int = 16, seed: int = 0):
    """Recovery and error rate per noise std, the fitted tanh curve (or why not)."""
    points = []
    for sigma in tqdm(noise_levels, desc="robustness", unit="level"):
        masks = torch.Generator(x0.device).manual_seed(seed)
        noise = torch.Generator(x0.device).manual_seed(seed + 1)
        log_probs, condition = stage_denoiser(ae, sigma, noise)
        r = discrete_ratio_bound(log_probs, x0, ae.mask_id, mc_samples, masks, condition=condition)
        points.append({"noise_std": sigma, "recovery": r["recovery"], "error": 1 - r["recovery"]})
    result = {
        "points": points,
        "noise_space": "auto-encoder's standardised latent (decoder input), std relative",
        "latent_std": latent_scale(encode(ae, x0)),
        "rows": len(x0),
        "mc_samples": mc_samples,
        "seed": seed,
    }
    try:
        s, err = [p["noise_std"] for p in points], [p["error"] for p in points]
        curve = fit_tanh(s, err)
        result["tanh_fit"] = curve.to_dict()
        residual = curve(s) - torch.tensor(err, dtype=torch.float64)
        result["tanh_fit_rmse"] = float(residual.pow(2).mean().sqrt())
        result["schedule_override"] = schedule_override(curve)
    except (RuntimeError, ValueError) as exc:
        result["tanh_fit_error"] = str(exc)
    return result


def schedule_override(curve) -> str:
    """The config overrides of the fitted schedule for a tanh fit."""
    values = ",".join(f"{v:.8g}" for v in (curve.a, curve.b, curve.c, curve.e))
    return f"diffusion.schedule=fitted diffusion.fitted_tanh={values}"


def plot(result: dict, title: str):
    from diladiff.plotting import pyplot
    from diladiff.processes.tanh_fit import TanhCurve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    s = [p["noise_std"] for p in result["points"]]
    ax.plot(s, [p["error"] for p in result["points"]], "o", label="1 - recovery")
    if "tanh_fit" in result:
        grid = torch.linspace(min(s), max(s), 200, dtype=torch.float64)
        f = result["tanh_fit"]
        label = f"{f['a']:.3g} + {f['b']:.3g} tanh({f['c']:.3g} (s - {f['e']:.3g}))"
        ax.plot(grid, TanhCurve(**f)(grid), "-", label=label)
    ax.set_xlabel("std of noise added to the latent")
    ax.set_ylabel("token error rate")
    ax.set_title(title)
    ax.legend()
    return fig
