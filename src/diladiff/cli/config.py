"""`diladiff config`: print a resolved config."""

from __future__ import annotations

import json

from diladiff.cli.options import preset_choices


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print a resolved config")
    p.add_argument("--preset", default="paper", choices=preset_choices())
    p.epilog = "Further key=value arguments are config overrides, e.g. train.lr=2e-4."
    p.set_defaults(handler=cmd_config)


def cmd_config(args) -> int:
    from diladiff.config import build_config

    print(json.dumps(build_config(args.preset, args.overrides).to_dict(), indent=2))
    return 0
