import json

import pytest
import torch
from latent_fixtures import PRIOR_SMALL, build_chain, train
from safetensors.torch import load_file

from diladiff.cli import main
from diladiff.train.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return build_chain(tmp_path_factory.mktemp("chain"))


def test_ladiff_run_resumes_exactly(chain, tmp_path):
    ae = chain["ae"]
    assert (
        train("ladiff", tmp_path / "a", "--autoencoder", ae, *PRIOR_SMALL, "train.max_steps=5") == 0
    )
    assert (
        train("ladiff", tmp_path / "a", "--autoencoder", ae, *PRIOR_SMALL, "train.max_steps=10")
        == 0
    )
    assert (
        train("ladiff", tmp_path / "b", "--autoencoder", ae, *PRIOR_SMALL, "train.max_steps=10")
        == 0
    )
    a = load_file(latest_checkpoint(tmp_path / "a") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "b") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the auto-encoder inside stayed frozen: identical to the parent's EMA weights
    parent = load_file(latest_checkpoint(ae) / "ema.safetensors")
    assert all(torch.equal(a[f"ae.{k}"], parent[k].to(a[f"ae.{k}"].dtype)) for k in parent)


def test_schedule_warping_is_a_config_override(chain, tmp_path):
    assert (
        train(
            "ladiff",
            tmp_path / "d5",
            "--autoencoder",
            chain["ae"],
            *PRIOR_SMALL,
            "diffusion.d=5",
            "train.max_steps=1",
        )
        == 0
    )
    cfg = json.loads((tmp_path / "d5" / "config.json").read_text())
    assert cfg["diffusion"]["d"] == 5.0 and cfg["autoencoder"]["latent_dim"] == 64


def test_sample_ladiff_run_decodes_text(chain, tmp_path):
    out = tmp_path / "s.jsonl"
    assert (
        main(
            [
                "sample",
                str(chain["ladiff"]),
                "--num-samples",
                "3",
                "--cont-steps",
                "10",
                "--disc-steps",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["ids"]) == 32 and r["text"] for r in rows)
    meta = json.loads((tmp_path / "s.jsonl.meta.json").read_text())
    assert meta["stage"] == "ladiff" and meta["cont_nfe"] == 10 and meta["cont_steps"] == 10


def test_bench_reports_latent_overhead(chain, capsys):
    assert (
        main(
            [
                "bench",
                "sample",
                str(chain["ladiff"]),
                "--batch-sizes",
                "1,2",
                "--repeats",
                "1",
                "--cont-steps",
                "5",
                "--disc-steps",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "latent_s" in out and "decode_s" in out and "latent_overhead" in out


def test_ladiff_needs_an_autoencoder_parent(chain, tmp_path, capsys):
    assert main(["train", "ladiff", "--preset", "tiny", "--run-dir", str(tmp_path / "x")]) == 2
    assert "needs --autoencoder" in capsys.readouterr().err
    assert train("ladiff", tmp_path / "y", "--autoencoder", chain["mdlm"], "train.max_steps=1") == 2
    assert "not an autoencoder run" in capsys.readouterr().err
