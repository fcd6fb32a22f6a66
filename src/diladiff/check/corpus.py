"""The check's corpus: K distinct real rows of exactly L tokens (DIR/corpus.jsonl, the texts;
DIR/corpus_rows.npy, their token rows), and the overrides that train every stage on it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diladiff.errors import DataError

# Settings every stage of the check shares: no mid-run evaluation or checkpoints beyond the end.
CHECK_COMMON = ["train.eval_every=100000", "train.ckpt_every=200", "train.eval_batches=1"]


def build_corpus(
    source_spec: str, tok, k: int, seq_len: int, text_field: str = "text", txt_split: str = ""
) -> tuple[list[str], np.ndarray]:
    """K texts whose token rows are exactly L long and distinct: the first L - 1 tokens of K
    documents of the source plus the separator the packer appends. A document is kept only if
    its truncated text re-tokenises to the same ids (WordPiece can split a cut word
    differently), so packing the texts reproduces the rows exactly."""
    from diladiff.data.packing import _encode_batch
    from diladiff.data.sources import open_source
    from diladiff.data.tokenizer import separator_id

    sep = separator_id(tok)
    texts: list[str] = []
    rows: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    source = open_source(source_spec, text_field, txt_split or "blank_line")
    batch: list[str] = []

    def consume() -> None:
        for ids in _encode_batch(tok, batch):
            if len(texts) == k or len(ids) < seq_len - 1:
                continue
            ids = ids[: seq_len - 1]
            text = tok.decode(ids)
            if _encode_batch(tok, [text])[0] != ids or tuple(ids) in seen:
                continue
            seen.add(tuple(ids))
            texts.append(text)
            rows.append(ids + [sep])
        batch.clear()

    for doc in source.documents():
        batch.append(doc)
        if len(batch) == 256:
            consume()
            if len(texts) == k:
                break
    consume()
    if len(texts) < k:
        raise DataError(
            f"{source_spec!r} has only {len(texts)} documents of at least {seq_len - 1} tokens "
            f"that re-tokenise exactly; lower --num-sequences or data.seq_len"
        )
    return texts, np.asarray(rows, dtype=np.int64)


def write_corpus(root: Path, texts: list[str], rows: np.ndarray, heldout: int) -> Path:
    """DIR/corpus.jsonl: the K texts, then the first `heldout` of them again as the validation
    split (the check measures memorisation; the training split is exactly the K rows)."""
    path = root / "corpus.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for text in texts + texts[:heldout]:
            fh.write(json.dumps({"text": text}) + "\n")
    np.save(root / "corpus_rows.npy", rows)
    tmp.replace(path)
    return path


def training_config(overrides: list[str], corpus: Path, heldout: int) -> list[str]:
    """Overrides for every stage: the user's, then the corpus (the check's own data)."""
    keep = [o for o in overrides if not o.startswith("data.source=")]
    return [
        *CHECK_COMMON,
        *keep,
        f"data.source={corpus}",
        f"data.heldout_docs={heldout}",
        "data.max_docs=0",
    ]


@dataclass
class CheckCorpus:
    """The K rows and what training on them takes."""

    origin: str  # the data.source the rows were cut from
    path: Path  # DIR/corpus.jsonl
    tok: object  # the stages' tokenizer
    rows: np.ndarray  # (K, L) token ids, distinct
    train_overrides: list[str]  # every stage's overrides (training_config, the tokenizer)


def corpus_rows(root: Path, cfg, tok, k: int, heldout: int) -> np.ndarray:
    """DIR's K rows of L tokens: the saved ones when DIR has a corpus (a DataError when its
    shape differs), else built from cfg.data.source and written (build_corpus)."""
    seq_len = cfg.data.seq_len
    if (root / "corpus.jsonl").is_file() and (root / "corpus_rows.npy").is_file():
        rows = np.load(root / "corpus_rows.npy")
        if rows.shape != (k, seq_len):
            raise DataError(
                f"{root} holds a check corpus of {rows.shape[0]} rows x {rows.shape[1]} tokens, "
                f"not {k} x {seq_len}; use a new --run-dir"
            )
        return rows
    print(f"[check] building {k} rows of {seq_len} tokens from {cfg.data.source}")
    d = cfg.data
    texts, rows = build_corpus(d.source, tok, k, seq_len, d.text_field, d.txt_split)
    write_corpus(root, texts, rows, heldout)
    return rows


def prepare_corpus(root: Path, preset: str, overrides: list[str], k: int) -> CheckCorpus:
    """The check's corpus under `root` (corpus_rows) and the stages' overrides for it, checked
    by packing it as training does: a DataError unless that gives back exactly the K rows."""
    from diladiff.config import build_config
    from diladiff.data.packing import prepare_data
    from diladiff.data.tokenizer import load_tokenizer, resolve_tokenizer

    cfg = build_config(preset, overrides)
    # A corpus BPE (bpe-N) is trained on data.source's training split; the stages then train
    # with that folder (data.tokenizer below), not a BPE of the check's own corpus.
    tok_name = resolve_tokenizer(cfg.data)
    tok = load_tokenizer(tok_name)
    heldout = max(1, min(32, k // 4))
    rows = corpus_rows(root, cfg, tok, k, heldout)
    path = root / "corpus.jsonl"
    train_overrides = [*training_config(overrides, path, heldout), f"data.tokenizer={tok_name}"]
    packed = prepare_data(build_config(preset, train_overrides).data, tok, progress=False)
    train = np.asarray(packed.train, dtype=np.int64)
    if train.shape != rows.shape or not (train == rows).all():
        raise DataError("packing the check corpus did not reproduce its K rows exactly")
    return CheckCorpus(cfg.data.source, path, tok, rows, train_overrides)
