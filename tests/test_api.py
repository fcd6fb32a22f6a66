"""The Python API: diladiff.load(run).generate(...) with keyword settings, no config mutation."""

import pytest
import torch
from conftest import TINY

import diladiff
from diladiff.cli import main
from diladiff.config import ConfigError


def test_load_and_generate_with_keyword_settings(tmp_path, capsys):
    run = tmp_path / "m"
    argv = ["train", "mdlm", "--preset", "tiny", "--run-dir", str(run), *TINY, "train.max_steps=2"]
    assert main(argv) == 0
    model = diladiff.load(run, device="cpu")
    before = model.stage.cfg.sample
    out = model.generate(num_samples=3, disc_steps=4, temperature=0.9, seed=1)
    assert model.kind == "mdlm" and len(out.texts) == 3 and len(out.ids[0]) == 32
    assert out.stats["disc_steps_taken"] == 4 * 1  # one batch of 3
    assert model.stage.cfg.sample == before  # the run's settings are not mutated
    again = model.generate(num_samples=3, disc_steps=4, temperature=0.9, seed=1)
    assert again.ids == out.ids  # reproducible from the seed
    assert model.generate(num_samples=3, disc_steps=4, seed=2).ids != out.ids
    with pytest.raises(ConfigError, match="unknown sampling setting"):
        model.settings(nonsense=1)


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert (
        exc.value.code == 0
        and capsys.readouterr().out.strip() == f"diladiff {diladiff.__version__}"
    )


def test_export_from_pretrained_generates_the_run_folders_ids(tmp_path, capsys):
    """diladiff export -> a folder with config, weights, tokenizer and card ->
    ExportedModel.from_pretrained / diladiff.load / diladiff sample: the same ids as the run
    folder for the same seed; a frozen feature model is referenced by name, not copied."""
    import json

    from diladiff.hub import ExportedModel

    run = tmp_path / "m"
    argv = ["train", "mdlm", "--preset", "tiny", "--run-dir", str(run), *TINY, "train.max_steps=2"]
    assert main(argv) == 0
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "mdlm" and config["settings"]["data"]["seq_len"] == 32
    assert "training data" in (out / "README.md").read_text()
    exported = ExportedModel.from_pretrained(out)
    original = diladiff.load(run, device="cpu")
    for k, v in original.stage.state_dict().items():
        assert torch.equal(exported.stage.state_dict()[k], v)
    a = original.generate(num_samples=2, disc_steps=4, seed=3)
    b = diladiff.load(out, device="cpu").generate(num_samples=2, disc_steps=4, seed=3)
    assert a.ids == b.ids and a.texts == b.texts
    assert main(["sample", str(out), "--num-samples", "2", "--disc-steps", "4", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert all(text in printed for text in a.texts)


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nowhere" / "model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a diladiff run folder" in err
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_score_is_a_perplexity_bound_that_prefers_the_training_text(tmp_path):
    """model.score(texts): the discrete-ratio bound over the packed texts, reproducible from
    the seed; a model trained on a repeated sentence scores it far better than unseen words."""
    run = tmp_path / "m"
    text = "the river flows through the old town and into the sea ."
    (tmp_path / "c.txt").write_text("\n\n".join([text] * 400))
    argv = ["train", "mdlm", "--preset", "tiny", "--run-dir", str(run), *TINY]
    argv += [f"data.source={tmp_path / 'c.txt'}", "train.max_steps=150", "train.lr=3e-3"]
    assert main(argv) == 0
    model = diladiff.load(run, device="cpu")
    unseen = "quantum zebra violin harbour algebra copper lantern meadow orbit tulip saga"
    good = model.score([text] * 8, mc_samples=8)
    bad = model.score([unseen] * 8, mc_samples=8)
    assert good["tokens"] % 32 == 0 and not good["conditional"]
    assert good == model.score([text] * 8, mc_samples=8)
    assert 1.0 < good["ppl_bound"] < bad["ppl_bound"] / 3
    with pytest.raises(ConfigError, match="one row needs"):
        model.score(["short"])


def _options(parser, command: list[str]) -> set[str]:
    """The option strings of a (nested) subcommand of the `diladiff` parser."""
    import argparse

    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {s for a in parser._actions for s in a.option_strings}


def test_every_sampling_setting_has_one_definition_that_the_cli_and_the_api_take(tmp_path):
    """SampleConfig is the one definition: each key is an option of `sample` (and, but for the
    per-command keys, of `bench sample`), and a keyword of Model.generate."""
    import dataclasses

    from diladiff.cli import PER_COMMAND, build_parser
    from diladiff.config import SampleConfig, field_help

    keys = [f.name for f in dataclasses.fields(SampleConfig)]
    assert sorted(field_help(SampleConfig)) == sorted(keys)  # every key documented
    parser = build_parser()
    sample, bench = _options(parser, ["sample"]), _options(parser, ["bench", "sample"])
    for key in keys:
        flag = "--" + key.replace("_", "-")
        assert flag in sample and (key in PER_COMMAND or flag in bench), key
    # booleans both ways; the option the CLI had before the one definition still works
    assert {"--no-cache", "--cache", "--no-float64-gumbel"} <= sample

    run = tmp_path / "m"
    argv = ["train", "mdlm", "--preset", "tiny", "--run-dir", str(run), *TINY, "train.max_steps=2"]
    assert main(argv) == 0
    model = diladiff.load(run, device="cpu")
    every = {  # a non-default value of every key
        "disc_steps": 4,
        "strategy": "topk",
        "confidence_threshold": 0.5,
        "temperature": 0.9,
        "top_p": 0.95,
        "float64_gumbel": False,
        "cache": False,
        "sampler": "reference",
        "latent_sampler": "ode_euler",
        "cont_steps": 3,
        "gamma": 0.0,
        "time_grid": "uniform",
        "inference": "sequential",
    }
    assert sorted(every) == sorted(
        k for k in keys if k not in ("num_samples", "seed", "batch_size")
    )
    sc = model.settings(**every)
    assert all(getattr(sc, k) == v for k, v in every.items())
    out = model.generate(num_samples=2, seed=1, **{k: every[k] for k in ("disc_steps", "cache")})
    assert len(out.ids) == 2


def test_the_api_selects_ladd_inference(tmp_path):
    """Model.generate(inference=...) reaches LADD's sampler: sequential inference makes the
    latent-only network calls (cont_nfe) that joint inference does not."""
    from test_ladd import train as train_ladd

    assert train_ladd("di-ladd", tmp_path / "di", "train.max_steps=2") == 0
    model = diladiff.load(tmp_path / "di", device="cpu")
    joint = model.generate(num_samples=2, disc_steps=4, inference="joint")
    seq = model.generate(num_samples=2, disc_steps=4, inference="sequential", cont_steps=3)
    assert joint.stats.get("cont_nfe", 0) == 0 and seq.stats["cont_nfe"] == 3
