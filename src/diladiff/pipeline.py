"""`diladiff pipeline`: raw text -> MDLM -> auto-encoder -> LaDiff -> DiLaDiff, then one
evaluation of all three generators under the fixed protocol, the speed benchmark, the frontier
sweep and DIR/report.md.

    DIR/mdlm  DIR/autoencoder  DIR/ladiff  DIR/diladiff      run folders (each resumable)
    DIR/eval/*.json  DIR/eval/samples/  DIR/frontier/  DIR/report.md

A stage whose folder holds a COMPLETE marker is skipped; an interrupted stage resumes from its
last checkpoint. With --budget-minutes, each stage gets its preset share of the budget as a
time limit (it stops, checkpoints and counts as complete when its share is spent).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

STAGE_ORDER = [
    ("mdlm", None),
    ("autoencoder", "init_from"),
    ("ladiff", "autoencoder"),
    ("diladiff", "teacher"),
]
PARENT_RUN = {"autoencoder": "mdlm", "ladiff": "autoencoder", "diladiff": "ladiff"}
# Share of a time budget per stage (evaluation gets the rest).
BUDGET_SHARES = {"mdlm": 0.25, "autoencoder": 0.25, "ladiff": 0.15, "diladiff": 0.1}


@dataclass
class EvalPlan:
    """What the pipeline measures, per preset."""

    scorer: str
    num_samples: int
    batch_size: int
    ladiff_cont_steps: int
    frontier_disc: tuple[int, ...]
    bench_batches: tuple[int, ...]
    bench_repeats: int
    temperatures: tuple[float, ...] = (0.7, 0.85, 1.0)
    frontier_mauve: bool = True
    # Benchmark at N_disc = L / k for each k.
    bench_disc_divisors: tuple[int, ...] = (8, 1)


EVAL_PLANS = {
    # tiny: MAUVE only on the main table (32 samples); the frontier reports GenPPL alone.
    "tiny": EvalPlan(
        "smollm2-135m", 32, 16, 200, (4, 16, 64), (1, 8, 32), 1, (0.7, 1.0), False, (8,)
    ),
    "small": EvalPlan("smollm2-135m", 256, 64, 200, (8, 16, 32, 64, 128), (1, 8, 32), 3),
    "paper": EvalPlan("gpt2-large", 5000, 128, 200, (8, 16, 32, 64, 128), (1, 8, 32), 3),
}


def _complete(run: Path) -> bool:
    return (run / "COMPLETE").is_file()


def train_stages(
    root: Path,
    preset: str,
    overrides: list[str],
    budget_minutes: float = 0.0,
    stage_overrides: dict[str, list[str]] | None = None,
) -> dict:
    from diladiff.runs import train_run

    results = {}
    for stage, parent_flag in STAGE_ORDER:
        run = root / stage
        if _complete(run):
            print(f"[pipeline] {stage}: complete, skipped ({run})")
            continue
        extra = list(overrides) + list((stage_overrides or {}).get(stage, []))
        if budget_minutes > 0:
            extra.append(f"train.time_limit_minutes={budget_minutes * BUDGET_SHARES[stage]:.3f}")
        parents = {parent_flag: root / PARENT_RUN[stage]} if parent_flag else None
        print(f"[pipeline] {stage}: training in {run}")
        start = time.perf_counter()
        results[stage] = train_run(stage, run, preset, extra, parents)
        (run / "COMPLETE").write_text(
            json.dumps({**results[stage], "seconds": time.perf_counter() - start}) + "\n"
        )
    return results


def plan_for(preset: str) -> EvalPlan:
    return EVAL_PLANS[preset.removesuffix("-4x")]


def evaluate_all(root: Path, plan: EvalPlan, device) -> list[Path]:
    """Samples and protocol evaluation of MDLM, LaDiff and DiLaDiff at N_disc = L/8 and L."""
    from diladiff.eval.evaluate import evaluate_samples
    from diladiff.eval.protocol import write_result
    from diladiff.runs import load_run
    from diladiff.sampling.generate import generate, write_samples

    L = load_run(root / "mdlm")[0].seq_len
    out, paths = root / "eval", []
    points = [("mdlm", 0), ("ladiff", plan.ladiff_cont_steps), ("ladiff", 5), ("diladiff", 5)]
    for stage_name, cont in points:
        stage, tok = load_run(root / stage_name, device=device)
        for n_disc in (L // 8, L):
            sc = stage.cfg.sample
            sc.num_samples, sc.batch_size, sc.seed = plan.num_samples, plan.batch_size, 0
            sc.disc_steps, sc.cont_steps = n_disc, cont
            name = f"{stage_name}_cont{cont}_disc{n_disc}" if cont else f"{stage_name}_disc{n_disc}"
            gen = generate(stage, tok, sc, device, progress=False)
            meta = {
                "run": str(root / stage_name),
                "stage": stage_name,
                **vars(sc),
                "seconds": gen.seconds,
                **gen.stats,
            }
            write_samples(out / "samples" / f"{name}.jsonl", gen, meta)
            result = evaluate_samples(
                gen.ids,
                gen.texts,
                plan.scorer,
                str(root / "mdlm"),
                device,
                generator_meta=meta,
                batch_size=plan.batch_size,
            )
            result["metrics"]["tokens_per_s"] = plan.num_samples * L / gen.seconds
            write_result(out / f"{name}.json", result)
            paths.append(out / f"{name}.json")
            print(
                f"[pipeline] eval {name}: gen_ppl={result['metrics']['gen_ppl']:.1f} "
                f"mauve={result['metrics'].get('mauve', float('nan')):.3f}"
            )
    return paths


def bench_all(root: Path, plan: EvalPlan, device) -> list[dict]:
    from diladiff.eval.bench import bench_sampling
    from diladiff.runs import load_run
    from diladiff.sampling.generate import sampler_settings

    rows = []
    for stage_name, cont in (("mdlm", 0), ("ladiff", plan.ladiff_cont_steps), ("diladiff", 5)):
        stage, _ = load_run(root / stage_name, device=device)
        for n_disc in (stage.seq_len // k for k in plan.bench_disc_divisors):
            sc = stage.cfg.sample
            sc.disc_steps, sc.cont_steps = n_disc, cont
            for row in bench_sampling(
                stage,
                sampler_settings(sc, stage.seq_len),
                plan.bench_batches,
                plan.bench_repeats,
                device,
            ):
                rows.append({"stage": stage_name, "N_cont": cont or "", "N_disc": n_disc, **row})
    (root / "eval").mkdir(exist_ok=True)
    (root / "eval" / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def write_report(
    root: Path, preset: str, plan: EvalPlan, results: list[Path], bench: list[dict], device
) -> Path:
    from diladiff.eval.bench import format_table
    from diladiff.eval.protocol import device_record, read_result
    from diladiff.eval.report import markdown_report

    lines = [
        f"# diladiff pipeline report ({preset})",
        "",
        f"Device: {device_record(device)}. Scorer: {plan.scorer}. Samples per row: "
        f"{plan.num_samples} (seed 0). MAUVE reference: held-out split of the MDLM run's "
        f"data. Regenerate: `diladiff pipeline --preset {preset} --run-dir {root}`.",
        "",
    ]
    lines.append(markdown_report(results, "Generation quality").split("\n", 2)[2])
    recon = root / "eval" / "recon.json"
    if recon.is_file():
        rec = read_result(recon)["metrics"]
        lines += [
            "## Reconstruction (discrete-ratio bound, held-out rows)",
            "",
            format_table(
                [
                    {"run": k, "ppl_bound": v["ppl_bound"], "recovery": v["recovery"]}
                    for k, v in rec["runs"].items()
                ]
            ),
            "",
        ]
    cols = [
        "stage",
        "N_cont",
        "N_disc",
        "batch",
        "wall_s_per_batch",
        "tokens_per_s",
        "latent_s",
        "decode_s",
        "latent_overhead",
    ]
    lines += [
        "## Speed (median of timed batches after a warm-up)",
        "",
        format_table(bench, cols),
        "",
    ]
    for png in ("frontier/frontier.png", "frontier/temperature.png", "autoencoder/recon.png"):
        if (root / png).is_file():
            lines += [f"![{png}]({png})", ""]
    report = root / "report.md"
    report.write_text("\n".join(lines))
    return report


def run_pipeline(
    root: Path,
    preset: str = "tiny",
    overrides: list[str] | None = None,
    budget_minutes: float = 0.0,
    device_spec: str = "auto",
    stage_overrides: dict[str, list[str]] | None = None,
    plan: EvalPlan | None = None,
) -> Path:
    from diladiff.eval.frontier import frontier
    from diladiff.eval.protocol import device_record, write_result
    from diladiff.eval.recon_report import plot_recon, recon_report
    from diladiff.train.distributed import pick_device

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train_stages(root, preset, list(overrides or []), budget_minutes, stage_overrides)
    device = pick_device(device_spec)
    plan = plan or plan_for(preset)
    print("[pipeline] reconstruction: auto-encoder vs MDLM")
    rec = recon_report(root / "autoencoder", sequences=16, mc_samples=32, device=device)
    plot_recon(rec, root / "autoencoder" / "recon.png", "Auto-encoder vs MDLM (held-out)")
    write_result(root / "eval" / "recon.json", {"metrics": rec, "device": device_record(device)})
    print("[pipeline] evaluation")
    results = evaluate_all(root, plan, device)
    print("[pipeline] speed benchmark")
    bench = bench_all(root, plan, device)
    print("[pipeline] frontier")
    frontier(
        [root / "mdlm", root / "ladiff", root / "diladiff"],
        list(plan.frontier_disc),
        plan.num_samples // 2,
        plan.scorer,
        root / "frontier",
        str(root / "mdlm") if plan.frontier_mauve else None,
        temperatures=list(plan.temperatures),
        device=device,
        batch_size=plan.batch_size,
    )
    report = write_report(root, preset, plan, results, bench, device)
    print(f"[pipeline] report: {report}")
    return report
