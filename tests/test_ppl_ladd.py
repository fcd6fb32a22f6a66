"""`diladiff eval-ppl` on a LADD run: the token channel's 1/t-weighted bound given the text's own
latent path (methods/ladd/stage.py token_nll_bound), named as such, not the weight-1 training
loss."""

import json

import pytest
import torch
from test_ladd import train

from diladiff.cli import main


def test_eval_ppl_on_a_ladd_run_reports_the_token_channel_bound(tmp_path, capsys):
    from diladiff.eval.ppl import corpus_rows, eval_ppl
    from diladiff.runs import load_run

    run = tmp_path / "co"
    assert train("co-ladd", run, "train.max_steps=2") == 0
    res = eval_ppl(run, sequences=4, mc_samples=2, seed=3)
    # the same rows, seed and draws through the stage's held-out forward
    stage, tok = load_run(run)
    x0 = corpus_rows(stage, tok, None, 4, None, "cpu")
    gen = torch.Generator("cpu").manual_seed(3)
    with torch.no_grad():
        draws = [stage(x0, gen)[1] for _ in range(2)]
    bound = sum(float(m["token_nll_bound"]) for m in draws) / 2
    weight_one = sum(float(m["loss_x"]) for m in draws) / 2
    assert res["nll_bound"] == pytest.approx(bound, rel=1e-6)
    assert res["nll_bound"] > 1.05 * weight_one  # not the training loss
    assert res["conditional"] is True and "1/t" in res["bound"] and "latent" in res["bound"]
    assert res["sequences"] == 4 and res["mc_samples"] == 2
    out = tmp_path / "ppl.json"
    argv = ["eval-ppl", str(run), "--num-sequences", "4", "--samples", "2", "--seed", "3"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LADD token channel" in printed and "not on -log p(x)" in printed
    saved = json.loads(out.read_text())
    assert saved["nll_bound"] == pytest.approx(bound, rel=1e-6)
