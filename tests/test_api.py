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
