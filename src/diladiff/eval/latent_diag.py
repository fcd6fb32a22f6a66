"""`diladiff eval-latent`: does the latent prior sample what the encoder produces?

Prior samples and encoder latents are compared in the prior's space (the prior's data:
`stage.prior_latents(x0)`, the frozen encoder's latent of clean rows, standardised for the
prior; samples: `sampling.latent.sample_latent`). Three sets of encoder latents, one seed:

    H      held-out rows (the first n of the validation split)      the target
    T_n    n random training rows                                  the floor (same distribution)
    T_ref  M further random training rows                          nearest-neighbour reference

Statistics, each a function below (z flattened to D = N_z * d_z coordinates unless stated):

- moment mismatch: mean_c |mu_c(P) - mu_c(H)| and mean_c |log(sd_c(P) / sd_c(H))| over the D
  coordinates c (sample mean, standard deviation with n - 1);
- Fréchet distance per latent vector, averaged: for each of the N_z latent vectors j, the
  Fréchet distance between Gaussians fitted to P[:, j, :] and H[:, j, :] (d_z dimensions), then
  the mean over j. Not on the flattened N_z * d_z vector: its covariance would have far more
  dimensions than there are samples. The estimate is biased upwards at small n (and d_z may
  exceed n: it is computed exactly for the rank-deficient fitted covariances), so the same
  statistic for T_n against H, at the same n, is reported as its floor;
- memorisation: mean Euclidean distance (flattened) from each sample to its nearest neighbour
  in T_ref, divided by the same mean for H (held-out text, never trained on). A ratio well
  below the floor row's means samples that copy training latents; well above 1, samples off
  the encoder's manifold;
- second moment: E||z||^2 / D (1 for the standardised prior data; a few-step sampler that
  leaves noise in directions the data does not use shows up here).

Rows: one per sampler (LaDiff: Euler N_cont 200 and 5; DiLaDiff: N_cont 5, gamma 0 and
gamma > 0), plus "encoder train (floor)" (T_n as if it were a sampler) and "encoder held-out"
(H itself: its own second moment and nearest-neighbour distance).
"""

from __future__ import annotations

import numpy as np
import torch

STATISTICS = {
    "space": "prior space: stage.prior_latents(x0) vs sampling.latent.sample_latent",
    "moments": "mean_c |mu_P - mu_H| and mean_c |log sd_P / sd_H| over the N_z*d_z coordinates",
    "frechet": "Frechet distance between Gaussians fitted per latent vector (d_z dims), "
    "averaged over the N_z vectors; floor: the same for n training latents vs H",
    "nn_ratio": "mean NN distance (flattened, Euclidean) to the training reference set, "
    "divided by that of the held-out latents",
    "sq_norm": "E||z||^2 / (N_z * d_z)",
}


def _rows(z: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, D) in float64."""
    return z.reshape(len(z), -1).double()


def moment_mismatch(samples: torch.Tensor, reference: torch.Tensor) -> dict:
    """Per-coordinate mean and spread mismatch of `samples` against `reference` (both (n, ...),
    flattened): {"mean_abs_mean_diff": mean_c |mu_c(samples) - mu_c(reference)|,
    "mean_abs_log_sd_ratio": mean_c |log(sd_c(samples) / sd_c(reference))|} (sd with n - 1)."""
    a, b = _rows(samples), _rows(reference)
    tiny = torch.finfo(torch.float64).tiny
    log_ratio = a.std(0).clamp_min(tiny).log() - b.std(0).clamp_min(tiny).log()
    return {
        "mean_abs_mean_diff": float((a.mean(0) - b.mean(0)).abs().mean()),
        "mean_abs_log_sd_ratio": float(log_ratio.abs().mean()),
    }


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein^2) distance between Gaussians fitted to the rows of a (n, D) and
    b (m, D):  ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)),  covariances with n - 1.

    Computed without D x D matrices or square roots: with A = (a - mu_a) / sqrt(n - 1), so that
    S_a = A^T A (same for B), Tr S_a = ||A||_F^2 and Tr (S_a S_b)^(1/2) = ||A B^T||_* (the
    nonzero eigenvalues of S_a S_b are the squared singular values of A B^T), and
    ||A B^T||_* = ||R_a R_b^T||_* with the reduced QR factors R (min(n, D) x D). Exact for any
    D, also D > n (rank-deficient fitted covariances)."""
    a, b = _rows(a), _rows(b)
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError("need two sets of >= 2 rows of the same width")
    A = (a - a.mean(0)) / (len(a) - 1) ** 0.5
    B = (b - b.mean(0)) / (len(b) - 1) ** 0.5
    ra, rb = torch.linalg.qr(A).R, torch.linalg.qr(B).R
    cross = torch.linalg.svdvals(ra @ rb.T).sum()
    fd = (a.mean(0) - b.mean(0)).square().sum() + A.square().sum() + B.square().sum() - 2 * cross
    return float(fd.clamp_min(0.0))


def latent_frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance per latent vector, averaged: a, b (n, N_z, d_z) ->
    mean_j frechet_distance(a[:, j], b[:, j])."""
    if a.dim() != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError("latents must be (n, N_z, d_z) with the same N_z and d_z")
    return sum(frechet_distance(a[:, j], b[:, j]) for j in range(a.shape[1])) / a.shape[1]


def nearest_neighbour_distances(
    queries: torch.Tensor, reference: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """For each query row (flattened), the Euclidean distance to its nearest reference row."""
    q, r = _rows(queries), _rows(reference)
    return torch.cat([torch.cdist(q[i : i + chunk], r).amin(1) for i in range(0, len(q), chunk)])


def memorisation(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor) -> dict:
    """Nearest-neighbour distance of samples to the training latents, relative to held-out
    latents': {"nn_dist": mean NN distance of samples to train, "nn_dist_heldout": the same
    for held-out latents, "nn_ratio": their ratio} (about 1: no sign of copying)."""
    mine = float(nearest_neighbour_distances(samples, train).mean())
    ref = float(nearest_neighbour_distances(heldout, train).mean())
    return {"nn_dist": mine, "nn_dist_heldout": ref, "nn_ratio": mine / ref}


def mean_square_norm(z: torch.Tensor) -> float:
    """E||z||^2 / D: the mean over samples of the squared norm, per coordinate."""
    return float(_rows(z).square().mean())


def compare(samples: torch.Tensor, refs: dict) -> dict:
    """Every statistic of `samples` against the reference sets of `reference_latents`."""
    return {
        **moment_mismatch(samples, refs["heldout"]),
        "frechet": latent_frechet_distance(samples, refs["heldout"]),
        **memorisation(samples, refs["train_ref"], refs["heldout"]),
        "sq_norm": mean_square_norm(samples),
    }


# ---------------------------------------------------------------------------- a run
def _encode(stage, rows: np.ndarray, batch_size: int, device) -> torch.Tensor:
    """Prior-space encoder latents of clean rows (the prior's data), float32 on the CPU."""
    from diladiff.eval.oracle import encoder_latents

    return encoder_latents(stage, rows, batch_size, device, prior_space=True)


def reference_latents(
    stage, tok, num: int, train_rows: int, seed: int = 0, device="cpu", batch_size: int = 64
) -> dict:
    """Encoder latents (prior space) of n held-out rows (val[:n]) and of n + M random training
    rows (numpy seed `seed`, without replacement): "heldout" (n), "train_floor" (n),
    "train_ref" (M), with the row choice recorded in "meta"."""
    from diladiff.data.packing import prepare_data
    from diladiff.errors import DataError

    data = prepare_data(stage.cfg.data, tok, progress=False)
    if len(data.val) < num:
        raise DataError(f"{len(data.val)} held-out rows, fewer than {num} latent samples")
    if len(data.train) < num + 1:
        raise DataError(f"{len(data.train)} training rows, too few for {num} latent samples")
    train_rows = min(train_rows, len(data.train) - num)
    pick = np.random.default_rng(seed).choice(len(data.train), num + train_rows, replace=False)
    train = _encode(stage, data.train[pick], batch_size, device)
    return {
        "heldout": _encode(stage, data.val[:num], batch_size, device),
        "probe_rows": np.asarray(data.val[: min(num, 4)], dtype=np.int64),
        "train_floor": train[:num],
        "train_ref": train[num:],
        "meta": {
            "heldout_rows": f"val[:{num}]",
            "train_rows": f"{num} (floor) + {train_rows} (reference), numpy seed {seed}",
            "source": stage.cfg.data.source,
        },
    }


def same_latent_space(stage, refs: dict, device) -> bool:
    """Whether `stage` maps the probe rows to the reference latents (e.g. a DiLaDiff run and
    its LaDiff teacher share the auto-encoder and the prior's standardisation)."""
    probe = _encode(stage, refs["probe_rows"], len(refs["probe_rows"]), device)
    if probe.shape[1:] != refs["heldout"].shape[1:]:
        return False
    return bool(torch.allclose(probe, refs["heldout"][: len(probe)], atol=1e-4, rtol=1e-4))


def latent_samplers(specs) -> list[dict]:
    """{"cont_steps", "gamma"} of each evaluation sampler spec (gamma 0 when not given)."""
    return [{"cont_steps": s["cont_steps"], "gamma": float(s.get("gamma", 0.0))} for s in specs]


def default_samplers(stage) -> list[dict]:
    """The stage's evaluation samplers (its class's `eval_samplers`: LaDiff Euler N_cont 200
    and 5; DiLaDiff N_cont 5 at gamma 0 and 0.2)."""
    return latent_samplers(type(stage).eval_samplers)


def sampler_grid(stage, cont_steps=None, gammas=None) -> list[dict]:
    """Samplers from command-line lists: every (N_cont, gamma) pair; missing lists take
    default_samplers' values. gamma applies to the meanflow sampler only."""
    defaults = default_samplers(stage)
    conts = list(cont_steps or dict.fromkeys(d["cont_steps"] for d in defaults))
    gs = list(gammas if gammas is not None else dict.fromkeys(d["gamma"] for d in defaults))
    if stage.latent_sampler != "meanflow" and any(g != 0 for g in gs):
        raise ValueError(f"gamma-sampling applies to the meanflow sampler, not {stage.kind}")
    return [{"cont_steps": c, "gamma": g} for c in conts for g in gs]


@torch.no_grad()
def sample_prior(
    stage, num: int, cont_steps: int, gamma: float, seed: int, batch_size: int, device
) -> tuple[torch.Tensor, dict]:
    """`num` prior samples in prior space (one generator seeded `seed`, batch after batch), with
    the network calls per sample and the seconds."""
    from diladiff.eval.latent_cache import draw_batch

    gen = torch.Generator(torch.device(device)).manual_seed(seed)
    batches = [
        draw_batch(stage, min(batch_size, num - i), cont_steps, gamma, gen, device)
        for i in range(0, num, batch_size)
    ]
    z = torch.cat([b.z for b in batches])
    return z, {"cont_nfe": batches[-1].nfe, "seconds": sum(b.seconds for b in batches)}


def latent_diagnostics(
    stage,
    refs: dict,
    samplers: list[dict] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device="cpu",
    cache=None,
    run: str | None = None,
) -> list[dict]:
    """One row per sampler, plus the floor and held-out reference rows. With a `LatentCache`
    (eval/latent_cache.py) and the run's name, the prior samples come from (and stay in) the
    cache: the same tensors as `sample_prior` draws; `seconds` is then the time they took when
    drawn, and `latent_reused` says whether an earlier caller drew them."""
    from diladiff.eval.latent_cache import LatentCache

    if cache is None:
        cache, run = LatentCache(), "this run"
    elif run is None:
        raise ValueError("a shared latent cache needs the run's name")
    num = len(refs["heldout"])
    rows = [
        {"sampler": "encoder train (floor)", **compare(refs["train_floor"], refs)},
        {
            "sampler": "encoder held-out",
            "sq_norm": mean_square_norm(refs["heldout"]),
            **memorisation(refs["heldout"], refs["train_ref"], refs["heldout"]),
        },
    ]
    for spec in samplers or default_samplers(stage):
        cont, gamma = int(spec["cont_steps"]), float(spec.get("gamma", 0.0))
        z, info = cache.prior(stage, run, num, cont, gamma, seed, batch_size, device)
        name = f"{stage.kind} N_cont={cont}" + (
            f" gamma={gamma:g}" if stage.latent_sampler == "meanflow" else ""
        )
        rows.append(
            {
                "sampler": name,
                "N_cont": cont,
                "gamma": gamma,
                "cont_nfe": info["cont_nfe"],
                "seconds": info["latent_s"],
                "latent_reused": info["latent_reused"],
                **compare(z, refs),
            }
        )
    return rows


TABLE_COLUMNS = [
    "sampler",
    "mean_abs_mean_diff",
    "mean_abs_log_sd_ratio",
    "frechet",
    "nn_ratio",
    "sq_norm",
    "cont_nfe",
]


def latent_result(stage, run_dir, refs: dict, rows: list[dict], seed: int, device) -> dict:
    """A result record for `write_result`: protocol (statistics, sample counts, seeds)."""
    from diladiff.eval.protocol import PROTOCOL_VERSION, device_record

    return {
        "protocol": {
            "version": PROTOCOL_VERSION,
            "latent_diagnostics": STATISTICS,
            "num_samples": len(refs["heldout"]),
            "train_reference_rows": len(refs["train_ref"]),
            "sample_seed": seed,
            **refs["meta"],
        },
        "metrics": {"rows": rows},
        "generator": {"run": str(run_dir), "stage": stage.kind},
        "device": device_record(device),
    }
