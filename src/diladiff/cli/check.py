"""`diladiff check parallel-decoding`: known-answer checks of the method's mechanism."""

from __future__ import annotations

from pathlib import Path

from diladiff.cli.options import positive, preset_choices
from diladiff.config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="known-answer checks of the method's mechanism")
    csub = p.add_subparsers(dest="what", required=True)
    add_parallel_decoding_parser(csub)


def add_parallel_decoding_parser(csub) -> None:
    from diladiff.check.plan import method_choices

    c = csub.add_parser(
        "parallel-decoding",
        help="train the chain on K memorisable rows; validity vs N_disc per generator",
    )
    c.add_argument("--run-dir", type=Path, required=True, help="the stages' run folders inside")
    c.add_argument("--data", help="where the K rows come from (default: the preset's source)")
    c.add_argument("--num-sequences", type=positive, default=256, help="K distinct rows")
    c.add_argument("--preset", default="tiny", choices=preset_choices())
    c.add_argument("--num-samples", type=positive, default=512, help="rows per generator, N_disc")
    c.add_argument("--gamma", type=float, default=0.2, help="DiLaDiff's gamma-sampling row")
    c.add_argument(
        "--steps",
        default="",
        help="training steps per stage, e.g. mdlm=1500,duo=1500 (default: each stage's "
        "check_steps)",
    )
    c.add_argument(
        "--strategy",
        choices=["ancestral", "topk"],
        default="ancestral",
        help="how every generator reveals tokens; not ancestral/1: results go to "
        "check_STRATEGY_tT.* beside check.* (the trained stages are reused)",
    )
    c.add_argument("--temperature", type=float, default=1.0, help="of every token draw")
    c.add_argument(
        "--methods",
        default="",
        metavar="NAME,...",
        help="registered methods to train on the rows beside the chain (NAME=N in --steps) and "
        f"sample with each of their eval samplers: {', '.join(method_choices())} (default: none)",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.epilog = "Further key=value arguments are config overrides applied to every stage."
    c.set_defaults(handler=cmd_check)


def cmd_check(args) -> int:
    from diladiff.check.parallel_decoding import run_check
    from diladiff.check.plan import CheckPlan, parse_methods, parse_steps

    if args.temperature <= 0:
        raise ConfigError("--temperature must be > 0")
    plan = CheckPlan(
        num_samples=args.num_samples,
        seed=args.seed,
        gamma=args.gamma,
        strategy=args.strategy,
        temperature=args.temperature,
        steps=parse_steps(args.steps),
        methods=parse_methods(args.methods),
    )
    result = run_check(
        args.run_dir,
        args.preset,
        args.overrides,
        args.num_sequences,
        args.data,
        plan,
        args.device,
    )
    print((args.run_dir / f"{plan.results_name}.md").read_text())
    return 0 if result["verdict"]["diagnosis"] == "every link passes" else 1
