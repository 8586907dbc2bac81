"""Turn a checked manifest into model-ready arrays, collecting every input problem on the way.

Two passes, both reporting all problems at once rather than stopping at the first:

- :func:`build_series_windows`: each row's activity window as ``(T, F)`` features + ``(T,)`` mask;
  unknown keys, windows outside the series, too few present hours (none at all, whatever
  ``min_present``) and naive starts are errors.
- :func:`scan_tiles`: every tile decoded once; missing/unreadable files, all-nodata tiles and wrong
  band counts are errors; per-band statistics accumulate over the training rows only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import track

from fusion.data.manifest import LINE
from fusion.data.series import SeriesTable, encode_window, parse_start
from fusion.data.tiles import BandStats, Tile, TileInfo, read_tile, tile_info
from fusion.errors import InputError


@dataclass
class SeriesArrays:
    """Windows of all rows: ``features (N, T, F)``, ``mask (N, T)``, ``present (N,)``.

    ``present[i]`` is False where row ``i`` has no series (its window is all zeros, all masked).
    """

    features: np.ndarray
    mask: np.ndarray
    present: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"features": self.features, "mask": self.mask, "present": self.present}


def build_series_windows(
    frame: pd.DataFrame,
    table: SeriesTable,
    *,
    manifest_path: Path,
    key_column: str,
    timezone: str | None,
    min_present: float,
    log1p: bool,
) -> tuple[SeriesArrays, list[InputError]]:
    """Build each row's window; rows with an empty key get an all-absent window.

    All rows with a key must share one window length ``T`` (the model's input length); rows that
    differ from the most common length are errors.
    """
    errors: list[InputError] = []
    keyed = frame[frame[key_column] != ""]
    lengths = Counter(keyed["hours"].tolist())
    hours = lengths.most_common(1)[0][0] if lengths else 0
    n_features = len(table.value_columns) + 4
    features = np.zeros((len(frame), hours, n_features), dtype=np.float32)
    mask = np.zeros((len(frame), hours), dtype=bool)
    present = np.zeros(len(frame), dtype=bool)
    for i, row_d in enumerate(
        track(frame.to_dict("records"), total=len(frame), description="series windows")
    ):
        key, line = row_d[key_column], row_d[LINE]

        if not key:
            continue
        if row_d["hours"] != hours:
            errors.append(
                InputError(
                    f"window of {row_d['hours']} hours; all rows must share one length "
                    f"(most rows have {hours})",
                    file=manifest_path,
                    line=line,
                    field="hours",
                )
            )
            continue
        try:
            start = parse_start(row_d["start"], timezone=timezone)
        except InputError as err:
            errors.append(err.within(manifest_path, line=line, field="start"))
            continue
        try:
            window = table.window(key, start, hours)
        except InputError as err:
            errors.append(err.within(manifest_path, line=line, field=key_column))
            continue
        if not window.present.any():
            # Even with min_present=0: an all-absent window is no series, not a series of zeros.
            errors.append(
                InputError(
                    "no hour of the window has a count (the series has a gap there)",
                    file=manifest_path,
                    line=line,
                    field="start",
                )
            )
            continue
        if window.present_share < min_present:
            errors.append(
                InputError(
                    f"only {window.present_share:.0%} of the window's hours have a count "
                    f"(at least {min_present:.0%} required; see min_present)",
                    file=manifest_path,
                    line=line,
                    field="start",
                )
            )
            continue
        features[i], mask[i] = encode_window(window, log1p=log1p)
        present[i] = True
    return SeriesArrays(features, mask, present), errors


@dataclass
class TileScan:
    """What a pass over the tiles found: per-row header info and training band statistics."""

    infos: list[TileInfo | None]
    stats: BandStats | None
    n_bands: int | None


def scan_tiles(
    paths: Sequence[Path | None],
    lines: Sequence[int],
    train: np.ndarray,
    *,
    manifest_path: Path,
    bands: Sequence[int] | None,
    nodata: float | None,
    expected_bands: int | None = None,
) -> tuple[TileScan, list[InputError]]:
    """Check every tile (header, then a full decode) and accumulate training band statistics.

    Band statistics stream over the rows where ``train`` is True, so memory stays bounded. The
    expected band count (after ``bands`` selection) is ``expected_bands`` if given, else the most
    common count.
    """
    errors: list[InputError] = []
    infos: list[TileInfo | None] = []
    for path, line in zip(paths, lines, strict=True):
        info = None
        if path is not None:
            try:
                info = tile_info(path)
            except InputError as err:
                errors.append(err.within(manifest_path, line=line, field="image"))
        infos.append(info)

    def selected(info: TileInfo) -> int:
        return len(bands) if bands else info.count

    counts = Counter(selected(i) for i in infos if i is not None)
    n_bands = expected_bands or (counts.most_common(1)[0][0] if counts else None)
    for i, info in enumerate(infos):
        if info is not None and selected(info) != n_bands:
            errors.append(
                InputError(
                    f"tile {paths[i]} has {selected(info)} bands, expected {n_bands}",
                    file=manifest_path,
                    line=lines[i],
                    field="image",
                )
            )
            infos[i] = None

    def decoded() -> Iterator[Tile]:
        rows = [i for i, info in enumerate(infos) if info is not None]
        for i in track(rows, description="checking tiles"):
            try:
                tile = read_tile(paths[i], bands=bands, nodata=nodata)  # type: ignore[arg-type]
            except InputError as err:
                errors.append(err.within(manifest_path, line=lines[i], field="image"))
                infos[i] = None
                continue
            if train[i]:
                yield tile

    stats = BandStats.accumulate(decoded())
    return TileScan(infos=infos, stats=stats if n_bands else None, n_bands=n_bands), errors
