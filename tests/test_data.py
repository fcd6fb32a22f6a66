import numpy as np
import pytest
from conftest import write_jsonl

from diladiff.config import DataConfig
from diladiff.data.batches import RowSampler
from diladiff.data.packing import prepare_data
from diladiff.data.sources import open_source
from diladiff.data.tokenizer import load_tokenizer, separator_id
from diladiff.errors import DataError

DOCS = [
    f"document number {i} talks about the history of the river and its towns." for i in range(60)
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("minilm-l6")


def test_minilm_alias_is_the_bert_base_uncased_vocabulary(tok):
    assert len(tok) == 30522
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0,
        101,
        102,
        103,
    )


def test_pack_jsonl_gz_into_rows_with_separators_and_heldout_split(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl.gz", DOCS)
    cfg = DataConfig(source=str(path), tokenizer="minilm-l6", seq_len=16, heldout_docs=10)
    data = prepare_data(cfg, tok, progress=False)
    per_doc = len(tok(DOCS[0], add_special_tokens=False)["input_ids"]) + 1
    assert data.train.shape == (50 * per_doc // 16, 16)
    assert data.val.shape == (10 * per_doc // 16, 16)
    flat = np.asarray(data.train).ravel()
    assert flat[per_doc - 1] == separator_id(tok)
    decoded = tok.decode(flat[: per_doc - 1])
    assert decoded == DOCS[0].lower()
    # The held-out split starts with the first held-out document.
    assert tok.decode(np.asarray(data.val).ravel()[: per_doc - 1]) == DOCS[50].lower()


def test_cache_is_reused_and_invalidated_by_changes(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS)
    cfg = DataConfig(source=str(path), tokenizer="minilm-l6", seq_len=16, heldout_docs=10)
    first = prepare_data(cfg, tok, progress=False)
    again = prepare_data(cfg, tok, progress=False)
    assert again.folder == first.folder
    cfg.seq_len = 8
    assert prepare_data(cfg, tok, progress=False).folder != first.folder
    write_jsonl(path, DOCS[:-1])
    cfg.seq_len = 16
    assert prepare_data(cfg, tok, progress=False).folder != first.folder


def test_txt_files_split_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n\n\nfour\n")
    docs = list(open_source(str(tmp_path / "a.txt")).documents())
    assert docs == ["one\ntwo", "three", "four"]


def test_folder_source_reads_all_supported_files_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("from txt\n")
    write_jsonl(tmp_path / "a.jsonl", ["from jsonl"])
    (tmp_path / "ignored.csv").write_text("x")
    assert list(open_source(str(tmp_path)).documents()) == ["from jsonl", "from txt"]


def test_builtin_wiki_vital_is_real_english():
    docs = open_source("wiki-vital").documents()
    first = next(docs)
    assert len(first.split()) > 10 and " the " in first


def test_empty_corpus_is_a_clear_error(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    cfg = DataConfig(source=str(tmp_path / "empty.jsonl"), tokenizer="minilm-l6", heldout_docs=1)
    with pytest.raises(DataError, match="contains no documents"):
        prepare_data(cfg, tok, progress=False)


def test_non_utf8_file_is_a_clear_error(tmp_path, tok):
    (tmp_path / "bad.txt").write_bytes(b"fine text\n\ncaf\xe9 latin-1 text\n")
    cfg = DataConfig(source=str(tmp_path / "bad.txt"), tokenizer="minilm-l6", heldout_docs=1)
    with pytest.raises(DataError, match="not valid UTF-8"):
        prepare_data(cfg, tok, progress=False)


def test_missing_source_and_too_few_documents(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        open_source("./nope/corpus.jsonl")
    path = write_jsonl(tmp_path / "c.jsonl", DOCS[:5])
    cfg = DataConfig(source=str(path), tokenizer="minilm-l6", heldout_docs=5)
    with pytest.raises(DataError, match="heldout_docs"):
        prepare_data(cfg, tok, progress=False)


def test_row_sampler_is_a_deterministic_function_of_position():
    rows = np.arange(50, dtype=np.uint16).reshape(10, 5)
    a, b = RowSampler(rows, seed=3), RowSampler(rows, seed=3)
    epoch = a.rows_at(0, 10)[:, 0].tolist()
    assert sorted(epoch) == list(range(0, 50, 5))  # each row once per epoch
    assert b.rows_at(7, 6).tolist() == a.rows_at(7, 6).tolist()
    # Two ranks together read exactly the global batch.
    both = [a.micro_batch(2, 4, 2, 0, r, 2) for r in range(2)]
    assert [x[:, 0].tolist() for x in both] == [
        a.rows_at(8, 2)[:, 0].tolist(),
        a.rows_at(10, 2)[:, 0].tolist(),
    ]


def test_long_documents_are_neither_truncated_nor_padded(tmp_path, tok):
    long_doc = " ".join(["river"] * 700)  # 700 tokens: past BERT's 512 limit
    path = write_jsonl(
        tmp_path / "long.jsonl", [long_doc, "short one", "a held out document of enough words"]
    )
    cfg = DataConfig(source=str(path), tokenizer="minilm-l6", seq_len=8, heldout_docs=1)
    data = prepare_data(cfg, tok, progress=False)
    assert data.manifest["train_tokens"] == (700 + 1 + 2 + 1) // 8 * 8


class _FakeHub:
    """A stand-in for the `datasets` package (no hub here): load_dataset records its
    arguments and returns the records of DOCS, as a list or, when streamed, a generator."""

    def __init__(self):
        self.calls = []

    def load_dataset(self, name, config=None, split="train", revision=None, streaming=False):
        self.calls.append((name, config, split, revision, streaming))
        records = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
        return (r for r in records) if streaming else records


def test_hub_source_passes_config_revision_split_and_streams(tmp_path, tok, monkeypatch):
    import sys

    hub = _FakeHub()
    monkeypatch.setitem(sys.modules, "datasets", hub)
    base = dict(source="someone/corpus", tokenizer="minilm-l6", seq_len=16, heldout_docs=10)
    base["cache_dir"] = str(tmp_path / "cache")
    cfg = DataConfig(**base, hub_config="en", hub_revision="refs/convert/parquet")
    full = prepare_data(cfg, tok, progress=False)
    assert hub.calls[-1] == ("someone/corpus", "en", "train", "refs/convert/parquet", False)
    streamed = prepare_data(
        DataConfig(**base, hub_split="validation", streaming=True, max_docs=60), tok, False
    )
    assert hub.calls[-1] == ("someone/corpus", None, "validation", None, True)
    assert streamed.folder != full.folder  # another split and revision: another cache entry
    assert np.array_equal(np.asarray(streamed.train), np.asarray(full.train))
    with pytest.raises(DataError, match="needs data.max_docs"):
        prepare_data(DataConfig(**base, streaming=True, hub_split="x"), tok, False)
    with pytest.raises(DataError, match="ended after 60 documents"):
        prepare_data(DataConfig(**base, streaming=True, max_docs=80, hub_split="y"), tok, False)
    with pytest.raises(DataError, match="has no field 'body'"):
        prepare_data(DataConfig(**base, text_field="body", hub_split="z"), tok, False)
