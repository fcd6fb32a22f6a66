"""`diladiff sample`: generate text from a trained run."""

from __future__ import annotations

from pathlib import Path

from diladiff.cli.options import (
    PER_COMMAND,
    common_sampling_args,
    load_run,
    sample_config,
    sampling_options,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate text from a trained run",
        description="Options left unset take the run's own sample.* settings.",
    )
    common_sampling_args(p)
    p.add_argument("--prompt", help="text the samples start with (its tokens are kept)")
    p.add_argument("--suffix", help="text the samples end with (its tokens are kept)")
    p.add_argument(
        "--infill",
        help="a text whose [MASK] tokens are generated (the positions after it too)",
    )
    p.add_argument(
        "--latent-from",
        help="stages with an encoder (LaDiff, DiLaDiff, LDLM, LADD): decode the encoder latent "
        "of this reference text instead of a prior sample (paraphrase-style)",
    )
    sampling_options(p, PER_COMMAND)
    p.add_argument("--out", type=Path, help="write JSONL (ids and text) here instead of printing")
    p.set_defaults(handler=cmd_sample)


def cmd_sample(args) -> int:
    from diladiff.sampling.conditioning import canvas_mask_id, make_condition
    from diladiff.sampling.generate import generate, write_samples

    stage, tok, device = load_run(args)
    sc = sample_config(args, stage.cfg)
    texts = {k: getattr(args, k) for k in ("prompt", "suffix", "infill", "latent_from")}
    condition = make_condition(tok, stage.seq_len, canvas_mask_id(stage), **texts)
    out = generate(stage, tok, sc, device, condition=condition)
    if args.out:
        given = {k: v for k, v in texts.items() if v is not None}
        meta = {"run": str(args.run_dir), "stage": stage.kind, "weights": args.weights}
        write_samples(args.out, out, {**meta, **vars(sc), **given})
        print(f"wrote {len(out.ids)} samples to {args.out} ({out.seconds:.1f} s)")
    else:
        for i, text in enumerate(out.texts):
            print(f"--- sample {i}\n{text}")
    return 0
