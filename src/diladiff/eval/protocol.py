"""The one evaluation protocol, versioned, and the result files that record it.

A result file is JSON:
    {"protocol": {...}, "metrics": {...}, "generator": {...}, "device": "...", "created": ...}
where `protocol` fixes everything that changes a number (scorer, tokenisation, boundary
token, pooling, sample count, seeds, reference set) and `generator` the model and sampler.

Versions:
- diladiff-eval-v1: GenPPL (bootstrap interval, median), entropy and n-gram diversity of
  the token ids, MAUVE.
- diladiff-eval-v2: v1 unchanged, plus word-level metrics that can rank CPU-scale models
  (eval/ngram.py; `text_metrics` below): a Kneser-Ney word n-gram LM perplexity fitted on the
  run's train split (ngram_ppl, its interval, per-sample NLL sums and word counts), the share
  of generated word bigrams / trigrams seen in that text, distinct-1/2/3 on words and the
  longest span copied from it; and the paired bootstrap (eval/paired.py) for comparing two
  results of the same seeds (`paired_interval`).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from diladiff.errors import DataError
from diladiff.eval.genppl import BOOTSTRAP_DESCRIPTION
from diladiff.eval.paired import PAIRED_DESCRIPTION

PROTOCOL_VERSION = "diladiff-eval-v2"


def protocol_record(
    scorer,
    num_samples: int,
    seed: int | None,
    reference: dict | None,
    mauve_seed: int | None,
    text_metrics: dict | None = None,
) -> dict:
    """`text_metrics`: the word metrics' entry (eval/ngram.py `ngram_protocol`)."""
    return {
        "version": PROTOCOL_VERSION,
        "scorer": scorer.name if scorer else None,
        "tokenization": "decode generator ids (skip special tokens), re-tokenise with the "
        "scorer tokenizer, no truncation below the scorer context",
        "boundary_token": scorer.boundary if scorer else None,
        "first_token_scored": True,
        "pooling": "token-pooled exp(total NLL / total tokens); per-sample median beside it",
        "interval": BOOTSTRAP_DESCRIPTION,
        "entropy": "unigram entropy (nats) of generator token ids per sample, averaged",
        "mauve": {
            "package": "mauve-text",
            "features": "scorer final hidden state at last token",
            "seed": mauve_seed,
            "reference": reference,
        }
        if mauve_seed is not None
        else None,
        "text_metrics": text_metrics,
        "paired_interval": PAIRED_DESCRIPTION,
        "num_samples": num_samples,
        "sample_seed": seed,
    }


def device_record(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_result(path: Path | str, record: dict) -> None:
    record = {**record, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")


def read_result(path: Path | str) -> dict:
    """A result JSON file (eval --json, eval-recon, ...); DataError when missing or not one."""
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"result file {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError, IsADirectoryError) as exc:
        raise DataError(f"{path} is not a result JSON file ({type(exc).__name__})") from None
    if not isinstance(result, dict):
        raise DataError(f"{path} is not a result JSON file (a {type(result).__name__})")
    return result
