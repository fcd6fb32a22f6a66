"""`diladiff train`: train (or resume) a stage in a run folder."""

from __future__ import annotations

import json
from pathlib import Path

from diladiff.cli.options import given_parents, parent_options, preset_choices
from diladiff.stages import stage_order


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) a stage in a run folder")
    p.add_argument("stage", choices=stage_order(optional=True), help="the stage to train")
    parent_options(p, "the parent run of ")
    p.add_argument(
        "--preset",
        choices=preset_choices(),
        help="the preset of a new run (default: paper; resume: the run's)",
    )
    p.add_argument("--run-dir", type=Path, required=True, help="the run folder (new or resumed)")
    p.epilog = "Any further key=value arguments are dotted config overrides, e.g. train.lr=2e-4."
    p.set_defaults(handler=cmd_train)


def cmd_train(args) -> int:
    from diladiff.runs import train_run

    metrics = train_run(args.stage, args.run_dir, args.preset, args.overrides, given_parents(args))
    print(json.dumps(metrics))
    return 0
