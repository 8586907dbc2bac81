"""The array cache: keyed by inputs, built once, memory-mapped, never left half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusion.data.cache import Allocate, cache_key, cached_arrays, file_fingerprint


def test_build_once_then_load_memory_mapped(tmp_path: Path) -> None:
    calls = []

    def build(allocate: Allocate) -> None:
        calls.append(1)
        x = allocate("x", (2, 3), np.int64)
        x[:] = np.arange(6).reshape(2, 3)
        allocate("mask", (2,), np.bool_)[1] = True

    first, hit1 = cached_arrays("t", "k1", build, cache_dir=tmp_path)
    second, hit2 = cached_arrays("t", "k1", build, cache_dir=tmp_path)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert np.array_equal(first["x"], np.arange(6).reshape(2, 3))
    assert np.array_equal(second["x"], first["x"]) and second["mask"].tolist() == [False, True]
    # Served from disk, read-only: a sample reads its slice, nothing writes into the cache.
    assert isinstance(second["x"], np.memmap) and not second["x"].flags.writeable
    assert sorted(p.name for p in (tmp_path / "t-k1").iterdir()) == ["mask.npy", "x.npy"]
    cached_arrays("t", "k2", build, cache_dir=tmp_path)
    assert len(calls) == 2


def test_disabled_cache_builds_in_memory(tmp_path: Path) -> None:
    def build(allocate: Allocate) -> None:
        allocate("x", (3,), np.float32)[:] = 1.5

    arrays, hit = cached_arrays("t", "k", build, cache_dir="")
    assert not hit and arrays["x"].tolist() == [1.5, 1.5, 1.5]
    assert not isinstance(arrays["x"], np.memmap)


def test_entries_of_earlier_versions_are_read(tmp_path: Path) -> None:
    np.savez(tmp_path / "t-k.npz", x=np.arange(4))

    def build(allocate: Allocate) -> None:
        raise AssertionError("an existing entry must not be rebuilt")

    arrays, hit = cached_arrays("t", "k", build, cache_dir=tmp_path)
    assert hit and arrays["x"].tolist() == [0, 1, 2, 3]


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(allocate: Allocate) -> None:
        allocate("x", (10,), np.float32)[:5] = 1.0  # half written, then a failure
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


def test_key_of_a_folder_follows_every_file_in_it(tmp_path: Path) -> None:
    folder = tmp_path / "table"
    (folder / "part=a").mkdir(parents=True)
    (folder / "part=a" / "0.parquet").write_bytes(b"one")
    before = cache_key(file_fingerprint(folder))
    (folder / "part=b").mkdir()
    (folder / "part=b" / "0.parquet").write_bytes(b"two")  # a new partition
    added = cache_key(file_fingerprint(folder))
    assert added != before
    (folder / "part=a" / "0.parquet").write_bytes(b"one!")  # a partition rewritten
    assert cache_key(file_fingerprint(folder)) not in (before, added)
