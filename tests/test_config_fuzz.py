"""A property-based test of the configuration's declared rules (issue 32).

Hypothesis draws a preset (tiny, cpu, small, paper, tiny-4x), a stage kind and 1-3 overrides
over every key of every section (the core ones and each method's), each value one of: a
plausible or boundary value of the key's type (its declared bounds, their neighbours, its unset
value, its choices), a wrong type, the empty string, or a huge value. The configuration is
resolved as `diladiff train` resolves it (runs.resolve_config, with parent run folders where the
stage has parents). The outcome must be one of:

- refused: a ConfigError (or another one-line DiladiffError) whose message is one line, and the
  same command line through the CLI (`diladiff train KIND --preset P --run-dir NEW ...`) exits
  with code 2, prints that one `error: ...` line and writes no file (no run folder, no cache);
- accepted: the resolved configuration is valid, survives a JSON round trip through
  Config.from_dict, and builds its stage's model (with the offline minilm-l6 tokenizer's
  identity) or is refused by the stage's constructor in one line (a check that needs the feature
  model or the stage, e.g. a feature model that cannot be loaded). To keep the test affordable,
  models are built at the tiny and cpu presets only and not when a drawn value is huge (a
  10^18-wide model is valid but not buildable); small and paper configurations are validated.

A second property: every command-line option that sets a sample.* key accepts exactly the
values the key's declaration accepts (its unset value excepted: leaving the option out gives it).

The fast suite runs a bounded, derandomized number of examples; `make test-all` (the slow marker)
runs 2,000 random ones.
"""

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diladiff.cli import main
from diladiff.config import (
    Config,
    ConfigError,
    OneOf,
    Range,
    all_keys,
    build_config,
    field_rules,
    parse_option,
    preset_base,
)
from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
from diladiff.errors import DiladiffError
from diladiff.runs import resolve_config
from diladiff.stages import STAGES

PRESETS = ("tiny", "cpu", "small", "paper", "tiny-4x")
BUILT_PRESETS = ("tiny", "cpu")  # preset bases whose models are built (affordable on CPU)
KINDS = sorted(STAGES)
KEYS = all_keys(Config())
CATEGORIES = ("value", "value", "value", "type", "empty", "huge")  # plausible values: half
# Keys whose free-text values have a grammar of their own.
SPECIAL = {
    "autoencoder.cross_attn_after": ["first,last", "all", "0", "0,1", "", "last", "x", "first,9"],
    "diffusion.fitted_tanh": ["", "0.5,0.4,2.0,1.5", "1,2", "0.5,-0.5,5,1", "0.5,x,5,1"],
    "train.device": ["cpu", "auto", "cuda", "cuda:1", "gpu:x", "cuda:", ":0"],
}
# The autouse cache fixture (conftest) is function-scoped: it only sets DILADIFF_CACHE.
SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
FAST = settings(
    max_examples=100,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=SUPPRESSED,
)
SLOW = settings(
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=SUPPRESSED,
)


def key_rules(key: str):
    """(type, declared rules) of a dotted key."""
    *path, name = key.split(".")
    obj = Config()
    for part in path:
        obj = getattr(obj, part)
    return field_rules(type(obj))[name], getattr(obj, name)


def _num(x) -> str:
    return repr(x) if isinstance(x, float) else str(x)


def value_pools(key: str) -> dict[str, list[str]]:
    """Candidate override values of a key by category (module docstring)."""
    if key == "preset":
        names = [*PRESETS, "paper-4x"]
        return {"value": names, "type": ["1"], "empty": [""], "huge": ["x" * 5000]}
    (hint, rules), default = key_rules(key)
    ranges = [r for r in rules if isinstance(r, Range)]
    edges = []
    for r in ranges:
        for bound in (r.ge, r.gt, r.le, r.lt, r.unset):
            if bound is not None:
                edges += [bound, bound - 1, bound + 1] if hint is int else [bound, bound - 0.5]
                edges += [] if hint is int else [bound + 0.5, bound + 1e-9]
    if hint is bool:
        value, wrong, huge = ["true", "false", "1", "0", "yes", "off", "2", "maybe"], ["1.5"], []
    elif hint is int:
        small = [0, 1, 2, 3, 4, 8, 16, 32, -1, -2, default, *edges]
        value = sorted({_num(int(v)) for v in small})
        wrong = ["1.5", "abc", "true", "[1]", "0x10"]
        huge = ["1e18", str(2**63 - 1), str(2**63), "-1e30", "1e30", "99999999999"]
    elif hint is float:
        small = [0.0, 1.0, 0.5, -0.5, 1e-3, 2.0, -1.0, 10.0, float(default), *edges]
        value = sorted({_num(float(v)) for v in small})
        wrong = ["abc", "1,5", "true", "0x1p3"]
        huge = ["1e308", "-1e308", "1e400", "nan", "inf", "-inf"]
    else:
        choices = [n for r in rules if isinstance(r, OneOf) for n in r.names()]
        value = SPECIAL.get(key) or [*choices, default, "nonsense"]
        value += [choices[0].upper()] if choices else ["minilm-l6", "/nonexistent/x", "a b"]
        wrong = ["1"]
        huge = []
    return {"value": value, "type": wrong, "empty": [""], "huge": huge + ["x" * 5000]}


POOLS = {key: value_pools(key) for key in KEYS}


@st.composite
def scenarios(draw):
    """(preset, stage kind, overrides, whether a value is huge)."""
    preset = draw(st.sampled_from(PRESETS))
    kind = draw(st.sampled_from(KINDS))
    overrides, huge = [], False
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(KEYS))
        category = draw(st.sampled_from(CATEGORIES))
        overrides.append(f"{key}={draw(st.sampled_from(POOLS[key][category]))}")
        huge |= category == "huge"
    return preset, kind, overrides, huge


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_identity(load_tokenizer("minilm-l6"))


@pytest.fixture(scope="module")
def parent_runs(tmp_path_factory):
    """parent_runs(kind, preset) -> {role: folder}: stand-ins for a stage's parent runs (the
    run.json and config.json that `train` reads from them, as the parent kind's preset)."""
    root = tmp_path_factory.mktemp("parents")

    def folders(kind: str, preset: str) -> dict[str, Path]:
        out = {}
        for role, parent_kind in STAGES[kind].parents.items():
            folder = root / f"{preset}-{parent_kind}"
            if not folder.is_dir():
                folder.mkdir()
                build_config(preset, [], stage=parent_kind).save(folder / "config.json")
                (folder / "run.json").write_text(json.dumps({"stage": parent_kind}))
            out[role] = folder
        return out

    return folders


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip() and "\n" not in message, repr(message)
    return message


def refused_through_the_cli(kind, preset, overrides, parents, message):
    """`diladiff train` with a new run folder: exit 2, the same one `error:` line, no file."""
    flags = [a for role, d in parents.items() for a in ("--" + role.replace("_", "-"), str(d))]
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", kind, "--preset", preset, "--run-dir", f"{tmp}/run", *flags, *overrides]
        err = io.StringIO()
        with (
            mock.patch.dict(os.environ, {"DILADIFF_CACHE": f"{tmp}/cache"}),
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert code == 2 and lines == [f"error: {message}"], (code, err.getvalue())
        assert os.listdir(tmp) == [], os.listdir(tmp)  # no run folder, no cache


def check_scenario(preset, kind, overrides, huge, parents_of, tokenizer):
    parents = parents_of(kind, preset)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        try:
            cfg, resumed, _ = resolve_config(kind, run_dir, preset, overrides, parents)
        except (ConfigError, DiladiffError) as exc:
            message, error = one_line(exc), type(exc).__name__
            assert os.listdir(tmp) == []
        else:
            message = None
            assert not resumed and os.listdir(tmp) == []
    if message is not None:
        event(f"refused: {error}")
        refused_through_the_cli(kind, preset, overrides, parents, message)
        return
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert Config.from_dict(saved) == cfg  # a saved run's configuration loads as resolved
    if preset_base(preset) not in BUILT_PRESETS or huge:
        event("accepted: validated, not built")
        return
    try:
        STAGES[kind](cfg, tokenizer)
    except (ConfigError, DiladiffError) as exc:
        one_line(exc)
        event(f"accepted, refused by the stage: {type(exc).__name__}: {str(exc)[:60]}")
    else:
        event("accepted: built")


@FAST
@given(scenario=scenarios())
def test_every_drawn_configuration_is_refused_in_one_line_or_builds(
    scenario, parent_runs, tokenizer
):
    check_scenario(*scenario, parent_runs, tokenizer)


@pytest.mark.slow
@SLOW
@given(scenario=scenarios())
def test_every_drawn_configuration_is_refused_in_one_line_or_builds_2000(
    scenario, parent_runs, tokenizer
):
    check_scenario(*scenario, parent_runs, tokenizer)


# The sample command's options that set a config key (cli.options.common_sampling_args and sample).
OPTIONS = {
    "--disc-steps": "sample.disc_steps",
    "--cont-steps": "sample.cont_steps",
    "--num-samples": "sample.num_samples",
    "--batch-size": "sample.batch_size",
    "--temperature": "sample.temperature",
    "--top-p": "sample.top_p",
    "--gamma": "sample.gamma",
    "--confidence-threshold": "sample.confidence_threshold",
    "--seed": "sample.seed",
}


@FAST
@given(data=st.data())
def test_sample_options_accept_what_their_config_keys_accept(tmp_path_factory, data):
    """An option's value is refused at parse time (exit 2, one line naming the option) exactly
    when its key refuses it as an override or it is the key's unset value."""
    option = data.draw(st.sampled_from(sorted(OPTIONS)))
    key = OPTIONS[option]
    category = data.draw(st.sampled_from(CATEGORIES))
    text = data.draw(st.sampled_from(POOLS[key][category]))
    try:
        cfg = build_config("tiny", [f"{key}={text}"])
        (_, rules), _ = key_rules(key)
        unset = [r.unset for r in rules if isinstance(r, Range) and r.unset is not None]
        as_key = getattr(cfg.sample, key.split(".")[1]) not in unset
    except ConfigError:
        as_key = False
    try:
        parse_option(key, text)
        as_option = True
    except ConfigError as exc:
        one_line(exc)
        as_option = False
    assert as_option == as_key, (option, text)
    missing = str(tmp_path_factory.getbasetemp() / "no-such-run")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(["sample", missing, f"{option}={text}"])
        except SystemExit as exc:
            code = exc.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    # Accepted: the command goes on to the run folder (missing here); refused: the option.
    assert (f"argument {option}" in lines[0]) != as_option, lines[0]


# The issue's four cases: before, the first two ran (0 steps; a sample), the last two ended in
# a ZeroDivisionError and a ValueError traceback.
FOUR_CASES = [
    (["train.max_steps=-5"], "train.max_steps must be an integer >= 1, or 0 (= train.total_steps)"),
    (["--disc-steps", "0"], "argument --disc-steps: sample.disc_steps must be an integer >= 1"),
    (["train.batch_size=0"], "train.batch_size must be an integer >= 1, got 0"),
    (["model.width=130"], "model.width=130 must be divisible by model.heads=4"),
]


@pytest.mark.parametrize(
    "args, words", FOUR_CASES, ids=["max_steps", "disc_steps", "batch_size", "width"]
)
def test_the_issues_four_cases_are_one_line_errors_that_write_nothing(
    tmp_path, monkeypatch, capsys, args, words
):
    monkeypatch.setenv("DILADIFF_CACHE", str(tmp_path / "cache"))
    run = str(tmp_path / "run")
    if args[0].startswith("--"):
        argv = ["sample", run, *args]
    else:
        argv = ["train", "mdlm", "--preset", "tiny", "--run-dir", run, *args]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # no run folder, no cache


def test_a_plugin_section_gets_the_same_checks():
    """A method's section declared outside the package (as a plug-in's) is checked by its own
    declarations, with the same one-line errors and the same option parsing."""
    from dataclasses import dataclass
    from typing import Annotated

    from diladiff.config import SECTIONS, DivisibleBy, register_section

    @register_section("fuzzplugin")
    @dataclass
    class PluginConfig:
        scale: Annotated[float, Range(gt=0)] = 1.0
        width: Annotated[int, Range(ge=1), DivisibleBy("model.heads")] = 64

    try:
        assert build_config("tiny", ["fuzzplugin.scale=2"]).fuzzplugin.scale == 2.0
        for override, words in [
            ("fuzzplugin.scale=0", "fuzzplugin.scale must be > 0, got 0.0"),
            ("fuzzplugin.scale=inf", "fuzzplugin.scale must be a finite number"),
            ("fuzzplugin.width=6", "fuzzplugin.width=6 must be divisible by model.heads=4"),
        ]:
            with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as exc:
                build_config("tiny", [override])
            one_line(exc.value)
        with pytest.raises(ConfigError, match="must be an integer >= 1, got '0'"):
            parse_option("fuzzplugin.width", "0")
    finally:
        del SECTIONS["fuzzplugin"]
