import json
import re

import numpy as np
import pytest
import torch
from latent_fixtures import PRIOR_SMALL, train
from safetensors.torch import load_file

from diladiff.cli import main
from diladiff.data.packing import prepare_data
from diladiff.methods.ladiff import LaDiff
from diladiff.runs import load_run
from diladiff.sampling import generate
from diladiff.sampling.generate import GenerationSettings
from diladiff.sampling.latent import LatentSettings, sample_latent
from diladiff.sampling.masked import SamplerSettings
from diladiff.train.checkpoint import latest_checkpoint, load_weights


@pytest.fixture(scope="module")
def chain(latent_chain):
    return latent_chain


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
    parent, _ = load_weights(ae, "ema")
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
    assert re.search("is a run of mdlm, not of autoencoder", capsys.readouterr().err)


def encode_rows(fn, rows, batch=64):
    return torch.cat(
        [
            fn(torch.from_numpy(np.asarray(rows[i : i + batch], dtype=np.int64)))
            for i in range(0, len(rows), batch)
        ]
    ).double()


def test_prior_data_has_zero_mean_unit_variance_coordinates(chain):
    """The prior-space standardisation is estimated from the frozen encoder when the run starts
    (here from all training rows: fewer than diffusion.latent_stats_rows)."""
    stage, tok = load_run(chain["ladiff"])
    assert stage.prior_norm.fitted
    rows = prepare_data(stage.cfg.data, tok, progress=False).train
    assert len(rows) < stage.cfg.diffusion.latent_stats_rows
    z = encode_rows(stage.prior_latents, rows)
    mean, var = z.mean(0), z.var(0, unbiased=False)
    assert mean.abs().max() < 1e-3 and (var - 1).abs().max() < 1e-3
    # The auto-encoder's own statistics (averaged over its training batches) are far off:
    # the prior would not see standardised coordinates without its own standardisation.
    z_ae = encode_rows(stage.ae.encode, rows)
    mean_ae, var_ae = z_ae.mean(0), z_ae.var(0, unbiased=False)
    assert mean_ae.abs().max() > 0.1 or (var_ae - 1).abs().max() > 0.1


def test_latent_spaces_round_trip_and_sampling_decodes_in_decoder_space(chain, monkeypatch):
    stage, _ = load_run(chain["ladiff"])
    x0 = torch.randint(1000, 3000, (3, 32))
    z_ae = stage.ae.encode(x0)
    assert torch.allclose(stage.to_decoder_space(stage.prior_latents(x0)), z_ae, atol=1e-5)
    assert torch.allclose(stage.to_prior_space(z_ae), stage.prior_latents(x0))
    tokens = SamplerSettings(steps=4)
    latent = LatentSettings(LaDiff.latent_sampler, steps=3)
    settings = GenerationSettings(tokens, latent)
    seen = {}
    decode = generate.decode_latent

    def spy(stage, z, *args, **kwargs):
        seen["z"] = z
        return decode(stage, z, *args, **kwargs)

    monkeypatch.setattr(generate, "decode_latent", spy)
    ids, st = generate.sample_batch(stage, 2, settings, torch.Generator().manual_seed(0), "cpu")
    assert ids.shape == (2, 32) and st["cont_nfe"] == 3
    assert set(st) == {"disc_nfe", "disc_steps_taken", "cont_nfe", "latent_s", "decode_s"}
    z_p, _ = sample_latent(stage, 2, latent, torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(seen["z"], stage.to_decoder_space(z_p))
    ids2, st2 = decode(stage, z_ae, tokens, torch.Generator().manual_seed(0), "cpu")
    assert ids2.shape == (3, 32) and {"disc_nfe", "disc_steps_taken", "decode_s"} <= set(st2)


def test_checkpoint_without_prior_standardisation_loads_as_the_identity(chain):
    """Runs written before the prior had its own standardisation trained on ae.encode(x0)."""
    weights, _ = load_weights(chain["ladiff"], "ema")
    old = {k: v for k, v in weights.items() if not k.startswith("prior_norm.")}
    stage, _ = load_run(chain["ladiff"])
    fresh = LaDiff(stage.cfg, stage.tokenizer_identity)
    with pytest.warns(UserWarning, match="identity"):
        fresh.load_state_dict(old)
    z = torch.randn(2, *fresh.latent_shape)
    assert torch.equal(fresh.to_decoder_space(z), z)
