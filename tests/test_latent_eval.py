"""`diladiff eval-latent` and the oracle / noise-latent controls on a tiny trained chain."""

import json

import pytest
import torch
from latent_fixtures import build_chain, train

from diladiff.cli import main
from diladiff.eval.latent_diag import reference_latents, same_latent_space, sampler_grid
from diladiff.eval.oracle import control_latents, decode_latents, oracle_rows, token_recovery
from diladiff.runs import load_run
from diladiff.sampling.masked import SamplerSettings


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    runs = build_chain(tmp_path_factory.mktemp("lchain"))
    runs["diladiff"] = runs["ladiff"].parent / "diladiff"
    assert (
        train("diladiff", runs["diladiff"], "--teacher", runs["ladiff"], "train.max_steps=2") == 0
    )
    return runs


def eval_latent(run, out, *extra):
    args = ["eval-latent", str(run), "--num-samples", "6", "--train-rows", "10", "--json", str(out)]
    return main([*args, *extra])


def test_eval_latent_on_a_ladiff_run(chain, tmp_path, capsys):
    out = tmp_path / "l.json"
    assert eval_latent(chain["ladiff"], out, "--cont-steps", "8,2") == 0
    printed = capsys.readouterr().out
    assert "frechet" in printed and "nn_ratio" in printed
    res = json.loads(out.read_text())
    assert res["protocol"]["version"].startswith("diladiff-eval")
    assert res["protocol"]["num_samples"] == 6 and res["protocol"]["train_reference_rows"] == 10
    rows = {r["sampler"]: r for r in res["metrics"]["rows"]}
    assert list(rows) == [
        "encoder train (floor)",
        "encoder held-out",
        "ladiff N_cont=8",
        "ladiff N_cont=2",
    ]
    assert rows["ladiff N_cont=8"]["cont_nfe"] == 8 and rows["ladiff N_cont=2"]["cont_nfe"] == 2
    assert rows["encoder held-out"]["nn_ratio"] == pytest.approx(1.0)
    for name in ("encoder train (floor)", "ladiff N_cont=8"):
        r = rows[name]
        assert r["frechet"] >= 0 and r["nn_ratio"] > 0 and r["sq_norm"] > 0
        assert r["mean_abs_mean_diff"] >= 0 and r["mean_abs_log_sd_ratio"] >= 0


def test_eval_latent_on_a_diladiff_run_crosses_cont_steps_and_gammas(chain, tmp_path):
    out = tmp_path / "d.json"
    assert eval_latent(chain["diladiff"], out, "--gamma", "0,0.3") == 0
    names = [r["sampler"] for r in json.loads(out.read_text())["metrics"]["rows"]]
    assert names[2:] == ["diladiff N_cont=5 gamma=0", "diladiff N_cont=5 gamma=0.3"]
    stage, _ = load_run(chain["diladiff"])
    assert sampler_grid(stage, [5, 2], [0.0]) == [
        {"cont_steps": 5, "gamma": 0.0},
        {"cont_steps": 2, "gamma": 0.0},
    ]
    assert sampler_grid(stage)[1]["gamma"] > 0  # the default: gamma 0 and gamma > 0


def test_eval_latent_refuses_runs_without_a_prior(chain, tmp_path, capsys):
    assert eval_latent(chain["mdlm"], tmp_path / "m.json") == 2
    assert "latent prior" in capsys.readouterr().err
    assert eval_latent(chain["ladiff"], tmp_path / "g.json", "--gamma", "0.2") == 2


def test_diladiff_shares_its_teachers_reference_latents(chain):
    teacher, tok = load_run(chain["ladiff"])
    student, _ = load_run(chain["diladiff"])
    refs = reference_latents(teacher, tok, 4, 6)
    assert refs["heldout"].shape == (4, *teacher.latent_shape)
    assert len(refs["train_floor"]) == 4 and len(refs["train_ref"]) == 6
    assert same_latent_space(student, refs, "cpu")
    with torch.no_grad():
        student.prior_norm.mean.add_(1.0)  # another prior space
    assert not same_latent_space(student, refs, "cpu")


def test_token_recovery_by_hand():
    assert token_recovery([[1, 2, 3, 4]], [[1, 2, 0, 0]]) == 0.5
    assert token_recovery([[1, 2], [3, 4]], [[1, 2], [3, 4]]) == 1.0
    with pytest.raises(ValueError):
        token_recovery([[1, 2]], [[1, 2, 3]])


def test_oracle_and_noise_latent_controls_decode_and_score_recovery(chain):
    stage, tok = load_run(chain["ladiff"])
    rows, meta = oracle_rows(stage, tok, 4)
    assert rows.shape == (4, stage.seq_len)
    assert meta["oracle_rows"].startswith("val[") and not meta["overlaps_mauve_reference"]
    latents = control_latents(stage, rows, 0, 3, "cpu")
    with torch.no_grad():
        assert torch.allclose(latents["oracle"], stage.ae.encode(torch.from_numpy(rows)), atol=1e-5)
    assert latents["noise_latent"].shape == latents["oracle"].shape
    settings = SamplerSettings(steps=4)
    gen = decode_latents(stage, tok, latents["oracle"], settings, 0, 3, "cpu")
    assert len(gen.ids) == len(gen.texts) == 4 and gen.stats["disc_nfe"] > 0
    again = decode_latents(stage, tok, latents["oracle"], settings, 0, 3, "cpu")
    assert gen.ids == again.ids  # seeded
    assert 0.0 <= token_recovery(gen.ids, rows) <= 1.0
