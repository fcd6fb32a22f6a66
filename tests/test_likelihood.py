"""The probability-flow ODE log-likelihood against closed forms, and eval-ppl end to end."""

import math

import pytest
import torch
from test_gaussian import gaussian_posterior_mean

from diladiff.processes.flow_likelihood import pf_ode_log_likelihood
from diladiff.processes.gaussian import alpha_sigma

pytest.importorskip("torchdiffeq")

MU = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
STD = torch.tensor([[0.5, 1.5, 1.0]], dtype=torch.float64)
D, T0 = 10.0, 1e-3


def closed_form(z):
    """log N(z; alpha mu, alpha^2 s^2 + sigma^2) at T0: the Gaussian prior's marginal."""
    a, s = (float(x) for x in alpha_sigma(torch.tensor(T0, dtype=torch.float64), D))
    var = a**2 * STD**2 + s**2
    return (-0.5 * (z - a * MU) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum((1, 2))


def points(n, seed=0):
    a, s = (float(x) for x in alpha_sigma(torch.tensor(T0, dtype=torch.float64), D))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, 1, 3), generator=g, dtype=torch.float64)
    return a * MU + torch.sqrt(a**2 * STD**2 + s**2) * noise


def x0_fn(z, t):
    return gaussian_posterior_mean(MU, STD, D)(z, t)


def test_exact_trace_matches_the_closed_form():
    z = points(16)
    logp, calls = pf_ode_log_likelihood(x0_fn, z, D, T0, exact=True, rtol=1e-6, atol=1e-6)
    assert calls > 10
    assert torch.allclose(logp, closed_form(z), atol=2e-3)


def test_rademacher_probes_are_exact_for_a_diagonal_prior():
    """N(mu, diag(s^2)) has a diagonal Jacobian, so eps^T J eps = tr J for every Rademacher eps:
    one probe gives the exact-trace result and the closed form."""
    z = points(8, seed=1)
    g = torch.Generator().manual_seed(0)
    one, _ = pf_ode_log_likelihood(x0_fn, z, D, T0, g, probes=1, rtol=1e-6, atol=1e-6)
    exact, _ = pf_ode_log_likelihood(x0_fn, z, D, T0, exact=True, rtol=1e-6, atol=1e-6)
    assert torch.allclose(one, exact, atol=1e-6)
    assert torch.allclose(one, closed_form(z), atol=2e-3)


COV = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, -0.5], [0.0, -0.5, 1.0]], dtype=torch.float64)


def correlated():
    """A correlated Gaussian prior N(MU, COV) (a full Jacobian: Rademacher probes are then
    noisy; for a diagonal one they are exact): its posterior mean and marginal at T0."""
    torch.manual_seed(0)  # the marginal's samples
    a, s = (float(x) for x in alpha_sigma(torch.tensor(T0, dtype=torch.float64), D))
    marginal = torch.distributions.MultivariateNormal(a * MU[0], a**2 * COV + s**2 * torch.eye(3))

    def fn(z, t):
        al, si = alpha_sigma(t.double(), D)
        out = []
        for zi, ai, sii in zip(z.reshape(-1, 3), al, si, strict=True):
            gain = ai * COV @ torch.linalg.inv(ai**2 * COV + sii**2 * torch.eye(3))
            out.append(MU[0] + gain @ (zi - ai * MU[0]))
        return torch.stack(out).view_as(z)

    return fn, marginal


def test_hutchinson_estimate_matches_the_closed_form_on_average():
    """Per point the Rademacher estimate of a correlated prior is noisy; averaged over 256
    points it agrees with the closed form within its standard error, and 4 probes are less
    noisy than 1."""
    fn, marginal = correlated()
    z = marginal.sample((256,)).view(256, 1, 3)
    exact = marginal.log_prob(z.view(256, 3))
    g = torch.Generator().manual_seed(2)
    one, _ = pf_ode_log_likelihood(fn, z, D, T0, g, probes=1, rtol=1e-5, atol=1e-5)
    diff = one - exact
    assert float(diff.std()) > 1e-3  # noisy per point ...
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(z))  # ... unbiased
    four, _ = pf_ode_log_likelihood(fn, z, D, T0, g, probes=4, rtol=1e-5, atol=1e-5)
    assert float((four - exact).std()) < float(diff.std())


@pytest.fixture(scope="module")
def chain(latent_chain):
    return latent_chain


def test_eval_ppl_end_to_end(chain, tmp_path, capsys):
    """MDLM: the eval-recon bound on the same rows and seed; auto-encoder: flagged
    conditional; LaDiff: finite terms that add up, one entry per t0 (t_eps first by default),
    the tightest reported."""
    import json

    from diladiff.cli import main
    from diladiff.eval.ppl import corpus_rows, eval_ppl
    from diladiff.eval.recon import discrete_ratio_bound
    from diladiff.runs import load_run

    mdlm = eval_ppl(chain["mdlm"], sequences=4, mc_samples=4)
    stage, tok = load_run(chain["mdlm"])
    x0 = corpus_rows(stage, tok, None, 4, None, "cpu")
    direct = discrete_ratio_bound(
        lambda x, c: stage.log_probs(x), x0, stage.mask_id, 4, torch.Generator().manual_seed(0)
    )
    assert mdlm["nll_bound"] == pytest.approx(direct["nll_bound"]) and not mdlm["conditional"]
    assert mdlm["bound"] == "-log p(x)" and mdlm["sequences"] == 4
    ae = eval_ppl(chain["ae"], sequences=4, mc_samples=4)
    assert ae["conditional"] and ae["bound"] == "-log p(x | E(x))"

    out = tmp_path / "ppl.json"
    argv = ["eval-ppl", str(chain["ladiff"]), "--num-sequences", "4", "--samples", "2"]
    assert main(argv + ["--t0", "0.1,0.3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["construction"] == "reconstructed" and not res["conditional"]
    assert [r["t0"] for r in res["per_t0"]] == [0.1, 0.3] and res["at_t_eps"] is None
    assert res["nll_bound"] == min(r["nll_bound"] for r in res["per_t0"])
    for r in res["per_t0"]:
        parts = r["decoder_nll_per_token"] + r["prior_nll_per_token"]
        assert math.isfinite(r["nll_bound"]) and math.isfinite(r["prior_nll_stderr_per_token"])
        assert r["nll_bound"] == pytest.approx(parts - r["posterior_entropy_per_token"])
        assert "no self-conditioning" in r["denoiser"]
    assert "t0=0.3:" in capsys.readouterr().out

    default = eval_ppl(chain["ladiff"], sequences=2, mc_samples=1)
    t_eps = default["at_t_eps"]["t0"]
    assert [r["t0"] for r in default["per_t0"]] == [t_eps, 0.01, 0.1, 0.4, 0.8]


def test_eval_ppl_on_a_small_foreign_corpus(chain, tmp_path, capsys):
    """--data a corpus with fewer documents than the run's data.heldout_docs (40): half of
    them are read (the model saw none); a missing source is one error line."""
    from conftest import write_jsonl

    from diladiff.cli import main
    from diladiff.eval.ppl import eval_ppl

    words = "the cat sat on a mat while it rained and the dog ran home".split()
    texts = [" ".join(words[i % 5 :] * 4) for i in range(10)]
    corpus = write_jsonl(tmp_path / "small.jsonl", texts)
    res = eval_ppl(chain["mdlm"], str(corpus), sequences=3, mc_samples=2)
    assert res["data"] == str(corpus) and 1 <= res["sequences"] <= 3
    assert math.isfinite(res["nll_bound"])
    assert main(["eval-ppl", str(chain["mdlm"]), "--data", str(tmp_path / "none.jsonl")]) != 0
    err = capsys.readouterr().err
    assert "does not exist" in err.strip().splitlines()[-1] and "Traceback" not in err
