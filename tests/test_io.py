"""Atomic writes: complete files or nothing, with ordinary permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fusion.io import atomic_path


def test_success_replaces_with_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.csv"
    old = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and not target.exists()
            tmp.write_text("a,b\n")
    finally:
        os.umask(old)
    assert target.read_text() == "a,b\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["out.csv"]


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
