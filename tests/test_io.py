"""Atomic writes: complete files or nothing, with ordinary permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fusion.errors import InputError
from fusion.io import atomic_path, check_replaceable


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


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Write permission from the mode bits, as for an ordinary user (root may write anywhere,
    and these tests may run as root)."""
    if os.geteuid() == 0:

        def access(path: str | os.PathLike[str], mode: int) -> bool:
            return not mode & os.W_OK or bool(os.stat(path).st_mode & 0o200)

        monkeypatch.setattr("fusion.io.os.access", access)


def test_folder_as_output_fails_before_the_work(tmp_path: Path) -> None:
    worked = False
    with pytest.raises(InputError, match="is a folder") as info, atomic_path(tmp_path):
        worked = True
    assert info.value.file == str(tmp_path) and not worked
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_the_way_of_the_folder(tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("not a folder\n")
    target = tmp_path / "runs" / "a" / "out.csv"
    with pytest.raises(InputError) as info:
        check_replaceable(target)
    assert info.value.file == str(target)
    assert f"cannot create the folder {target.parent}: {tmp_path / 'runs'} is a file" in str(
        info.value
    )


def test_missing_folder_that_can_be_created(tmp_path: Path) -> None:
    check_replaceable(tmp_path / "a" / "b" / "out.csv")  # no error ...
    assert list(tmp_path.iterdir()) == []  # ... and the check alone creates nothing


@pytest.mark.usefixtures("as_user")
def test_read_only_file_and_folders(tmp_path: Path) -> None:
    locked = tmp_path / "locked.csv"
    locked.write_text("old\n")
    locked.chmod(0o444)
    with pytest.raises(InputError, match="read-only") as info, atomic_path(locked):
        pass
    assert info.value.file == str(locked) and locked.read_text() == "old\n"

    folder = tmp_path / "shut"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InputError, match=f"the folder {folder} is not writable"):
            check_replaceable(folder / "out.csv")
        with pytest.raises(InputError, match=f"cannot create the folder {folder / 'new'}: "):
            check_replaceable(folder / "new" / "out.csv")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_unwritable_place_is_an_input_error() -> None:
    """Even what the check cannot see (/proc refuses new entries, to root too) is no traceback."""
    target = Path("/proc/fusion-nowhere/out.csv")
    refused = "cannot create the folder /proc/fusion-nowhere"
    with pytest.raises(InputError, match=refused) as info, atomic_path(target):
        pass
    assert info.value.file == str(target)
