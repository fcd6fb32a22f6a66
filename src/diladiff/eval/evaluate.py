"""Evaluate a set of samples under the fixed protocol: GenPPL, entropy, diversity, MAUVE, and
the word metrics against the run's training text (eval/ngram.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diladiff.errors import DataError
from diladiff.eval.diversity import corpus_diversity, diversity_metrics
from diladiff.eval.genppl import per_sample_totals, pooled_perplexity
from diladiff.eval.ngram import NGRAM_MAX_WORDS, NGRAM_ORDER
from diladiff.eval.protocol import device_record, protocol_record
from diladiff.eval.scorer import load_scorer

_REFERENCE_FEATURES: dict[tuple, object] = {}


def read_samples(path: Path | str) -> tuple[list[list[int]], list[str], dict]:
    """Samples JSONL ({"ids", "text"} per line) and its sidecar metadata (FILE.meta.json)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"samples file {path} does not exist")
    ids, texts = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(row, dict) or "text" not in row:
            raise DataError(f"{path}:{lineno}: a sample needs a 'text' field")
        texts.append(row["text"])
        ids.append(row.get("ids") or [])
    if not texts:
        raise DataError(f"samples file {path} holds no samples")
    meta_path = path.with_name(path.name + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return ids, texts, meta


def reference_texts(spec: str, count: int, seq_len: int | None = None) -> tuple[list[str], dict]:
    """Held-out reference texts: from a run folder (its data config's held-out rows, decoded:
    the same length as the samples) or from a samples-style JSONL file."""
    path = Path(spec)
    if (path / "config.json").is_file():
        from diladiff.config import Config
        from diladiff.data.packing import prepare_data
        from diladiff.runs import run_tokenizer

        cfg = Config.load(path / "config.json")
        tok = run_tokenizer(path)  # the run's copy: a corpus BPE (bpe-N) needs no cache
        data = prepare_data(cfg.data, tok, progress=False)
        if len(data.val) < count:
            raise DataError(f"{spec}: {len(data.val)} held-out rows, fewer than {count} samples")
        rows = np.asarray(data.val[:count], dtype=np.int64).tolist()
        texts = tok.batch_decode(rows, skip_special_tokens=True)
        return texts, {
            "source": cfg.data.source,
            "split": f"held-out (last {cfg.data.heldout_docs} documents)",
            "rows": count,
            "seq_len": cfg.data.seq_len,
            "tokenizer": cfg.data.tokenizer,
        }
    _, texts, _ = read_samples(path)
    if len(texts) < count:
        raise DataError(f"{spec}: {len(texts)} reference texts, fewer than {count} samples")
    return texts[:count], {"file": str(path), "rows": count}


def _is_run(spec) -> bool:
    return bool(spec) and (Path(spec) / "config.json").is_file()


def ngram_train_run(
    ngram_train: str | None, reference: str | None, generator_meta: dict | None
) -> str | None:
    """The run folder whose train split the word metrics are fitted on: `ngram_train` when
    given (it must be a run folder), else the MAUVE reference when it is a run folder, else
    the samples' own run (generator_meta["run"]); None when there is none (metrics left out,
    recorded as such in the protocol)."""
    if ngram_train:
        if not _is_run(ngram_train):
            raise DataError(f"{ngram_train} is not a run folder (no config.json)")
        return str(ngram_train)
    for spec in (reference, (generator_meta or {}).get("run")):
        if _is_run(spec):
            return str(spec)
    return None


def evaluate_samples(
    ids: list[list[int]],
    texts: list[str],
    scorer_name: str,
    reference: str | None = None,
    device="cpu",
    mauve_seed: int = 25,
    batch_size: int = 16,
    generator_meta: dict | None = None,
    ngram_train: str | None = None,
    ngram_order: int = NGRAM_ORDER,
    ngram_max_words: int = NGRAM_MAX_WORDS,
) -> dict:
    """A result record (protocol + metrics) for one sample set; `per_sample` keeps each sample's
    NLL sum and token count (the pooled GenPPL and its bootstrap interval derive from them) and
    its word metrics (words, ngram_nll_sum, seen_2, seen_3, copy_span: the paired intervals of
    eval/paired.py derive from them). The word metrics' n-gram LM and index are fitted once per
    process on the train split of `ngram_train_run` (at most ngram_max_words words).

    An empty `scorer_name` leaves out what needs the causal-LM scorer (GenPPL and MAUVE): the
    cheap rows of a large evaluation grid (pipeline.EvalPlan.scored_disc)."""
    from diladiff.eval.ngram import load_ngram_reference, ngram_protocol, word_metrics

    train_run = ngram_train_run(ngram_train, reference, generator_meta)
    ngram_ref = load_ngram_reference(train_run, ngram_order, ngram_max_words) if train_run else None
    scorer = load_scorer(scorer_name, device) if scorer_name else None
    if scorer is None:
        nlls, feats, reference = None, None, None
        metrics = {}
    else:
        nlls, feats = scorer.score(texts, batch_size, features=bool(reference))
        metrics = pooled_perplexity(nlls)
    if any(ids):
        rows = [x for x in ids if x]
        metrics |= diversity_metrics(rows)  # per sample, averaged: "diversity"
        metrics["corpus_diversity"] = corpus_diversity(rows)  # pooled over the set (LDLM's Div)
    ref_meta = None
    if reference:
        from diladiff.eval.mauve import mauve_from_features

        refs, ref_meta = reference_texts(reference, len(texts))
        key = (scorer_name, str(device), reference, len(texts), batch_size)
        if key not in _REFERENCE_FEATURES:  # the same reference set for every sample set
            _REFERENCE_FEATURES[key] = scorer.features(refs, batch_size)
        metrics |= mauve_from_features(feats, _REFERENCE_FEATURES[key], mauve_seed)
    text_metrics, text_per_sample = word_metrics(texts, ngram_ref)
    metrics |= text_metrics
    meta = generator_meta or {}
    return {
        "protocol": protocol_record(
            scorer,
            len(texts),
            meta.get("seed"),
            ref_meta,
            mauve_seed if reference else None,
            ngram_protocol(ngram_ref),
        ),
        "metrics": metrics,
        "generator": meta,
        "device": device_record(device),
        "per_sample": (per_sample_totals(nlls) if nlls is not None else {}) | text_per_sample,
    }
