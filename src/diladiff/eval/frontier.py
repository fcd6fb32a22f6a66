"""Speed/quality frontiers: sweep sampler settings for one or more runs, evaluate every point
under the fixed protocol, and plot MAUVE and GenPPL against tokens/s (plus a temperature
sweep: GenPPL against entropy). Everything lands in one output folder:

    OUT/frontier.json   OUT/frontier.png   OUT/frontier_gflops.png   OUT/temperature.png
    OUT/samples/*.jsonl

A latent run's prior samples are drawn once per (N_cont, gamma) and decoded at every N_disc and
temperature (eval/latent_cache.py: latents from `seed`, decoding from `seed + 1`); its rows'
seconds and tokens/s include the time of that draw (latent_s; latent_reused marks the rows that
did not spend it again).

A latent run's legend names its schedule ("tangent d=10" or "fitted": stages.latent.
schedule_name), so a tangent-schedule and a fitted-schedule run of the same method are told
apart on one plot; runs whose folders share a name are named by their parent folder too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tqdm.auto import tqdm

from diladiff.eval.evaluate import evaluate_samples
from diladiff.eval.latent_cache import (
    RNG_RULE,
    LatentCache,
    generate_from_cache,
    rng_meta,
)
from diladiff.eval.protocol import device_record
from diladiff.plotting import pyplot, save
from diladiff.runs import load_run, run_kind
from diladiff.sampling.generate import generate, write_samples
from diladiff.stages import STAGES, LatentStage
from diladiff.stages.latent import schedule_name
from diladiff.stages.protocols import SizedNetwork


def _label(name: str, stage) -> str:
    if isinstance(stage, LatentStage):  # LaDiff, DiLaDiff, LDLM: the diffusion section's VP
        return f"{name} ({stage.kind}, {schedule_name(stage.cfg.diffusion, short=True)})"
    return f"{name} ({stage.kind})"


def run_names(run_dirs) -> list[str]:
    """Each run's name on plots and sample files: its folder's name, or PARENT_NAME where
    folders share a name (runs/a/ladiff and runs/b/ladiff: a_ladiff and b_ladiff)."""
    paths = [Path(r) for r in run_dirs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}_{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def sweep_run(
    run_dir: Path,
    points: list[dict],
    num_samples: int,
    scorer: str,
    reference: str | None,
    out_dir: Path,
    device,
    seed: int,
    batch_size: int,
    latent_cache: LatentCache | None = None,
    name: str | None = None,
) -> list[dict]:
    """Generate and evaluate at each point (a dict of sample-config overrides), the run named
    `name` (default its folder's name) on plots and sample files. A latent run
    draws its prior samples through `latent_cache` (one per call when None): once per
    (N_cont, gamma), decoded at every point (eval/latent_cache.py: latents from `seed`,
    decoding from `seed + 1`)."""
    stage, tok = load_run(run_dir, device=device)
    name = name or run_dir.name
    latent = isinstance(stage, LatentStage)
    cache = LatentCache() if latent_cache is None else latent_cache
    rows = []
    for point in tqdm(points, desc=f"frontier {run_dir.name}", leave=False):
        sc = copy.deepcopy(stage.cfg.sample)
        sc.num_samples, sc.batch_size, sc.seed = num_samples, batch_size, seed
        for k, v in point.items():
            setattr(sc, k, v)
        if latent:
            out = generate_from_cache(stage, tok, sc, cache, str(run_dir), device)
        else:
            out = generate(stage, tok, sc, device, progress=False)
        file = f"{name}_" + "_".join(f"{k}{v}" for k, v in point.items())
        meta = {"run": str(run_dir), "stage": stage.kind, **vars(sc)}
        if latent:
            meta |= rng_meta(sc.seed)
        write_samples(out_dir / "samples" / f"{file}.jsonl", out, meta)
        result = evaluate_samples(
            out.ids,
            out.texts,
            scorer,
            reference,
            device,
            generator_meta=meta,
            batch_size=batch_size,
        )
        batches = -(-num_samples // batch_size)
        gflops = sample_gflops(stage, out.stats, batches)
        rows.append(
            {
                "run": _label(name, stage),
                **({"gflops_per_sample": gflops} if gflops is not None else {}),
                "temperature": sc.temperature,
                **point,
                **({"decode_seed": meta["decode_seed"]} if latent else {}),
                "tokens_per_s": num_samples * stage.seq_len / out.seconds,
                "seconds": out.seconds,
                **out.stats,
                **result["metrics"],
                "protocol": result["protocol"],
            }
        )
    return rows


def frontier(
    run_dirs: list[Path],
    disc_steps: list[int],
    num_samples: int,
    scorer: str,
    out_dir: Path,
    reference: str | None = None,
    temperatures: list[float] = (),
    temperature_steps: int | None = None,
    device="cpu",
    seed: int = 0,
    batch_size: int = 16,
    cont_steps: list[int] = (),
    latent_cache: LatentCache | None = None,
) -> dict:
    """Sweep N_disc (x N_cont for latent runs when `cont_steps` is given) per run. Latent runs
    draw their prior samples once per (run, N_cont, gamma) through `latent_cache` (a new one
    when None) and decode them at every N_disc and temperature."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = LatentCache() if latent_cache is None else latent_cache
    result = {
        "device": device_record(device),
        "num_samples": num_samples,
        "seed": seed,
        "latent_rng": RNG_RULE,
        "points": [],
        "temperature": [],
    }
    for run, name in zip(run_dirs, run_names(run_dirs), strict=True):
        cls = STAGES[run_kind(run)]
        latent = issubclass(cls, LatentStage)
        points = [{"disc_steps": n} for n in disc_steps]
        if latent and cont_steps:
            points = [{"cont_steps": c, "disc_steps": n} for c in cont_steps for n in disc_steps]
            if cls.latent_decoding == "direct":  # one decoder call (LDLM): N_cont is the axis
                points = [{"cont_steps": c} for c in cont_steps]
        frontier_rows = sweep_run(
            Path(run),
            points,
            num_samples,
            scorer,
            reference,
            out_dir,
            device,
            seed,
            batch_size,
            cache,
            name,
        )
        result["points"] += frontier_rows
        if temperatures:
            n = temperature_steps or max(disc_steps)
            # a frontier point at N_disc = n already measured its own temperature: reuse it
            done = {
                r["temperature"]: r
                for r in frontier_rows
                if r.get("disc_steps") == n and "cont_steps" not in r
            }
            tpoints = [{"disc_steps": n, "temperature": t} for t in temperatures if t not in done]
            swept = sweep_run(
                Path(run),
                tpoints,
                num_samples,
                scorer,
                None,
                out_dir,
                device,
                seed,
                batch_size,
                cache,
                name,
            )
            by_t = done | {r["temperature"]: r for r in swept}
            result["temperature"] += [by_t[t] for t in temperatures]
    (out_dir / "frontier.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_frontier(result, out_dir / "frontier.png")
    if any("gflops_per_sample" in r for r in result["points"]):
        plot_frontier(result, out_dir / "frontier_gflops.png", x="gflops_per_sample")
    if result["temperature"]:
        plot_temperature(result, out_dir / "temperature.png")
    return result


def sample_gflops(stage, stats: dict, batches: int) -> float | None:
    """Backbone GFLOPs of one sample (eval/compute.py) from the sampler's call counts, summed
    over `batches` batches, for the stages that sample with one network (SizedNetwork: MDLM,
    DUO, LADD; N_z = 0 but for LADD, whose sequential inference's latent-only calls, cont_nfe,
    run over L + N_z positions too); None for the others (a latent prior plus a decoder)."""
    from diladiff.eval import compute

    if not isinstance(stage, SizedNetwork):
        return None
    calls = stats.get("disc_nfe", 0) / batches
    d = stage.network_dims()
    latent = stats.get("cont_nfe", 0) / batches
    args = (d["blocks"], d["width"], d["seq_len"], d["num_latents"])
    if latent:
        return compute.ladd_sequential_gflops(latent, calls - latent, *args)
    return compute.ladd_joint_gflops(calls, *args)


def _by_run(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = r["run"] + (f", N_cont={r['cont_steps']}" if "cont_steps" in r else "")
        groups.setdefault(key, []).append(r)
    return groups


def plot_frontier(result: dict, path: Path, x: str = "tokens_per_s") -> None:
    """Quality against sampling speed (x = "tokens_per_s") or against backbone compute per
    sample (x = "gflops_per_sample", the rows that have it)."""
    plt = pyplot()
    points = [r for r in result["points"] if x in r]

    metrics = [m for m in ("mauve", "gen_ppl") if any(m in r for r in points)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for run, rows in _by_run(points).items():
            rows = sorted(rows, key=lambda r: r[x])
            ax.plot([r[x] for r in rows], [r[metric] for r in rows], "o-", label=run)
            for r in rows:
                ax.annotate(
                    ", ".join(
                        f"{label}={r[key]}"
                        for key, label in (("cont_steps", "N_cont"), ("disc_steps", "N_disc"))
                        if key in r
                    ),
                    (r[x], r[metric]),
                    fontsize=8,
                    textcoords="offset points",
                    xytext=(4, 4),
                )
        ax.set_xscale("log")
        ax.set_xlabel(
            "sampling speed (tokens / s, log scale)"
            if x == "tokens_per_s"
            else "backbone GFLOPs per sample (log scale; eval/compute.py)"
        )
        ax.set_ylabel(
            "MAUVE (higher is better)"
            if metric == "mauve"
            else "generative perplexity (lower is better)"
        )
        if metric == "gen_ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    p0 = result["points"][0]["protocol"] if result["points"] else {}
    fig.suptitle(
        f"Speed / quality frontier ({result['num_samples']} samples, scorer "
        f"{p0.get('scorer')}, {result['device']})",
        fontsize=10,
    )
    save(fig, path)


def plot_temperature(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for run, rows in _by_run(result["temperature"]).items():
        rows = sorted(rows, key=lambda r: r["temperature"])
        ax.plot([r["entropy"] for r in rows], [r["gen_ppl"] for r in rows], "o-", label=run)
        for r in rows:
            ax.annotate(
                f"T={r['temperature']}",
                (r["entropy"], r["gen_ppl"]),
                fontsize=8,
                textcoords="offset points",
                xytext=(4, 4),
            )
    ax.set_xlabel("sample unigram entropy (nats)")
    ax.set_ylabel("generative perplexity (log scale)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(
        f"Temperature sweep (N_disc={result['temperature'][0]['disc_steps']}, "
        f"{result['num_samples']} samples)",
        fontsize=10,
    )
    save(fig, path)
