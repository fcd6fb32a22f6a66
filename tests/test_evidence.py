"""The real-text evidence table (eval/evidence.py) on hand-made result files, and the
pipeline's evaluation grid (EvalPlan)."""

import json

import numpy as np
import pytest

from diladiff.eval.evidence import diagnose, evidence, evidence_markdown, judge_win
from diladiff.eval.protocol import PROTOCOL_VERSION
from diladiff.pipeline import EVAL_PLANS, EvalPlan, row_name

N = 64
REFERENCE = {"lm": {"order": 3}, "reference": {"rows": 10}}


def result(nll_per_word: float, entropy=4.0, distinct_2=0.8, recovery=None, seed=0) -> dict:
    """A protocol-v2 result of N samples of 20 words whose per-word n-gram NLL is about
    `nll_per_word` (noise from `seed`)."""
    rng = np.random.default_rng(seed)
    words = [20] * N
    nll = (nll_per_word + 0.3 * rng.standard_normal(N)) * 20
    metrics = {
        "ngram_ppl": float(np.exp(nll.sum() / sum(words))),
        "ngram_ppl_ci95": [0.0, 0.0],
        "entropy": entropy,
        "distinct_2": distinct_2,
        "seen_bigrams": 0.5,
        "copy_span": 3.0,
    }
    if recovery is not None:
        metrics["token_recovery"] = recovery
    return {
        "protocol": {
            "version": PROTOCOL_VERSION,
            "num_samples": N,
            "sample_seed": 0,
            "text_metrics": REFERENCE,
        },  # fmt: skip
        "metrics": metrics,
        "per_sample": {
            "words": words,
            "ngram_nll_sum": nll.tolist(),
            "seen_2": [10] * N,
            "seen_3": [5] * N,
            "copy_span": [3] * N,
        },
    }


def test_a_lower_perplexity_at_the_same_diversity_is_a_win_and_a_low_entropy_one_is_not():
    mdlm = result(6.0, seed=1)
    better = judge_win(result(5.5, seed=2), mdlm)
    assert better["win"] and better["diff"] < 0 and better["ci95"][1] < 0
    # the same perplexity gain bought with 10% less entropy: no win
    collapsed = judge_win(result(5.5, entropy=3.6, seed=2), mdlm)
    assert collapsed["excludes_zero"] and not collapsed["diverse"] and not collapsed["win"]
    assert collapsed["entropy_rel"] == pytest.approx(-0.1)
    # indistinguishable generators: the interval holds 0
    same = judge_win(result(6.0, seed=3), mdlm)
    assert not same["excludes_zero"] and not same["win"]
    # worse: interval above 0
    worse = judge_win(result(6.5, seed=2), mdlm)
    assert worse["ci95"][0] > 0 and not worse["win"]


def write(folder, name, res):
    (folder / f"{name}.json").write_text(json.dumps(res))


def test_evidence_reads_the_grid_judges_the_criteria_and_names_missing_rows(tmp_path):
    L = 16
    for s in ("topk", "ancestral"):
        for n in (1, 2, 4, 8, L):
            write(tmp_path, f"mdlm_{s}_disc{n}", result(6.0 if n < L else 5.0, seed=n))
            write(tmp_path, f"ladiff_{s}_cont200_disc{n}", result(5.2, seed=10 + n))
            if n != 4:  # one DiLaDiff row missing
                write(tmp_path, f"diladiff_{s}_cont5_disc{n}", result(5.25, seed=20 + n))
            write(tmp_path, f"oracle_{s}_disc{n}", result(4.0, recovery=0.6, seed=30 + n))
            write(tmp_path, f"other_row_latent_{s}_disc{n}", result(6.0, recovery=0.1))
            write(tmp_path, f"noise_latent_{s}_disc{n}", result(6.1, recovery=0.05))
    ev = evidence(tmp_path, ["topk", "ancestral"], [1, 2, 4, 8, L], L)
    assert len(ev["cells"]) == 10
    assert ev["missing"] == ["diladiff_topk_cont5_disc4", "diladiff_ancestral_cont5_disc4"]
    c = ev["criteria"]
    assert c["ladiff_beats_mdlm_at_1_2_4"]["all"]
    # DiLaDiff wins where it was measured, but a missing row is not a win
    assert not c["diladiff_beats_mdlm_at_1_2_4"]["all"]
    assert c["diladiff_beats_mdlm_at_1_2_4"]["cells"] == ["topk@1", "topk@2", "ancestral@1",
                                                         "ancestral@2"]  # fmt: skip
    # headline: LaDiff at L/8 = 2 (5.2 nats) against the MDLM at L (5.0 nats): a loss
    assert not c["headline_topk"]["win"] and c["headline_topk"]["diff"] > 0
    assert c["student_vs_teacher_topk_disc8"]["within"]
    assert ev["diagnosis"] == "every link carries the latent"
    md = evidence_markdown(ev)
    assert "### topk" in md and "| 1 | ladiff |" in md and "Missing rows" in md


def test_diagnosis_names_the_failing_link():
    def cell(own, other, ladiff=5.0, diladiff=5.0, oracle=4.0, noise=6.0):
        return {
            "disc_steps": 1,
            "oracle": {"token_recovery": own, "ngram_ppl": oracle},
            "other_row_latent": {"token_recovery": other},
            "noise_latent": {"ngram_ppl": noise},
            "ladiff": {"ngram_ppl": ladiff},
            "diladiff": {"ngram_ppl": diladiff},
        }

    assert diagnose([]) == "no controls measured"
    assert "ignores the latent" in diagnose([cell(0.12, 0.10)])
    assert "prior misses" in diagnose([cell(0.6, 0.1, ladiff=5.8)])
    assert "distillation" in diagnose([cell(0.6, 0.1, ladiff=4.5, diladiff=5.5)])
    assert diagnose([cell(0.6, 0.1, ladiff=4.5, diladiff=4.6)]) == "every link carries the latent"


def test_eval_plan_grid_strategies_and_scored_rows():
    plan = EVAL_PLANS["cpu"]
    assert plan.disc_grid(64) == [1, 2, 4, 8, 64]
    assert plan.strategy_grid() == [{"strategy": "topk"}, {"strategy": "ancestral"}]
    assert plan.scorer_at(8, 64) == plan.scorer_at(64, 64) == "smollm2-135m"
    assert plan.scorer_at(1, 64) == ""  # word metrics only
    default = EvalPlan("s", 8, 4, (4,), (1,), 1)
    assert default.disc_grid(64) == [8, 64] and default.strategy_grid() == [{}]
    assert default.scorer_at(1, 64) == "s"
    # tagged names are the ones the evidence table reads
    sampler = {**plan.strategy_grid()[0], **plan.samplers("ladiff")[0]}
    assert row_name("ladiff", sampler, 8) == "ladiff_topk_cont200_disc8"
    assert row_name("mdlm", plan.strategy_grid()[1], 64) == "mdlm_ancestral_disc64"


def test_unigram_bound_is_the_add_one_unigram_cross_entropy():
    from diladiff.eval.unigram import unigram_bound

    train = np.array([[0, 0, 1], [0, 2, 2]])  # counts 3, 1, 2 of V = 4 (+1 each: 4, 2, 3, 1 / 10)
    held = np.array([[0, 3]])
    assert unigram_bound(train, held, 4) == pytest.approx(-(np.log(0.4) + np.log(0.1)) / 2)


def test_the_report_line_sets_the_mdlm_bound_beside_the_unigram_of_the_same_rows(trained_run):
    from diladiff.config import Config
    from diladiff.data.packing import prepare_data
    from diladiff.eval.unigram import unigram_bound
    from diladiff.pipeline import bound_vs_unigram
    from diladiff.runs import run_tokenizer

    b = bound_vs_unigram(trained_run)
    log = [json.loads(x) for x in (trained_run / "log.jsonl").read_text().splitlines()]
    assert b["bound"] == [r for r in log if "val_nll_bound" in r][-1]["val_nll_bound"]
    cfg = Config.load(trained_run / "config.json")
    tok = run_tokenizer(trained_run)
    data = prepare_data(cfg.data, tok, progress=False)
    n = cfg.train.batch_size * cfg.train.eval_batches  # the trainer's validation rows
    assert b["heldout_tokens"] == min(n, len(data.val)) * cfg.data.seq_len
    assert b["unigram"] == pytest.approx(unigram_bound(data.train, data.val[:n], len(tok)))
    assert b["below_unigram"] == pytest.approx(b["unigram"] - b["bound"])
