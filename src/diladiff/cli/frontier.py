"""`diladiff frontier` and `diladiff compare-compute`: sample and evaluate runs over a sweep
of step counts."""

from __future__ import annotations

from pathlib import Path

from diladiff.cli.options import non_negative, number_list, positive, sweep_options
from diladiff.config import ConfigError


def add_parser(sub) -> None:
    add_frontier_parser(sub)
    add_compare_compute_parser(sub)


def add_frontier_parser(sub) -> None:
    p = sub.add_parser("frontier", help="sweep N_disc (and temperature), evaluate, plot")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--disc-steps", default="4,8,16,32,64")
    p.add_argument("--cont-steps", default="", help="latent runs: N_cont values, e.g. 5,50,200")
    p.add_argument("--temperatures", default="", help="e.g. 0.7,0.8,0.9,1.0 (empty: no sweep)")
    p.add_argument("--temperature-steps", type=positive, help="N_disc of the temperature sweep")
    sweep_options(p, "the first run's held-out split")
    p.set_defaults(handler=cmd_frontier)


def add_compare_compute_parser(sub) -> None:
    p = sub.add_parser(
        "compare-compute",
        help="LADD runs vs a size-matched MDLM at equal backbone GFLOPs (the LADD paper's "
        "Table 2): sweep N_disc, evaluate, interpolate at fixed budgets",
    )
    p.add_argument("ladd_runs", type=Path, nargs="+", help="Co-LADD / Di-LADD runs")
    p.add_argument(
        "--mdlm",
        type=Path,
        help="the size-matched MDLM run (without it, the command names the one to train)",
    )
    p.add_argument(
        "--budgets",
        default="",
        help="GFLOPs per sample, e.g. 50,100,200,400 (default: 2^k over the measured range)",
    )
    p.add_argument("--disc-steps", default="1,2,4,8,16,32,64,128", help="N_disc sweep")
    p.add_argument(
        "--inferences",
        default="joint,sequential",
        help="LADD inferences (a run not trained for one skips it)",
    )
    p.add_argument(
        "--cont-steps",
        type=non_negative,
        default=0,
        help="N_y of sequential inference (default 0: each run's ladd.latent_steps)",
    )
    p.add_argument(
        "--allow-unmatched",
        action="store_true",
        help="compare with an MDLM that is not size-matched (the result records it)",
    )
    sweep_options(p, "the MDLM run's held-out split")
    p.set_defaults(handler=cmd_compare_compute)


def cmd_frontier(args) -> int:
    from diladiff.eval.bench import format_table
    from diladiff.eval.frontier import frontier
    from diladiff.train.distributed import pick_device

    reference = None if args.no_mauve else (args.reference or str(args.run_dirs[0]))
    temps = number_list(args.temperatures, "--temperatures", float)
    res = frontier(
        args.run_dirs,
        number_list(args.disc_steps, "--disc-steps", minimum=0),
        args.num_samples,
        args.scorer,
        args.out,
        reference,
        temps,
        args.temperature_steps,
        pick_device(args.device),
        args.seed,
        args.batch_size,
        cont_steps=number_list(args.cont_steps, "--cont-steps", minimum=1),
    )
    cols = ["run", "cont_steps", "disc_steps", "tokens_per_s", "gen_ppl", "entropy", "mauve"]
    print(format_table(res["points"], [c for c in cols if c in res["points"][0]]))
    print(
        f"wrote {args.out / 'frontier.json'} and {args.out / 'frontier.png'}"
        + (f" and {args.out / 'temperature.png'}" if temps else "")
    )
    return 0


def cmd_compare_compute(args) -> int:
    from diladiff.eval.iso_compute import compare_compute, markdown_tables
    from diladiff.methods.ladd.sampler import INFERENCES
    from diladiff.train.distributed import pick_device

    inferences = tuple(i.strip() for i in args.inferences.split(",") if i.strip())
    unknown = [i for i in inferences if i not in INFERENCES]
    if unknown or not inferences:
        raise ConfigError(f"--inferences takes {','.join(INFERENCES)}, got {args.inferences!r}")
    mauve_ref = args.reference or (str(args.mdlm) if args.mdlm else None)
    res = compare_compute(
        args.ladd_runs,
        args.mdlm,
        number_list(args.disc_steps, "--disc-steps", minimum=1),
        args.out,
        number_list(args.budgets, "--budgets", float, minimum=0.0),
        inferences,
        args.cont_steps,
        args.num_samples,
        args.scorer,
        None if args.no_mauve else mauve_ref,
        pick_device(args.device),
        args.seed,
        args.batch_size,
        args.allow_unmatched,
    )
    m = res["size_match"]
    state = "size-matched" if m["matched"] else "NOT size-matched (--allow-unmatched)"
    print(f"MDLM {m['mdlm']}: {state} (wanted {next(iter(m['wanted'].values()))})")
    for s in res["skipped"]:
        print(f"skipped: {s['run']} {s['inference']} (trained for {', '.join(s['trained'])})")
    print(markdown_tables(res["tables"], res["budgets"]), end="")
    print(f"wrote {args.out / 'compute.json'}, {args.out / 'compute.md'}")
    return 0
