"""`diladiff analyze latent|robustness|cross-attention`: the paper's analyses of a run's
latent (JSON + PNG)."""

from __future__ import annotations

from pathlib import Path

from diladiff.cli.options import key_option, positive

ANALYSES = {
    "latent": "BERTScore of decodes under latent noise; same-latent vs other-latent pools",
    "robustness": "token recovery vs latent noise std, with the fitted tanh error model",
    "cross-attention": "each cross-attention layer's contribution per masking ratio",
}


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="the paper's analyses of a run's latent (JSON + PNG)")
    asub = p.add_subparsers(dest="what", required=True)
    for what, text in ANALYSES.items():
        a = asub.add_parser(what, help=text)
        a.add_argument("run_dir", type=Path, help="an auto-encoder, LaDiff or DiLaDiff run")
        a.add_argument("--data", help="data.source of the rows (default: the run's held-out)")
        a.add_argument("--num-rows", type=positive, default=32, help="held-out rows")
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--out", type=Path, help="output folder (default: RUN/analysis)")
        a.add_argument("--device", default="auto")
        if what == "latent":
            a.add_argument("--bertscore-model", help="default: bert-score's English model")
            a.add_argument(
                "--disc-steps",
                type=key_option("sample.disc_steps", unset=True),
                default=0,
                help="0: the run's",
            )
            a.add_argument("--pool-pairs", type=positive, default=1, help="latent pairs A, B")
        if what == "robustness":
            a.add_argument("--mc-samples", type=positive, default=16, help="masks per row")
        a.set_defaults(handler=cmd_analyze)


def cmd_analyze(args) -> int:
    from diladiff.analysis import common
    from diladiff.train.distributed import pick_device

    device = pick_device(args.device)
    ae, tok = common.load_autoencoder(args.run_dir, device)
    if args.what == "latent":  # before the data: a model that cannot load fails fast
        from diladiff.analysis import latent_semantics as mod

        scorer = mod.BertScore(args.bertscore_model, device)
    x0 = common.heldout(ae, tok, args.data, args.num_rows, device)
    title = f"{args.run_dir.name}: {args.what}"
    if args.what == "robustness":
        from diladiff.analysis import robustness as mod

        result = mod.robustness_curve(ae, x0, mc_samples=args.mc_samples, seed=args.seed)
    elif args.what == "cross-attention":
        from diladiff.analysis import cross_attention as mod

        result = mod.cross_attention_use(ae, x0, seed=args.seed)
    else:
        result = mod.latent_semantics(
            ae, tok, x0, scorer, args.disc_steps, args.seed, pool_pairs=args.pool_pairs
        )
    result = {"run": str(args.run_dir), "analysis": args.what, **result}
    out = args.out or args.run_dir / "analysis"
    paths = common.write_outputs(result, out, args.what, mod.plot(result, title))
    print(f"wrote {paths[0]} and {paths[1]}")
    if "schedule_override" in result:  # robustness: train a prior with the fitted schedule
        print(f"fitted time reparameterisation: {result['schedule_override']}")
    return 0
