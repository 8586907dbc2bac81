"""The array cache: keyed by inputs, built once, never left half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusion.data.cache import cache_key, cached_arrays, file_fingerprint


def test_build_once_then_load(tmp_path: Path) -> None:
    calls = []

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"x": np.arange(6).reshape(2, 3)}

    first, hit1 = cached_arrays("t", "k1", build, cache_dir=tmp_path)
    second, hit2 = cached_arrays("t", "k1", build, cache_dir=tmp_path)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert np.array_equal(first["x"], second["x"])
    cached_arrays("t", "k2", build, cache_dir=tmp_path)
    assert len(calls) == 2


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build() -> dict[str, np.ndarray]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached_arrays("t", "k", build, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_key_changes_with_file(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text("1\n")
    k1 = cache_key(file_fingerprint(f), [1, 2])
    assert k1 == cache_key(file_fingerprint(f), [1, 2])
    f.write_text("12\n")
    assert cache_key(file_fingerprint(f), [1, 2]) != k1
    assert cache_key(file_fingerprint(f), [1, 3]) != cache_key(file_fingerprint(f), [1, 2])
