"""The `diladiff` command.

diladiff train mdlm --preset tiny --run-dir runs/m [key=value ...]
diladiff sample runs/m --num-samples 8 --disc-steps 64 --out samples.jsonl
diladiff bench sample runs/m --batch-sizes 1,8,32
diladiff demo --run-dir runs/demo
diladiff config --preset tiny [key=value ...]      # print the resolved config
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diladiff.config import ConfigError


def _common_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path)
    p.add_argument(
        "--disc-steps", type=int, help="N_disc (default: the run's sample.disc_steps or L)"
    )
    p.add_argument("--strategy", choices=["ancestral", "topk"])
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--no-cache", action="store_true", help="recompute logits every step")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diladiff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a stage in a run folder")
    p.add_argument("stage", help="mdlm")
    p.add_argument("--preset", help="tiny, small or paper (default: paper; resume: the run's)")
    p.add_argument("--run-dir", type=Path, required=True)
    p.epilog = "Any further key=value arguments are dotted config overrides, e.g. train.lr=2e-4."

    p = sub.add_parser("sample", help="generate text from a trained run")
    _common_sampling_args(p)
    p.add_argument("--num-samples", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", type=Path, help="write JSONL (ids and text) here instead of printing")

    p = sub.add_parser("bench", help="speed benchmarks")
    bsub = p.add_subparsers(dest="what", required=True)
    b = bsub.add_parser("sample", help="sampling wall time and tokens/s per batch size")
    _common_sampling_args(b)
    b.add_argument("--batch-sizes", default="1,8,32")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--json", type=Path, help="also write the rows as JSON here")

    p = sub.add_parser("demo", help="train a tiny MDLM on the built-in corpus, sample, report")
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=600)

    p = sub.add_parser("config", help="print a resolved config")
    p.add_argument("--preset", default="paper")
    return parser


def _sample_config(args, cfg):
    sc = cfg.sample
    for attr, key in [
        ("disc_steps", "disc_steps"),
        ("strategy", "strategy"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("seed", "seed"),
        ("num_samples", "num_samples"),
        ("batch_size", "batch_size"),
    ]:
        value = getattr(args, attr, None)
        if value is not None:
            setattr(sc, key, value)
    if args.no_cache:
        sc.cache = False
    return sc


def _load(args):
    from diladiff.runs import load_run
    from diladiff.train.distributed import pick_device

    device = pick_device(args.device)
    stage, tok = load_run(args.run_dir, which=args.weights, device=device)
    return stage, tok, device


def cmd_train(args) -> int:
    from diladiff.runs import train_run

    metrics = train_run(args.stage, args.run_dir, args.preset, args.overrides)
    print(json.dumps(metrics))
    return 0


def cmd_sample(args) -> int:
    from diladiff.sampling.generate import generate

    stage, tok, device = _load(args)
    sc = _sample_config(args, stage.cfg)
    out = generate(stage, tok, sc, device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as fh:
            for ids, text in zip(out.ids, out.texts, strict=True):
                fh.write(json.dumps({"ids": ids, "text": text}) + "\n")
        print(f"wrote {len(out.ids)} samples to {args.out} ({out.seconds:.1f} s)")
    else:
        for i, text in enumerate(out.texts):
            print(f"--- sample {i}\n{text}")
    return 0


def cmd_bench(args) -> int:
    from diladiff.eval.bench import bench_sampling, format_table
    from diladiff.sampling.generate import sampler_settings

    stage, _, device = _load(args)
    settings = sampler_settings(_sample_config(args, stage.cfg), stage.seq_len)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    rows = bench_sampling(stage, settings, sizes, args.repeats, device)
    print(
        f"device: {device}, L={stage.seq_len}, N_disc={settings.steps}, "
        f"strategy={settings.strategy}"
    )
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    return 0


def cmd_demo(args) -> int:
    from diladiff.demo import run_demo

    run_demo(args.run_dir, args.steps, args.overrides)
    return 0


def cmd_config(args) -> int:
    from diladiff.config import build_config

    print(json.dumps(build_config(args.preset, args.overrides).to_dict(), indent=2))
    return 0


OVERRIDABLE = ("train", "demo", "config")
COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "bench": cmd_bench,
    "demo": cmd_demo,
    "config": cmd_config,
}


def main(argv: list[str] | None = None) -> int:
    from diladiff.errors import DiladiffError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value words anywhere on the line are config overrides (train, demo, config).
    bad = [w for w in extra if w.startswith("-") or "=" not in w]
    if bad or (extra and args.command not in OVERRIDABLE):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    args.overrides = extra
    try:
        return COMMANDS[args.command](args)
    except (DiladiffError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; saved checkpoints are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
