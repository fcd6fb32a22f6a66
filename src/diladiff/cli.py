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
import dataclasses
import json
import sys
from pathlib import Path

from diladiff.config import PRESETS, ConfigError, overrides_from_file, parse_option
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


def _parent_flags() -> dict[str, list[str]]:
    """Every parent role of a registered stage (the --ROLE flag) -> the stages that take it."""
    flags: dict[str, list[str]] = {}
    for kind in stage_order(optional=True):
        for role, parent in STAGES[kind].parents.items():
            flags.setdefault(role, []).append(f"{kind} ({parent} run)")
    return flags


# The sample.* keys every sampling command takes as options; `diladiff sample` adds the rest.
PER_COMMAND = ("num_samples", "batch_size")


def sampling_options(p: argparse.ArgumentParser, keys=None) -> None:
    """One option per sample.* key (all but PER_COMMAND by default), derived from SampleConfig:
    --disc-steps for disc_steps, its Help as help, its OneOf names as choices, a boolean as
    --cache / --no-cache; parsed and checked by the key's rules (key_option). Unset options
    leave the run's own value (`_sample_config`)."""
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


def _common_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path)
    sampling_options(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="diladiff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from diladiff.version import __version__

    parser.add_argument("--version", action="version", version=f"diladiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a stage in a run folder")
    p.add_argument("stage", choices=stage_order(optional=True), help="the stage to train")
    for role, takers in _parent_flags().items():
        flag = "--" + role.replace("_", "-")
        p.add_argument(flag, dest=role, type=Path, help="the parent run of " + ", ".join(takers))
    p.add_argument(
        "--preset",
        choices=preset_choices(),
        help="the preset of a new run (default: paper; resume: the run's)",
    )
    p.add_argument("--run-dir", type=Path, required=True, help="the run folder (new or resumed)")
    p.epilog = "Any further key=value arguments are dotted config overrides, e.g. train.lr=2e-4."

    p = sub.add_parser(
        "sample",
        help="generate text from a trained run",
        description="Options left unset take the run's own sample.* settings.",
    )
    _common_sampling_args(p)
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

    p = sub.add_parser("bench", help="speed benchmarks")
    bsub = p.add_subparsers(dest="what", required=True)
    b = bsub.add_parser("sample", help="sampling wall time and tokens/s per batch size")
    _common_sampling_args(b)
    b.add_argument("--batch-sizes", default="1,8,32")
    b.add_argument("--repeats", type=positive, default=3)
    b.add_argument("--json", type=Path, help="also write the rows as JSON here")
    b.add_argument(
        "--compare-reference",
        action="store_true",
        help="time the reference sampler too, interleaved in this process; add a speed-up column",
    )
    b = bsub.add_parser(
        "train",
        help="training seconds/step, tokens/s, FLOPs and MFU of a stage against the measured "
        "matmul peak",
        description="Builds a new run of the stage as `diladiff train` would (fresh weights; "
        "parents loaded only if given) and times optimizer steps on real packed batches; "
        "nothing is saved.",
    )
    b.add_argument("stage", choices=stage_order(optional=True), help="the stage to time")
    for role, takers in _parent_flags().items():
        flag = "--" + role.replace("_", "-")
        b.add_argument(
            flag, dest=role, type=Path, help="optional parent run of " + ", ".join(takers)
        )
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
    b.add_argument(
        "--config",
        dest="config_file",
        type=Path,
        metavar="FILE",
        help="JSON or TOML config values, applied before the key=value overrides",
    )
    b.set_defaults(takes_overrides=True)
    b.epilog = "Further key=value arguments are config overrides, e.g. model.compile=true."

    p = sub.add_parser("eval", help="GenPPL, entropy, diversity and MAUVE of a samples file")
    p.add_argument("samples", type=Path, help="JSONL with 'text' (and 'ids') per line")
    p.add_argument("--scorer", default="gpt2-large", help="causal LM name/path or smollm2-135m")
    p.add_argument("--reference", help="run folder (its held-out split) or JSONL for MAUVE")
    p.add_argument("--mauve-seed", type=int, default=25)
    p.add_argument("--batch-size", type=positive, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="write the result (metrics + protocol) here")

    p = sub.add_parser("eval-recon", help="perplexity bound and token recovery on held-out data")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--sequences", type=positive, default=64, help="held-out sequences")
    p.add_argument("--mc-samples", type=positive, default=128, help="Monte Carlo draws / sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--json", type=Path)
    p.add_argument("--png", type=Path, help="curve plot (default RUN/recon.png)")

    p = sub.add_parser(
        "eval-ppl",
        help="perplexity bound on any corpus: MDLM, auto-encoder (conditional), LaDiff, "
        "LADD (its token channel given the text's own latent: conditional)",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", help="data.source of the rows (default: the run's own held-out)")
    p.add_argument("--heldout-docs", type=positive, help="documents held out of --data")
    p.add_argument("--sequences", "--num-sequences", type=positive, default=64, help="rows")
    p.add_argument(
        "--mc-samples", "--samples", type=positive, default=32, help="Monte Carlo draws / row"
    )
    p.add_argument("--probes", type=positive, default=1, help="LaDiff: Hutchinson probes")
    p.add_argument(
        "--t0",
        help="LaDiff: times of q(z | x) to try, the tightest reported "
        "(default: diffusion.t_eps,0.01,0.1,0.4,0.8)",
    )
    p.add_argument("--rtol", type=float, default=1e-4, help="LaDiff: RK45 relative tolerance")
    p.add_argument("--atol", type=float, default=1e-4, help="LaDiff: RK45 absolute tolerance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--json", type=Path)

    p = sub.add_parser("eval-latent", help="latent-prior diagnostics of a LaDiff/DiLaDiff run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--num-samples", type=positive, default=256, help="prior samples, held-out rows")
    p.add_argument("--train-rows", type=positive, default=1024, help="nearest-neighbour reference")
    p.add_argument("--cont-steps", default="", help="N_cont list (default ladiff 200,5; dila. 5)")
    p.add_argument("--gamma", default="", help="diladiff gamma list (default 0 and the run's)")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--json", type=Path)

    p = sub.add_parser("analyze", help="the paper's analyses of a run's latent (JSON + PNG)")
    asub = p.add_subparsers(dest="what", required=True)
    helps = {
        "latent": "BERTScore of decodes under latent noise; same-latent vs other-latent pools",
        "robustness": "token recovery vs latent noise std, with the fitted tanh error model",
        "cross-attention": "each cross-attention layer's contribution per masking ratio",
    }
    for what, text in helps.items():
        a = asub.add_parser(what, help=text)
        a.add_argument("run_dir", type=Path, help="an auto-encoder, LaDiff or DiLaDiff run")
        a.add_argument("--data", help="data.source of the rows (default: the run's held-out)")
        a.add_argument("--num-rows", type=positive, default=32, help="held-out rows")
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--out", type=Path, help="output folder (default: RUN/analysis)")
        a.add_argument("--device", default="auto")
        if what == "latent":
            a.add_argument("--bertscore-model", help="default: bert-score's English model")
            a.add_argument(
                "--disc-steps",
                type=key_option("sample.disc_steps", unset=True),
                default=0,
                help="0: the run's",
            )
            a.add_argument("--pool-pairs", type=positive, default=1, help="latent pairs A, B")
        if what == "robustness":
            a.add_argument("--mc-samples", type=positive, default=16, help="masks per row")

    p = sub.add_parser("report", help="Markdown table of result JSON files")
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("--out", type=Path)
    p.add_argument("--title", default="Evaluation")

    p = sub.add_parser("frontier", help="sweep N_disc (and temperature), evaluate, plot")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--disc-steps", default="4,8,16,32,64")
    p.add_argument("--cont-steps", default="", help="latent runs: N_cont values, e.g. 5,50,200")
    p.add_argument("--temperatures", default="", help="e.g. 0.7,0.8,0.9,1.0 (empty: no sweep)")
    p.add_argument("--temperature-steps", type=positive, help="N_disc of the temperature sweep")
    sweep_options(p, "the first run's held-out split")

    p = sub.add_parser(
        "compare-compute",
        help="LADD runs vs a size-matched MDLM at equal backbone GFLOPs (the LADD paper's "
        "Table 2): sweep N_disc, evaluate, interpolate at fixed budgets",
    )
    p.add_argument("ladd_runs", type=Path, nargs="+", help="Co-LADD / Di-LADD runs")
    p.add_argument(
        "--mdlm",
        type=Path,
        help="the size-matched MDLM run (without it, the command names the one to train)",
    )
    p.add_argument(
        "--budgets",
        default="",
        help="GFLOPs per sample, e.g. 50,100,200,400 (default: 2^k over the measured range)",
    )
    p.add_argument("--disc-steps", default="1,2,4,8,16,32,64,128", help="N_disc sweep")
    p.add_argument(
        "--inferences",
        default="joint,sequential",
        help="LADD inferences (a run not trained for one skips it)",
    )
    p.add_argument(
        "--cont-steps",
        type=non_negative,
        default=0,
        help="N_y of sequential inference (default 0: each run's ladd.latent_steps)",
    )
    p.add_argument(
        "--allow-unmatched",
        action="store_true",
        help="compare with an MDLM that is not size-matched (the result records it)",
    )
    sweep_options(p, "the MDLM run's held-out split")

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

    p = sub.add_parser("check", help="known-answer checks of the method's mechanism")
    csub = p.add_subparsers(dest="what", required=True)
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
        help="training steps per stage, e.g. mdlm=1500,autoencoder=800 (default: the check's)",
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
        "--with-duo",
        action="store_true",
        help="also train the DUO baseline on the rows (duo=N in --steps) and sample it "
        "(ancestral and greedy_tail)",
    )
    c.add_argument(
        "--with-ldlm",
        action="store_true",
        help="also train LDLM on the rows (ldlm=N in --steps) and sample it along N_cont",
    )
    c.add_argument(
        "--with-ladd",
        action="store_true",
        help="also train Co-LADD and Di-LADD on the rows (co-ladd=N, di-ladd=N in --steps) and "
        "sample them joint and sequential",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.epilog = "Further key=value arguments are config overrides applied to every stage."

    p = sub.add_parser(
        "demo", help="the pipeline: tiny preset, corpus BPE (bpe-4096), built-in corpus, CPU"
    )
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="the demo's folder")
    p.epilog = "Further key=value arguments are config overrides applied to every stage."

    p = sub.add_parser(
        "prepare-data",
        help="tokenise and pack a preset's corpus into the cache (or data.cache_dir); prints "
        "the packed folder, usable as data.source without the corpus",
    )
    p.add_argument("--preset", default="paper", choices=preset_choices())
    p.epilog = "Further key=value arguments are config overrides (data.*)."

    p = sub.add_parser(
        "export-features",
        help="save a feature model and its tokenizer as a local safetensors folder",
    )
    p.add_argument("model", help="hub name, path or alias (e.g. minilm-l6, bert-base-uncased)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")

    p = sub.add_parser(
        "export", help="write a run as a folder loadable with from_pretrained / the hub"
    )
    p.add_argument("run_dir", type=Path, help="a trained run folder")
    p.add_argument("out_dir", type=Path, help="the folder to write (config, weights, tokenizer)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="(default: ema)")

    # --- serve (issue 31) ---
    p = sub.add_parser(
        "serve",
        help="a local web playground: watch runs denoise step by step, side by side",
        description="Loads every RUN once and serves a page (no network needed) that streams "
        "each generation step by step: prompt / suffix / [MASK] infilling, N_disc, N_cont, "
        "temperature, top-p, strategy, gamma, seed, a reference text's latent.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders, exported folders or hub ids"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (anything but localhost exposes the models to the "
        "network, without authentication)",
    )
    p.add_argument("--port", type=non_negative, default=7860, help="the port (0: a free one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    # --- end serve ---

    p = sub.add_parser("config", help="print a resolved config")
    p.add_argument("--preset", default="paper", choices=preset_choices())
    p.epilog = "Further key=value arguments are config overrides, e.g. train.lr=2e-4."
    for name in OVERRIDABLE:
        sub.choices[name].add_argument(
            "--config",
            dest="config_file",
            type=Path,
            metavar="FILE",
            help="JSON or TOML config values (nested sections or dotted keys; a run's "
            "config.json works), applied before the key=value overrides; its preset is used "
            "when --preset is not given",
        )
    document_options(parser)
    return parser


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default, unless the help
    already says what the default is or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


# Help for the options that many commands share (any option left without help gets it here).
COMMON_HELP = {
    "run_dir": "a run folder (or, where a model is loaded, an exported folder or hub id)",
    "device": "auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ...",
    "seed": "random seed (the same seed gives the same samples)",
    "weights": "which weights of the newest checkpoint: the EMA average or the raw model",
    "json": "also write the result as JSON here",
    "out": "where to write the output",
    "strategy": "which masked positions each step reveals (ancestral, topk, ...)",
    "temperature": "divides the logits before every token draw",
    "top_p": "nucleus sampling: keep the smallest set of tokens with this probability mass",
    "num_samples": "how many rows to generate",
    "batch_size": "rows per forward pass",
    "batch_sizes": "comma-separated batch sizes to time",
    "repeats": "timed batches per batch size (after one warm-up batch)",
    "mauve_seed": "seed of MAUVE's k-means quantisation",
    "results": "result JSON files (from eval --json, eval-recon --json, ...)",
    "title": "the Markdown table's heading",
    "disc_steps": "comma-separated N_disc values to sweep",
    "scorer": "causal LM for GenPPL and MAUVE features: hub name, path or smollm2-135m",
    "no_mauve": "skip MAUVE (no reference texts needed)",
    "preset": "tiny (tests, demo), cpu (real-text evidence on 2 cores), small or paper "
    "(optionally with -4x: 4x latent compression)",
    "run_dirs": "run folders to sweep",
    "samples": "a samples JSONL file",
    "stage": "the stage to train",
    "model": "hub name, path or alias of the feature model",
    "out_dir": "the folder to write",
    "dtype": "floating-point format of the written weights",
}


def document_options(parser: argparse.ArgumentParser) -> None:
    """Give every option of every (sub)command a help text (COMMON_HELP by destination) and
    the defaults-showing formatter."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                document_options(sub)
        elif action.help is None and action.dest in COMMON_HELP:
            action.help = COMMON_HELP[action.dest]


def preset_choices() -> list[str]:
    """Every preset name --preset accepts, with the latent-compression suffixes."""
    from diladiff.config import PRESET_SUFFIXES

    return [*PRESETS, *(f"{p}{s}" for p in PRESETS for s in PRESET_SUFFIXES)]


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one `error: ...` line (exit code 2), like every other
    user error; --help still prints the usage."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _sample_config(args, cfg):
    """The run's sample.* with every sampling option given on the command line."""
    from diladiff.config import SampleConfig

    sc = cfg.sample
    for f in dataclasses.fields(SampleConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(sc, f.name, value)
    return sc


def _load(args):
    from diladiff.hub import load_any
    from diladiff.train.distributed import pick_device

    device = pick_device(args.device)
    stage, tok = load_any(args.run_dir, which=args.weights, device=device)
    return stage, tok, device


def cmd_train(args) -> int:
    from diladiff.runs import train_run

    parents = {role: getattr(args, role) for role in _parent_flags() if getattr(args, role)}
    metrics = train_run(args.stage, args.run_dir, args.preset, args.overrides, parents)
    print(json.dumps(metrics))
    return 0


def cmd_sample(args) -> int:
    from diladiff.sampling.conditioning import canvas_mask_id, make_condition
    from diladiff.sampling.generate import generate, write_samples

    stage, tok, device = _load(args)
    sc = _sample_config(args, stage.cfg)
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


def cmd_bench(args) -> int:
    if args.what == "train":
        return _bench_train(args)
    from diladiff.eval.bench import bench_sampling, compare_samplers, format_table
    from diladiff.sampling.generate import generation_settings

    stage, _, device = _load(args)
    settings = generation_settings(_sample_config(args, stage.cfg), stage)
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


def _bench_train(args) -> int:
    from diladiff.eval.bench import bench_training, format_table

    parents = {role: getattr(args, role) for role in _parent_flags() if getattr(args, role)}
    res = bench_training(
        args.stage,
        args.preset,
        args.overrides,
        parents,
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


def cmd_eval(args) -> int:
    from diladiff.eval.bench import format_table
    from diladiff.eval.evaluate import evaluate_samples, read_samples
    from diladiff.eval.protocol import write_result
    from diladiff.train.distributed import pick_device

    ids, texts, meta = read_samples(args.samples)
    if not args.reference:
        print("note: no --reference given, MAUVE is not computed", file=sys.stderr)
    result = evaluate_samples(
        ids,
        texts,
        args.scorer,
        args.reference,
        pick_device(args.device),
        args.mauve_seed,
        args.batch_size,
        meta,
    )
    result["samples_file"] = str(args.samples)
    m = result["metrics"]
    print(format_table([{k: v for k, v in m.items() if not isinstance(v, list)}]))
    lo, hi = m["gen_ppl_ci95"]
    print(f"gen_ppl {m['gen_ppl']:.4g}, 95% bootstrap interval [{lo:.4g}, {hi:.4g}]")
    p = result["protocol"]
    print(
        f"protocol {p['version']}: scorer={p['scorer']}, boundary={p['boundary_token']!r}, "
        f"samples={p['num_samples']}, device={result['device']}"
    )
    if args.json:
        write_result(args.json, result)
    return 0


def cmd_eval_recon(args) -> int:
    from diladiff.eval.bench import format_table
    from diladiff.eval.protocol import device_record, write_result
    from diladiff.eval.recon_report import plot_recon, recon_report
    from diladiff.train.distributed import pick_device

    device = pick_device(args.device)
    rep = recon_report(
        args.run_dir, args.sequences, args.mc_samples, args.seed, device, weights=args.weights
    )
    print(
        f"held-out sequences: {args.sequences}, Monte Carlo draws each: {args.mc_samples}, "
        f"seed {args.seed}, estimator: mask exactly l ~ U{{1..L}}, weight L/l"
    )
    print(
        format_table(
            [
                {
                    "run": k,
                    "ppl_bound": v["ppl_bound"],
                    "nll_bound": v["nll_bound"],
                    "recovery": v["recovery"],
                }
                for k, v in rep["runs"].items()
            ]
        )
    )
    for name, res in rep["runs"].items():
        print(f"\nper masking ratio: {name}")
        print(format_table(res["per_ratio"]))
    if "full_mask_recovery" in rep:
        r = rep["full_mask_recovery"]
        print(
            "\nargmax recovery from all-masked rows given the row's own latent / the next row's "
            f"/ N(0, I): {r['own']:.3f} / {r['other_row']:.3f} / {r['noise']:.3f}"
        )
    if rep["robustness"]:
        print("\nlatent robustness (recovery with Gaussian noise added to the latent)")
        print(format_table(rep["robustness"]))
    png = args.png or args.run_dir / "recon.png"
    plot_recon(
        rep,
        png,
        f"Reconstruction on held-out data ({args.sequences} sequences x "
        f"{args.mc_samples} draws, {device_record(device)})",
    )
    print(f"\nwrote {png}")
    if args.json:
        write_result(
            args.json,
            {
                "protocol": {
                    "estimator": "discrete-ratio (mask exactly l ~ U{1..L}, weight L/l)",
                    "seed": args.seed,
                    "sequences": args.sequences,
                    "mc_samples": args.mc_samples,
                },
                "metrics": rep,
                "generator": {"run": str(args.run_dir)},
                "device": device_record(device),
            },
        )
    return 0


def cmd_eval_ppl(args) -> int:
    from diladiff.eval.ppl import eval_ppl
    from diladiff.eval.protocol import write_result
    from diladiff.train.distributed import pick_device

    device = pick_device(args.device)
    kw = dict(heldout_docs=args.heldout_docs, probes=args.probes, weights=args.weights)
    kw.update(rtol=args.rtol, atol=args.atol)
    if args.t0:
        kw["t0s"] = tuple(number_list(args.t0, "--t0", float, minimum=1e-6))
        if any(t >= 1 for t in kw["t0s"]):
            raise ConfigError("--t0: times of q(z | x) must be below 1")
    res = eval_ppl(
        args.run_dir, args.data, args.sequences, args.mc_samples, args.seed, device, **kw
    )
    print(
        f"{res['stage']} on {res['data']} ({res['sequences']} rows x {res['seq_len']} tokens): "
        f"{res['bound']} <= {res['nll_bound']:.4f} nats/token, "
        f"perplexity <= {res['ppl_bound']:.2f}"
    )
    if res.get("note"):
        print(f"  ({res['note']})")
    for r in res.get("per_t0", []):
        print(
            f"  t0={r['t0']:g}: {r['nll_bound']:.4f} = decoder {r['decoder_nll_per_token']:.4f}"
            f" + prior {r['prior_nll_per_token']:.4f} (+-{r['prior_nll_stderr_per_token']:.4f})"
            f" - entropy {r['posterior_entropy_per_token']:.4f}"
        )
    if args.json:
        write_result(args.json, res)
    return 0


def cmd_eval_latent(args) -> int:
    from diladiff.eval.bench import format_table
    from diladiff.eval.latent_diag import (
        STATISTICS,
        TABLE_COLUMNS,
        latent_diagnostics,
        latent_result,
        reference_latents,
        sampler_grid,
    )
    from diladiff.eval.protocol import write_result
    from diladiff.stages import LatentStage

    stage, tok, device = _load(args)
    if not isinstance(stage, LatentStage):
        raise ConfigError(f"{args.run_dir} is a {stage.kind} run; eval-latent needs a latent prior")
    conts = number_list(args.cont_steps, "--cont-steps", minimum=1) or None
    gammas = number_list(args.gamma, "--gamma", float, minimum=0.0) or None
    try:
        samplers = sampler_grid(stage, conts, gammas)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    refs = reference_latents(
        stage, tok, args.num_samples, args.train_rows, args.seed, device, args.batch_size
    )
    rows = latent_diagnostics(stage, refs, samplers, args.seed, args.batch_size, device)
    print(format_table(rows, TABLE_COLUMNS + ["nn_dist", "seconds"]))
    for key, text in STATISTICS.items():
        print(f"  {key}: {text}")
    print(
        f"{args.num_samples} samples (seed {args.seed}) vs held-out {refs['meta']['heldout_rows']}"
        f"; training rows {refs['meta']['train_rows']}"
    )
    if args.json:
        write_result(args.json, latent_result(stage, args.run_dir, refs, rows, args.seed, device))
    return 0


def cmd_analyze(args) -> int:
    from diladiff.analysis import common
    from diladiff.train.distributed import pick_device

    device = pick_device(args.device)
    ae, tok = common.load_autoencoder(args.run_dir, device)
    if args.what == "latent":  # before the data: a model that cannot load fails fast
        from diladiff.analysis import latent_semantics as mod

        scorer = mod.BertScore(args.bertscore_model, device)
    x0 = common.heldout(ae, tok, args.data, args.num_rows, device)
    title = f"{args.run_dir.name}: {args.what}"
    if args.what == "robustness":
        from diladiff.analysis import robustness as mod

        result = mod.robustness_curve(ae, x0, mc_samples=args.mc_samples, seed=args.seed)
    elif args.what == "cross-attention":
        from diladiff.analysis import cross_attention as mod

        result = mod.cross_attention_use(ae, x0, seed=args.seed)
    else:
        result = mod.latent_semantics(
            ae, tok, x0, scorer, args.disc_steps, args.seed, pool_pairs=args.pool_pairs
        )
    result = {"run": str(args.run_dir), "analysis": args.what, **result}
    out = args.out or args.run_dir / "analysis"
    paths = common.write_outputs(result, out, args.what, mod.plot(result, title))
    print(f"wrote {paths[0]} and {paths[1]}")
    if "schedule_override" in result:  # robustness: train a prior with the fitted schedule
        print(f"fitted time reparameterisation: {result['schedule_override']}")
    return 0


def cmd_report(args) -> int:
    from diladiff.eval.report import markdown_report

    text = markdown_report(args.results, args.title)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


def cmd_frontier(args) -> int:
    from diladiff.eval.bench import format_table
    from diladiff.eval.frontier import frontier
    from diladiff.train.distributed import pick_device

    reference = None if args.no_mauve else (args.reference or str(args.run_dirs[0]))
    temps = number_list(args.temperatures, "--temperatures", float)
    res = frontier(
        args.run_dirs,
        number_list(args.disc_steps, "--disc-steps", minimum=0),
        args.num_samples,
        args.scorer,
        args.out,
        reference,
        temps,
        args.temperature_steps,
        pick_device(args.device),
        args.seed,
        args.batch_size,
        cont_steps=number_list(args.cont_steps, "--cont-steps", minimum=1),
    )
    cols = ["run", "cont_steps", "disc_steps", "tokens_per_s", "gen_ppl", "entropy", "mauve"]
    print(format_table(res["points"], [c for c in cols if c in res["points"][0]]))
    print(
        f"wrote {args.out / 'frontier.json'} and {args.out / 'frontier.png'}"
        + (f" and {args.out / 'temperature.png'}" if temps else "")
    )
    return 0


def cmd_compare_compute(args) -> int:
    from diladiff.eval.iso_compute import compare_compute, markdown_tables
    from diladiff.methods.ladd.sampler import INFERENCES
    from diladiff.train.distributed import pick_device

    inferences = tuple(i.strip() for i in args.inferences.split(",") if i.strip())
    unknown = [i for i in inferences if i not in INFERENCES]
    if unknown or not inferences:
        raise ConfigError(f"--inferences takes {','.join(INFERENCES)}, got {args.inferences!r}")
    mauve_ref = args.reference or (str(args.mdlm) if args.mdlm else None)
    res = compare_compute(
        args.ladd_runs,
        args.mdlm,
        number_list(args.disc_steps, "--disc-steps", minimum=1),
        args.out,
        number_list(args.budgets, "--budgets", float, minimum=0.0),
        inferences,
        args.cont_steps,
        args.num_samples,
        args.scorer,
        None if args.no_mauve else mauve_ref,
        pick_device(args.device),
        args.seed,
        args.batch_size,
        args.allow_unmatched,
    )
    m = res["size_match"]
    state = "size-matched" if m["matched"] else "NOT size-matched (--allow-unmatched)"
    print(f"MDLM {m['mdlm']}: {state} (wanted {next(iter(m['wanted'].values()))})")
    for s in res["skipped"]:
        print(f"skipped: {s['run']} {s['inference']} (trained for {', '.join(s['trained'])})")
    print(markdown_tables(res["tables"], res["budgets"]), end="")
    print(f"wrote {args.out / 'compute.json'}, {args.out / 'compute.md'}")
    return 0


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


def cmd_check(args) -> int:
    from diladiff.check.parallel_decoding import CHECK_STEPS, CheckPlan, run_check

    if args.temperature <= 0:
        raise ConfigError("--temperature must be > 0")
    plan = CheckPlan(
        num_samples=args.num_samples,
        seed=args.seed,
        gamma=args.gamma,
        strategy=args.strategy,
        temperature=args.temperature,
        with_duo=args.with_duo,
        with_ldlm=args.with_ldlm,
        with_ladd=args.with_ladd,
    )
    for item in filter(None, args.steps.split(",")):
        stage, _, n = item.partition("=")
        if stage not in CHECK_STEPS or not n.isdigit():
            raise ConfigError(f"--steps: expected STAGE=N with STAGE in {list(CHECK_STEPS)}")
        plan.steps[stage] = int(n)
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


def cmd_demo(args) -> int:
    from diladiff.demo import run_demo

    run_demo(args.run_dir, args.overrides)
    return 0


def cmd_prepare_data(args) -> int:
    from diladiff.config import build_config
    from diladiff.data.packing import prepare_data
    from diladiff.data.tokenizer import load_tokenizer

    cfg = build_config(args.preset, args.overrides).data
    data = prepare_data(cfg, load_tokenizer(cfg))  # a corpus BPE (bpe-N) is trained first
    m = data.manifest
    copy = data.folder / "tokenizer"  # packed with the rows (not by older versions)
    print(
        f"{data.folder}\n{m['train_rows']} train rows, {m['val_rows']} held-out rows of "
        f"{m['seq_len']} tokens from {m['source']!r}, tokenizer {cfg.tokenizer}"
        + (f" (copy in {copy})" if copy.is_dir() else "")
        + f"; use it anywhere as data.source={data.folder}"
    )
    return 0


def cmd_export_features(args) -> int:
    from diladiff.features import export_feature_model

    out = export_feature_model(args.model, args.out_dir, args.dtype)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"wrote {out} ({size / 2**20:.1f} MiB); use autoencoder.feature_model={out} "
        f"data.tokenizer={out}"
    )
    return 0


def cmd_export(args) -> int:
    from diladiff.hub import export_run

    out = export_run(args.run_dir, args.out_dir, args.weights)
    print(f"wrote {out}: load it with diladiff.load({str(out)!r}) or diladiff sample {out}")
    return 0


def cmd_serve(args) -> int:
    from diladiff.serve import serve

    return serve([str(r) for r in args.runs], args.host, args.port, args.device, args.weights)


def cmd_config(args) -> int:
    from diladiff.config import build_config

    print(json.dumps(build_config(args.preset, args.overrides).to_dict(), indent=2))
    return 0


OVERRIDABLE = ("train", "demo", "config", "pipeline", "check", "prepare-data")
COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "bench": cmd_bench,
    "demo": cmd_demo,
    "check": cmd_check,
    "prepare-data": cmd_prepare_data,
    "export-features": cmd_export_features,
    "config": cmd_config,
    "export": cmd_export,
    "serve": cmd_serve,
    "eval": cmd_eval,
    "eval-recon": cmd_eval_recon,
    "eval-ppl": cmd_eval_ppl,
    "eval-latent": cmd_eval_latent,
    "analyze": cmd_analyze,
    "report": cmd_report,
    "frontier": cmd_frontier,
    "compare-compute": cmd_compare_compute,
    "pipeline": cmd_pipeline,
}


def main(argv: list[str] | None = None) -> int:
    from diladiff.errors import DiladiffError, Terminated

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value words anywhere on the line are config overrides (train, demo, config).
    bad = [w for w in extra if w.startswith("-") or "=" not in w]
    takes = args.command in OVERRIDABLE or getattr(args, "takes_overrides", False)
    if bad or (extra and not takes):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    args.overrides = extra
    try:
        if getattr(args, "config_file", None):
            preset, from_file = overrides_from_file(args.config_file)
            args.overrides = from_file + extra
            given = any(a == "--preset" or a.startswith("--preset=") for a in argv)
            if preset and hasattr(args, "preset") and not given:
                args.preset = preset
        return COMMANDS[args.command](args)
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


if __name__ == "__main__":
    raise SystemExit(main())
