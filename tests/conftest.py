import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core (pytest -n)
    import torch

    # Tiny models: one intra-op thread per worker; two per worker would oversubscribe the cores.
    torch.set_num_threads(1)

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(kind: str, run: Path, *overrides: str, nproc: int = 2) -> list[str]:
    """`torchrun --nproc_per_node=nproc -m diladiff train KIND --preset tiny --run-dir RUN ...`
    on a free port (gloo on CPU)."""
    return [
        *(sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"),
        *(f"--master_port={free_port()}", "-m", "diladiff", "train", kind, "--preset", "tiny"),
        *("--run-dir", str(run), *overrides),
    ]


def torchrun_replica_digests(kind: str, run: Path, *overrides: str) -> list[str]:
    """Train KIND with 2 processes (torchrun_cmd) and return the end record's replica digests
    (one per rank: a hash of every state_dict entry, buffers included)."""
    proc = subprocess.run(
        torchrun_cmd(kind, run, *overrides), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return next(r for r in log if r.get("event") == "end")["replica_digests"]


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


@pytest.fixture(scope="session")
def latent_chain(tmp_path_factory):
    """A tiny MDLM -> auto-encoder -> LaDiff chain (latent_fixtures.build_chain), trained once
    per test session and shared by every module that needs trained latent runs. Read-only for
    its users: a test that trains or writes must use its own folder."""
    from latent_fixtures import build_chain

    # session fixtures run before the per-test _isolated_cache: point the cache there too
    os.environ["DILADIFF_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    return build_chain(tmp_path_factory.mktemp("chain"))
