"""data.tokenizer=bpe-N: a byte-level BPE trained on the training split of data.source, cached,
and carried by run folders, packed data and exports (data.bpe, data.tokenizer, runs, hub)."""

import itertools
import json
import os

import pytest
from conftest import TINY, write_jsonl

import diladiff
from diladiff.cli import main
from diladiff.config import build_config
from diladiff.data import bpe
from diladiff.data.packing import _encode_batch
from diladiff.data.sources import open_source
from diladiff.data.tokenizer import (
    load_tokenizer,
    require_mask_id,
    resolve_tokenizer,
    separator_id,
    tokenizer_identity,
)
from diladiff.errors import CheckpointError, DataError
from diladiff.runs import load_run

BPE = ["data.tokenizer=bpe-512"]


def data_cfg(*overrides: str):
    return build_config("tiny", [*TINY, *BPE, *overrides]).data


@pytest.fixture
def spy(monkeypatch):
    """Every call of the BPE trainer: the texts it was given."""
    calls: list[list[str]] = []
    real = bpe.train_bpe

    def recording(texts, *args, **kwargs):
        texts = list(texts)
        calls.append(texts)
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(bpe, "train_bpe", recording)
    return calls


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("the BPE was trained again")

    monkeypatch.setattr(bpe, "train_bpe", refuse)


def test_the_bpe_sees_the_training_documents_only(tmp_path, spy):
    """The trainer gets exactly the documents packing puts in the training split; a word found
    only in the held-out documents gets no token, while the same documents inside the training
    split (data.heldout_docs=1) do give it one."""
    wiki = list(itertools.islice(open_source("wiki-vital").documents(), 300))
    heldout = [f"Qorvandel {i} met Qorvandel and Qorvandel again." for i in range(40)]
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki + heldout)
    cfg = data_cfg(f"data.source={corpus}", "data.max_docs=0", "data.heldout_docs=40")
    tok = load_tokenizer(cfg)
    assert spy == [wiki]
    assert not [t for t in tok.get_vocab() if "Qorv" in t]
    control = load_tokenizer(data_cfg(f"data.source={corpus}", "data.heldout_docs=1"))
    assert [t for t in control.get_vocab() if "Qorv" in t]
    assert len(spy) == 2 and spy[1] == wiki + heldout[:-1]


def test_the_bpe_is_trained_once_and_cached_by_corpus_and_split(spy, capsys):
    cfg = data_cfg()
    first = resolve_tokenizer(cfg, progress=True)
    assert "training tokenizer bpe-512" in capsys.readouterr().out  # says what it is doing
    stamp = os.stat(os.path.join(first, "tokenizer.json")).st_mtime_ns
    assert resolve_tokenizer(cfg) == first and len(spy) == 1
    assert os.stat(os.path.join(first, "tokenizer.json")).st_mtime_ns == stamp
    assert first.startswith(os.path.join(os.environ["DILADIFF_CACHE"], "tokenizers"))
    record = json.loads(open(os.path.join(first, bpe.PROVENANCE)).read())
    assert record["train_docs"] == 360 and record["source"] == "wiki-vital"
    other = resolve_tokenizer(data_cfg("data.heldout_docs=50"))
    assert other != first and len(spy) == 2 and len(spy[1]) == 350


def test_special_tokens_round_trip_and_packed_documents(spy):
    tok = load_tokenizer(data_cfg())
    vocab = tok.get_vocab()
    assert len(tok) == 512
    assert separator_id(tok) == vocab["[SEP]"] and tok.pad_token_id == vocab["[PAD]"]
    assert require_mask_id(tokenizer_identity(tok), "bpe-512", "test") == vocab["[MASK]"]
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Paris is the capital of France; it has 2,165,423 inhabitants (2019).",
        "Café naïve Ångström — 東京 🙂\nA second line,  two spaces.",
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # Packed documents (each followed by [SEP]) decode with a space between them.
    ids = [i for row in _encode_batch(tok, texts[:2]) for i in [*row, separator_id(tok)]]
    assert tok.decode(ids, skip_special_tokens=True) == " ".join(texts[:2])
    # [MASK] in a text is the mask id alone, the space before it absorbed.
    ids = tok("a [MASK] b", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["Ġa", "[MASK]", "Ġb"]


def test_bpe_lower_lowercases():
    tok = load_tokenizer(data_cfg("data.tokenizer=bpe-512-lower"))
    assert tok.decode(tok("Hello World", add_special_tokens=False)["input_ids"]) == "hello world"


def test_bad_bpe_names_are_one_line_errors():
    with pytest.raises(DataError, match="more than 259 tokens"):
        load_tokenizer(data_cfg("data.tokenizer=bpe-100"))
    with pytest.raises(DataError, match="trained on a corpus"):
        load_tokenizer("bpe-512")
    with pytest.raises(DataError, match="only .* BPE tokens"):
        load_tokenizer(data_cfg("data.tokenizer=bpe-60000", "data.max_docs=50"))


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A tiny MDLM trained for 3 steps with bpe-512, in its own cache."""
    root = tmp_path_factory.mktemp("bpe_run")
    os.environ["DILADIFF_CACHE"] = str(root / "cache")
    run = root / "mdlm"
    argv = ["train", "mdlm", "--preset", "tiny", "--run-dir", str(run), *TINY, *BPE]
    assert main([*argv, "train.max_steps=3"]) == 0
    return run


def test_an_mdlm_run_carries_its_tokenizer_and_loads_without_the_cache(
    bpe_run, tmp_path, monkeypatch, no_training, capsys
):
    """The run folder holds the tokenizer it trained with; with an empty cache (and no BPE
    training allowed) diladiff.load, diladiff sample, export and the exported folder all use
    that copy."""
    info = json.loads((bpe_run / "run.json").read_text())
    assert json.loads((bpe_run / "config.json").read_text())["data"]["tokenizer"] == "bpe-512"
    copy = load_tokenizer(str(bpe_run / "tokenizer"))
    assert tokenizer_identity(copy) == info["tokenizer_identity"]
    assert info["tokenizer_identity"]["vocab_size"] == 512
    assert (bpe_run / "tokenizer" / bpe.PROVENANCE).is_file()

    monkeypatch.setenv("DILADIFF_CACHE", str(tmp_path / "empty"))
    model = diladiff.load(bpe_run, device="cpu")
    out = model.generate(num_samples=2, disc_steps=4, seed=0, prompt="The city of")
    assert all(text.startswith("The city of") for text in out.texts)
    assert max(max(ids) for ids in out.ids) < 512
    samples = tmp_path / "s.jsonl"
    argv = ["sample", str(bpe_run), "--num-samples", "2", "--disc-steps", "4", "--seed", "0"]
    assert main([*argv, "--out", str(samples)]) == 0
    assert len(samples.read_text().splitlines()) == 2

    exported = tmp_path / "exported"
    assert main(["export", str(bpe_run), str(exported)]) == 0
    assert "byte-level BPE" in (exported / "README.md").read_text()
    from diladiff.hub import ExportedModel

    stage = ExportedModel.from_pretrained(exported).stage
    assert stage.tokenizer_identity == info["tokenizer_identity"]
    again = diladiff.load(exported, device="cpu")
    assert tokenizer_identity(again.tokenizer) == info["tokenizer_identity"]
    b = again.generate(num_samples=2, disc_steps=4, seed=0, prompt="The city of")
    assert b.ids == out.ids
    assert not (tmp_path / "empty" / "tokenizers").exists()


def test_a_run_refuses_another_corpus_bpe(bpe_run, tmp_path, capsys):
    """A BPE of the same size trained on another split is another vocabulary: loading or
    resuming the run with it fails."""
    other = resolve_tokenizer(data_cfg("data.max_docs=300", "data.heldout_docs=30"))
    assert tokenizer_identity(load_tokenizer(other)) != tokenizer_identity(
        load_tokenizer(str(bpe_run / "tokenizer"))
    )
    with pytest.raises(CheckpointError, match="vocabulary mismatch"):
        load_run(bpe_run, tokenizer=other)
    resume = tmp_path / "resumed"
    import shutil

    shutil.copytree(bpe_run, resume)
    argv = ["train", "mdlm", "--run-dir", str(resume), *TINY, f"data.tokenizer={other}"]
    assert main([*argv, "train.max_steps=4"]) == 2
    assert "tokenizer vocabulary mismatch" in capsys.readouterr().err


def test_a_resumed_run_uses_its_own_copy(bpe_run, tmp_path, monkeypatch, no_training):
    """Resuming with the same data.tokenizer needs no cache: the run's copy is used."""
    import shutil

    resume = tmp_path / "resumed"
    shutil.copytree(bpe_run, resume)
    monkeypatch.setenv("DILADIFF_CACHE", str(tmp_path / "empty"))
    argv = ["train", "mdlm", "--run-dir", str(resume), *TINY, *BPE, "train.max_steps=4"]
    assert main(argv) == 0
    steps = [json.loads(x).get("step") for x in (resume / "log.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 4


def test_duo_trains_with_a_corpus_bpe(tmp_path):
    run = tmp_path / "duo"
    argv = ["train", "duo", "--preset", "tiny", "--run-dir", str(run), *TINY, *BPE]
    assert main([*argv, "train.max_steps=2"]) == 0
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    model = diladiff.load(run, device="cpu")
    out = model.generate(num_samples=2, disc_steps=4, seed=0)
    assert len(model.tokenizer) == 512 and len(out.ids[0]) == 32
    assert 0 <= min(min(ids) for ids in out.ids) and max(max(ids) for ids in out.ids) < 512


def test_prepare_data_packs_the_tokenizer_for_use_without_corpus_or_cache(
    tmp_path, monkeypatch, capsys
):
    assert main(["prepare-data", "--preset", "tiny", *TINY, *BPE]) == 0
    folder = capsys.readouterr().out.splitlines()[0]
    packed = load_tokenizer(os.path.join(folder, "tokenizer"))
    assert tokenizer_identity(packed) == tokenizer_identity(load_tokenizer(data_cfg()))
    monkeypatch.setenv("DILADIFF_CACHE", str(tmp_path / "empty"))
    cfg = data_cfg(f"data.source={folder}")
    assert resolve_tokenizer(cfg) == os.path.join(folder, "tokenizer")
