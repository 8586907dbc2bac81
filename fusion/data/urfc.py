"""Visit files of URFC (Urban Region Function Classification, Baidu/IKCEST 2019).

One text file per region (e.g. ``000001_001.txt``); each line is
``USERID<TAB>YYYYMMDD&HH|HH|...,YYYYMMDD&HH|...``: a user and the days and hours they were seen in
the region. The data cover the 182 days (26 weeks) from Monday 2018-10-01 to 2019-03-31.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from os import PathLike
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np

from fusion.errors import InputError

URFC_FIRST_DAY = date(2018, 10, 1)
URFC_WEEKS = 26
URFC_TIMEZONE = "Asia/Shanghai"  # the visit files' local time (no daylight saving)
# Categories 001-009, by their folder and file names.
URFC_CATEGORIES = (
    "residential", "school", "industrial", "railway_station", "airport", "park", "shopping",
    "administrative", "hospital",
)  # fmt: skip
CHANNELS = ("visits", "regulars", "others")  # hourly counts per region, see read_urfc_channels
REGULAR_DAYS = 7  # a user seen on this many distinct days in a region is one of its regulars
HOURS = URFC_WEEKS * 7 * 24  # 4,368 hourly steps

_DAYS = URFC_WEEKS * 7
_CATEGORY = {f"{i:03d}": name for i, name in enumerate(URFC_CATEGORIES, start=1)}
_DAY_INDEX = {(URFC_FIRST_DAY + timedelta(days=d)).strftime("%Y%m%d"): d for d in range(_DAYS)}
_HOUR_INDEX = {f"{h:02d}": h for h in range(24)}
_LINE_FORM = "expected 'USERID<TAB>YYYYMMDD&HH|HH|...,YYYYMMDD&HH|...'"


def read_urfc_channels(path: str | PathLike[str], regular_days: int = REGULAR_DAYS) -> np.ndarray:
    """Hourly counts of one region, ``(3, 4368)`` float32 over its 182 days: ``visits`` (the
    (user, hour) entries listed), ``regulars`` (those of users seen on at least ``regular_days``
    distinct days there) and ``others`` (the rest); blank lines are skipped."""
    path = Path(path)
    counts = np.zeros((len(CHANNELS), HOURS), dtype=np.float32)
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                text = line.strip()
                if not text:
                    continue
                slots = np.asarray(_parse_line(text, path, number), dtype=np.int64)
                regular = len(np.unique(slots // 24)) >= regular_days
                np.add.at(counts[0], slots, 1)
                np.add.at(counts[1 if regular else 2], slots, 1)
    except FileNotFoundError:
        raise InputError("file not found", file=path) from None
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", file=path) from None
    return counts


def read_urfc_visits(path: str | PathLike[str]) -> np.ndarray:
    """Visit counts of one region, ``(7, 26, 24)`` float32: weekday (Monday=0) x week x hour.

    A cell counts the (user, hour) entries listed for that hour; blank lines are skipped.
    """
    visits = read_urfc_channels(path)[0]
    # day = week * 7 + weekday, so (182 * 24,) -> (26, 7, 24) -> (7, 26, 24).
    return visits.reshape(URFC_WEEKS, 7, 24).transpose(1, 0, 2)


def read_urfc_dir(folder: str | PathLike[str]) -> tuple[list[str], np.ndarray]:
    """Region ids (file stems, sorted) and their visits ``(N, 7, 26, 24)`` float32."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("folder not found", file=folder)
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise InputError("no URFC visit files (*.txt) in the folder", file=folder)
    return [f.stem for f in files], np.stack([read_urfc_visits(f) for f in files])


def _parse_line(line: str, path: Path, number: int) -> list[int]:
    """The ``day * 24 + hour`` slot of each visit listed on one line."""
    user, tab, visits = line.partition("\t")
    if not tab or not user.strip() or not visits:
        raise InputError(_LINE_FORM, file=path, line=number)
    slots = []
    for entry in visits.split(","):
        day_text, amp, hours_text = entry.partition("&")
        day = _DAY_INDEX.get(day_text)
        if day is None:
            raise InputError(_date_problem(day_text), file=path, line=number)
        if not amp:
            raise InputError(
                f"visit {entry!r} has no '&HH' hours; {_LINE_FORM}", file=path, line=number
            )
        for hour_text in hours_text.split("|"):
            hour = _HOUR_INDEX.get(hour_text)
            if hour is None:
                raise InputError(
                    f"hour {hour_text!r} on {day_text} is not 00-23", file=path, line=number
                )
            slots.append(day * 24 + hour)
    return slots


def _date_problem(text: str) -> str:
    try:
        valid = len(text) == 8 and text.isdigit() and bool(datetime.strptime(text, "%Y%m%d"))
    except ValueError:
        valid = False
    if not valid:
        return f"date {text!r} is not YYYYMMDD; {_LINE_FORM}"
    last = URFC_FIRST_DAY + timedelta(days=_DAYS - 1)
    return f"date {text} is outside the {URFC_WEEKS} weeks {URFC_FIRST_DAY} .. {last}"


# ---------------------------------------------------------------------------------- conversion
@dataclass(frozen=True)
class UrfcArea:
    """One region of a URFC folder: its id (the file stem), tile, visit file, label ("" for a
    test region) and split (``train`` or ``test``)."""

    area_id: str
    image: Path
    visits: Path
    label: str
    split: str


def scan_urfc(root: str | PathLike[str]) -> tuple[list[UrfcArea], list[InputError]]:
    """The regions of a URFC folder (``train_image/00C/ID_00C.jpg`` + ``train_visit/ID_00C.txt``,
    ``test_image/ID.jpg`` + ``test_visit/ID.txt``), sorted by split and id, and the problems of
    its layout: an unknown category folder, a file named for another category, a tile without a
    visit file or the reverse."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("folder not found", file=root)
    if not any((root / f"{split}_visit").is_dir() for split in ("train", "test")):
        raise InputError("no URFC layout (train_visit/ or test_visit/) in the folder", file=root)
    areas: list[UrfcArea] = []
    errors: list[InputError] = []
    for split in ("train", "test"):
        images: dict[str, tuple[Path, str]] = {}
        for path in sorted((root / f"{split}_image").rglob("*.jpg")):
            label = ""
            if split == "train":
                folder = path.parent.name
                if path.parent.parent != root / "train_image" or folder not in _CATEGORY:
                    errors.append(InputError(
                        f"unknown category folder '{folder}' (001-009)", file=path,
                    ))  # fmt: skip
                    continue
                if not path.stem.endswith(f"_{folder}"):
                    errors.append(InputError(f"file of category folder {folder} is not "
                                             f"named ID_{folder}.jpg", file=path))  # fmt: skip
                    continue
                label = _CATEGORY[folder]
            images[path.stem] = (path, label)
        visits = {p.stem: p for p in sorted((root / f"{split}_visit").glob("*.txt"))}
        for stem in sorted(images.keys() - visits.keys()):
            errors.append(InputError(f"tile without a visit file ({split}_visit/{stem}.txt)",
                                     file=images[stem][0]))  # fmt: skip
        for stem in sorted(visits.keys() - images.keys()):
            errors.append(InputError(f"visit file without a tile in {split}_image/",
                                     file=visits[stem]))  # fmt: skip
        for stem in sorted(images.keys() & visits.keys()):
            image, label = images[stem]
            areas.append(UrfcArea(stem, image, visits[stem], label, split))
    return areas, errors


def _channels_or_error(job: tuple[Path, int]) -> np.ndarray | InputError:
    """:func:`read_urfc_channels` in a worker process, a problem returned rather than raised."""
    try:
        return read_urfc_channels(*job)
    except InputError as err:
        return err


@dataclass
class UrfcConversion:
    """What :func:`convert_urfc` wrote and skipped."""

    manifest: Path
    activity: Path
    areas: int
    skipped: list[InputError] = field(default_factory=list)
    report: Path | None = None
    seconds: float = 0.0


def convert_urfc(
    root: str | PathLike[str],
    output: str | PathLike[str],
    *,
    regular_days: int = REGULAR_DAYS,
    on_error: str = "stop",
    workers: int = 2,
    chunk: int = 256,
) -> UrfcConversion:
    """Convert a URFC folder into this project's inputs: ``output/manifest.csv`` (``sample_id,
    image, area_id, start, hours, label, split``; labels by category name, test rows unlabelled)
    and ``output/activity.parquet`` (``area_id``, hourly ``timestamp`` in Asia/Shanghai, and the
    :data:`CHANNELS` counts of :func:`read_urfc_channels`), one row per area and hour.

    Visit files are parsed in ``workers`` processes and written ``chunk`` areas per row group,
    so memory follows the chunk, not the number of regions. Problems (layout, undecodable or
    malformed files) are all listed; ``on_error="stop"`` raises them and writes nothing,
    ``"skip"`` leaves those regions out and lists them in ``output/skipped.csv``.
    """
    import multiprocessing
    import time

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from rich.progress import track

    from fusion.errors import InputErrors
    from fusion.io import atomic_path, check_replaceable

    if on_error not in ("stop", "skip"):
        raise InputError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    output = Path(output)
    paths = {name: output / name for name in ("manifest.csv", "activity.parquet", "skipped.csv")}
    for path in paths.values():
        check_replaceable(path)
    areas, errors = scan_urfc(root)
    if errors and on_error == "stop":
        raise InputErrors(errors)
    bad = {e.file for e in errors}
    areas = [a for a in areas if str(a.image) not in bad and str(a.visits) not in bad]
    start = time.perf_counter()
    first = _first_hour()
    stamps = _hour_stamps(first)
    schema = pa.schema(
        [("area_id", pa.string()), ("timestamp", pa.timestamp("us", tz=URFC_TIMEZONE))]
        + [(name, pa.float32()) for name in CHANNELS]
    )
    kept: list[UrfcArea] = []
    jobs = [(a.visits, regular_days) for a in areas]
    with (
        atomic_path(paths["activity.parquet"]) as tmp,
        multiprocessing.get_context("spawn").Pool(max(1, workers)) as pool,
    ):
        writer = pq.ParquetWriter(tmp, schema)
        pending: list[tuple[str, np.ndarray]] = []

        def flush() -> None:
            ids = np.repeat([a for a, _ in pending], HOURS)
            values = np.concatenate([c for _, c in pending], axis=1)  # (3, n * HOURS)
            columns = [pa.array(ids), pa.array(np.tile(stamps, len(pending)), schema[1].type)]
            columns += [pa.array(v) for v in values]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
            pending.clear()

        results = pool.imap(_channels_or_error, jobs, chunksize=16)
        for area, counts in track(
            zip(areas, results, strict=True), total=len(areas), description="URFC visit files"
        ):
            if isinstance(counts, InputError):
                errors.append(counts)
                continue
            kept.append(area)
            pending.append((area.area_id, counts))
            if len(pending) >= chunk:
                flush()
        if pending:
            flush()
        writer.close()
        if errors and on_error == "stop":
            raise InputErrors(errors)
    if not kept:
        raise InputError("no region could be converted", file=root)
    manifest = pd.DataFrame({
        "sample_id": [a.area_id for a in kept],
        "image": [os.path.relpath(a.image, output) for a in kept],
        "area_id": [a.area_id for a in kept],
        "start": first.isoformat(),
        "hours": HOURS,
        "label": [a.label for a in kept],
        "split": [a.split for a in kept],
    })  # fmt: skip
    with atomic_path(paths["manifest.csv"]) as tmp:
        manifest.to_csv(tmp, index=False)
    result = UrfcConversion(
        paths["manifest.csv"], paths["activity.parquet"], len(kept), errors,
        seconds=time.perf_counter() - start,
    )  # fmt: skip
    if errors:
        report = pd.DataFrame({
            "file": [e.file for e in errors], "line": [e.line for e in errors],
            "problem": [e.message for e in errors],
        })  # fmt: skip
        with atomic_path(paths["skipped.csv"]) as tmp:
            report.to_csv(tmp, index=False)
        result.report = paths["skipped.csv"]
    return result


def _first_hour() -> datetime:
    """The first hour of the visit records, 2018-10-01 00:00 in China time."""
    return datetime.combine(URFC_FIRST_DAY, clock_time(), tzinfo=ZoneInfo(URFC_TIMEZONE))


def _hour_stamps(first: datetime) -> np.ndarray:
    """The 4,368 hours from ``first``, as UTC microseconds."""
    return int(first.timestamp()) * 1_000_000 + np.arange(HOURS, dtype=np.int64) * 3_600_000_000


def urfc_submission(area_ids: list[str], labels: list[str]) -> str:
    """A URFC submission: ``AreaID<TAB>CategoryID`` per area (e.g. ``000000\\t001``), from each
    area's predicted class name (one of :data:`URFC_CATEGORIES`). Raises for a class that is not
    a URFC category or an area without a prediction (listed)."""
    ids = {name: f"{i:03d}" for i, name in enumerate(URFC_CATEGORIES, start=1)}
    missing = [a for a, label in zip(area_ids, labels, strict=True) if label not in ids]
    if missing:
        shown = ", ".join(missing[:5])
        raise InputError(
            f"{len(missing)} areas have no URFC category predicted ({shown}, ...): a submission "
            "needs one for every area (see the CSV's status and note columns)"
        )
    lines = [f"{a.split('_')[0]}\t{ids[label]}" for a, label in zip(area_ids, labels, strict=True)]
    return "\n".join(lines) + "\n"
