"""The `diladiff` command.

diladiff train mdlm --preset tiny --run-dir runs/m [key=value ...]
diladiff sample runs/m --num-samples 8 --disc-steps 64 --out samples.jsonl
diladiff bench sample runs/m --batch-sizes 1,8,32
diladiff eval-latent runs/l --json latent.json     # prior samples vs encoder latents
diladiff compare-compute runs/co runs/di --mdlm runs/m --budgets 50,100 --out cmp  # Table 2
diladiff demo --run-dir runs/demo
diladiff serve runs/m runs/dl                      # a web playground on 127.0.0.1:7860
diladiff config --preset tiny [key=value ...]      # print the resolved config
"""

from __future__ import annotations

import argparse
import sys

from diladiff.cli import (
    analyze,
    bench,
    check,
    config,
    data,
    demo,
    evaluate,
    export,
    frontier,
    pipeline,
    report,
    sample,
    serve,
    train,
)
from diladiff.cli.formatting import COMMON_HELP, HelpFormatter, document_options
from diladiff.cli.options import (
    PER_COMMAND,
    config_file_option,
    key_option,
    non_negative,
    number_list,
    positive,
    preset_choices,
    sampling_options,
)
from diladiff.config import ConfigError, overrides_from_file

__all__ = [
    "COMMANDS",
    "COMMON_HELP",
    "OVERRIDABLE",
    "PER_COMMAND",
    "HelpFormatter",
    "OneLineParser",
    "build_parser",
    "document_options",
    "key_option",
    "main",
    "non_negative",
    "number_list",
    "positive",
    "preset_choices",
    "sampling_options",
]

# The command modules in `diladiff --help` order; each registers its command(s) with
# add_parser(sub), a handler included (set_defaults(handler=...)).
COMMANDS = (
    train,
    sample,
    bench,
    evaluate,
    analyze,
    report,
    frontier,
    pipeline,
    check,
    demo,
    data,
    export,
    serve,
    config,
)

# The commands that take key=value config overrides and --config FILE.
OVERRIDABLE = ("train", "demo", "config", "pipeline", "check", "prepare-data")
CONFIG_FILE_HELP = (
    "JSON or TOML config values (nested sections or dotted keys; a run's config.json works), "
    "applied before the key=value overrides; its preset is used when --preset is not given"
)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one `error: ...` line (exit code 2), like every other
    user error; --help still prints the usage."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="diladiff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from diladiff.version import __version__

    parser.add_argument("--version", action="version", version=f"diladiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for name in OVERRIDABLE:
        config_file_option(sub.choices[name], CONFIG_FILE_HELP)
    document_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value words anywhere on the line are config overrides (train, demo, config).
    bad = [w for w in extra if w.startswith("-") or "=" not in w]
    takes = args.command in OVERRIDABLE or getattr(args, "takes_overrides", False)
    if bad or (extra and not takes):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    args.overrides = extra
    return run_command(args, argv)


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    """Runs the parsed command (its --config file first); a user error is one `error: ...`
    line and exit code 2, an interrupt 130, a termination 128 + SIGTERM."""
    from diladiff.errors import DiladiffError, Terminated

    try:
        if getattr(args, "config_file", None):
            preset, from_file = overrides_from_file(args.config_file)
            args.overrides = from_file + args.overrides
            given = any(a == "--preset" or a.startswith("--preset=") for a in argv)
            if preset and hasattr(args, "preset") and not given:
                args.preset = preset
        return args.handler(args)
    except (DiladiffError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        print(f"error: {exc.strerror}: {exc.filename}", file=sys.stderr)  # a path the user gave
        return 2
    except KeyboardInterrupt:
        print("interrupted; saved checkpoints are intact", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(str(exc), file=sys.stderr)
        return 128 + 15
