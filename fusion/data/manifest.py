"""The sample manifest: one row per (tile, activity window) pair, and the fixed class list.

A manifest is a CSV with columns ``sample_id, image, <series key>, start, hours`` and optionally
``label`` and ``split``. ``image`` or the series key may be empty in a row (that view is missing for
the sample); a row with neither is an error. Line numbers (header = line 1) travel with every row so
that later checks can name them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import pandas as pd

from fusion.data.series import KEY_COLUMN
from fusion.errors import InputError, InputErrors, header_hint

SPLITS = ("train", "val", "test")
LINE = "_line"


def read_manifest(path: str | PathLike[str], *, key_column: str = KEY_COLUMN) -> pd.DataFrame:
    """Load a manifest and raise :class:`InputErrors` listing every problem in its rows."""
    frame = load_manifest(path, key_column=key_column)
    problems = check_manifest(frame, Path(path), key_column=key_column)
    if problems:
        raise InputErrors(problems)
    return frame


def load_manifest(path: str | PathLike[str], *, key_column: str = KEY_COLUMN) -> pd.DataFrame:
    """Read a manifest's table: strings, ``hours`` as int (0 where not a number), and ``_line``.

    Raises :class:`InputError` only if the file is missing, empty, unreadable, lacks a column
    (naming the header it read and a delimiter other than ',' it seems to use) or has no rows;
    row problems are left to :func:`check_manifest`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("manifest not found", file=path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as err:
        raise InputError("manifest is empty (no header, no rows)", file=path) from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read manifest: {err}", file=path) from err
    required = ("sample_id", "image", key_column, "start", "hours")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        hint = header_hint(path)
        raise InputError(
            f"missing column(s) {missing}; a manifest needs {list(required)} "
            "(+ optional 'label', 'split')" + (f"; {hint}" if hint else ""),
            file=path,
        )
    if frame.empty:
        raise InputError("manifest has a header but no rows (no samples)", file=path)
    frame = frame.apply(lambda col: col.str.strip())
    frame[LINE] = range(2, len(frame) + 2)
    frame["hours_text"] = frame["hours"]
    hours = pd.to_numeric(frame["hours"], errors="coerce")
    whole = hours.notna() & (hours == hours.round()) & (hours > 0)
    frame["hours"] = hours.where(whole, 0).astype(int)
    return frame


def check_manifest(
    frame: pd.DataFrame, path: Path, *, key_column: str, require_view: bool = True
) -> list[InputError]:
    """Every row problem in a loaded manifest.

    Empty or duplicate ``sample_id``, bad ``hours``, empty ``start``, unknown ``split``, and (with
    ``require_view``) rows with neither an image nor a series key.
    """
    problems: list[InputError] = []
    first_line: dict[str, int] = {}
    has_split = "split" in frame.columns
    for row in frame.to_dict("records"):
        line = int(row[LINE])

        def problem(field: str, message: str, line: int = line) -> None:
            problems.append(InputError(message, file=path, line=line, field=field))

        sid = row["sample_id"]
        if not sid:
            problem("sample_id", "empty sample_id")
        elif sid in first_line:
            problem("sample_id", f"duplicate sample_id '{sid}' (first on line {first_line[sid]})")
        else:
            first_line[sid] = line
        if require_view and not row["image"] and not row[key_column]:
            problem("image", f"neither an image nor a '{key_column}': nothing to classify")
        if row[key_column]:
            if row["hours"] <= 0:
                got = row["hours_text"]
                problem("hours", f"hours must be a positive whole number, got '{got}'")
            if not row["start"]:
                problem("start", "empty window start")
        if has_split and row["split"] and row["split"] not in SPLITS:
            problem("split", f"unknown split '{row['split']}' (use one of {list(SPLITS)})")
    return problems


@dataclass(frozen=True)
class ClassList:
    """A fixed, ordered list of class names: the model's output index ``i`` is ``names[i]``.

    It is saved with every checkpoint (``data_info["classes"]``, also in the run's hparams.yaml).
    """

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a class list needs at least one class")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate class names in {list(self.names)}")

    @classmethod
    def from_labels(cls, labels: Sequence[str]) -> ClassList:
        """Sorted unique non-empty labels."""
        return cls(tuple(sorted({label for label in labels if label})))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, label: object) -> bool:
        return label in self.names

    def index(self, label: str) -> int:
        return self.names.index(label)


# Layout of the real-data bundle (``shared/data``): used only to fill in paths a user left out.
BUNDLE_SERIES = Path("footfall") / "counts.csv.gz"
BUNDLE_SEARCH_DEPTH = 3


def resolve_image_root(manifest_path: Path, images: Sequence[str]) -> Path:
    """Folder that relative image paths are taken from when none is given.

    The manifest's folder, else the nearest parent folder (up to three levels) in which the first
    image exists. Every row is checked against the chosen root later, so a wrong guess shows up
    as missing files, never as silently mixed roots.
    """
    folder = manifest_path.resolve().parent
    first = next((Path(i) for i in images if i), None)
    if first is None or first.is_absolute():
        return folder
    for candidate in [folder, *folder.parents][: BUNDLE_SEARCH_DEPTH + 1]:
        if (candidate / first).exists():
            return candidate
    return folder


def default_series_path(manifest_path: Path) -> Path | None:
    """The bundle's series table beside a manifest (``../footfall/counts.csv.gz``), if present."""
    folder = manifest_path.resolve().parent
    for candidate in [folder, *folder.parents][: BUNDLE_SEARCH_DEPTH + 1]:
        if (candidate / BUNDLE_SERIES).is_file():
            return candidate / BUNDLE_SERIES
    return None


def image_paths(frame: pd.DataFrame, root: Path) -> list[Path | None]:
    """Absolute image paths per row (``None`` where the row has no image)."""
    return [None if not image else root / image for image in frame["image"]]
