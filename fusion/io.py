"""Writing outputs atomically: a temporary file in the target folder, renamed when complete."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fusion.errors import InputError


def check_replaceable(path: str | os.PathLike[str]) -> None:
    """Raise :class:`InputError` naming ``path`` if an output cannot be written there.

    Checked: ``path`` is not a folder, an existing file there is writable, and its folder is
    writable or, when missing, can be created (the message names the folder in the way).
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise InputError("is a folder; give a file name for the output", file=path)
        if path.exists() and not os.access(path, os.W_OK):
            raise InputError(
                "the file exists and is read-only, so it cannot be replaced", file=path
            )
        folder = path.parent
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise InputError(f"cannot create the folder {folder}: {existing} is a file", file=path)
        if not os.access(existing, os.W_OK | os.X_OK):
            if existing == folder:
                raise InputError(f"the folder {folder} is not writable", file=path)
            raise InputError(
                f"cannot create the folder {folder}: {existing} is not writable", file=path
            )
    except OSError as err:  # e.g. a folder on the way that may not be looked into
        message = f"cannot check where the output goes: {err.strerror or err}"
        raise InputError(message, file=path) from None


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, else it is removed.

    ``path`` is checked first (:func:`check_replaceable`), so an output that cannot be written
    fails before any work. An interrupted or failed write never leaves a half-written output.
    The file gets the usual permissions for new files (``0o666`` less the umask), not
    ``mkstemp``'s ``0o600``.
    """
    path = Path(path)
    check_replaceable(path)
    # What the check cannot foresee (e.g. a file system refusing new entries) is an InputError too.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        message = f"cannot create the folder {path.parent}: {err.strerror or err}"
        raise InputError(message, file=path) from None
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    except OSError as err:
        message = f"cannot write in the folder {path.parent}: {err.strerror or err}"
        raise InputError(message, file=path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
