"""Word-level metrics against the training text (eval/ngram.py) and paired intervals
(eval/paired.py)."""

import json
import math
import random

import numpy as np
import pytest
import torch

from diladiff.errors import DataError
from diladiff.eval.diversity import corpus_diversity, distinct_n
from diladiff.eval.ngram import (
    NgramIndex,
    copy_shares,
    copy_spans,
    fit_kneser_ney,
    load_ngram_reference,
    ngram_perplexity,
    sample_nll,
    seen_ngram_counts,
    training_text,
    word_metrics,
    words,
)
from diladiff.eval.paired import (
    compare_results,
    excludes_zero,
    paired_mean_difference,
    paired_perplexity_difference,
    paired_ratio_difference,
)

nltk_lm = pytest.importorskip("nltk.lm")

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the river"]
VERBS = ["sees", "likes", "finds", "follows", "crosses"]
OBJECTS = ["the ball", "a red apple", "the green valley", "her friend", "the bridge"]


def grammar_sentences(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}".split()
        for _ in range(n)
    ]


def plain_nltk_kn(segments, order, discount=0.75):
    """nltk's own KneserNeyInterpolated, unmodified, fitted like fit_kneser_ney."""
    from nltk.lm import KneserNeyInterpolated, Vocabulary
    from nltk.lm.preprocessing import padded_everygram_pipeline

    lm = KneserNeyInterpolated(order, discount=discount, vocabulary=Vocabulary(unk_cutoff=2))
    lm.fit(*padded_everygram_pipeline(order, segments))
    return lm


# --------------------------------------------------------------------------- words, distinct


def test_word_tokenizer_lowercases_and_splits_at_non_alphanumerics():
    assert words("Don't STOP, café_x 42! ") == ["don", "t", "stop", "café", "x", "42"]
    # A tokenizer's decoding spaces do not change the words.
    assert words("don ' t stop , cafe") == words("Don't stop, cafe")


def test_distinct_n_by_hand():
    samples = [["a", "b", "a", "b"], ["a", "b"]]
    assert distinct_n(samples, 1) == pytest.approx(2 / 6)
    assert distinct_n(samples, 2) == pytest.approx(2 / 4)  # ab ba ab | ab
    assert distinct_n(samples, 3) == pytest.approx(2 / 2)  # aba bab
    assert math.isnan(distinct_n(samples, 5))
    # corpus_diversity is the product of distinct_2..4 (n = 4: abab, one window: 1).
    assert corpus_diversity([[1, 2, 1, 2], [1, 2]]) == pytest.approx(0.5 * 1.0 * 1.0)


# --------------------------------------------------------------------------- Kneser-Ney


@pytest.mark.parametrize("order", [3, 4])
def test_kneser_ney_scores_equal_nltks_own(order):
    segments = grammar_sentences(150, seed=0) + [["a", "lone", "word"]]
    ours = fit_kneser_ney(segments, order).lm
    ref = plain_nltk_kn(segments, order)
    vocab = sorted(ref.vocab) + ["never-seen"]
    rng = random.Random(1)
    seen_contexts = {tuple(s[i : i + order - 1]) for s in segments for i in range(len(s))}
    contexts = [c for c in seen_contexts if len(c) == order - 1][:40]
    contexts += [tuple(rng.choice(vocab) for _ in range(order - 1)) for _ in range(40)]
    contexts += [("<s>",) * (order - 1), ("<s>",) * (order - 2) + ("the",), ()]
    for ctx in contexts:
        for w in vocab:
            assert ours.score(w, ctx) == pytest.approx(ref.score(w, ctx), rel=1e-12, abs=1e-15)


def test_kneser_ney_is_a_distribution_over_the_vocabulary():
    """For contexts of words (nltk's KN is not exactly normalised after the '<s>' padding: its
    interpolation weight counts '<s> <s>' as a successor of '<s>')."""
    lm = fit_kneser_ney(grammar_sentences(150, seed=0), 3).lm
    vocab = list(lm.vocab)
    for ctx in [("the", "cat"), ("cat", "sees"), ("sees", "zebra"), ("the",), ("zebra",), ()]:
        assert sum(lm.score(w, ctx) for w in vocab) == pytest.approx(1.0, abs=1e-9)


def test_in_domain_text_has_a_lower_ngram_perplexity_than_its_words_shuffled():
    lm = fit_kneser_ney(grammar_sentences(300, seed=0), 3)
    held = grammar_sentences(40, seed=7)
    rng = random.Random(0)
    shuffled = [rng.sample(s, len(s)) for s in held]  # the same words: unigram-equal

    def ppl(samples):
        return ngram_perplexity([sample_nll(lm, s) for s in samples], [len(s) for s in samples])

    good, bad = ppl(held), ppl(shuffled)
    assert good["ngram_ppl"] < 0.5 * bad["ngram_ppl"]
    assert good["ngram_ppl_ci95"][1] < bad["ngram_ppl_ci95"][0]


def test_sample_nll_sums_left_padded_word_log_probabilities():
    segments = grammar_sentences(100, seed=0) + [["a", "lone", "word"]]  # singletons: <UNK>
    lm = fit_kneser_ney(segments, 3)
    ref = plain_nltk_kn(segments, 3)
    sample = ["the", "cat", "sees", "a", "zebra"]  # an OOV word: <UNK>'s probability
    ctx, expected = ("<s>", "<s>"), 0.0
    for w in sample:
        expected -= math.log(ref.score(w, ctx))
        ctx = (ctx[1], w)
    assert sample_nll(lm, sample) == pytest.approx(expected, rel=1e-12)
    assert lm.oov_count(sample) == 1


def test_ngram_perplexity_is_word_pooled_and_skips_empty_samples():
    res = ngram_perplexity([6.0, 0.0, 2.0], [3, 0, 1])
    assert res["ngram_ppl"] == pytest.approx(math.exp(8.0 / 4))
    assert res["ngram_words"] == 4
    assert res["ngram_ppl_median"] == pytest.approx(math.exp(2.0))


# --------------------------------------------------------------------------- seen n-grams, copies

TRAIN = [words("the cat sat on the mat"), words("a dog ran")]


def test_seen_ngram_counts_by_hand():
    index = NgramIndex(TRAIN)
    samples = [words("the cat ran on the mat"), words("mat a dog"), words("zebra"), []]
    # bigrams: the cat +, cat ran -, ran on -, on the +, the mat + | mat a (two documents) -,
    # a dog +
    assert seen_ngram_counts(index, samples, 2) == [3, 1, 0, 0]
    # trigrams: only "on the mat"; "mat a dog" crosses a document boundary
    assert seen_ngram_counts(index, samples, 3) == [1, 0, 0, 0]
    assert seen_ngram_counts(index, samples, 1) == [6, 3, 0, 0]


def test_copy_spans_by_hand():
    index = NgramIndex(TRAIN)
    samples = [
        words("x the cat sat on y"),  # "the cat sat on"
        words("cat sat on the mat a dog"),  # not across the document boundary
        words("the cat sat on the mat"),  # a whole document
        words("zebra quokka"),
        [],
    ]
    spans = copy_spans(index, samples)
    assert spans == [4, 5, 6, 0, 0]
    assert copy_shares(spans, [len(s) for s in samples]) == [4 / 6, 5 / 7, 1.0, 0.0, 0.0]


def test_copy_spans_equal_a_brute_force_longest_common_substring():
    rng = random.Random(0)
    alphabet = list("abcdef")
    train = [[rng.choice(alphabet) for _ in range(rng.randint(1, 30))] for _ in range(20)]
    samples = [[rng.choice(alphabet + ["z"]) for _ in range(rng.randint(0, 25))] for _ in range(60)]
    train_grams = {
        tuple(d[i:j]) for d in train for i in range(len(d)) for j in range(i, len(d) + 1)
    }

    def brute(s):
        return max(
            (
                j - i
                for i in range(len(s))
                for j in range(i, len(s) + 1)
                if tuple(s[i:j]) in train_grams
            ),
            default=0,
        )

    assert copy_spans(NgramIndex(train), samples) == [brute(s) for s in samples]
    bigrams = [sum(tuple(s[i : i + 2]) in train_grams for i in range(len(s) - 1)) for s in samples]
    assert seen_ngram_counts(NgramIndex(train), samples, 2) == bigrams


# --------------------------------------------------------------------------- training text

HELDOUT_WORD = "quokkaheldout"
TRAIN_DOCS = [["a", "lone", "word"], *grammar_sentences(120, seed=3)]


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """A run folder whose data is a small local corpus: TRAIN_DOCS for training (a document of
    words seen once, so that <UNK> has counts) and 2 held-out documents with a word found
    nowhere else."""
    from diladiff.config import PRESETS

    folder = tmp_path_factory.mktemp("ngram_run")
    docs = [" ".join(s) + "." for s in TRAIN_DOCS]
    docs += [f"the {HELDOUT_WORD} sees the {HELDOUT_WORD}."] * 2
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = PRESETS["tiny"]()
    cfg.data.source, cfg.data.seq_len, cfg.data.heldout_docs = str(corpus), 8, 2
    cfg.data.cache_dir = str(folder / "cache")
    (folder / "run").mkdir()
    cfg.save(folder / "run" / "config.json")
    return folder / "run"


def test_training_text_is_the_decoded_train_split_without_the_heldout_documents(corpus_run):
    segments, meta = training_text(corpus_run)
    flat = [w for s in segments for w in s]
    assert HELDOUT_WORD not in flat
    assert {"cat", "sees", "valley"} <= set(flat)
    assert meta["words"] == len(flat) and meta["selection"] == "all rows"
    # Split at the separator into the training documents (the last one may be cut by the
    # packing's final partial row).
    assert segments[:-1] == TRAIN_DOCS[: len(segments) - 1] and len(segments) >= 100


def test_training_text_decodes_with_a_corpus_bpe_run(corpus_run, tmp_path, monkeypatch):
    """A run on a corpus BPE (data.tokenizer=bpe-N): decoded with the run's tokenizer, the
    training text has the same words as the documents."""
    from diladiff.config import Config

    monkeypatch.setenv("DILADIFF_CACHE", str(tmp_path / "cache"))
    cfg = Config.load(corpus_run / "config.json")
    cfg.data.tokenizer, cfg.data.cache_dir = "bpe-300", str(tmp_path / "data")
    cfg.save(tmp_path / "config.json")
    segments, meta = training_text(tmp_path)
    assert segments[:-1] == TRAIN_DOCS[: len(segments) - 1] and len(segments) >= 100
    assert meta["tokenizer"] == "bpe-300"


def test_training_text_cap_takes_evenly_spaced_blocks(corpus_run, monkeypatch):
    import diladiff.eval.ngram as ngram

    monkeypatch.setattr(ngram, "_BLOCK_ROWS", 4)
    segments, meta = training_text(corpus_run, max_words=120)
    assert meta["words"] == sum(map(len, segments)) == 120
    assert "evenly spaced blocks of 4" in meta["selection"]
    assert meta["rows_read"] < meta["train_rows"]


def test_ngram_reference_is_fitted_once_per_data_config(corpus_run):
    a = load_ngram_reference(corpus_run, order=3)
    assert load_ngram_reference(corpus_run, order=3) is a
    assert load_ngram_reference(corpus_run, order=4) is not a


def test_word_metrics_per_sample_lists_give_the_pooled_metrics(corpus_run):
    ref = load_ngram_reference(corpus_run)
    known = " ".join(TRAIN_DOCS[5])
    texts = ["The cat sees the ball.", "zebra quokka zebra", known]
    metrics, per = word_metrics(texts, ref)
    m = len(known.split())
    assert per["words"] == [5, 3, m]
    assert math.isfinite(metrics["ngram_ppl"])
    assert metrics["ngram_ppl"] == pytest.approx(
        math.exp(sum(per["ngram_nll_sum"]) / sum(per["words"]))
    )
    assert metrics["seen_bigrams"] == pytest.approx(sum(per["seen_2"]) / (4 + 2 + m - 1))
    assert per["seen_2"][1:] == [0, m - 1] and per["seen_3"][1:] == [0, m - 2]
    assert per["copy_span"][1:] == [0, m] and metrics["copy_span_max"] == m
    assert metrics["ngram_oov_rate"] == pytest.approx(3 / (8 + m))
    assert metrics["distinct_1"] == pytest.approx(len(set(words(" ".join(texts)))) / (8 + m))
    alone, per_alone = word_metrics(texts, None)  # no training run: distinct-n only
    assert (
        set(alone) == {"distinct_1", "distinct_2", "distinct_3"}
        and "ngram_nll_sum" not in per_alone
    )


def test_evaluate_samples_records_the_word_metrics_and_their_protocol(corpus_run, tmp_path):
    from conftest import word_level_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from diladiff.eval.evaluate import evaluate_samples
    from diladiff.eval.protocol import PROTOCOL_VERSION

    vocab = ["<|endoftext|>", "[UNK]", "the", "cat", "sees", "ball", "river"]
    word_level_tokenizer(
        tmp_path, vocab, unk_token="[UNK]", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=8, n_layer=1, n_head=2)
    ).save_pretrained(tmp_path)
    texts = ["the cat sees the ball", " ".join(TRAIN_DOCS[1])]
    # No MAUVE reference: the training text comes from the samples' own run.
    res = evaluate_samples([[], []], texts, str(tmp_path), generator_meta={"run": str(corpus_run)})
    m, p, per = res["metrics"], res["protocol"], res["per_sample"]
    assert p["version"] == PROTOCOL_VERSION == "diladiff-eval-v2"
    assert p["text_metrics"]["reference"]["run"] == str(corpus_run)
    assert p["text_metrics"]["lm"]["order"] == 3 and "paired" in p["paired_interval"]
    assert m["ngram_ppl"] > 1 and len(per["ngram_nll_sum"]) == len(per["nll_sum"]) == 2
    assert per["copy_span"][1] == len(texts[1].split())
    res = evaluate_samples([[], []], texts, str(tmp_path), generator_meta={"run": "/nowhere"})
    assert (
        "ngram_ppl" not in res["metrics"] and res["protocol"]["text_metrics"]["reference"] is None
    )
    with pytest.raises(DataError, match="not a run folder"):
        evaluate_samples([[]], texts[:1], str(tmp_path), ngram_train=str(tmp_path / "none"))


# --------------------------------------------------------------------------- paired intervals


def test_identical_generators_have_a_zero_paired_interval():
    rng = np.random.default_rng(0)
    nll, n = rng.gamma(5.0, 10.0, 64), rng.integers(40, 64, 64)
    res = paired_perplexity_difference(nll, n, nll, n)
    assert res["diff"] == 0 and res["ci95"] == [0.0, 0.0] and res["log_ratio_ci95"] == [0.0, 0.0]
    assert not excludes_zero(res["ci95"])


def test_a_shifted_generator_is_told_apart_with_the_right_sign():
    rng = np.random.default_rng(0)
    n = np.full(128, 50)
    # Large per-sample noise shared by a pair (the same seed) and a small shift for B.
    shared = rng.normal(0, 1.0, 128) * 50
    nll_a = 4.0 * n + shared + rng.normal(0, 2.0, 128)
    nll_b = 4.05 * n + shared + rng.normal(0, 2.0, 128)
    res = paired_perplexity_difference(nll_a, n, nll_b, n)
    assert res["diff"] < 0 and res["ci95"][1] < 0 and excludes_zero(res["ci95"])
    assert res["log_ratio"] == pytest.approx(-0.05, abs=0.01) and res["log_ratio_ci95"][1] < 0
    # Unpaired, the same data cannot tell them apart: the two bootstrap intervals overlap.
    from diladiff.eval.genppl import bootstrap_ppl_interval

    lo_a, hi_a = bootstrap_ppl_interval(nll_a, n)
    lo_b, hi_b = bootstrap_ppl_interval(nll_b, n)
    assert lo_b < hi_a
    # And swapping A and B flips the interval.
    swapped = paired_perplexity_difference(nll_b, n, nll_a, n)
    assert swapped["ci95"] == pytest.approx([-res["ci95"][1], -res["ci95"][0]], rel=0.05)


def test_paired_intervals_match_the_normal_approximation():
    rng = np.random.default_rng(1)
    x_a = rng.normal(3.0, 2.0, 400)
    x_b = x_a - 0.3 + rng.normal(0, 1.0, 400)
    d = x_a - x_b
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    res = paired_mean_difference(x_a, x_b)
    assert res["diff"] == pytest.approx(d.mean())
    assert res["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=0.2 * half)
    # Equal word counts m: log(ppl_A / ppl_B) = mean_i (S_A,i - S_B,i) / m.
    m = 20
    res = paired_perplexity_difference(x_a * m, [m] * 400, x_b * m, [m] * 400)
    assert res["log_ratio"] == pytest.approx(d.mean())
    assert res["log_ratio_ci95"] == pytest.approx(
        [d.mean() - half, d.mean() + half], abs=0.2 * half
    )


def test_paired_ratio_difference_pools_numerators_and_denominators():
    res = paired_ratio_difference([1, 3], [2, 4], [2, 2], [2, 4])
    assert res["a"] == pytest.approx(4 / 6) and res["b"] == pytest.approx(4 / 6)
    assert res["diff"] == pytest.approx(0.0)
    lo, hi = res["ci95"]
    assert lo < 0 < hi  # resamples of one index differ: 1/2 - 1 and 3/4 - 1/2


def test_compare_results_pairs_per_sample_lists_and_refuses_unpaired_files(tmp_path):
    from diladiff.eval.report import comparison_table

    def result(shift, seed=0):
        rng = np.random.default_rng(0)
        w = [30] * 50
        return {
            "protocol": {"version": "v", "num_samples": 50, "sample_seed": seed},
            "per_sample": {
                "nll_sum": list(rng.normal(100, 10, 50) + shift),
                "tokens": [40] * 50,
                "words": w,
                "ngram_nll_sum": list(rng.normal(150, 10, 50) + shift),
                "seen_2": [20] * 50,
                "seen_3": [10] * 50,
                "copy_span": [3] * 50,
            },
        }

    rows = {r["metric"]: r for r in compare_results(result(0.0), result(10.0))}
    assert set(rows) == {"gen_ppl", "ngram_ppl", "seen_bigrams", "seen_trigrams", "copy_span"}
    assert rows["gen_ppl"]["excludes_zero"] and rows["gen_ppl"]["diff"] < 0
    assert not rows["copy_span"]["excludes_zero"] and rows["copy_span"]["ci95"] == [0.0, 0.0]
    with pytest.raises(DataError, match="seeds"):
        compare_results(result(0.0), result(0.0, seed=1))
    # The n-gram metrics compare only when fitted on the same training text (any run folder).
    a, b = result(0.0), result(10.0)
    a["protocol"]["text_metrics"] = {"lm": {"order": 3}, "reference": {"run": "x", "words": 9}}
    b["protocol"]["text_metrics"] = {"lm": {"order": 3}, "reference": {"run": "y", "words": 9}}
    assert len(compare_results(a, b)) == 5
    b["protocol"]["text_metrics"]["lm"]["order"] = 4
    with pytest.raises(DataError, match="different training texts"):
        compare_results(a, b)
    (tmp_path / "a.json").write_text(json.dumps(result(0.0)))
    (tmp_path / "b.json").write_text(json.dumps(result(10.0)))
    table = comparison_table(tmp_path / "a.json", tmp_path / "b.json")
    assert "| gen_ppl |" in table and "| yes |" in table
