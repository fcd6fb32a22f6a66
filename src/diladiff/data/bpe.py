"""A BPE tokenizer trained on the corpus itself: `data.tokenizer=bpe-N` (e.g. bpe-4096), or
`bpe-N-lower` for one of lowercased text.

It is trained with Hugging Face `tokenizers` once per corpus, on the training split only (the
documents `split_sizes` assigns to training: never the last data.heldout_docs), and cached as a
transformers fast-tokenizer folder

    $DILADIFF_CACHE/tokenizers/<key>-bpe-N/    key: the source's fingerprint and its split

which `load_tokenizer(folder)` loads like any other. Run folders, packed data and exports carry
a copy (`save_tokenizer`), so nothing trained needs this cache or the corpus again.

The flavour: byte-level BPE (GPT-2's), so every text is encoded without an unknown token and
decode(encode(text)) gives the text back (after NFC normalisation), case included: samples
read as the corpus does, and the GenPPL scorers are cased. `bpe-N-lower` lowercases first (on
wiki-vital's training split, 9,733 documents: bpe-4096 takes 1.73 tokens per whitespace-
separated word, bpe-4096-lower 1.66, bert-base-uncased 1.66). A space is put before each
document (ByteLevel add_prefix_space), so a word is one token at a document's start and inside
it, and documents packed after one another decode with a space between them; the decoder drops
that one leading space again. Special tokens: [PAD] = 0, [SEP] = 1 (between packed documents),
[MASK] = 2 (absorbing the space before it, as RoBERTa's <mask> does, so "a [MASK] b" leaves no
stray space token).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import time
from pathlib import Path

from diladiff.data.sources import source_from_config, split_sizes
from diladiff.errors import DataError
from diladiff.runtime import cache_root

BPE_NAME = re.compile(r"bpe-(\d+)(-lower)?")
SPECIAL_TOKENS = ("[PAD]", "[SEP]", "[MASK]")
BYTE_ALPHABET = 256
# Written beside the tokenizer's files: how it was trained (copied with it by save_tokenizer).
PROVENANCE = "diladiff_tokenizer.json"
# Part of the cache key: bump it whenever the trained tokenizer for the same documents changes.
BPE_FORMAT_VERSION = 1


def bpe_spec(name: str) -> tuple[int, bool] | None:
    """(N, lowercase) of a corpus tokenizer name "bpe-N" or "bpe-N-lower"; None for any other
    tokenizer name."""
    match = BPE_NAME.fullmatch(name)
    if match is None:
        return None
    size = int(match.group(1))
    if size <= BYTE_ALPHABET + len(SPECIAL_TOKENS):
        raise DataError(
            f"data.tokenizer={name!r}: a byte-level BPE needs more than "
            f"{BYTE_ALPHABET + len(SPECIAL_TOKENS)} tokens (256 bytes + {len(SPECIAL_TOKENS)} "
            "special tokens)"
        )
    return size, match.group(2) is not None


def bpe_cache_folder(cfg, fingerprint: str) -> Path:
    """Where the corpus tokenizer of a DataConfig lives: keyed by the source's fingerprint and
    the split (max_docs, heldout_docs), which fix the training documents, and named by
    data.tokenizer (size and case)."""
    parts = [fingerprint, cfg.max_docs, cfg.heldout_docs, BPE_FORMAT_VERSION]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    return cache_root() / "tokenizers" / f"{key}-{cfg.tokenizer}"


def train_bpe(
    texts,
    vocab_size: int,
    lowercase: bool = False,
    length: int | None = None,
    progress: bool = True,
):
    """A byte-level BPE fast tokenizer (PreTrainedTokenizerFast) with `vocab_size` tokens,
    trained on the iterable `texts` (`length`: their count, for the progress bar); `lowercase`:
    it lowercases every text it encodes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    norms = [normalizers.NFC(), *([normalizers.Lowercase()] if lowercase else [])]
    backend.normalizer = normalizers.Sequence(norms)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    # Fuse, then strip one leading space: the one add_prefix_space put before the text.
    backend.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    pad, sep, mask = SPECIAL_TOKENS
    specials = [
        AddedToken(pad, special=True, normalized=False),
        AddedToken(sep, special=True, normalized=False),
        AddedToken(mask, lstrip=True, special=True, normalized=False),
    ]
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    backend.train_from_iterator(texts, trainer, length=length)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        sep_token=sep,
        mask_token=mask,
        # transformers' clean-up would delete the space before "." or "'s": not a round trip.
        clean_up_tokenization_spaces=False,
    )


def corpus_tokenizer(cfg, progress: bool = True) -> Path:
    """The folder of the corpus tokenizer `cfg.tokenizer` = "bpe-N[-lower]" of the DataConfig
    `cfg`, trained on its training split the first time and read from the cache afterwards."""
    spec = bpe_spec(cfg.tokenizer)
    if spec is None:
        raise DataError(f"data.tokenizer={cfg.tokenizer!r} is not a corpus tokenizer (bpe-N)")
    vocab_size, lowercase = spec
    source = source_from_config(cfg)
    folder = bpe_cache_folder(cfg, source.fingerprint())
    if (folder / "tokenizer.json").is_file():
        return folder
    _, n_train = split_sizes(cfg, source)
    if progress:
        print(
            f"training tokenizer {cfg.tokenizer} on the {n_train} training documents of "
            f"{cfg.source!r} -> {folder}",
            flush=True,
        )
    start = time.perf_counter()
    train_docs = itertools.islice(source.documents(), n_train)
    tok = train_bpe(train_docs, vocab_size, lowercase, n_train, progress)
    seconds = time.perf_counter() - start
    if len(tok) != vocab_size:  # a corpus too small to merge this often
        raise DataError(
            f"the {n_train} training documents of {cfg.source!r} yield only {len(tok)} BPE "
            f"tokens, not {vocab_size}; choose a smaller data.tokenizer=bpe-N"
        )
    provenance = {
        "tokenizer": cfg.tokenizer,
        "flavour": "byte-level BPE, NFC"
        + (", lowercase" if lowercase else "")
        + ", prefix space; [PAD] [SEP] [MASK]",
        "source": cfg.source,
        "fingerprint": source.fingerprint(),
        "train_docs": n_train,
        "max_docs": cfg.max_docs,
        "heldout_docs": cfg.heldout_docs,
        "train_seconds": round(seconds, 2),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process trained the same tokenizer first
        if not (folder / "tokenizer.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"trained {cfg.tokenizer} in {seconds:.1f} s", flush=True)
    return folder
