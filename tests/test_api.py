"""The Python API: diladiff.load(run).generate(...) with keyword settings, no config mutation."""

import pytest
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
