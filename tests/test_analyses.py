"""The paper's analyses (issue 17): the tanh error model, BERTScore, and the three analyze
commands on a tiny trained chain."""

import json
import math

import pytest
import torch

from diladiff.processes.tanh_fit import TanhCurve, fit_tanh


@pytest.mark.parametrize(
    "true, s_max, noise_std",
    [
        (TanhCurve(a=0.5, b=0.4, c=2.0, e=1.0), 3.0, 0.005),
        # a robust decoder: the error rate moves by 2% (the tiny demo's shape); the fit must not
        # stop at its starting point because the squared errors are tiny in absolute terms
        (TanhCurve(a=0.885, b=0.01, c=0.65, e=2.9), 5.0, 1e-4),
    ],
)
def test_tanh_fit_recovers_known_parameters_and_inverts(true, s_max, noise_std):
    s = torch.linspace(0, s_max, 30, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    fit = fit_tanh(s, true(s) + noise_std * torch.randn(30, generator=gen, dtype=torch.float64))
    for k, v in true.to_dict().items():
        assert getattr(fit, k) == pytest.approx(v, rel=0.05), k
    probe = torch.tensor([0.3, 1.0, 2.2], dtype=torch.float64)
    assert torch.allclose(fit.inverse(fit(probe)), probe, atol=1e-9)
    with pytest.raises(ValueError, match="strictly within"):
        fit.inverse(torch.tensor([fit.a + 1.01 * fit.b]))  # beyond the curve's range
    assert float(fit.inverse(fit.a)) == pytest.approx(fit.e)  # the knee
    with pytest.raises(ValueError, match="constant"):
        fit_tanh(s, torch.full_like(s, 0.3))


def test_bertscore_is_one_for_identical_texts_and_drops_for_shuffled():
    pytest.importorskip("bert_score")
    from diladiff.analysis.latent_semantics import BertScore

    scorer = BertScore("minilm-l6")
    text = "the river flows through the old town and into the sea before the winter"
    words = text.split()
    shuffled = " ".join(words[::2] + words[1::2])
    same, mixed = scorer.f1([text, text], [text, shuffled])
    assert same == pytest.approx(1.0, abs=1e-5) and mixed < 0.95


@pytest.fixture(scope="module")
def chain(latent_chain):
    return latent_chain


@pytest.mark.parametrize(
    "what, run",
    [
        ("robustness", "ladiff"),
        ("cross-attention", "ladiff"),
        ("cross-attention", "ae"),
        ("latent", "ladiff"),
    ],
)
def test_analyze_commands_write_json_and_png(chain, tmp_path, what, run):
    from diladiff.cli import main
    from diladiff.config import Config
    from diladiff.methods.autoencoder.stage import cross_attention_blocks

    if what == "latent":
        pytest.importorskip("bert_score")
    out = tmp_path / "a"
    argv = ["analyze", what, str(chain[run]), "--num-rows", "4", "--out", str(out)]
    extra = {
        "robustness": ["--mc-samples", "2"],
        "latent": ["--bertscore-model", "minilm-l6", "--disc-steps", "4", "--pool-pairs", "2"],
    }
    assert main(argv + extra.get(what, [])) == 0
    result = json.loads((out / f"{what}.json").read_text())
    assert (out / f"{what}.png").stat().st_size > 0
    if what != "cross-attention":
        assert result["latent_std"]["rows"] == 4 and result["latent_std"]["mean"] > 0
    if what == "robustness":
        rec = [p["recovery"] for p in result["points"]]
        assert len(rec) == 11 and all(0 <= r <= 1 for r in rec)
        assert result["points"][0]["noise_std"] == 0 and rec[0] >= rec[-1]
        assert "tanh_fit" in result or result["tanh_fit_error"]
    elif what == "cross-attention":
        cfg = Config.load(chain["ae"] / "config.json")
        injected = cross_attention_blocks(cfg.autoencoder.cross_attn_after, cfg.model.depth)
        assert result["injected_after_blocks"] == sorted(injected)
        assert len(result["bins"]) == 10
        for b in result["bins"]:
            assert sorted(int(k) for k in b["layers"]) == sorted(injected)  # one per layer
            values = [x for v in b["layers"].values() for x in (v["cross"], v["self"])]
            assert all(math.isfinite(x) and x >= 0 for x in values)
    else:
        curve = result["noise_curve"]
        assert curve[0]["noise_std"] == 0 and curve[0]["f1_mean"] == pytest.approx(1.0, abs=1e-4)
        pools = result["pools"]
        assert pools["pairs"] == 2 and len(pools["per_pair"]) == 2
        for key in ("intra_mean", "inter_mean", "inter_same_seed_mean", "inter_other_seed_mean"):
            assert 0 < pools[key] <= 1 + 1e-6, key
        # inter = its 10 same-seed and 90 other-seed pairs
        mix = (pools["inter_same_seed_mean"] + 9 * pools["inter_other_seed_mean"]) / 10
        assert pools["inter_mean"] == pytest.approx(mix)


def test_analyze_latent_bad_scorer_is_a_one_line_error(chain, tmp_path, capsys):
    pytest.importorskip("bert_score")
    from diladiff.cli import main

    argv = ["analyze", "latent", str(chain["ae"]), "--bertscore-model", str(tmp_path / "none")]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "cannot load the BERTScore model" in err and len(err.strip().splitlines()) == 1


def test_analyze_refuses_an_mdlm_run(chain, capsys):
    from diladiff.cli import main

    assert main(["analyze", "robustness", str(chain["mdlm"])]) == 2
    assert "need an auto-encoder, LaDiff or DiLaDiff run" in capsys.readouterr().err
