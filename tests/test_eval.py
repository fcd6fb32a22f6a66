import json
import math
import random

import numpy as np
import pytest
import torch

from diladiff.eval.diversity import (
    corpus_diversity,
    diversity_metrics,
    repetition_rate,
    unigram_entropy,
)
from diladiff.eval.genppl import (
    bootstrap_ppl_interval,
    generative_perplexity,
    per_sample_totals,
    pooled_perplexity,
)
from diladiff.eval.recon import discrete_ratio_bound
from diladiff.eval.scorer import load_scorer

WORDS = ["the", "river", "town", "old", "a", "flows", "through", "green", "valley", "bridge"]


@pytest.fixture(scope="module")
def tiny_lm_path(tmp_path_factory):
    """A tiny GPT-2 with a word-level tokenizer that has <|endoftext|> (id 0)."""
    from conftest import word_level_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_lm")
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", *WORDS])}
    word_level_tokenizer(
        folder, list(vocab), unk_token="[UNK]", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=2, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return str(folder)


TEXTS = ["the river flows through the green valley", "a bridge", "old town the river town"]


def test_genppl_of_a_uniform_model_is_the_vocabulary_size(tiny_lm_path, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the embedding: zero logits everywhere
    model.save_pretrained(tmp_path)
    from shutil import copy

    for f in ("tokenizer.json", "tokenizer_config.json"):
        copy(f"{tiny_lm_path}/{f}", tmp_path / f)
    res = generative_perplexity(load_scorer(str(tmp_path)), TEXTS)
    assert res["gen_ppl"] == pytest.approx(12.0, rel=1e-5)  # |vocab| = 12


def test_genppl_equals_a_hand_computation_and_scores_the_first_token(tiny_lm_path):
    scorer = load_scorer(tiny_lm_path)
    total, count = 0.0, 0
    for text in TEXTS:
        ids = [0] + [scorer.tokenizer.get_vocab()[w] for w in text.split()]
        with torch.no_grad():
            logp = scorer.model(torch.tensor([ids])).logits[0].log_softmax(-1)
        for j in range(1, len(ids)):  # every word is scored, the first one included
            total -= float(logp[j - 1, ids[j]])
            count += 1
    res = generative_perplexity(scorer, TEXTS)
    assert res["scored_tokens"] == sum(len(t.split()) for t in TEXTS) == count
    assert res["gen_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_batching_and_padding_do_not_change_genppl(tiny_lm_path):
    scorer = load_scorer(tiny_lm_path)
    one = generative_perplexity(scorer, TEXTS, batch_size=1)
    three = generative_perplexity(scorer, TEXTS, batch_size=3)
    assert one["gen_ppl"] == pytest.approx(three["gen_ppl"], rel=1e-5)
    assert one["gen_ppl_median"] == pytest.approx(three["gen_ppl_median"], rel=1e-5)


def test_scorer_is_loaded_once(tiny_lm_path):
    assert load_scorer(tiny_lm_path) is load_scorer(tiny_lm_path)


def test_bootstrap_interval_of_identical_samples_has_zero_width():
    nlls = [torch.tensor([1.0, 2.0, 3.0])] * 10
    res = pooled_perplexity(nlls)
    assert res["gen_ppl"] == pytest.approx(math.exp(2.0))
    assert res["gen_ppl_ci95"] == pytest.approx([math.exp(2.0)] * 2)


def test_bootstrap_interval_is_token_pooled_and_seeded():
    """Resamples of (sum, count) pairs: a sample with many tokens weighs more; same seed, same
    interval; the point estimate lies inside; more samples, a narrower interval."""
    g = torch.Generator().manual_seed(0)
    nlls = [torch.rand(int(n), generator=g) * 6 for n in torch.randint(1, 40, (60,), generator=g)]
    totals = per_sample_totals(nlls)
    res = pooled_perplexity(nlls)
    assert res["gen_ppl"] == pytest.approx(
        math.exp(sum(totals["nll_sum"]) / sum(totals["tokens"])), rel=1e-9
    )
    lo, hi = res["gen_ppl_ci95"]
    assert lo < res["gen_ppl"] < hi
    assert bootstrap_ppl_interval(totals["nll_sum"], totals["tokens"]) == (lo, hi)
    wide = bootstrap_ppl_interval(totals["nll_sum"][:15], totals["tokens"][:15])
    assert wide[1] - wide[0] > hi - lo
    # two samples, one token each with NLL 0 and 1: every resample is exp(0), exp(.5) or exp(1)
    lo2, hi2 = bootstrap_ppl_interval([0.0, 1.0], [1, 1])
    assert lo2 == pytest.approx(1.0) and hi2 == pytest.approx(math.e)
    with pytest.raises(ValueError):
        bootstrap_ppl_interval([1.0], [0])


def test_bootstrap_interval_covers_the_true_perplexity_about_95_percent_of_the_time():
    """Samples of 20 tokens with iid NLL ~ Exponential(mean 3): the true pooled perplexity is
    e^3. Over 300 simulated sets of 40 samples the 95% interval should cover it ~95% of the
    time (percentile intervals run a little short at small n)."""
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(300):
        sums = rng.exponential(3.0, size=(40, 20)).sum(1)
        lo, hi = bootstrap_ppl_interval(sums, np.full(40, 20), resamples=500)
        hits += lo <= math.exp(3.0) <= hi
    assert 0.88 <= hits / 300 <= 0.99


def test_entropy_and_repetition_by_hand():
    assert unigram_entropy([1, 1, 2, 3]) == pytest.approx(
        -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))
    )
    assert unigram_entropy([7] * 10) == 0.0
    assert repetition_rate([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)
    m = diversity_metrics([[1, 2, 3, 4, 5], [5, 5, 5, 5, 5]])
    assert m["entropy"] == pytest.approx(math.log(5) / 2)
    assert m["rep_2"] == pytest.approx((0 + 3 / 4) / 2)


def test_corpus_diversity_by_hand():
    distinct = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert corpus_diversity(distinct) == 1.0
    # Two copies: every n-gram count doubles, the unique counts do not: each ratio halves.
    assert corpus_diversity([[1, 2, 3, 4, 5]] * 2) == pytest.approx(0.5**3)
    # Per-sample diversity does not see repeats across samples; the corpus variant does.
    assert diversity_metrics([[1, 2, 3, 4, 5]] * 2)["diversity"] == 1.0
    # Pooled, not averaged: 2-grams {12, 23, 34, 45} + {12, 23}: 4/6; 3-grams {123, 234, 345}
    # + {123}: 3/4; 4-grams {1234, 2345}: 2/2.
    assert corpus_diversity([[1, 2, 3, 4, 5], [1, 2, 3]]) == pytest.approx(4 / 6 * 3 / 4)
    # n-grams never span two samples: [1, 2] + [3, 4] has no 3- or 4-grams (factor 1).
    assert corpus_diversity([[1, 2], [3, 4]]) == 1.0
    assert corpus_diversity([[1, 2], [1, 2]]) == pytest.approx(0.5)
    # Repetition inside one sample counts as in the per-sample metric.
    assert corpus_diversity([[5, 5, 5, 5, 5]]) == pytest.approx(1 / 4 * 1 / 3 * 1 / 2)


def test_report_has_a_corpus_diversity_column(tmp_path):
    from diladiff.eval.report import COLUMNS, result_row

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"metrics": {"diversity": 0.9, "corpus_diversity": 0.5}}))
    row = result_row(path)
    assert COLUMNS.index("corpus_diversity") == COLUMNS.index("diversity") + 1
    assert (row["diversity"], row["corpus_diversity"]) == (0.9, 0.5)


def test_discrete_ratio_bound_is_exact_for_a_known_likelihood():
    """A context-free model p(x_i) = q_i: any mask gives (L/l) * l * c = L * c when every
    position has the same NLL c, so every Monte Carlo draw equals -log p(x) exactly."""
    V, mask = 5, 5
    x0 = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    q = torch.full((V + 1,), -math.inf)
    q[:V] = torch.tensor([0.4, 0.4, 0.4, 0.4, 0.4]).log()  # unnormalised on purpose: c = -log .4

    def log_probs(x_t, x0):
        return q.expand(*x_t.shape, V + 1)

    res = discrete_ratio_bound(
        log_probs, x0, mask, samples=32, generator=torch.Generator().manual_seed(0)
    )
    assert res["nll_bound"] == pytest.approx(-math.log(0.4), rel=1e-6)
    # Non-constant per-position NLL: unbiased, so close to the exact value with many draws.
    probs = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1])
    q2 = torch.cat([probs.log(), torch.tensor([-math.inf])])
    exact = float(-probs.log()[x0[0]].mean())
    res2 = discrete_ratio_bound(
        lambda x, _: q2.expand(*x.shape, V + 1),
        x0,
        mask,
        samples=4000,
        generator=torch.Generator().manual_seed(1),
    )
    assert res2["nll_bound"] == pytest.approx(exact, rel=0.03)
    assert res2["recovery"] == pytest.approx(float((x0 == 0).float().mean()), abs=0.03)
    assert sum(b["draws"] for b in res2["per_ratio"]) == 4000


@pytest.fixture(scope="module")
def wiki_texts():
    from diladiff.data.sources import open_source

    docs = []
    for text in open_source("wiki-vital").documents():
        docs.append(" ".join(text.split()[:40]))
        if len(docs) == 60:
            break
    return docs


def test_mauve_is_near_one_against_itself_and_lower_against_shuffled_words(wiki_texts):
    pytest.importorskip("mauve")
    from diladiff.eval.mauve import mauve_from_features, mauve_score

    scorer = load_scorer("smollm2-135m")
    rng = random.Random(0)
    shuffled = []
    for t in wiki_texts:
        words = t.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    real = scorer.features(wiki_texts, 16)  # each set's features once (as the pipeline does)
    same = mauve_from_features(real, real)["mauve"]
    worse = mauve_score(scorer, shuffled, wiki_texts)["mauve"]
    assert same > 0.98
    assert worse < same - 0.2


def test_eval_cli_records_the_protocol_offline(trained_run, tmp_path, capsys):
    from diladiff.cli import main

    samples = tmp_path / "s.jsonl"
    assert (
        main(
            [
                "sample",
                str(trained_run),
                "--num-samples",
                "20",
                "--disc-steps",
                "16",
                "--out",
                str(samples),
            ]
        )
        == 0
    )
    out_json = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                str(samples),
                "--scorer",
                "smollm2-135m",
                "--reference",
                str(trained_run),
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "gen_ppl" in printed and "mauve" in printed and "<|endoftext|>" in printed
    assert "95% bootstrap interval [" in printed
    result = json.loads(out_json.read_text())
    m, p = result["metrics"], result["protocol"]
    assert m["gen_ppl"] > 1 and 0 < m["mauve"] <= 1 and m["entropy"] > 0
    assert 0 < m["corpus_diversity"] <= 1 and 0 < m["diversity"] <= 1
    lo, hi = m["gen_ppl_ci95"]
    assert lo <= m["gen_ppl"] <= hi and "bootstrap" in p["interval"]
    per = result["per_sample"]
    assert len(per["nll_sum"]) == len(per["tokens"]) == 20
    assert sum(per["tokens"]) == m["scored_tokens"]
    assert m["gen_ppl"] == pytest.approx(math.exp(sum(per["nll_sum"]) / sum(per["tokens"])))
    assert p["scorer"] == "smollm2-135m" and p["boundary_token"] == "<|endoftext|>"
    assert p["num_samples"] == 20 and p["mauve"]["reference"]["rows"] == 20
    assert result["generator"]["disc_steps"] == 16 and result["generator"]["stage"] == "mdlm"
    assert main(["report", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "| r | mdlm | 16 |" in table and "gen_ppl_ci95" in table and f"[{lo:,.4g}, " in table


def test_eval_recon_cli(trained_run, tmp_path, capsys):
    from diladiff.cli import main

    assert (
        main(
            [
                "eval-recon",
                str(trained_run),
                "--sequences",
                "4",
                "--mc-samples",
                "8",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    runs = json.loads((tmp_path / "r.json").read_text())["metrics"]["runs"]
    (res,) = runs.values()
    assert res["ppl_bound"] > 1 and 0 <= res["recovery"] <= 1 and res["mc_samples"] == 8
    assert (trained_run / "recon.png").read_bytes()[:4] == b"\x89PNG"


def test_frontier_writes_plots(trained_run, tmp_path, capsys, tiny_lm_path):
    from diladiff.cli import main

    out = tmp_path / "front"
    assert (
        main(
            [
                "frontier",
                str(trained_run),
                "--disc-steps",
                "4,8",
                "--num-samples",
                "4",
                "--batch-size",
                "4",
                "--scorer",
                tiny_lm_path,
                "--no-mauve",
                "--temperatures",
                "0.8,1.0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "frontier.json").read_text())
    assert [p["disc_steps"] for p in res["points"]] == [4, 8]
    assert [p["temperature"] for p in res["temperature"]] == [0.8, 1.0]
    for png in ("frontier.png", "temperature.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
