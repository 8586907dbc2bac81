"""Errors for bad user input: each names the file, the line (row) and the column (field)."""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from os import PathLike
from pathlib import Path

# Delimiters a table might have been saved with instead of ',' (as a message names them).
_OTHER_DELIMITERS = {";": "';'", "\t": "tab", "|": "'|'"}
_HEADER_SHOWN = 80


class InputError(ValueError):
    """One problem in a user's input, located by file, line and column.

    ``line`` is the 1-based line number in the file as an editor shows it (a CSV's header is line 1,
    its first data row line 2); for non-tabular inputs (a raster, a region layer) ``line`` may be
    ``None`` and ``where`` names the item instead (e.g. ``"region_id=17"``).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | PathLike[str] | None = None,
        line: int | None = None,
        field: str | None = None,
        where: str | None = None,
    ) -> None:
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.field = field
        self.where = where
        super().__init__(self.__str__())

    def within(
        self, file: str | PathLike[str], *, line: int | None = None, field: str | None = None
    ) -> InputError:
        """This problem as seen from a row of another file (e.g. a manifest naming a bad tile).

        The row's file, line and field become the location; this error's own location moves into
        the message.
        """
        inner = ", ".join(p for p in (self.file, self.where) if p)
        message = f"{inner}: {self.message}" if inner else self.message
        return InputError(message, file=file, line=line, field=field)

    def __str__(self) -> str:
        parts = [p for p in (self.file, None if self.line is None else f"line {self.line}") if p]
        if self.where:
            parts.append(self.where)
        if self.field:
            parts.append(f"column '{self.field}'")
        prefix = ", ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class InputErrors(ValueError):
    """Several input problems, reported together so a user can fix them all in one go."""

    def __init__(self, errors: Iterable[InputError], *, limit: int = 50) -> None:
        self.errors = list(errors)
        shown = [f"  - {e}" for e in self.errors[:limit]]
        if len(self.errors) > limit:
            shown.append(f"  ... and {len(self.errors) - limit} more")
        noun = "problem" if len(self.errors) == 1 else "problems"
        super().__init__(f"{len(self.errors)} input {noun} found:\n" + "\n".join(shown))


def header_hint(path: str | PathLike[str]) -> str:
    """A note for a CSV whose header lacks columns: the header line as read and, when it looks
    split by ``;``, tab or ``|`` rather than ``,``, that delimiter.

    E.g. ``header read: 'sample_id;image' (it looks ';'-separated; save the table with ','
    between columns)``. The header is the first non-blank line (``.gz`` files are
    decompressed), shortened when long; "" if the file cannot be read.
    """
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = next((line for line in handle if line.strip()), b"")
    except (OSError, EOFError):
        return ""
    text = header.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")
    if not text.strip():
        return "the file has no header line"
    shown = text if len(text) <= _HEADER_SHOWN else text[: _HEADER_SHOWN - 3] + "..."
    note = f"header read: {shown!r}"
    counts = {d: text.count(d) for d in _OTHER_DELIMITERS}
    delimiter = max(counts, key=lambda d: counts[d])
    if counts[delimiter] > text.count(","):
        name = _OTHER_DELIMITERS[delimiter]
        note += f" (it looks {name}-separated; save the table with ',' between columns)"
    return note
