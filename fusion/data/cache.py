"""An on-disk cache of NumPy arrays keyed by a hash of everything that produced them.

An entry is a folder ``<name>-<key>/`` of ``.npy`` files, opened memory-mapped and read-only: a
sample reads its slice from disk, so arrays larger than memory (windows of hundreds of thousands
of regions) cost only the pages in use. The builder fills arrays handed out by an allocator, one
chunk at a time if it likes; the folder is written under a temporary name and renamed when
complete, so an interrupted build never leaves a half-written entry. The cache folder is
``$FUSION_CACHE`` or ``~/.cache/fusion``. Entries of earlier versions (one ``.npz`` file) are
still read, into memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

# Hands out an array of (name, shape, dtype), zero-filled, for the builder to fill.
Allocate = Callable[[str, tuple[int, ...], Any], np.ndarray]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FUSION_CACHE", Path.home() / ".cache" / "fusion"))


def file_fingerprint(path: str | PathLike[str]) -> dict[str, Any] | list[dict[str, Any]]:
    """Identity of a file for cache keys: resolved path, size and modification time; of a
    folder (a partitioned table), the fingerprints of every file in it, in path order."""
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [file_fingerprint(p) for p in files]  # type: ignore[misc]
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(*parts: Any) -> str:
    """A stable hex digest of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def cached_arrays(
    name: str,
    key: str,
    build: Callable[[Allocate], None],
    *,
    cache_dir: str | PathLike[str] | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays of ``<cache_dir>/<name>-<key>/`` (memory-mapped, read-only), or built by
    ``build(allocate)``, saved and returned; and whether they came from the cache.

    ``cache_dir=None`` uses the default folder; ``""`` disables caching (the arrays are built
    in memory).
    """
    if cache_dir == "":
        arrays: dict[str, np.ndarray] = {}

        def in_memory(array: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            arrays[array] = np.zeros(shape, dtype=dtype)
            return arrays[array]

        build(in_memory)
        return arrays, False
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / f"{name}-{key}"
    if target.is_dir():
        return _open(target), True
    legacy = target.with_suffix(".npz")
    if legacy.is_file():
        with np.load(legacy, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}, True
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{target.name}-"))
    try:
        opened: list[np.memmap] = []

        def on_disk(array: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            out = np.lib.format.open_memmap(tmp / f"{array}.npy", "w+", dtype, shape)
            opened.append(out)
            return out

        build(on_disk)
        for array in opened:
            array.flush()
        opened.clear()  # unmapped: the folder is complete on disk
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same entry first: use theirs
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open(target), False


class Scratch:
    """An :data:`Allocate` of arrays for one run: memory-mapped files in a temporary folder of
    the cache folder, removed with this object (or at exit)."""

    def __init__(self, cache_dir: str | PathLike[str] | None = None) -> None:
        parent = Path(cache_dir) if cache_dir else default_cache_dir()
        parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(dir=parent, prefix=".scratch-"))
        self._remove = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def __call__(self, array: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.lib.format.open_memmap(self.folder / f"{array}.npy", "w+", dtype, shape)


def _open(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}
