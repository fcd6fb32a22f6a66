"""`diladiff bench sample` and `diladiff bench train`: speed benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

from diladiff.cli.options import (
    common_sampling_args,
    config_file_option,
    given_parents,
    load_run,
    non_negative,
    number_list,
    parent_options,
    positive,
    preset_choices,
    sample_config,
)
from diladiff.stages import stage_order


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed benchmarks")
    bsub = p.add_subparsers(dest="what", required=True)
    add_sample_parser(bsub)
    add_train_parser(bsub)


def add_sample_parser(bsub) -> None:
    b = bsub.add_parser("sample", help="sampling wall time and tokens/s per batch size")
    common_sampling_args(b)
    b.add_argument("--batch-sizes", default="1,8,32")
    b.add_argument("--repeats", type=positive, default=3)
    b.add_argument("--json", type=Path, help="also write the rows as JSON here")
    b.add_argument(
        "--compare-reference",
        action="store_true",
        help="time the reference sampler too, interleaved in this process; add a speed-up column",
    )
    b.set_defaults(handler=cmd_bench_sample)


def add_train_parser(bsub) -> None:
    b = bsub.add_parser(
        "train",
        help="training seconds/step, tokens/s, FLOPs and MFU of a stage against the measured "
        "matmul peak",
        description="Builds a new run of the stage as `diladiff train` would (fresh weights; "
        "parents loaded only if given) and times optimizer steps on real packed batches; "
        "nothing is saved.",
    )
    b.add_argument("stage", choices=stage_order(optional=True), help="the stage to time")
    parent_options(b, "optional parent run of ")
    b.add_argument(
        "--preset", choices=preset_choices(), help="the preset of the stage (default: paper)"
    )
    b.add_argument("--steps", type=positive, default=10, help="timed optimizer steps")
    b.add_argument(
        "--warmup-steps", type=non_negative, default=2, help="untimed steps before the timed"
    )
    b.add_argument(
        "--flop-steps",
        type=positive,
        default=1,
        help="untimed steps whose FLOPs are counted and averaged (more for stages that draw "
        "an extra pass per step, e.g. self-conditioning)",
    )
    b.add_argument("--device", help="default: the config's train.device")
    b.add_argument("--json", action="store_true", help="print one JSON object instead")
    config_file_option(b, "JSON or TOML config values, applied before the key=value overrides")
    b.set_defaults(takes_overrides=True, handler=cmd_bench_train)
    b.epilog = "Further key=value arguments are config overrides, e.g. model.compile=true."


def cmd_bench_sample(args) -> int:
    from diladiff.eval.bench import bench_sampling, compare_samplers, format_table
    from diladiff.sampling.generate import generation_settings

    stage, _, device = load_run(args)
    settings = generation_settings(sample_config(args, stage.cfg), stage)
    sizes = number_list(args.batch_sizes, "--batch-sizes", minimum=1)
    if args.compare_reference:
        rows = compare_samplers(stage, settings, sizes, args.repeats, device)
    else:
        rows = bench_sampling(stage, settings, sizes, args.repeats, device)
    print(
        f"device: {device}, L={stage.seq_len}, N_disc={settings.tokens.steps}, "
        f"strategy={settings.tokens.strategy}, sampler="
        f"{'reference vs fast' if args.compare_reference else settings.tokens.sampler}"
        + (f", latent: {settings.latent}" if settings.latent else "")
    )
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    return 0


def cmd_bench_train(args) -> int:
    from diladiff.eval.bench import bench_training, format_table

    res = bench_training(
        args.stage,
        args.preset,
        args.overrides,
        given_parents(args),
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        flop_steps=args.flop_steps,
        device=args.device,
    )
    if args.json:
        print(json.dumps(res))
        return 0
    print(
        f"{res['stage']} (preset {res['preset']}) on {res['device']} ({res['threads']} threads), "
        f"{res['precision']}: batch {res['batch_size']} x {res['seq_len']} tokens, "
        f"{res['warmup_steps']} warm-up + {res['steps']} timed steps, {res['batches']}"
    )
    cols = ["s_per_step", "tokens_per_s", "flops_per_step", "forward_flops_per_step"]
    cols += ["trainable_flops_per_step", "frozen_flops_per_step", "achieved_flops_per_s", "mfu"]
    print(format_table([res], cols))
    peaks = ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in res["peak_flops_per_s"].items())
    print(f"measured matmul peak: {peaks}; MFU against {res['precision']}")
    return 0
