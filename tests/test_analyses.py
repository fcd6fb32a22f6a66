"""The paper's analyses (issue 17): the tanh error model, BERTScore, and the three analyze
commands on a tiny trained chain."""

import json
import math

import pytest
import torch

from diladiff.processes.tanh_fit import TanhCurve, fit_tanh


def test_tanh_fit_recovers_known_parameters_and_inverts():
    true = TanhCurve(a=0.5, b=0.4, c=2.0, e=1.0)
    s = torch.linspace(0, 3, 30, dtype=torch.float64)
    noise = 0.005 * torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fit = fit_tanh(s, true(s) + noise)
    for k, v in true.to_dict().items():
        assert getattr(fit, k) == pytest.approx(v, rel=0.03, abs=0.01), k
    probe = torch.tensor([0.3, 1.0, 2.2], dtype=torch.float64)
    assert torch.allclose(fit.inverse(fit(probe)), probe, atol=1e-9)
    with pytest.raises(ValueError, match="strictly within"):
        fit.inverse(torch.tensor([fit.a + fit.b]))


def test_bertscore_is_one_for_identical_texts_and_drops_for_shuffled():
    from diladiff.analysis.latent_semantics import BertScore

    scorer = BertScore("minilm-l6")
    text = "the river flows through the old town and into the sea before the winter"
    words = text.split()
    shuffled = " ".join(words[::2] + words[1::2])
    same, mixed = scorer.f1([text, text], [text, shuffled])
    assert same == pytest.approx(1.0, abs=1e-5) and mixed < 0.95


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from latent_fixtures import build_chain

    return build_chain(tmp_path_factory.mktemp("anchain"))


@pytest.mark.parametrize("what", ["robustness", "cross-attention", "latent"])
def test_analyze_commands_write_json_and_png(chain, tmp_path, what):
    from diladiff.cli import main

    out = tmp_path / "a"
    argv = ["analyze", what, str(chain["ladiff"]), "--num-rows", "4", "--out", str(out)]
    extra = {
        "robustness": ["--mc-samples", "2"],
        "latent": ["--bertscore-model", "minilm-l6", "--disc-steps", "4"],
    }
    assert main(argv + extra.get(what, [])) == 0
    result = json.loads((out / f"{what}.json").read_text())
    assert (out / f"{what}.png").stat().st_size > 0
    if what == "robustness":
        rec = [p["recovery"] for p in result["points"]]
        assert len(rec) == 11 and all(0 <= r <= 1 for r in rec)
        assert result["points"][0]["noise_std"] == 0 and (
            "tanh_fit" in result or result["tanh_fit_error"]
        )
    elif what == "cross-attention":
        assert len(result["bins"]) == 10
        for b in result["bins"]:
            values = [x for v in b["layers"].values() for x in v.values()]
            assert values and all(math.isfinite(x) and x >= 0 for x in values)
    else:
        curve = result["noise_curve"]
        assert curve[0]["noise_std"] == 0 and curve[0]["f1_mean"] == pytest.approx(1.0, abs=1e-4)
        assert 0 < result["pools"]["intra_mean"] <= 1 and 0 < result["pools"]["inter_mean"] <= 1


def test_analyze_refuses_an_mdlm_run(chain, capsys):
    from diladiff.cli import main

    assert main(["analyze", "robustness", str(chain["mdlm"])]) == 2
    assert "need an auto-encoder, LaDiff or DiLaDiff run" in capsys.readouterr().err
