"""A frozen feature model's features of packed token rows, computed once and kept on disk.

    cache = FeatureCache.open_or_build(root, key, [data.train, data.val], compute, 128, 384)
    idx = cache.lookup(x0)                   # (B,) row index in the cache, -1 where absent
    h, lengths = cache.load(idx[idx >= 0], device)

A cache is a folder `root/<hash of key>/`:

    meta.json      the key, the row count, max_len, width and the total number of positions
    features.bin   (positions, width) float16: the rows' features one after another, padding
                   left out (row r holds positions offsets[r] .. offsets[r+1] - 1, at most
                   max_len of them)
    offsets.bin    (rows + 1,) int64

`key` names everything the features depend on (feature model, layer, compute dtype, how rows
become feature tokens, the packed data's identity). The folder is written under a temporary
name and renamed into place, so an interrupted build leaves nothing that could be opened; a
folder whose files do not match its meta.json, or whose features differ from the model's on a
spot check of `VERIFY_ROWS` rows, is an error that says to delete it.

Rows are found by content, not by index (the trainer hands a stage token rows, not their
positions): a 64-bit hash of each row (`row_hashes`), sorted once, then each batch row's hash
is looked up by binary search and the candidate row compared with the batch row in full, so a
hash collision is a miss (computed live), never wrong features.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diladiff.errors import DataError

# Part of the key: bump it whenever the stored features of the same key, or their layout,
# change. 2: rows stored without padding (features.bin + offsets.bin).
FEATURE_CACHE_VERSION = 2
# Rows recomputed when an existing cache is opened, and the largest relative difference
# ||h_cached - h|| / ||h|| accepted (fp16 storage is ~1e-3; bf16 kernels run on batches of
# another size differ by up to ~1e-2).
VERIFY_ROWS = 2
VERIFY_TOLERANCE = 0.05
FP16_MAX = float(np.finfo(np.float16).max)

# compute(rows (b, L) int64 on the device) -> (h (b, F, width) float, lengths (b,) int)
Compute = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _multipliers(length: int) -> np.ndarray:
    """Fixed odd pseudo-random 64-bit multipliers m_0 .. m_{length-1} (the same in every
    process and run)."""
    rng = np.random.default_rng(0x5EED_F00D)
    return rng.integers(0, 2**63, size=length, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """h(x) = sum_i x_i m_i mod 2^64 per row of `rows` (n, L) (uint64 arithmetic wraps): rows
    differing in one position never collide (m_i is odd), others with probability ~2^-64."""
    mult = _multipliers(rows.shape[1])
    with np.errstate(over="ignore"):
        return (rows.astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)


class RowIndex:
    """The rows of several arrays (the splits, in order) numbered 0 .. n-1, found by content."""

    def __init__(self, splits: Sequence[np.ndarray], chunk: int = 65536):
        self.splits = list(splits)
        self.offsets = np.cumsum([0] + [len(s) for s in self.splits])
        hashes = np.concatenate(
            [
                row_hashes(np.asarray(s[i : i + chunk]))
                for s in self.splits
                for i in range(0, len(s), chunk)
            ]
            or [np.zeros(0, np.uint64)]
        )
        self.order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.order]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """The rows with indices idx (k,) as int64 (k, L)."""
        out = np.empty((len(idx), self.splits[0].shape[1]), dtype=np.int64)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for s, split in enumerate(self.splits):
            sel = np.nonzero(which == s)[0]
            if len(sel):
                local = idx[sel] - self.offsets[s]
                order = np.argsort(local)  # sorted reads are faster on a memmap
                out[sel[order]] = split[local[order]]
        return out

    def lookup(self, batch: np.ndarray) -> np.ndarray:
        """Index of each row of `batch` (B, L), -1 for a row not held (or a hash collision)."""
        if len(self) == 0 or batch.shape[1] != self.splits[0].shape[1]:
            return np.full(len(batch), -1, dtype=np.int64)
        h = row_hashes(batch)
        pos = np.minimum(np.searchsorted(self.sorted, h), len(self.sorted) - 1)
        idx = np.where(self.sorted[pos] == h, self.order[pos], -1).astype(np.int64)
        hit = idx >= 0
        if hit.any():
            same = (self.rows(idx[hit]) == batch[hit]).all(axis=1)
            idx[np.nonzero(hit)[0][~same]] = -1
        return idx


def cache_folder_name(key: dict) -> str:
    """The folder of a key: the first 20 hex digits of sha256(key as sorted JSON)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cache_bytes(rows: int, positions_per_row: float, width: int) -> int:
    """Disk size of a cache: rows x positions_per_row x width fp16 values and an 8-byte offset
    per row."""
    return int(rows * (positions_per_row * width * 2 + 8))


class FeatureCache:
    """fp16 features of a fixed set of rows (module docstring)."""

    def __init__(self, folder: Path, meta: dict, index: RowIndex):
        self.folder, self.meta, self.index = folder, meta, index
        shape = (meta["positions"], meta["width"])
        self.features = np.memmap(folder / "features.bin", np.float16, "r", shape=shape)
        self.offsets = np.memmap(folder / "offsets.bin", np.int64, "r", shape=(meta["rows"] + 1,))

    def __deepcopy__(self, memo):  # read-only: a copy of the stage shares it
        return self

    def __len__(self) -> int:
        return self.meta["rows"]

    # ------------------------------------------------------------------ use
    def lookup(self, x0: torch.Tensor) -> np.ndarray:
        """The cache index of each row of x0 (B, L), -1 where the row is not cached."""
        return self.index.lookup(x0.detach().cpu().numpy())

    def load(self, idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (k, F, width) float32 of cached rows idx (k,), right-padded with zeros to
        their longest length F (at least 1), and their lengths (k,) int64, on `device`."""
        starts = np.asarray(self.offsets[idx], dtype=np.int64)
        lengths = np.asarray(self.offsets[idx + 1], dtype=np.int64) - starts
        h = np.zeros(
            (len(idx), max(int(lengths.max(initial=0)), 1), self.meta["width"]), np.float16
        )
        for j in np.argsort(starts):  # in file order: faster reads on a memmap
            h[j, : lengths[j]] = self.features[starts[j] : starts[j] + lengths[j]]
        h = torch.from_numpy(h).to(device).float()
        return h, torch.from_numpy(lengths).to(device)

    # ------------------------------------------------------------------ open / build
    @classmethod
    def open_or_build(
        cls,
        root: Path,
        key: dict,
        splits: Sequence[np.ndarray],
        compute: Compute,
        max_len: int,
        width: int,
        batch_size: int = 64,
        progress: bool = True,
        build: bool = True,
    ) -> FeatureCache | None:
        """The cache of `key` over the rows of `splits`: opened (and spot-checked against
        `compute`) if it is on disk, else built with `compute` in batches of `batch_size` rows
        (a progress bar if `progress`) when `build`, else None."""
        folder = Path(root) / cache_folder_name(key)
        index = RowIndex(splits)
        if not (folder / "meta.json").is_file():
            if not build:
                return None
            cls._build(folder, key, index, compute, max_len, width, batch_size, progress)
            return cls._open(folder, key, index, max_len, width)
        cache = cls._open(folder, key, index, max_len, width)
        cache.verify(compute)
        return cache

    @classmethod
    def _open(cls, folder: Path, key: dict, index: RowIndex, max_len: int, width: int):
        def corrupt(why: str) -> DataError:
            return DataError(f"feature cache {folder} is corrupt ({why}); delete it to rebuild")

        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise corrupt(f"meta.json: {exc}") from None
        if not isinstance(meta, dict) or meta.get("key") != key:
            got = meta.get("key") if isinstance(meta, dict) else meta
            raise corrupt(f"meta.json's key {got} is not {key}")
        want = {"rows": len(index), "max_len": max_len, "width": width}
        if any(meta.get(k) != v for k, v in want.items()):
            raise corrupt(f"it holds {[meta.get(k) for k in want]}, expected {list(want.values())}")
        if not isinstance(meta.get("positions"), int) or meta["positions"] < 0:
            raise corrupt(f"meta.json's positions {meta.get('positions')!r} is not a count")
        sizes = {
            "features.bin": meta["positions"] * width * 2,
            "offsets.bin": (meta["rows"] + 1) * 8,
        }
        for name, size in sizes.items():
            path = folder / name
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                raise corrupt(f"{name} has {actual} bytes, not {size}")
        cache = cls(folder, meta, index)
        lengths = np.diff(np.asarray(cache.offsets))
        if cache.offsets[0] != 0 or cache.offsets[-1] != meta["positions"]:
            raise corrupt("offsets.bin does not span features.bin")
        if len(lengths) and (lengths.min() < 0 or lengths.max() > max_len):
            raise corrupt(f"row lengths outside [0, {max_len}]")
        return cache

    @staticmethod
    def _build(folder, key, index, compute, max_len, width, batch_size, progress) -> None:
        root = folder.parent
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
        n = len(index)
        offsets = np.zeros(n + 1, dtype=np.int64)
        try:
            bar = tqdm(total=n, desc="feature cache", unit="row", disable=not progress)
            with open(tmp / "features.bin", "wb") as out:
                for start in range(0, n, batch_size):
                    idx = np.arange(start, min(start + batch_size, n))
                    h, lens = compute(torch.from_numpy(index.rows(idx)))
                    h, lens = h.float().cpu(), lens.long().cpu()
                    if h.shape[1] > max_len or int(lens.max()) > h.shape[1]:
                        raise DataError(f"features of {h.shape[1]} positions exceed {max_len}")
                    pos = torch.arange(h.shape[1]).unsqueeze(0) < lens.unsqueeze(1)
                    rows = h[pos]  # the rows' real positions, one row after another
                    if rows.numel() and (
                        not torch.isfinite(rows).all() or rows.abs().max() > FP16_MAX
                    ):
                        raise DataError(
                            "the feature model's features are not finite or exceed fp16's "
                            "range; turn the feature cache off"
                        )
                    out.write(rows.half().numpy().tobytes())
                    offsets[start + 1 : start + len(idx) + 1] = offsets[start] + lens.cumsum(0)
                    bar.update(len(idx))
            bar.close()
            offsets.tofile(tmp / "offsets.bin")
            meta = {
                "key": key,
                "rows": n,
                "max_len": max_len,
                "width": width,
                "positions": int(offsets[-1]),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process built it first
                if not (folder / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @torch.no_grad()
    def verify(self, compute: Compute, rows: int = VERIFY_ROWS) -> None:
        """Recompute the first and last rows (`rows` in all) and compare them with the cache:
        a DataError when ||h_cached - h|| / ||h|| > VERIFY_TOLERANCE or the lengths differ."""
        n = len(self)
        if n == 0 or rows <= 0:
            return
        idx = np.unique(np.linspace(0, n - 1, min(rows, n)).round().astype(np.int64))
        h, lens = compute(torch.from_numpy(self.index.rows(idx)))
        cached, cached_lens = self.load(idx, "cpu")
        h, lens = h.float().cpu(), lens.cpu()
        f = max(h.shape[1], cached.shape[1])
        h = torch.nn.functional.pad(h, (0, 0, 0, f - h.shape[1]))
        cached = torch.nn.functional.pad(cached, (0, 0, 0, f - cached.shape[1]))
        pos = (torch.arange(f).unsqueeze(0) < lens.unsqueeze(1)).unsqueeze(-1)
        rel = float((cached - h * pos).norm() / (h * pos).norm().clamp(min=1e-12))
        if not torch.equal(lens, cached_lens) or rel > VERIFY_TOLERANCE:
            raise DataError(
                f"feature cache {self.folder} does not match the feature model (relative "
                f"difference {rel:.3g} on {len(idx)} rows; lengths {cached_lens.tolist()} vs "
                f"{lens.tolist()}): built from other weights? delete it to rebuild"
            )


def free_bytes(root: Path) -> int:
    """Free space on the file system that holds `root` (or its nearest existing parent)."""
    path = Path(root)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def fits(root: Path, rows: int, positions_per_row: float, width: int, max_gb: float) -> str | None:
    """Why a cache of this size should not be built under `root` (over `max_gb` GB, or more
    than 90% of the free space), or None when it fits."""
    size = cache_bytes(rows, positions_per_row, width)
    if size > max_gb * 1e9:
        return f"it would take {size / 1e9:.1f} GB, over the limit of {max_gb:g} GB"
    free = free_bytes(root)
    if size > 0.9 * free:
        return f"it would take {size / 1e9:.1f} GB of the {free / 1e9:.1f} GB free under {root}"
    return None
