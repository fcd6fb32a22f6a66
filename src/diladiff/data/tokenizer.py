"""Tokenizers by hub name, local path, built-in alias or corpus BPE, and their identity for
checkpoints.

    load_tokenizer("bert-base-uncased")     # a hub name, a local folder or an alias
    load_tokenizer(cfg.data)                # data.tokenizer of a DataConfig, "bpe-N" included
    resolve_tokenizer(cfg.data)             # the name or folder that data.tokenizer stands for

`data.tokenizer=bpe-N` is a byte-level BPE of N tokens trained on data.source's training split,
once, and cached (data.bpe); run folders, packed data and exports carry a copy of the tokenizer
they were made with (`save_tokenizer`, in a `tokenizer/` folder), so they load without it.

Pretrained names (hub names, local folders, the built-in aliases `minilm-l6` and `smollm2-135m`:
`resolve_model_name`), their loading, `tokenizer_identity` and `separator_id` live in
diladiff.pretrained, in the lowest layer, where the feature model loads its tokenizer too; this
module adds the corpus BPE and the copies in run folders and packed data.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diladiff.config import DataConfig
from diladiff.data.bpe import PROVENANCE, bpe_spec, corpus_tokenizer
from diladiff.errors import CheckpointError, DataError
from diladiff.pretrained import (
    load_pretrained_tokenizer,
    resolve_model_name,
    separator_id,
    tokenizer_identity,
)

# resolve_model_name, separator_id and tokenizer_identity are diladiff.pretrained's, given here
# too: data's users load, identify and separate their tokenizer from one module.
__all__ = [
    "TOKENIZER_DIR",
    "check_same_tokenizer",
    "load_tokenizer",
    "require_mask_id",
    "resolve_model_name",
    "resolve_tokenizer",
    "save_tokenizer",
    "separator_id",
    "tokenizer_identity",
]

# The tokenizer's copy inside a run folder or a packed data folder.
TOKENIZER_DIR = "tokenizer"


def resolve_tokenizer(cfg: DataConfig, progress: bool = True) -> str:
    """The name or folder `cfg.tokenizer` stands for: a corpus BPE ("bpe-N") is found in the
    cache or trained on cfg.source's training split (`progress`: say so while training); a
    packed folder given as cfg.source supplies the copy packed with it; other names (hub names,
    paths, aliases) are returned as they are, for `load_tokenizer`."""
    if bpe_spec(cfg.tokenizer) is None:
        return cfg.tokenizer
    packed = Path(cfg.source).expanduser()
    if (packed / "manifest.json").is_file():
        if not (packed / TOKENIZER_DIR / "tokenizer.json").is_file():
            raise DataError(
                f"the packed folder {packed} holds no {TOKENIZER_DIR}/ to read "
                f"data.tokenizer={cfg.tokenizer!r} from; pack it again with this version"
            )
        return str(packed / TOKENIZER_DIR)
    return str(corpus_tokenizer(cfg, progress))


def load_tokenizer(spec: str | DataConfig):
    """A fast Hugging Face tokenizer from a hub name, local path or alias, or from a DataConfig
    (its data.tokenizer resolved by `resolve_tokenizer`: needed for "bpe-N", which names a
    tokenizer of a corpus). It need not have a mask token (the stages that mask tokens check
    for one: `require_mask_id`)."""
    name = resolve_tokenizer(spec) if isinstance(spec, DataConfig) else spec
    if bpe_spec(name) is not None:
        raise DataError(
            f"tokenizer {name!r} is trained on a corpus: load it from the data config "
            "(load_tokenizer(cfg.data)) or from a run folder's tokenizer/"
        )
    return load_pretrained_tokenizer(name)


def save_tokenizer(tok, folder: Path) -> Path:
    """Write `tok` to `folder` as a fast-tokenizer folder (save_pretrained; with the training
    record of a corpus BPE), written beside it first and then moved into place (a reader never
    sees a half-written copy); `load_tokenizer(folder)` reads it back with the same identity."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    record = Path(getattr(tok, "name_or_path", "") or "-") / PROVENANCE
    if record.is_file():
        shutil.copy2(record, tmp / PROVENANCE)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def require_mask_id(tokenizer_identity: dict, tokenizer: str, what: str) -> int:
    """The identity's mask id; a DataError naming `tokenizer` and `what` needs it when the
    tokenizer has none (e.g. GPT-2's)."""
    mask_id = tokenizer_identity.get("mask_id")
    if mask_id is None:
        raise DataError(f"tokenizer {tokenizer!r} has no mask token; {what} needs one")
    return int(mask_id)


def check_same_tokenizer(expected: dict, actual: dict, what: str) -> None:
    """Raise CheckpointError when two tokenizer identities differ."""
    if expected.get("vocab_sha256") != actual.get("vocab_sha256"):
        raise CheckpointError(
            f"{what}: tokenizer vocabulary mismatch (checkpoint vocab_size="
            f"{expected.get('vocab_size')}, tokenizer vocab_size={actual.get('vocab_size')})"
        )
