import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A model small enough that a training step takes milliseconds on 2 CPU cores.
TINY = [
    "model.depth=1",
    "model.width=32",
    "model.heads=2",
    "data.seq_len=32",
    "data.max_docs=400",
    "data.heldout_docs=40",
    "train.batch_size=8",
    "train.warmup_steps=5",
    "train.eval_every=1000",
    "train.ckpt_every=1000",
    "train.eval_batches=2",
    "train.progress=false",
    "sample.num_samples=4",
    "sample.batch_size=4",
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches go to a per-session folder, never to the user's ~/.cache."""
    monkeypatch.setenv("DILADIFF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def word_level_tokenizer(folder: Path, words: list[str], **special: str) -> Path:
    """Save a whitespace word-level fast tokenizer over `words` (ids in order) to `folder`;
    `special` names its special tokens (unk_token="[UNK]", mask_token="[MASK]", ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, texts: list[str]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": str(i), "text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny MDLM trained for 30 steps on wiki-vital (shared by sampling tests)."""
    from diladiff.cli import main

    run = tmp_path_factory.mktemp("runs") / "mdlm"
    os.environ["DILADIFF_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    assert (
        main(
            [
                "train",
                "mdlm",
                "--preset",
                "tiny",
                "--run-dir",
                str(run),
                "train.max_steps=30",
                *TINY,
            ]
        )
        == 0
    )
    return run
