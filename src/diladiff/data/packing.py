"""Tokenise a corpus in batches, pack documents (each followed by a separator) into rows of
length L, and store train / validation rows as memory-mapped arrays with a manifest and a copy
of the tokenizer (tokenizer/).

The cache key covers the source's fingerprint, the tokenizer's vocabulary, L and the split, so
re-runs reuse the arrays and any change rebuilds them. Writes go to a temporary folder that is
renamed into place, so an interrupted build never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diladiff.config import DataConfig
from diladiff.data.sources import DocumentSource, source_from_config, split_sizes
from diladiff.data.tokenizer import (
    TOKENIZER_DIR,
    save_tokenizer,
    separator_id,
    tokenizer_identity,
)
from diladiff.errors import DataError
from diladiff.runtime import cache_root

# Part of the cache key: bump it whenever the rows a source packs into change, so caches built
# by older code are never reused. 2: caches of version 1 could have been built before padding
# and truncation were disabled in the tokenizer (28% of the tokens of such a wiki-vital cache
# were [PAD]).
FORMAT_VERSION = 2


@dataclass
class PackedData:
    """Train and validation token rows, shape (rows, L), memory-mapped."""

    train: np.ndarray
    val: np.ndarray
    manifest: dict
    folder: Path


def _cache_key(source: DocumentSource, tok_id: dict, cfg: DataConfig) -> str:
    parts = [
        source.fingerprint(),
        tok_id["vocab_sha256"],
        cfg.seq_len,
        cfg.heldout_docs,
        cfg.max_docs,
        FORMAT_VERSION,
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def _open(folder: Path) -> PackedData:
    manifest = json.loads((folder / "manifest.json").read_text())
    arrays = {}
    for split in ("train", "val"):
        rows = manifest[f"{split}_rows"]
        arrays[split] = np.memmap(
            folder / f"{split}.bin",
            dtype=manifest["dtype"],
            mode="r",
            shape=(rows, manifest["seq_len"]),
        )
    return PackedData(arrays["train"], arrays["val"], manifest, folder)


def _encode_batch(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of whole documents: no special tokens, and no padding or truncation (some
    tokenizer.json files enable both, which would silently pad or cut every document)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def open_packed(folder: Path, cfg: DataConfig, tok_id: dict) -> PackedData:
    """A packed folder named directly as data.source (e.g. carried to a machine without the
    corpus; `diladiff prepare-data` prints it): its rows must have this config's seq_len and
    tokenizer."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{folder} was packed by another version (format {manifest.get('format_version')})"
        )
    if manifest["seq_len"] != cfg.seq_len:
        raise DataError(
            f"{folder} holds rows of {manifest['seq_len']} tokens, not data.seq_len={cfg.seq_len}"
        )
    if manifest["tokenizer_identity"] != tok_id:
        raise DataError(f"{folder} was packed with another tokenizer than {cfg.tokenizer!r}")
    return _open(folder)


def prepare_data(cfg: DataConfig, tok, progress: bool = True) -> PackedData:
    """Packed token rows for `cfg`, built once and then read from the cache; or a packed
    folder given as data.source itself (no corpus needed)."""
    tok_id = tokenizer_identity(tok)
    packed = Path(cfg.source).expanduser()
    if (packed / "manifest.json").is_file():
        return open_packed(packed, cfg, tok_id)
    source = source_from_config(cfg)
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "data"
    folder = root / _cache_key(source, tok_id, cfg)
    if (folder / "manifest.json").is_file():
        return _open(folder)

    n_docs, n_train_docs = split_sizes(cfg, source)
    dtype = np.uint16 if tok_id["vocab_size"] <= np.iinfo(np.uint16).max else np.uint32
    sep = separator_id(tok)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        files = {s: open(tmp / f"{s}.bin", "wb") for s in ("train", "val")}
        counts = {"train": 0, "val": 0}
        batch: list[str] = []
        bar = tqdm(total=n_docs, desc=f"tokenising {cfg.source}", unit="doc", disable=not progress)

        def flush(first_index: int) -> None:
            for i, ids in enumerate(_encode_batch(tok, batch)):
                split = "train" if first_index + i < n_train_docs else "val"
                arr = np.asarray(ids + [sep], dtype=dtype)
                files[split].write(arr.tobytes())
                counts[split] += arr.size
            bar.update(len(batch))
            batch.clear()

        batch_start, seen = 0, 0
        for index, text in enumerate(itertools.islice(source.documents(), n_docs)):
            seen = index + 1
            if not batch:
                batch_start = index
            batch.append(text)
            if len(batch) == cfg.tokenize_batch_docs:
                flush(batch_start)
        if batch:
            flush(batch_start)
        bar.close()
        if seen < n_docs:  # a stream that ended early
            raise DataError(
                f"data source {cfg.source!r} ended after {seen} documents; "
                f"set data.max_docs <= {seen}"
            )
        for fh in files.values():
            fh.close()

        manifest = {
            "format_version": FORMAT_VERSION,
            "source": cfg.source,
            "fingerprint": source.fingerprint(),
            "tokenizer": cfg.tokenizer,
            "tokenizer_identity": tok_id,
            "seq_len": cfg.seq_len,
            "dtype": np.dtype(dtype).name,
            "separator_id": sep,
            "train_docs": n_train_docs,
            "val_docs": cfg.heldout_docs,
        }
        for split in ("train", "val"):
            rows = counts[split] // cfg.seq_len
            if rows == 0:
                raise DataError(
                    f"the {split} split of {cfg.source!r} has {counts[split]} tokens, fewer than "
                    f"one row of data.seq_len={cfg.seq_len}"
                )
            os.truncate(tmp / f"{split}.bin", rows * cfg.seq_len * np.dtype(dtype).itemsize)
            manifest[f"{split}_rows"] = rows
            manifest[f"{split}_tokens"] = rows * cfg.seq_len
        # The tokenizer travels with its rows: a packed folder named as data.source elsewhere
        # needs no corpus, nor a corpus tokenizer's cache (data.tokenizer.resolve_tokenizer).
        save_tokenizer(tok, tmp / TOKENIZER_DIR)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built it first
            if not (folder / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open(folder)
