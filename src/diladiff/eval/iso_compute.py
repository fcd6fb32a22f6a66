"""`diladiff compare-compute`: LADD runs against a size-matched MDLM at equal backbone compute,
the LADD paper's Table 2 (LM1B) and Table 5 (OWT): each method's GenPPL (and entropy, MAUVE) at
fixed GFLOPs per sample (docs/methods/ladd.md#compute-accounting, #evaluation).

1. Size matching. The MDLM must have the transformer `methods.ladd.stage.matched_mdlm` gives
   for every LADD run's MM-DiT (as many parameters in its blocks, one block deeper: the
   paper's 1024 x 13 against its 768 x 12) and the same L; otherwise the command stops and names the
   `diladiff train mdlm` overrides that build it (`allow_unmatched` compares anyway and the
   result says so).
2. Sweep. Every run is sampled and evaluated at each N_disc (eval/frontier.sweep_run: the fixed
   protocol; gflops_per_sample from the sampler's call counts, eval/compute.py, every call
   charged at the positions it runs on); a LADD run at each requested inference it was trained
   for (`trained_inferences`; the others are listed as skipped), sequential with N_y = the given
   cont_steps or the run's ladd.latent_steps.
3. Interpolation. Per method (a run, and for LADD its inference) and metric, the value at each
   budget is linear in GFLOPs between the two measured points around it, n/a (None) outside the
   measured range, never extrapolated (compute.interpolate_at_budget). Points of one method at
   equal GFLOPs (a sampler that stops calling the network once every token is revealed) are
   averaged. Budgets: given, or 2^k GFLOPs over the measured range (compute.doubling_budgets).

Writes OUT/compute.json (matching, points, tables), OUT/compute.md (one Markdown table per
metric), OUT/compute.png (quality against GFLOPs per sample) and OUT/samples/*.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

from diladiff.config import Config, ConfigError
from diladiff.eval import frontier
from diladiff.eval.compute import doubling_budgets, interpolate_at_budget
from diladiff.eval.protocol import device_record
from diladiff.methods.ladd.stage import LADD, matched_mdlm
from diladiff.runs import run_kind
from diladiff.stages import STAGES

METRICS = ("gen_ppl", "entropy", "mauve")  # the paper's Tables 2 and 11, and MAUVE
MODEL_KEYS = ("depth", "width", "heads")


def size_match(ladd_runs: list[Path], mdlm_run: Path | None) -> dict:
    """The MDLM's transformer against the one matched_mdlm gives for each LADD run:
    {"mdlm": dims or None, "wanted": {run: dims}, "matched": bool}. ConfigError (one line) for
    a run of the wrong kind or runs of different L."""
    cfgs = {}
    for run in ladd_runs:
        kind = run_kind(run)
        if not issubclass(STAGES[kind], LADD):
            raise ConfigError(f"{run} is a {kind} run; compare-compute takes LADD runs first")
        cfgs[run] = Config.load(Path(run) / "config.json")
    wanted = {str(run): matched_mdlm(cfg) for run, cfg in cfgs.items()}
    lengths = {str(run): cfg.data.seq_len for run, cfg in cfgs.items()}
    mdlm = None
    if mdlm_run is not None:
        if run_kind(mdlm_run) != "mdlm":
            raise ConfigError(f"--mdlm {mdlm_run} is a {run_kind(mdlm_run)} run, not an mdlm one")
        mc = Config.load(Path(mdlm_run) / "config.json")
        mdlm = {k: getattr(mc.model, k) for k in MODEL_KEYS}
        lengths[str(mdlm_run)] = mc.data.seq_len
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"compare-compute needs one data.seq_len for every run, got {lengths}")
    matched = mdlm is not None and all(w == mdlm for w in wanted.values())
    return {"mdlm": mdlm, "wanted": wanted, "matched": matched}


def check_matched(match: dict, ladd_runs: list[Path], allow_unmatched: bool) -> None:
    """ConfigError naming the MDLM to train when there is none, or when the given one is not
    size-matched (unless allow_unmatched)."""
    wanted = list(match["wanted"].values())
    if len({tuple(w.values()) for w in wanted}) > 1 and not allow_unmatched:
        raise ConfigError(
            f"the LADD runs' MM-DiTs differ in size, so no one MDLM matches them all: "
            f"{match['wanted']} (compare them one at a time, or --allow-unmatched)"
        )
    dims = " ".join(f"model.{k}={v}" for k, v in wanted[0].items())
    cfg = Config.load(Path(ladd_runs[0]) / "config.json")
    train = (
        f"diladiff train mdlm --preset {cfg.preset} --run-dir RUN {dims} "
        f"data.seq_len={cfg.data.seq_len} data.source={cfg.data.source} "
        f"data.tokenizer={cfg.data.tokenizer}"
    )
    if match["mdlm"] is None:
        raise ConfigError(f"compare-compute needs --mdlm RUN, a size-matched MDLM: {train}")
    if not match["matched"] and not allow_unmatched:
        have = " ".join(f"model.{k}={v}" for k, v in match["mdlm"].items())
        raise ConfigError(
            f"the MDLM ({have}) is not size-matched to the LADD runs ({dims}): train one with "
            f"`{train}`, or compare anyway with --allow-unmatched"
        )


def method(row: dict) -> str:
    """A table row's method: the run's label, and a LADD row's inference."""
    return row["run"] + (f", {row['inference']}" if "inference" in row else "")


def iso_tables(rows: list[dict], budgets: list[float]) -> dict[str, list[dict]]:
    """metric -> [{"method", "values": value at each budget or None}] for every metric in
    METRICS that the rows carry (module docstring, 3)."""
    tables: dict[str, list[dict]] = {}
    for metric in METRICS:
        by_method: dict[str, dict[float, list[float]]] = {}
        for r in rows:
            if r.get(metric) is None or r.get("gflops_per_sample") is None:
                continue
            at = by_method.setdefault(method(r), {})
            at.setdefault(float(r["gflops_per_sample"]), []).append(float(r[metric]))
        if by_method:
            tables[metric] = [
                {
                    "method": name,
                    "values": interpolate_at_budget(
                        [(g, sum(v) / len(v)) for g, v in at.items()], budgets
                    ),
                }
                for name, at in by_method.items()
            ]
    return tables


def markdown_tables(tables: dict[str, list[dict]], budgets: list[float]) -> str:
    """One Markdown table per metric: a row per method, a column per budget (n/a outside the
    method's measured range)."""
    parts = []
    head = "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |"
    rule = "|---|" + "---|" * len(budgets)
    for metric, rows in tables.items():
        lines = [f"{metric} at fixed backbone GFLOPs per sample (linear interpolation)", ""]
        lines += [head, rule]
        for r in rows:
            cells = ["n/a" if v is None else f"{v:.4g}" for v in r["values"]]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def sweep_plan(
    ladd_runs: list[Path], mdlm_run: Path, disc_steps: list[int], inferences, cont_steps: int
) -> tuple[list[tuple[Path, list[dict]]], list[dict]]:
    """[(run, sweep points)], MDLM first, and the (run, inference) pairs skipped because the run
    was not trained for that inference."""
    plan = [(Path(mdlm_run), [{"disc_steps": n} for n in disc_steps])]
    skipped = []
    for run in ladd_runs:
        trained = STAGES[run_kind(run)].trained_inferences(Config.load(Path(run) / "config.json"))
        points = []
        for inference in inferences:
            if inference not in trained:
                skipped.append({"run": str(run), "inference": inference, "trained": trained})
                continue
            extra = {"cont_steps": cont_steps} if inference == "sequential" and cont_steps else {}
            points += [{"inference": inference, "disc_steps": n, **extra} for n in disc_steps]
        plan.append((Path(run), points))
    return plan, skipped


def compare_compute(
    ladd_runs: list[Path],
    mdlm_run: Path | None,
    disc_steps: list[int],
    out_dir: Path,
    budgets: list[float] = (),
    inferences: tuple[str, ...] = ("joint", "sequential"),
    cont_steps: int = 0,
    num_samples: int = 64,
    scorer: str = "gpt2-large",
    reference: str | None = None,
    device="cpu",
    seed: int = 0,
    batch_size: int = 16,
    allow_unmatched: bool = False,
) -> dict:
    """The iso-compute comparison (module docstring); returns what OUT/compute.json holds."""
    if not disc_steps:
        raise ConfigError("compare-compute needs at least one N_disc (--disc-steps)")
    match = size_match(ladd_runs, mdlm_run)
    check_matched(match, ladd_runs, allow_unmatched)
    plan, skipped = sweep_plan(ladd_runs, mdlm_run, disc_steps, inferences, cont_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = frontier.run_names([run for run, _ in plan])
    rows: list[dict] = []
    for (run, points), name in zip(plan, names, strict=True):
        if points:
            args = (num_samples, scorer, reference, out_dir, device, seed, batch_size)
            rows += frontier.sweep_run(run, points, *args, None, name)
    budgets = list(budgets) or doubling_budgets(r.get("gflops_per_sample", 0) for r in rows)
    tables = iso_tables(rows, budgets)
    result = {
        "device": device_record(device),
        "num_samples": num_samples,
        "seed": seed,
        "size_match": match,
        "allow_unmatched": allow_unmatched,
        "skipped": skipped,
        "budgets": budgets,
        "tables": tables,
        "points": rows,
    }
    (out_dir / "compute.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "compute.md").write_text(markdown_tables(tables, budgets))
    if rows:
        labelled = {**result, "points": [{**r, "run": method(r)} for r in rows]}
        frontier.plot_frontier(labelled, out_dir / "compute.png", x="gflops_per_sample")
    return result
