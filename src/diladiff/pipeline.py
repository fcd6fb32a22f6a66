"""`diladiff pipeline`: raw text -> every registered stage in parent order (MDLM ->
auto-encoder -> LaDiff -> DiLaDiff, and any plugin), then one evaluation of every generator
under the fixed protocol, the speed benchmark, the frontier sweep and DIR/report.md.

    DIR/<stage>  one run folder per stage (each resumable; parents from the stage's `parents`)
    DIR/eval/*.json  DIR/eval/samples/  DIR/frontier/  DIR/report.md

What runs is derived from the stage registry (stages/base.py): the order from the parents, the
evaluation rows from each stage's `eval_samplers` (MDLM; LaDiff N_cont 200 and 5; DiLaDiff
N_cont 5 at gamma 0 and 0.2), each at N_disc = L/8 and L, GenPPL with its bootstrap interval.
When a latent stage with a frozen auto-encoder is present: two controls on the auto-encoder
(eval/oracle.py), the oracle (decoder given the encoder latent of a held-out row) and the noise
latent (z ~ N(0, I)), and DIR/eval/latent.json, the latent-prior diagnostics
(eval/latent_diag.py). A stage with "recon" in its `reports` gets the reconstruction report.
The evaluation rows, the diagnostics and the frontier share one LatentCache
(eval/latent_cache.py): each (run, N_cont, gamma) draws its prior samples once (seed 0) and
decodes them at every N_disc and temperature (seed 1); the speed benchmark samples for real.

A stage whose folder holds a COMPLETE marker is skipped; an interrupted stage resumes from its
last checkpoint. With --budget-minutes, each stage gets its `budget_share` of the budget as a
time limit (it stops, checkpoints and counts as complete when its share is spent).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from diladiff.stages import STAGES, LatentStage, MaskedDiffusionStage, stage_order
from diladiff.stages.latent import decodes_directly


@dataclass
class EvalPlan:
    """What the pipeline measures, per preset."""

    scorer: str
    num_samples: int
    batch_size: int
    frontier_disc: tuple[int, ...]
    bench_batches: tuple[int, ...]
    bench_repeats: int
    temperatures: tuple[float, ...] = (0.7, 0.85, 1.0)
    frontier_mauve: bool = True
    # Benchmark at N_disc = L / k for each k.
    bench_disc_divisors: tuple[int, ...] = (8, 1)
    # Latent-prior diagnostics: prior samples (= held-out rows compared) and training rows of
    # the nearest-neighbour reference set.
    latent_samples: int = 256
    latent_train_rows: int = 1024
    # Per stage kind, evaluation samplers replacing the stage's own `eval_samplers`.
    eval_samplers: dict[str, tuple[dict, ...]] = field(default_factory=dict)
    # The evaluation grid: N_disc values (0 = L; empty = L/8 and L) and unmasking strategies
    # (empty = each run's own sample.strategy, names untagged; else every row at each strategy,
    # its name tagged, e.g. mdlm_topk_disc8).
    disc_steps: tuple[int, ...] = ()
    strategies: tuple[str, ...] = ()
    # N_disc values (0 = L) whose rows are scored by the causal-LM scorer (GenPPL, MAUVE);
    # None = every row. The word metrics (eval/ngram.py) score every row.
    scored_disc: tuple[int, ...] | None = None
    frontier: bool = True
    # Write the real-text evidence table (eval/evidence.py) into DIR/eval and the report.
    evidence: bool = False

    def samplers(self, kind: str) -> tuple[dict, ...]:
        return self.eval_samplers.get(kind, STAGES[kind].eval_samplers)

    def disc_grid(self, seq_len: int) -> list[int]:
        return [n or seq_len for n in self.disc_steps] or [seq_len // 8, seq_len]

    def strategy_grid(self) -> list[dict]:
        """Sampler additions per strategy ({} = the run's own, untagged)."""
        return [{"strategy": s} for s in self.strategies] or [{}]

    def scorer_at(self, n_disc: int, seq_len: int) -> str:
        """The scorer for a row at N_disc = n_disc ("" = word metrics only)."""
        if self.scored_disc is None or n_disc in [n or seq_len for n in self.scored_disc]:
            return self.scorer
        return ""


EVAL_PLANS = {
    # tiny: MAUVE only on the main table (32 samples); the frontier reports GenPPL alone.
    # tiny: 32 prior samples for the latent diagnostics (the 200-step Euler row alone takes
    # about 20 s on one CPU core); at that n a Fréchet distance is mostly estimator bias: read
    # it against its floor row.
    "tiny": EvalPlan(
        "smollm2-135m", 32, 16, (4, 16, 64), (1, 8, 32), 1, (0.7, 1.0), False, (8,), 32, 256
    ),
    "small": EvalPlan("smollm2-135m", 256, 64, (8, 16, 32, 64, 128), (1, 8, 32), 3),
    # cpu: the real-text evidence (issue 26): 256 samples per row (GenPPL +-6%), N_disc 1, 2, 4,
    # 8 and L, top-k and ancestral, LaDiff-200 and DiLaDiff-5 against the MDLM with the three
    # latent controls; SmolLM2 GenPPL kept at L/8 and L (the word metrics everywhere).
    "cpu": EvalPlan(
        "smollm2-135m",
        256,
        64,
        (8, 64),
        (1, 8, 64),
        1,
        (1.0,),
        False,
        (8,),
        256,
        1024,
        eval_samplers={
            "ladiff": ({"cont_steps": 200},),
            "diladiff": ({"cont_steps": 5, "gamma": 0.0},),
        },
        disc_steps=(1, 2, 4, 8, 0),
        strategies=("topk", "ancestral"),
        scored_disc=(8, 0),
        frontier=False,
        evidence=True,
    ),
    "paper": EvalPlan("gpt2-large", 5000, 128, (8, 16, 32, 64, 128), (1, 8, 32), 3),
}


def _complete(run: Path) -> bool:
    return (run / "COMPLETE").is_file()


def train_stages(
    root: Path,
    preset: str,
    overrides: list[str],
    budget_minutes: float = 0.0,
    stage_overrides: dict[str, list[str]] | None = None,
    kinds: list[str] | None = None,
) -> dict:
    """Train every registered stage (or `kinds` and their ancestors) in DIR/<kind>, parents
    first, each run's parents being the sibling folders of its parent kinds."""
    from diladiff.runs import train_run

    results = {}
    for kind in stage_order(kinds):
        run = root / kind
        if _complete(run):
            print(f"[pipeline] {kind}: complete, skipped ({run})")
            continue
        cls = STAGES[kind]
        extra = list(overrides) + list((stage_overrides or {}).get(kind, []))
        if budget_minutes > 0:
            extra.append(f"train.time_limit_minutes={budget_minutes * cls.budget_share:.3f}")
        parents = {role: root / parent for role, parent in cls.parents.items()}
        print(f"[pipeline] {kind}: training in {run}")
        start = time.perf_counter()
        results[kind] = train_run(kind, run, preset, extra, parents)
        (run / "COMPLETE").write_text(
            json.dumps({**results[kind], "seconds": time.perf_counter() - start}) + "\n"
        )
    return results


def trained_kinds(root: Path) -> list[str]:
    """The registered stages with a run folder under `root`, in parent order."""
    return [k for k in stage_order(optional=True) if (Path(root) / k / "run.json").is_file()]


def generators(root: Path) -> list[str]:
    """Trained stages that generate text (a non-empty `eval_samplers`)."""
    return [k for k in trained_kinds(root) if STAGES[k].eval_samplers]


def control_stage(root: Path) -> str | None:
    """The first trained latent stage with a frozen auto-encoder (the controls run on it)."""
    for kind in trained_kinds(root):
        cls = STAGES[kind]
        if issubclass(cls, LatentStage) and cls.frozen_autoencoder:
            return kind
    return None


def row_name(kind: str, sampler: dict, n_disc: int | None) -> str:
    """An evaluation row's name, e.g. ladiff_cont200_disc64, diladiff_cont5_gamma0.2_disc8,
    duo_greedy_tail_disc64; ldlm_cont32 (n_disc None: a stage decoding in one call)."""
    cont, gamma = sampler.get("cont_steps", 0), sampler.get("gamma", 0.0)
    tag = f"_{sampler['strategy']}" if "strategy" in sampler else ""
    tag += f"_{sampler['inference']}" if "inference" in sampler else ""
    tag += f"_cont{cont}" if cont else ""
    tag += f"_gamma{gamma:g}" if gamma else ""
    return f"{kind}{tag}" + ("" if n_disc is None else f"_disc{n_disc}")


def plan_for(preset: str) -> EvalPlan:
    return EVAL_PLANS[preset.removesuffix("-4x")]


def _score(
    root: Path, plan: EvalPlan, device, name: str, gen, meta: dict, L: int, extra=None, scorer=None
):
    """Write the samples and their protocol evaluation (DIR/eval/NAME.json); print one line.
    `scorer`: the causal-LM scorer's name (default the plan's; "" = word metrics only)."""
    from diladiff.eval.evaluate import evaluate_samples
    from diladiff.eval.protocol import write_result
    from diladiff.sampling.generate import write_samples

    out = root / "eval"
    meta = {**meta, "seconds": gen.seconds, **gen.stats}
    write_samples(out / "samples" / f"{name}.jsonl", gen, meta)
    result = evaluate_samples(
        gen.ids,
        gen.texts,
        plan.scorer if scorer is None else scorer,
        str(root / trained_kinds(root)[0]),  # MAUVE: the held-out split every stage shares
        device,
        generator_meta=meta,
        batch_size=plan.batch_size,
    )
    result["metrics"]["tokens_per_s"] = len(gen.ids) * L / gen.seconds
    result["metrics"] |= extra or {}
    write_result(out / f"{name}.json", result)
    m = result["metrics"]
    line = f"[pipeline] eval {name}:"
    if "gen_ppl" in m:
        lo, hi = m["gen_ppl_ci95"]
        line += f" gen_ppl={m['gen_ppl']:.1f} [{lo:.1f}, {hi:.1f}]"
        line += f" mauve={m.get('mauve', float('nan')):.3f}"
    if "ngram_ppl" in m:
        line += f" ngram_ppl={m['ngram_ppl']:.1f}"
    if "token_recovery" in m:
        line += f" recovery={m['token_recovery']:.3f}"
    print(line)
    return out / f"{name}.json"


def evaluate_all(root: Path, plan: EvalPlan, device, cache=None) -> list[Path]:
    """Samples and protocol evaluation of every generator's evaluation samplers, then the
    oracle and noise-latent controls, at N_disc = L/8 and L. The latent stages draw their prior
    samples once per (run, N_cont, gamma) through `cache` (a LatentCache,
    eval/latent_cache.py: latents from seed 0, decoding from seed 1) and decode them at both
    N_disc."""
    from diladiff.eval.latent_cache import LatentCache, generate_from_cache, rng_meta
    from diladiff.eval.oracle import (
        CONTROLS,
        control_latents,
        decode_latents,
        oracle_rows,
        token_recovery,
    )
    from diladiff.runs import load_run
    from diladiff.sampling.generate import generate, sampler_settings

    cache = LatentCache() if cache is None else cache
    paths = []
    L = None
    for kind in generators(root):
        stage, tok = load_run(root / kind, device=device)
        L = stage.seq_len
        # A stage that decodes its latent in one call (LDLM) has no N_disc axis: one row.
        direct = decodes_directly(stage)
        grid = [{}] if direct else plan.strategy_grid()
        for sampler in (
            {**strategy, **sampler} for strategy in grid for sampler in plan.samplers(kind)
        ):
            for n_disc in (L,) if direct else plan.disc_grid(L):
                sc = replace(
                    stage.cfg.sample,
                    num_samples=plan.num_samples,
                    batch_size=plan.batch_size,
                    seed=0,
                    disc_steps=n_disc,
                    **sampler,
                )
                name = row_name(kind, sampler, None if direct else n_disc)
                meta = {"run": str(root / kind), "stage": kind, **vars(sc)}
                if isinstance(stage, LatentStage):
                    gen = generate_from_cache(stage, tok, sc, cache, str(root / kind), device)
                    meta |= rng_meta(sc.seed)
                else:
                    gen = generate(stage, tok, sc, device, progress=False)
                scorer = plan.scorer_at(n_disc, L)
                paths.append(_score(root, plan, device, name, gen, meta, L, scorer=scorer))

    control = control_stage(root)
    if control is None:
        return paths
    # Controls on the auto-encoder (through the latent stage's frozen copy of it).
    stage, tok = load_run(root / control, device=device)
    ae_run = next(iter(STAGES[control].parents.values()), control)  # its auto-encoder's run
    rows, rows_meta = oracle_rows(stage, tok, plan.num_samples)
    latents = control_latents(stage, rows, 0, plan.batch_size, device)
    for strategy, n_disc in ((s, n) for s in plan.strategy_grid() for n in plan.disc_grid(L)):
        sc = replace(stage.cfg.sample, **strategy)
        sc.num_samples, sc.batch_size, sc.seed = plan.num_samples, plan.batch_size, 0
        sc.disc_steps, sc.cont_steps = n_disc, 0
        tag = f"_{strategy['strategy']}" if strategy else ""
        for control in CONTROLS:
            gen = decode_latents(
                stage, tok, latents[control], sampler_settings(sc, L), 0, plan.batch_size, device
            )
            meta = {
                "run": str(root / ae_run),
                "stage": control,
                "latent": "encoder latent of the held-out row"
                if control == "oracle"
                else "z ~ N(0, I) (torch CPU generator, seed 0)",
                **rows_meta,
                **vars(sc),
            }
            recovery = {"token_recovery": token_recovery(gen.ids, rows)}
            name = f"{control}{tag}_disc{n_disc}"
            scorer = plan.scorer_at(n_disc, L)
            paths.append(_score(root, plan, device, name, gen, meta, L, recovery, scorer))
    return paths


def latent_all(root: Path, plan: EvalPlan, device, cache=None) -> Path | None:
    """Latent-prior diagnostics of the latent generators (DIR/eval/latent.json); the
    encoder reference latents are reused for DiLaDiff when it maps rows to the same latents,
    the prior samples (seed 0) taken from `cache` when evaluate_all drew them already."""
    from diladiff.eval.latent_cache import LatentCache
    from diladiff.eval.latent_diag import (
        latent_diagnostics,
        latent_result,
        latent_samplers,
        reference_latents,
        same_latent_space,
    )
    from diladiff.eval.protocol import write_result
    from diladiff.runs import load_run

    cache = LatentCache() if cache is None else cache
    kinds = [k for k in generators(root) if issubclass(STAGES[k], LatentStage)]
    if not kinds:
        return None
    refs, rows = None, []
    for kind in kinds:
        stage, tok = load_run(root / kind, device=device)
        if refs is None or not same_latent_space(stage, refs, device):
            refs = reference_latents(
                stage, tok, plan.latent_samples, plan.latent_train_rows, 0, device, plan.batch_size
            )
        samplers = latent_samplers(plan.samplers(kind))
        for row in latent_diagnostics(
            stage, refs, samplers, 0, plan.batch_size, device, cache, str(root / kind)
        ):
            if not any(r["sampler"] == row["sampler"] for r in rows):  # shared reference rows
                rows.append(row)
    result = latent_result(stage, root, refs, rows, 0, device)
    result["generator"] = {"runs": [str(root / k) for k in kinds]}
    write_result(root / "eval" / "latent.json", result)
    for row in rows:
        print(
            f"[pipeline] latent {row['sampler']}: frechet={row.get('frechet', float('nan')):.3g} "
            f"nn_ratio={row['nn_ratio']:.3f} sq_norm={row['sq_norm']:.3f}"
        )
    return root / "eval" / "latent.json"


def bench_all(root: Path, plan: EvalPlan, device) -> list[dict]:
    """Sampling speed of every generator at its first evaluation sampler."""
    from diladiff.eval.bench import bench_sampling
    from diladiff.runs import load_run
    from diladiff.sampling.generate import generation_settings

    rows = []
    for kind in generators(root):
        stage, _ = load_run(root / kind, device=device)
        sampler = plan.samplers(kind)[0]
        for n_disc in (stage.seq_len // k for k in plan.bench_disc_divisors):
            sc = replace(stage.cfg.sample, disc_steps=n_disc, **sampler)
            for row in bench_sampling(
                stage,
                generation_settings(sc, stage),
                plan.bench_batches,
                plan.bench_repeats,
                device,
            ):
                cont = sampler.get("cont_steps", "")
                rows.append({"stage": kind, "N_cont": cont, "N_disc": n_disc, **row})
    (root / "eval").mkdir(exist_ok=True)
    (root / "eval" / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def bound_vs_unigram(run: Path) -> dict | None:
    """A masked-diffusion run's last held-out bound (log.jsonl's val_nll_bound, nats/token)
    beside the add-one unigram model of its training rows on the same held-out rows (the
    first eval_batches x batch rows, as the trainer's validation; eval/unigram.py)."""
    from diladiff.config import Config
    from diladiff.data.packing import prepare_data
    from diladiff.eval.unigram import unigram_bound
    from diladiff.runs import run_tokenizer

    log = run / "log.jsonl"
    records = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    evals = [r for r in records if "val_nll_bound" in r]
    if not evals:
        return None
    cfg = Config.load(run / "config.json")
    tok = run_tokenizer(run)
    data = prepare_data(cfg.data, tok, progress=False)
    n = (cfg.train.micro_batch_size or cfg.train.batch_size) * cfg.train.eval_batches
    held = data.val[: n or len(data.val)]
    uni = unigram_bound(data.train, held, len(tok))
    bound = evals[-1]["val_nll_bound"]
    return {
        "run": str(run),
        "step": evals[-1]["step"],
        "bound": bound,
        "unigram": uni,
        "below_unigram": uni - bound,
        "heldout_tokens": int(held.size),
    }


def write_evidence(root: Path, plan: EvalPlan) -> Path:
    """DIR/eval/evidence.json and .md (eval/evidence.py) from the evaluation's result files."""
    from diladiff.config import Config
    from diladiff.eval.evidence import evidence, evidence_markdown

    if not plan.strategies:
        raise ValueError("the evidence table needs the plan's strategies (tagged row names)")
    seq_len = Config.load(root / trained_kinds(root)[0] / "config.json").data.seq_len
    ev = evidence(root / "eval", list(plan.strategies), plan.disc_grid(seq_len), seq_len)
    (root / "eval" / "evidence.json").write_text(json.dumps(ev, indent=2) + "\n")
    (root / "eval" / "evidence.md").write_text(evidence_markdown(ev))
    print(f"[pipeline] evidence: {ev['diagnosis']}; {root / 'eval' / 'evidence.md'}")
    return root / "eval" / "evidence.md"


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
        f"{plan.num_samples} (seed 0). MAUVE reference: held-out split of the first run's "
        f"data. Latent stages: prior samples drawn once per (run, N_cont, gamma) from seed 0 "
        "and decoded at every N_disc and temperature from seed 1 (latent_s: the time of that "
        f"draw). Regenerate: `diladiff pipeline --preset {preset} --run-dir {root}`.",
        "",
    ]
    first = trained_kinds(root)[0]
    if issubclass(STAGES[first], MaskedDiffusionStage):
        b = bound_vs_unigram(root / first)
        if b is not None:
            lines += [
                f"Held-out bound of `{first}` at step {b['step']}: {b['bound']:.3f} nats/token "
                f"(perplexity {math.exp(b['bound']):,.0f}); the add-one unigram model of its "
                f"training rows on the same {b['heldout_tokens']:,} held-out tokens: "
                f"{b['unigram']:.3f} ({math.exp(b['unigram']):,.0f}); "
                f"{abs(b['below_unigram']):.3f} nats/token "
                f"{'below' if b['below_unigram'] >= 0 else 'above'} it.",
                "",
            ]
    evidence_md = root / "eval" / "evidence.md"
    if plan.evidence and evidence_md.is_file():
        lines += [evidence_md.read_text(), ""]
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
    latent = root / "eval" / "latent.json"
    if latent.is_file():
        from diladiff.eval.latent_diag import TABLE_COLUMNS

        res = read_result(latent)
        p = res["protocol"]
        lines += [
            "## Latent prior diagnostics (prior space)",
            "",
            f"{p['num_samples']} prior samples per sampler (seed {p['sample_seed']}) against "
            f"the encoder latents of the held-out rows {p['heldout_rows']}; nearest neighbours "
            f"among {p['train_reference_rows']} training latents. Fréchet distance per latent "
            "vector, averaged; its floor is the `encoder train (floor)` row (n training "
            "latents against the same held-out ones). nn_ratio: mean nearest-neighbour "
            "distance to training latents over the held-out latents' (below the floor row's: "
            "copying). sq_norm: E||z||^2 per coordinate (1 for the prior's data).",
            "",
            format_table(res["metrics"]["rows"], TABLE_COLUMNS),
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
    pngs = ["frontier/frontier.png", "frontier/temperature.png"]
    pngs += [f"{kind}/recon.png" for kind in trained_kinds(root)]
    for png in pngs:
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
    kinds: list[str] | None = None,
) -> Path:
    """Train `kinds` (default: every registered stage) and their ancestors under `root`,
    then evaluate, benchmark, sweep the frontier and write root/report.md."""
    from diladiff.eval.frontier import frontier
    from diladiff.eval.latent_cache import LatentCache
    from diladiff.eval.protocol import device_record, write_result
    from diladiff.eval.recon_report import plot_recon, recon_report
    from diladiff.train.distributed import pick_device

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train_stages(root, preset, list(overrides or []), budget_minutes, stage_overrides, kinds)
    device = pick_device(device_spec)
    plan = plan or plan_for(preset)
    for kind in trained_kinds(root):
        if "recon" in STAGES[kind].reports:
            print(f"[pipeline] reconstruction: {kind} vs its parent")
            rec = recon_report(root / kind, sequences=16, mc_samples=32, device=device)
            plot_recon(rec, root / kind / "recon.png", f"{kind} vs its parent (held-out)")
            result = {"metrics": rec, "device": device_record(device)}
            write_result(root / "eval" / "recon.json", result)
    # Prior samples drawn once and decoded at every N_disc / temperature by the evaluation,
    # the latent diagnostics and the frontier (not by the speed benchmark, which times them).
    cache = LatentCache()
    print("[pipeline] evaluation")
    results = evaluate_all(root, plan, device, cache)
    print("[pipeline] latent-prior diagnostics")
    latent_all(root, plan, device, cache)
    print("[pipeline] speed benchmark")
    bench = bench_all(root, plan, device)
    if plan.frontier:
        print("[pipeline] frontier")
        frontier(
            [root / kind for kind in generators(root)],
            list(plan.frontier_disc),
            plan.num_samples // 2,
            plan.scorer,
            root / "frontier",
            str(root / trained_kinds(root)[0]) if plan.frontier_mauve else None,
            temperatures=list(plan.temperatures),
            device=device,
            batch_size=plan.batch_size,
            latent_cache=cache,
        )
    print(f"[pipeline] latent draws (batches drawn, benchmark excluded): {cache.draws}")
    if plan.evidence:
        write_evidence(root, plan)
    report = write_report(root, preset, plan, results, bench, device)
    print(f"[pipeline] report: {report}")
    return report
