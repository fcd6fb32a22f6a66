"""`diladiff pipeline`: train all stages, evaluate, report."""

from __future__ import annotations

from pathlib import Path

from diladiff.cli.options import preset_choices
from diladiff.config import ConfigError
from diladiff.stages import STAGES, stage_order


def add_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="train all stages, evaluate, report")
    p.add_argument(
        "--stages",
        default="",
        help=f"comma-separated subset of {','.join(stage_order(optional=True))} (their parents "
        f"are added; default: {','.join(stage_order())}, i.e. all but optional baselines)",
    )
    p.add_argument("--preset", default="tiny", choices=preset_choices())
    p.add_argument("--run-dir", type=Path, required=True, help="one run folder per stage inside")
    p.add_argument("--data", help="data.source for every stage (default: the preset's)")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=0.0,
        help="split this training time across the stages (0 = no limit)",
    )
    p.add_argument("--device", default="auto")
    p.epilog = "Further key=value arguments are config overrides applied to every stage."
    p.set_defaults(handler=cmd_pipeline)


def cmd_pipeline(args) -> int:
    from diladiff.pipeline import run_pipeline

    overrides = list(args.overrides) + ([f"data.source={args.data}"] if args.data else [])
    kinds = [k.strip() for k in args.stages.split(",") if k.strip()] or None
    unknown = [k for k in kinds or [] if k not in STAGES]
    if unknown:
        choices = stage_order(optional=True)
        raise ConfigError(f"--stages: unknown stage(s) {unknown}; choose from {choices}")
    run_pipeline(
        args.run_dir, args.preset, overrides, args.budget_minutes, args.device, kinds=kinds
    )
    return 0
