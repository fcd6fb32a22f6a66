"""Word-level metrics against the run's training text, independent of the model's tokenizer.

Words: the text lowercased, then every maximal run of letters or digits (regex `[^\\W_]+`,
Unicode-aware); punctuation, whitespace and underscores only separate words. "Don't stop." is
["don", "t", "stop"] on both sides, so a tokenizer's decoding spaces ("don ' t") do not matter.

Training text (`training_text`): the packed *train* rows of the run's data (data/packing.py:
the documents before the last `heldout_docs`; the held-out rows never enter), decoded with the
run's tokenizer exactly as generated samples are (skip special tokens) and split into documents
at the separator token. At most `max_words` words: when the train split holds more, evenly
spaced blocks of consecutive rows, so every part of a concatenated corpus is represented.

Metrics (sample i has words w_i1..w_im_i):
- ngram_ppl = exp( sum_i sum_j -ln P(w_ij | w_i,j-n+1..j-1) / sum_i m_i ), a Kneser-Ney
  (interpolated) word n-gram LM of order n fitted on the training text with nltk.lm
  (`fit_kneser_ney`); each sample's context starts as n-1 "<s>" and "</s>" is not scored
  (samples are windows cut mid-sentence). As in nltk, the first word's distribution after
  the "<s>" padding is not exactly normalised (it counts "<s> <s>" as a continuation; +0.4% on
  a toy corpus), the same for every generator.
- seen_bigrams / seen_trigrams = sum_i #{positions whose n-gram occurs in the training text}
  / sum_i max(m_i - n + 1, 0) (`seen_ngram_counts`).
- copy_span_i = the largest k such that some k consecutive words of sample i occur
  consecutively in one training document; copy_share_i = copy_span_i / m_i (`copy_spans`).
- distinct_n over words: eval/diversity.py's `distinct_n`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from diladiff.errors import DataError, DiladiffError
from diladiff.eval.diversity import distinct_n
from diladiff.eval.genppl import bootstrap_ppl_interval

WORD_PATTERN = r"[^\W_]+"
_WORD_RE = re.compile(WORD_PATTERN)

NGRAM_ORDER = 3
# The usual absolute discount of Kneser-Ney (Chen & Goodman 1998 estimate ~0.7-0.8 on words);
# nltk's own default (0.1) leaves almost no mass to the lower orders.
NGRAM_DISCOUNT = 0.75
# nltk Vocabulary cutoff: words seen once in the training text become <UNK>, so <UNK> has
# counts and a word never seen in training gets <UNK>'s probability instead of zero.
NGRAM_UNK_CUTOFF = 2
# Words of training text fitted at most. wiki-vital's train split (0.77M words) fits whole:
# 10-35 s of nltk counting on one busy CPU core, 0.8 GB resident (order 3).
NGRAM_MAX_WORDS = 1_000_000
# Rows per contiguous block when the train split is subsampled.
_BLOCK_ROWS = 64
_BOS = "<s>"

NGRAM_DESCRIPTION = {
    "words": f"lowercased text, words = maximal runs of letters or digits (regex {WORD_PATTERN})",
    "ngram_ppl": "exp(total NLL / total words) under an interpolated Kneser-Ney word LM "
    "(nltk.lm KneserNeyInterpolated, continuation counts indexed once) fitted on the training "
    "text; context starts as order-1 '<s>', '</s>' not scored; words seen once in training "
    f"-> <UNK> (unk_cutoff {NGRAM_UNK_CUTOFF}); ngram_ppl_ci95: the GenPPL bootstrap over "
    "samples",
    "seen_ngrams": "seen_bigrams / seen_trigrams: share of the samples' word n-gram positions "
    "whose n-gram occurs inside one training document (pooled)",
    "copy_span": "per sample the longest run of consecutive words occurring consecutively "
    "inside one training document (mean, max); copy_share: that length / sample words (mean)",
    "distinct": "distinct_n (n = 1, 2, 3) on words: unique n-grams / n-grams over the sample set",
}


def words(text: str) -> list[str]:
    """The word tokenizer of these metrics: lowercase, then maximal runs of letters or digits
    (`WORD_PATTERN`)."""
    return _WORD_RE.findall(text.lower())


# --------------------------------------------------------------------------- Kneser-Ney LM


def _kneser_ney_classes():
    try:
        from nltk.lm import KneserNeyInterpolated, Vocabulary
        from nltk.lm.smoothing import KneserNey
    except ImportError:
        raise DiladiffError(
            "the n-gram LM metric needs nltk: `pip install 'diladiff[ngram]'`"
        ) from None

    class IndexedKneserNey(KneserNey):
        """nltk's KneserNey smoothing with its continuation counts looked up in a table built
        once from the fitted counts, instead of nltk's scan over every context per call
        (~0.1 s a word on 700K words of training text). The same numbers: for context c
        (k words) and word w,
            N1+(. c w) = #{distinct u : count(u c w) > 0},
            N1+(. c .) = sum over distinct u of #{distinct w : count(u c w) > 0},
        which is what nltk's `_continuation_counts` sums (tests compare the two)."""

        def __init__(self, vocabulary, counter, order, discount=0.1, **kwargs):
            super().__init__(vocabulary, counter, order, discount, **kwargs)
            word_cont: dict[tuple, int] = {}
            total: dict[tuple, int] = {}
            for m in range(2, order + 1):  # the orders whose contexts use continuation counts
                for prefix, dist in self.counts[m].items():
                    ctx = prefix[1:]
                    seen = [w for w, c in dist.items() if c > 0]
                    for w in seen:
                        key = (*ctx, w)
                        word_cont[key] = word_cont.get(key, 0) + 1
                    total[ctx] = total.get(ctx, 0) + len(seen)
            self._word_cont, self._total = word_cont, total

        def _continuation_counts(self, word, context=()):
            return self._word_cont.get((*context, word), 0), self._total.get(tuple(context), 0)

    return KneserNeyInterpolated, Vocabulary, IndexedKneserNey


class KneserNeyLM:
    """A word n-gram LM: nltk's KneserNeyInterpolated fitted on `segments` (lists of words,
    each padded with order-1 '<s>' and '</s>' by nltk's padded_everygram_pipeline), its
    smoothing estimator swapped for the indexed one (same scores), scores memoised."""

    def __init__(
        self,
        segments: list[list[str]],
        order: int = NGRAM_ORDER,
        discount: float = NGRAM_DISCOUNT,
        unk_cutoff: int = NGRAM_UNK_CUTOFF,
    ):
        kn_cls, vocab_cls, indexed = _kneser_ney_classes()
        from nltk.lm.preprocessing import padded_everygram_pipeline

        if order < 2:
            raise ValueError("a Kneser-Ney LM needs order >= 2")
        self.order, self.discount = order, discount
        self.lm = kn_cls(order, discount=discount, vocabulary=vocab_cls(unk_cutoff=unk_cutoff))
        grams, vocab_text = padded_everygram_pipeline(order, segments)
        self.lm.fit(grams, vocab_text)
        self.lm.estimator = indexed(self.lm.vocab, self.lm.counts, order=order, discount=discount)
        self._score = functools.lru_cache(maxsize=1 << 20)(self.lm.unmasked_score)

    def word_probs(self, sample: list[str]) -> list[float]:
        """P(w_j | previous order-1 words) for each word; the context starts as order-1 '<s>'
        and unknown words (and contexts) are <UNK>."""
        ctx = (_BOS,) * (self.order - 1)
        probs = []
        for w in self.lm.vocab.lookup(sample):
            probs.append(self._score(w, ctx))
            ctx = (*ctx[1:], w)
        return probs

    def oov_count(self, sample: list[str]) -> int:
        return sum(w not in self.lm.vocab for w in sample)


def fit_kneser_ney(
    segments: list[list[str]], order: int = NGRAM_ORDER, discount: float = NGRAM_DISCOUNT
) -> KneserNeyLM:
    """Interpolated Kneser-Ney (nltk.lm), for n = order > 1:
        P(w | c) = max(C(c w) - D, 0) / C(c .) + D N1+(c .) / C(c .) P(w | c')     (top order)
        P(w | c) = max(N1+(. c w) - D, 0) / N1+(. c .) + D N1+(c .) / N1+(. c .) P(w | c')
        P(w)     = N1+(. w) / N1+(. .)
    c' = c without its first word, D = `discount`; an unseen context defers to P(w | c')."""
    return KneserNeyLM(segments, order, discount)


def sample_nll(lm: KneserNeyLM, sample: list[str]) -> float:
    """NLL_i = sum_j -ln P(w_ij | context) in nats (inf when a word has probability 0)."""
    return sum(-math.log(p) if p > 0 else math.inf for p in lm.word_probs(sample))


def ngram_perplexity(nll_sums: list[float], word_counts: list[int]) -> dict:
    """ngram_ppl = exp(sum_i NLL_i / sum_i m_i) with the GenPPL bootstrap interval over samples
    (samples without words left out) and the per-sample median of exp(NLL_i / m_i)."""
    scored = [(s, n) for s, n in zip(nll_sums, word_counts, strict=True) if n > 0]
    if not scored:
        return {"ngram_ppl": math.nan, "ngram_ppl_ci95": None, "ngram_words": 0}
    sums, counts = zip(*scored, strict=True)
    return {
        "ngram_ppl": math.exp(sum(sums) / sum(counts)),
        "ngram_ppl_ci95": list(bootstrap_ppl_interval(sums, counts)),
        "ngram_ppl_median": statistics.median([math.exp(s / n) for s, n in scored]),
        "ngram_words": sum(counts),
    }


# --------------------------------------------------------------------------- n-gram index

_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio)


def _windows_without(bad_cumsum: np.ndarray, k: int) -> np.ndarray:
    """Which k-windows of a stream hold no flagged position, from the flags' cumulative sum
    with a leading 0."""
    return (bad_cumsum[k:] - bad_cumsum[:-k]) == 0


def _flag_cumsum(stream: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(stream < 0)])


def _in_sorted(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Membership of `values` in the sorted array `table`."""
    if not len(table):
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(table, values), len(table) - 1)
    return table[pos] == values


class NgramIndex:
    """The training text as one stream of word ids, documents separated by -1, whose k-grams
    (windows inside one document) are compared with a sample set's by 64-bit polynomial hashes
    h_k[i] = sum_{j<k} id[i+j] M^(k-1-j) mod 2^64 (a hash match is taken as an n-gram match:
    distinct n-grams collide with probability ~2^-64 per pair)."""

    def __init__(self, segments: list[list[str]]):
        self.vocab: dict[str, int] = {}
        stream = []
        for seg in segments:
            stream += [self.vocab.setdefault(w, len(self.vocab)) for w in seg]
            stream.append(-1)  # document boundary
        self.stream = np.asarray(stream, dtype=np.int64)
        self._bad = _flag_cumsum(self.stream)

    def ids(self, sample: list[str]) -> np.ndarray:
        """Word ids of a sample; -1 for a word absent from the training text."""
        return np.asarray([self.vocab.get(w, -1) for w in sample], dtype=np.int64)

    def seen_windows(self, samples: list[list[str]]):
        """For k = 1, 2, ...: (k, sample index of each k-window, whether it occurs in the
        training text), until no window does (a k-gram with an unseen (k-1)-gram is unseen).
        One pass per k over the training stream: its hashes are updated in place
        (h_k[i] = h_(k-1)[i] M + id[i+k-1]) and sorted, the samples' looked up in them; no
        table of training n-grams is kept between calls."""
        parts = [np.append(self.ids(s), -1) for s in samples]
        ss = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        ts, s_bad = self.stream.astype(np.uint64), _flag_cumsum(ss)
        th = np.zeros(len(ts), dtype=np.uint64)
        sh = np.zeros(len(ss), dtype=np.uint64)
        for k in range(1, len(ss) + 1):
            th = th[: len(ts) - k + 1] * _HASH_MULT + ts[k - 1 :]
            sh = sh[: len(ss) - k + 1] * _HASH_MULT + ss[k - 1 :].astype(np.uint64)
            s_ok = _windows_without(s_bad, k)
            # Sorting the training hashes beats looking each one up among the samples'.
            table = np.sort(th[_windows_without(self._bad, k)])
            seen = s_ok & _in_sorted(table, sh)
            yield k, owner[: len(seen)], seen
            if not seen.any():
                return


def shared_ngrams(
    index: NgramIndex, samples: list[list[str]], ns: tuple[int, ...] = (2, 3)
) -> tuple[dict[int, list[int]], list[int]]:
    """One pass over k = 1, 2, ... (NgramIndex.seen_windows) for both n-gram metrics:

        seen_n(i)    = #{j : (w_ij .. w_i,j+n-1) occurs inside one training document}, n in ns
        copy_span_i  = max{k : some k consecutive words of sample i occur consecutively
                       inside one training document}, 0 when none does.

    "Sample i shares a k-gram" is monotone in k (every sub-span of a shared span is shared),
    so the pass stops at the first k no sample shares: the cost grows with the longest copy.
    An n above that k has seen_n(i) = 0."""
    seen_n = {n: [0] * len(samples) for n in ns}
    spans = np.zeros(len(samples), dtype=np.int64)
    for k, owner, seen in index.seen_windows(samples):
        spans[np.unique(owner[seen])] = k
        if k in seen_n:
            seen_n[k] = np.bincount(owner[seen], minlength=len(samples)).tolist()
    return seen_n, spans.tolist()


def seen_ngram_counts(index: NgramIndex, samples: list[list[str]], n: int) -> list[int]:
    """seen_n(i) (`shared_ngrams`); the share of seen n-grams is
    sum_i seen_n(i) / sum_i max(m_i - n + 1, 0)."""
    return shared_ngrams(index, samples, (n,))[0][n]


def copy_spans(index: NgramIndex, samples: list[list[str]]) -> list[int]:
    """copy_span_i (`shared_ngrams`): the longest run of a sample's words found verbatim in
    one training document."""
    return shared_ngrams(index, samples, ())[1]


def copy_shares(spans: list[int], word_counts: list[int]) -> list[float]:
    """copy_share_i = copy_span_i / m_i (0 for a sample without words)."""
    return [s / m if m else 0.0 for s, m in zip(spans, word_counts, strict=True)]


# --------------------------------------------------------------------------- training text


def _decode_documents(tok, tokens: np.ndarray, sep: int) -> list[str]:
    """A contiguous run of packed tokens split at the separator and decoded per piece."""
    cuts = np.flatnonzero(tokens == sep)
    pieces = [p for p in np.split(tokens, cuts) if p.size]
    pieces = [p[1:] if p[0] == sep else p for p in pieces]
    return tok.batch_decode([p.tolist() for p in pieces if p.size], skip_special_tokens=True)


def _row_ranges(train_rows: int, rows_needed: int) -> list[tuple[int, int]]:
    """All rows as one range when rows_needed (rounded up to blocks of _BLOCK_ROWS) covers
    them, else evenly spaced, non-overlapping blocks of _BLOCK_ROWS consecutive rows."""
    blocks = -(-rows_needed // _BLOCK_ROWS)
    if blocks * _BLOCK_ROWS >= train_rows:
        return [(0, train_rows)]
    starts = np.linspace(0, train_rows - _BLOCK_ROWS, blocks).astype(int).tolist()
    return [(s, s + _BLOCK_ROWS) for s in starts]


def training_text(run_dir: str | Path, max_words: int = NGRAM_MAX_WORDS):
    """(segments, meta): the train split of a run's data as word lists, one per document piece,
    at most `max_words` words (module docstring)."""
    from diladiff.config import Config
    from diladiff.data.packing import prepare_data
    from diladiff.data.tokenizer import separator_id
    from diladiff.runs import run_tokenizer

    run_dir = Path(run_dir)
    cfg = Config.load(run_dir / "config.json")
    tok = run_tokenizer(run_dir)  # the run's own copy (a corpus BPE included)
    data = prepare_data(cfg.data, tok, progress=False)
    sep = int(data.manifest.get("separator_id", separator_id(tok)))
    rows = int(data.train.shape[0])
    # Words per row from the first block, to pick how many rows max_words needs.
    probe = np.asarray(data.train[: min(rows, _BLOCK_ROWS)]).reshape(-1)
    probe_words = sum(len(words(t)) for t in _decode_documents(tok, probe, sep))
    per_row = max(probe_words / min(rows, _BLOCK_ROWS), 1e-3)
    ranges = _row_ranges(rows, math.ceil(1.1 * max_words / per_row))
    segments, total = [], 0
    for start, stop in ranges:
        block = np.asarray(data.train[start:stop]).reshape(-1)
        for text in _decode_documents(tok, block, sep):
            seg = words(text)[: max_words - total]
            if seg:
                segments.append(seg)
                total += len(seg)
        if total >= max_words:
            break
    if not segments:
        raise DataError(f"{run_dir}: the train split decodes to no words")
    meta = {
        "run": str(run_dir),
        "source": cfg.data.source,
        "tokenizer": cfg.data.tokenizer,
        "split": f"train rows only (documents before the last {cfg.data.heldout_docs})",
        "train_rows": rows,
        "rows_read": sum(stop - start for start, stop in ranges),
        "selection": "all rows"
        if len(ranges) == 1 and ranges[0] == (0, rows)
        else f"{len(ranges)} evenly spaced blocks of {_BLOCK_ROWS} consecutive rows",
        "decoding": "run tokenizer, skip special tokens, split at the separator token",
        "documents": len(segments),
        "words": total,
        "max_words": max_words,
    }
    return segments, meta


# --------------------------------------------------------------------------- the reference


@dataclass
class NgramReference:
    """What the word metrics compare samples with: the fitted LM, the n-gram index and the
    record of the training text (protocol)."""

    lm: KneserNeyLM
    index: NgramIndex
    meta: dict


_REFERENCES: dict[tuple, NgramReference] = {}


def load_ngram_reference(
    run_dir: str | Path,
    order: int = NGRAM_ORDER,
    max_words: int = NGRAM_MAX_WORDS,
    discount: float = NGRAM_DISCOUNT,
) -> NgramReference:
    """The reference of a run's data, fitted once per process and data config (every generator
    of a pipeline shares it; never refitted per call)."""
    from diladiff.config import Config

    data_cfg = asdict(Config.load(Path(run_dir) / "config.json").data)
    key = (json.dumps(data_cfg, sort_keys=True), order, max_words, discount)
    if key not in _REFERENCES:
        segments, meta = training_text(run_dir, max_words)
        lm = fit_kneser_ney(segments, order, discount)
        _REFERENCES[key] = NgramReference(lm, NgramIndex(segments), meta)
    return _REFERENCES[key]


def ngram_protocol(ref: NgramReference | None) -> dict:
    """The protocol entry of the word metrics: definitions, LM settings and training text."""
    out = dict(NGRAM_DESCRIPTION)
    if ref is None:
        return out | {"reference": None}
    import nltk

    return out | {
        "lm": {
            "library": f"nltk {nltk.__version__}",
            "model": "KneserNeyInterpolated",
            "order": ref.lm.order,
            "discount": ref.lm.discount,
            "unk_cutoff": ref.lm.lm.vocab.cutoff,
            "vocabulary": len(ref.lm.lm.vocab),
        },
        "reference": ref.meta,
    }


def word_metrics(texts: list[str], ref: NgramReference | None) -> tuple[dict, dict]:
    """(metrics, per_sample) of the word metrics; distinct-n always, the others against `ref`
    when given. per_sample keeps each sample's words, n-gram LM NLL (nats), seen bigram and
    trigram counts and copy span, in sample order (paired intervals: eval/paired.py)."""
    samples = [words(t) for t in texts]
    counts = [len(s) for s in samples]
    metrics = {f"distinct_{n}": distinct_n(samples, n) for n in (1, 2, 3)}
    per_sample: dict[str, list] = {"words": counts}
    if ref is None:
        return metrics, per_sample
    nll = [sample_nll(ref.lm, s) for s in samples]
    metrics |= ngram_perplexity(nll, counts)
    metrics["ngram_oov_rate"] = sum(ref.lm.oov_count(s) for s in samples) / max(sum(counts), 1)
    per_sample["ngram_nll_sum"] = nll
    seen_n, spans = shared_ngrams(ref.index, samples, (2, 3))
    for n, name in ((2, "seen_bigrams"), (3, "seen_trigrams")):
        grams = sum(max(m - n + 1, 0) for m in counts)
        metrics[name] = sum(seen_n[n]) / grams if grams else math.nan
        per_sample[f"seen_{n}"] = seen_n[n]
    metrics["copy_span"] = statistics.fmean(spans) if spans else math.nan
    metrics["copy_span_max"] = max(spans, default=0)
    metrics["copy_share"] = statistics.fmean(copy_shares(spans, counts)) if spans else math.nan
    per_sample["copy_span"] = spans
    return metrics, per_sample
