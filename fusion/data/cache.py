"""A small on-disk cache of NumPy arrays keyed by a hash of everything that produced them.

Entries are written to a temporary file and renamed, so an interrupted build never leaves a
half-written entry. The folder is ``$FUSION_CACHE`` or ``~/.cache/fusion``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from fusion.io import atomic_path


def default_cache_dir() -> Path:
    return Path(os.environ.get("FUSION_CACHE", Path.home() / ".cache" / "fusion"))


def file_fingerprint(path: str | PathLike[str]) -> dict[str, Any]:
    """Identity of a file for cache keys: resolved path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(*parts: Any) -> str:
    """A stable hex digest of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def cached_arrays(
    name: str,
    key: str,
    build: Callable[[], dict[str, np.ndarray]],
    *,
    cache_dir: str | PathLike[str] | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """Load ``<cache_dir>/<name>-<key>.npz`` or build, save and return it.

    Returns the arrays and whether they came from the cache. ``cache_dir=None`` uses the default
    folder; pass ``False``-like empty string to disable caching.
    """
    if cache_dir == "":
        return build(), False
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / f"{name}-{key}.npz"
    if target.is_file():
        with np.load(target, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}, True
    arrays = build()
    with atomic_path(target) as tmp:
        np.savez(tmp, **arrays)
    return arrays, False
