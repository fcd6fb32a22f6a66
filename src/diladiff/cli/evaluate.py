"""`diladiff eval`, `eval-recon`, `eval-ppl` and `eval-latent`: metrics of samples files and
of runs on held-out data."""

from __future__ import annotations

import sys
from pathlib import Path

from diladiff.cli.options import load_run, number_list, positive
from diladiff.config import ConfigError


def add_parser(sub) -> None:
    add_eval_parser(sub)
    add_eval_recon_parser(sub)
    add_eval_ppl_parser(sub)
    add_eval_latent_parser(sub)


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="GenPPL, entropy, diversity and MAUVE of a samples file")
    p.add_argument("samples", type=Path, help="JSONL with 'text' (and 'ids') per line")
    p.add_argument("--scorer", default="gpt2-large", help="causal LM name/path or smollm2-135m")
    p.add_argument("--reference", help="run folder (its held-out split) or JSONL for MAUVE")
    p.add_argument("--mauve-seed", type=int, default=25)
    p.add_argument("--batch-size", type=positive, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="write the result (metrics + protocol) here")
    p.set_defaults(handler=cmd_eval)


def add_eval_recon_parser(sub) -> None:
    p = sub.add_parser("eval-recon", help="perplexity bound and token recovery on held-out data")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--sequences", type=positive, default=64, help="held-out sequences")
    p.add_argument("--mc-samples", type=positive, default=128, help="Monte Carlo draws / sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--json", type=Path)
    p.add_argument("--png", type=Path, help="curve plot (default RUN/recon.png)")
    p.set_defaults(handler=cmd_eval_recon)


def add_eval_ppl_parser(sub) -> None:
    p = sub.add_parser(
        "eval-ppl",
        help="perplexity bound on any corpus: MDLM, auto-encoder (conditional), LaDiff, "
        "LADD (its token channel given the text's own latent: conditional)",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", help="data.source of the rows (default: the run's own held-out)")
    p.add_argument("--heldout-docs", type=positive, help="documents held out of --data")
    p.add_argument("--sequences", "--num-sequences", type=positive, default=64, help="rows")
    p.add_argument(
        "--mc-samples", "--samples", type=positive, default=32, help="Monte Carlo draws / row"
    )
    p.add_argument("--probes", type=positive, default=1, help="LaDiff: Hutchinson probes")
    p.add_argument(
        "--t0",
        help="LaDiff: times of q(z | x) to try, the tightest reported "
        "(default: diffusion.t_eps,0.01,0.1,0.4,0.8)",
    )
    p.add_argument("--rtol", type=float, default=1e-4, help="LaDiff: RK45 relative tolerance")
    p.add_argument("--atol", type=float, default=1e-4, help="LaDiff: RK45 absolute tolerance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--json", type=Path)
    p.set_defaults(handler=cmd_eval_ppl)


def add_eval_latent_parser(sub) -> None:
    p = sub.add_parser("eval-latent", help="latent-prior diagnostics of a LaDiff/DiLaDiff run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--num-samples", type=positive, default=256, help="prior samples, held-out rows")
    p.add_argument("--train-rows", type=positive, default=1024, help="nearest-neighbour reference")
    p.add_argument("--cont-steps", default="", help="N_cont list (default ladiff 200,5; dila. 5)")
    p.add_argument("--gamma", default="", help="diladiff gamma list (default 0 and the run's)")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--json", type=Path)
    p.set_defaults(handler=cmd_eval_latent)


def cmd_eval(args) -> int:
    from diladiff.eval.bench import format_table
    from diladiff.eval.evaluate import evaluate_samples, read_samples
    from diladiff.eval.protocol import write_result
    from diladiff.train.distributed import pick_device

    ids, texts, meta = read_samples(args.samples)
    if not args.reference:
        print("note: no --reference given, MAUVE is not computed", file=sys.stderr)
    result = evaluate_samples(
        ids,
        texts,
        args.scorer,
        args.reference,
        pick_device(args.device),
        args.mauve_seed,
        args.batch_size,
        meta,
    )
    result["samples_file"] = str(args.samples)
    m = result["metrics"]
    print(format_table([{k: v for k, v in m.items() if not isinstance(v, list)}]))
    lo, hi = m["gen_ppl_ci95"]
    print(f"gen_ppl {m['gen_ppl']:.4g}, 95% bootstrap interval [{lo:.4g}, {hi:.4g}]")
    p = result["protocol"]
    print(
        f"protocol {p['version']}: scorer={p['scorer']}, boundary={p['boundary_token']!r}, "
        f"samples={p['num_samples']}, device={result['device']}"
    )
    if args.json:
        write_result(args.json, result)
    return 0


def cmd_eval_recon(args) -> int:
    from diladiff.eval.protocol import device_record, write_result
    from diladiff.eval.recon_report import plot_recon, recon_report
    from diladiff.train.distributed import pick_device

    device = pick_device(args.device)
    rep = recon_report(
        args.run_dir, args.sequences, args.mc_samples, args.seed, device, weights=args.weights
    )
    print_recon_report(args, rep)
    png = args.png or args.run_dir / "recon.png"
    plot_recon(
        rep,
        png,
        f"Reconstruction on held-out data ({args.sequences} sequences x "
        f"{args.mc_samples} draws, {device_record(device)})",
    )
    print(f"\nwrote {png}")
    if args.json:
        write_result(args.json, recon_result(args, rep, device_record(device)))
    return 0


def print_recon_report(args, rep: dict) -> None:
    """eval-recon's tables: the bound and recovery per run, per masking ratio, the recovery
    from all-masked rows and the latent robustness."""
    from diladiff.eval.bench import format_table

    print(
        f"held-out sequences: {args.sequences}, Monte Carlo draws each: {args.mc_samples}, "
        f"seed {args.seed}, estimator: mask exactly l ~ U{{1..L}}, weight L/l"
    )
    columns = ("ppl_bound", "nll_bound", "recovery")
    print(format_table([{"run": k, **{c: v[c] for c in columns}} for k, v in rep["runs"].items()]))
    for name, res in rep["runs"].items():
        print(f"\nper masking ratio: {name}")
        print(format_table(res["per_ratio"]))
    if "full_mask_recovery" in rep:
        r = rep["full_mask_recovery"]
        print(
            "\nargmax recovery from all-masked rows given the row's own latent / the next row's "
            f"/ N(0, I): {r['own']:.3f} / {r['other_row']:.3f} / {r['noise']:.3f}"
        )
    if rep["robustness"]:
        print("\nlatent robustness (recovery with Gaussian noise added to the latent)")
        print(format_table(rep["robustness"]))


def recon_result(args, rep: dict, device: dict) -> dict:
    """eval-recon's result file: the estimator's protocol, the report, the run, the device."""
    return {
        "protocol": {
            "estimator": "discrete-ratio (mask exactly l ~ U{1..L}, weight L/l)",
            "seed": args.seed,
            "sequences": args.sequences,
            "mc_samples": args.mc_samples,
        },
        "metrics": rep,
        "generator": {"run": str(args.run_dir)},
        "device": device,
    }


def cmd_eval_ppl(args) -> int:
    from diladiff.eval.ppl import eval_ppl
    from diladiff.eval.protocol import write_result
    from diladiff.train.distributed import pick_device

    device = pick_device(args.device)
    kw = dict(heldout_docs=args.heldout_docs, probes=args.probes, weights=args.weights)
    kw.update(rtol=args.rtol, atol=args.atol)
    if args.t0:
        kw["t0s"] = tuple(number_list(args.t0, "--t0", float, minimum=1e-6))
        if any(t >= 1 for t in kw["t0s"]):
            raise ConfigError("--t0: times of q(z | x) must be below 1")
    res = eval_ppl(
        args.run_dir, args.data, args.sequences, args.mc_samples, args.seed, device, **kw
    )
    print(
        f"{res['stage']} on {res['data']} ({res['sequences']} rows x {res['seq_len']} tokens): "
        f"{res['bound']} <= {res['nll_bound']:.4f} nats/token, "
        f"perplexity <= {res['ppl_bound']:.2f}"
    )
    if res.get("note"):
        print(f"  ({res['note']})")
    for r in res.get("per_t0", []):
        print(
            f"  t0={r['t0']:g}: {r['nll_bound']:.4f} = decoder {r['decoder_nll_per_token']:.4f}"
            f" + prior {r['prior_nll_per_token']:.4f} (+-{r['prior_nll_stderr_per_token']:.4f})"
            f" - entropy {r['posterior_entropy_per_token']:.4f}"
        )
    if args.json:
        write_result(args.json, res)
    return 0


def cmd_eval_latent(args) -> int:
    from diladiff.eval.bench import format_table
    from diladiff.eval.latent_diag import (
        STATISTICS,
        TABLE_COLUMNS,
        latent_diagnostics,
        latent_result,
        reference_latents,
        sampler_grid,
    )
    from diladiff.eval.protocol import write_result
    from diladiff.stages import LatentStage

    stage, tok, device = load_run(args)
    if not isinstance(stage, LatentStage):
        raise ConfigError(f"{args.run_dir} is a {stage.kind} run; eval-latent needs a latent prior")
    conts = number_list(args.cont_steps, "--cont-steps", minimum=1) or None
    gammas = number_list(args.gamma, "--gamma", float, minimum=0.0) or None
    try:
        samplers = sampler_grid(stage, conts, gammas)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    refs = reference_latents(
        stage, tok, args.num_samples, args.train_rows, args.seed, device, args.batch_size
    )
    rows = latent_diagnostics(stage, refs, samplers, args.seed, args.batch_size, device)
    print(format_table(rows, TABLE_COLUMNS + ["nn_dist", "seconds"]))
    for key, text in STATISTICS.items():
        print(f"  {key}: {text}")
    print(
        f"{args.num_samples} samples (seed {args.seed}) vs held-out {refs['meta']['heldout_rows']}"
        f"; training rows {refs['meta']['train_rows']}"
    )
    if args.json:
        write_result(args.json, latent_result(stage, args.run_dir, refs, rows, args.seed, device))
    return 0
