"""`diladiff demo`: the pipeline on the tiny preset, the built-in corpus and the CPU."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="the pipeline: tiny preset, corpus BPE (bpe-4096), built-in corpus, CPU"
    )
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="the demo's folder")
    p.epilog = "Further key=value arguments are config overrides applied to every stage."
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args) -> int:
    from diladiff.demo import run_demo

    run_demo(args.run_dir, args.overrides)
    return 0
