"""Stages as plug-ins: a method defined in tests/toy_stage.py (outside src/) registers itself,
trains, samples and runs through `diladiff pipeline` without any edit under src/."""

import json
import re
import sys

import pytest
from conftest import TINY

from diladiff import config as config_mod
from diladiff import pipeline
from diladiff.cli import main
from diladiff.config import Config, ConfigError
from diladiff.methods import load_plugins
from diladiff.stages import STAGES, stage_order


@pytest.fixture
def toy_registered():
    """Import the toy plug-in for one test, and unregister it afterwards (the registries are
    process-wide: other tests must not see a sixth stage)."""
    yield
    STAGES.pop("toy", None)
    config_mod.STAGE_PRESET_CHANGES.pop("toy", None)
    config_mod.SECTIONS.pop("toy", None)
    sys.modules.pop("toy_stage", None)


SMALL_PLAN = pipeline.EvalPlan(
    scorer="smollm2-135m",
    num_samples=4,
    batch_size=4,
    frontier_disc=(4,),
    bench_batches=(1,),
    bench_repeats=1,
    temperatures=(),
    frontier_mauve=False,
    bench_disc_divisors=(8,),
)


def test_a_stage_defined_outside_src_trains_samples_and_runs_the_pipeline(
    tmp_path, monkeypatch, capsys, toy_registered
):
    monkeypatch.setenv("DILADIFF_PLUGINS", "toy_stage")
    assert "toy_stage" in load_plugins() and "toy" in STAGES
    assert stage_order(["toy"]) == ["mdlm", "toy"]
    monkeypatch.setitem(pipeline.EVAL_PLANS, "tiny", SMALL_PLAN)
    root = tmp_path / "pipe"
    overrides = [*TINY, "train.max_steps=3"]
    args = ["--preset", "tiny", "--run-dir", str(root), "--device", "cpu"]
    assert main(["pipeline", "--stages", "toy", *args, *overrides]) == 0

    # trained in parent order, the toy run built on the MDLM run, with its own section
    assert (root / "mdlm" / "COMPLETE").is_file() and (root / "toy" / "COMPLETE").is_file()
    assert not (root / "autoencoder").exists()
    info = json.loads((root / "toy" / "run.json").read_text())
    assert info["stage"] == "toy" and info["parents"] == {"base": str((root / "mdlm").resolve())}
    cfg = json.loads((root / "toy" / "config.json").read_text())
    assert cfg["toy"] == {"logit_scale": 0.5} and cfg["train"]["lr"] == 1e-3
    # evaluated beside the MDLM at N_disc = L/8 and L
    report = (root / "report.md").read_text()
    for row in ("mdlm_disc4", "mdlm_disc32", "toy_disc4", "toy_disc32"):
        assert f"| {row} |" in report
    # the MDLM's bound beside the unigram's, the gap named in words (above or below)
    line = re.search(
        r"at step \d+: ([\d.]+) nats/token .* tokens: ([\d.]+) .*; ([\d.]+) "
        r"nats/token (below|above) it\.",
        report,
    )
    bound, unigram, gap, side = float(line[1]), float(line[2]), float(line[3]), line[4]
    assert gap == pytest.approx(abs(unigram - bound), abs=2e-3)
    assert side == ("below" if bound <= unigram else "above")
    bench = json.loads((root / "eval" / "bench.json").read_text())
    assert {r["stage"] for r in bench} == {"mdlm", "toy"}

    # the CLI knows the stage: sampling, and its parent flag --base with kind checks
    out = tmp_path / "toy.jsonl"
    assert main(["sample", str(root / "toy"), "--num-samples", "2", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2
    capsys.readouterr()
    new = ["train", "toy", "--preset", "tiny", "--run-dir", str(tmp_path / "t2"), *TINY]
    assert main(new) == 2
    assert "needs --base RUN_DIR (a run of mdlm)" in capsys.readouterr().err
    assert main([*new, "--base", str(root / "toy")]) == 2
    assert "is a run of toy, not of mdlm" in capsys.readouterr().err
    assert not (tmp_path / "t2").exists()


def test_a_config_section_of_an_unloaded_plugin_is_a_clear_error():
    saved = Config().to_dict()
    with pytest.raises(ConfigError, match="belong to no registered method"):
        Config.from_dict({**saved, "nonexistent_method": {"x": 1}})
    # and a removed key of an older version is ignored, not an error
    old = {**saved, "sample": {**saved["sample"], "use_ema": True}}
    assert Config.from_dict(old) == Config.from_dict(saved)


def test_registry_order_puts_parents_first_and_rejects_cycles():
    assert stage_order() == ["mdlm", "autoencoder", "ladiff", "diladiff"]
    assert stage_order(["diladiff"]) == ["mdlm", "autoencoder", "ladiff", "diladiff"]
    with pytest.raises(KeyError, match="not registered"):
        stage_order(["nope"])


@pytest.fixture
def toy_method_registered():
    """Import the toy_method plug-in (tests/toy_method/) for one test, then unregister it."""
    from diladiff.sampling.generate import GENERATIONS

    yield
    STAGES.pop("toy-ltr", None)
    GENERATIONS.pop("left_to_right", None)
    config_mod.STAGE_PRESET_CHANGES.pop("toy-ltr", None)
    config_mod.SECTIONS.pop("left_to_right", None)
    for name in ("toy_method", "toy_method.stage", "toy_method.sampler"):
        sys.modules.pop(name, None)


@pytest.mark.slow
def test_a_method_with_its_own_generation_kind_is_one_folder_plus_one_registration(
    tmp_path, monkeypatch, capsys, toy_method_registered
):
    """tests/toy_method/: a stage, a left-to-right sampler registered as its own generation
    kind, nothing under src/ naming it; registered by DILADIFF_PLUGINS alone, it trains,
    samples (CLI and API), runs through the pipeline (evaluation rows, bench, GFLOPs) and is
    refused a prompt (its kind takes no canvas) with a one-line error, and is sampled by the
    parallel-decoding check beside the chain (`--methods toy-ltr`)."""
    from diladiff.sampling.generate import GENERATIONS

    monkeypatch.setenv("DILADIFF_PLUGINS", "toy_method")
    assert "toy_method" in load_plugins()
    assert "toy-ltr" in STAGES and "left_to_right" in GENERATIONS
    monkeypatch.setitem(pipeline.EVAL_PLANS, "tiny", SMALL_PLAN)
    root = tmp_path / "pipe"
    overrides = [*TINY, "train.max_steps=3"]
    args = ["--preset", "tiny", "--run-dir", str(root), "--device", "cpu"]
    assert main(["pipeline", "--stages", "toy-ltr", *args, *overrides]) == 0

    assert (root / "toy-ltr" / "COMPLETE").is_file() and not (root / "mdlm").exists()
    report = (root / "report.md").read_text()
    assert "| toy-ltr_disc4 |" in report and "| toy-ltr_disc32 |" in report
    sampled = json.loads((root / "eval" / "toy-ltr_disc4.json").read_text())
    assert sampled["generator"]["disc_nfe"] == 4 * 1  # 4 left-to-right calls, one batch of 4
    bench = json.loads((root / "eval" / "bench.json").read_text())
    assert {r["stage"] for r in bench} == {"toy-ltr"}
    frontier = json.loads((root / "frontier" / "frontier.json").read_text())
    assert all(p["gflops_per_sample"] > 0 for p in frontier["points"])  # SizedNetwork

    out = tmp_path / "ltr.jsonl"
    argv = ["sample", str(root / "toy-ltr"), "--num-samples", "2", "--disc-steps", "8"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = [json.loads(x)["ids"] for x in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r) == 32 for r in rows)
    model = diladiff_load(root / "toy-ltr")
    assert model.generate(num_samples=2, disc_steps=8).ids == rows  # same seed, same ids
    capsys.readouterr()
    assert main([*argv, "--prompt", "The"]) == 2
    assert "not toy-ltr's 'left_to_right'" in capsys.readouterr().err
    assert (
        main(["bench", "sample", str(root / "toy-ltr"), "--batch-sizes", "1", "--repeats", "1"])
        == 0
    )


def diladiff_load(run):
    import diladiff

    return diladiff.load(run, device="cpu")
