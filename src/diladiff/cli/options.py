"""Argument types and option groups that several commands share, and the run loading of the
commands that load a model."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from diladiff.config import PRESETS, ConfigError, parse_option
from diladiff.stages import STAGES, stage_order


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expects an integer >= 1, got {text!r}")
    return value


def non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expects an integer >= 0, got {text!r}")
    return value


def number_list(text: str, option: str, kind=int, minimum=None) -> list:
    """A comma-separated option value as numbers (empty items skipped); ConfigError names the
    option when an item is not a number of `kind` or is below `minimum`."""
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(
            f"{option} takes comma-separated {kind.__name__}s, got {text!r}"
        ) from None
    if minimum is not None and any(v < minimum for v in values):
        raise ConfigError(f"{option} values must be >= {minimum}, got {text!r}")
    return values


def key_option(key: str, unset: bool = False):
    """argparse type: a value of config key `key` (sample.disc_steps for --disc-steps), parsed
    and checked by the key's declared type and rules (config.parse_option); its unset value
    (0 = default) only with `unset`, otherwise the option is left out for the default."""

    def parse(text: str):
        try:
            return parse_option(key, text, unset)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = key  # argparse's "invalid <name> value" (not reached: errors say more)
    return parse


def preset_choices() -> list[str]:
    """Every preset name --preset accepts, with the latent-compression suffixes."""
    from diladiff.config import PRESET_SUFFIXES

    return [*PRESETS, *(f"{p}{s}" for p in PRESETS for s in PRESET_SUFFIXES)]


def parent_flags() -> dict[str, list[str]]:
    """Every parent role of a registered stage (the --ROLE flag) -> the stages that take it."""
    flags: dict[str, list[str]] = {}
    for kind in stage_order(optional=True):
        for role, parent in STAGES[kind].parents.items():
            flags.setdefault(role, []).append(f"{kind} ({parent} run)")
    return flags


def parent_options(p: argparse.ArgumentParser, help_prefix: str) -> None:
    """One --ROLE option (a run folder) per parent role of the registered stages."""
    for role, takers in parent_flags().items():
        flag = "--" + role.replace("_", "-")
        p.add_argument(flag, dest=role, type=Path, help=help_prefix + ", ".join(takers))


def given_parents(args) -> dict[str, Path]:
    """The parent runs given on the command line, by role."""
    return {role: getattr(args, role) for role in parent_flags() if getattr(args, role)}


def config_file_option(p: argparse.ArgumentParser, help: str) -> None:
    """--config FILE: config values applied before the key=value overrides."""
    p.add_argument("--config", dest="config_file", type=Path, metavar="FILE", help=help)


# The sample.* keys only `diladiff sample` takes as options (sampling_options(p, PER_COMMAND));
# every sampling command takes all the others.
PER_COMMAND = ("num_samples", "batch_size")


def sampling_options(p: argparse.ArgumentParser, keys=None) -> None:
    """One option per sample.* key (all but PER_COMMAND by default), derived from SampleConfig:
    --disc-steps for disc_steps, its Help as help, its OneOf names as choices, a boolean as
    --cache / --no-cache; parsed and checked by the key's rules (key_option). Unset options
    leave the run's own value (`sample_config`)."""
    from diladiff.config import OneOf, SampleConfig, field_help, field_rules
    from diladiff.sampling import generate  # noqa: F401  (fills the sampler registries)

    helps, rules = field_help(SampleConfig), field_rules(SampleConfig)
    for key in keys or [k for k in helps if k not in PER_COMMAND]:
        hint, key_rules = rules[key]
        flag, text = "--" + key.replace("_", "-"), f"{helps[key]} (default: the run's sample.{key})"
        choices = [r for r in key_rules if isinstance(r, OneOf)]
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif choices:
            p.add_argument(flag, choices=choices[0].names(), help=text)
        else:
            p.add_argument(flag, type=key_option(f"sample.{key}"), help=text)


def common_sampling_args(p: argparse.ArgumentParser) -> None:
    """The run, the sampling options but PER_COMMAND, device and weights (sample, bench
    sample)."""
    p.add_argument("run_dir", type=Path)
    sampling_options(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")


def sweep_options(p: argparse.ArgumentParser, reference_default: str) -> None:
    """The options of a command that samples and evaluates runs over a sweep (frontier,
    compare-compute): samples, batch, scorer, MAUVE reference, seed, device, output folder."""
    p.add_argument("--num-samples", type=positive, default=64)
    p.add_argument("--batch-size", type=positive, default=16)
    p.add_argument("--scorer", default="gpt2-large")
    p.add_argument("--reference", help=f"for MAUVE (default: {reference_default})")
    p.add_argument("--no-mauve", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True)


def sample_config(args, cfg):
    """The run's sample.* with every sampling option given on the command line."""
    from diladiff.config import SampleConfig

    sc = cfg.sample
    for f in dataclasses.fields(SampleConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(sc, f.name, value)
    return sc


def load_run(args):
    """The stage, tokenizer and device of args.run_dir (a run, an exported folder or a hub id)
    with args.weights on args.device."""
    from diladiff.hub import load_any
    from diladiff.train.distributed import pick_device

    device = pick_device(args.device)
    stage, tok = load_any(args.run_dir, which=args.weights, device=device)
    return stage, tok, device
