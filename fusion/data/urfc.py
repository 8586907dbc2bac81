"""Visit files of URFC (Urban Region Function Classification, Baidu/IKCEST 2019).

One text file per region (e.g. ``000001_001.txt``); each line is
``USERID<TAB>YYYYMMDD&HH|HH|...,YYYYMMDD&HH|...``: a user and the days and hours they were seen in
the region. The data cover the 182 days (26 weeks) from Monday 2018-10-01 to 2019-03-31.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from os import PathLike
from pathlib import Path

import numpy as np

from fusion.errors import InputError

URFC_FIRST_DAY = date(2018, 10, 1)
URFC_WEEKS = 26

_DAYS = URFC_WEEKS * 7
_DAY_INDEX = {(URFC_FIRST_DAY + timedelta(days=d)).strftime("%Y%m%d"): d for d in range(_DAYS)}
_HOUR_INDEX = {f"{h:02d}": h for h in range(24)}
_LINE_FORM = "expected 'USERID<TAB>YYYYMMDD&HH|HH|...,YYYYMMDD&HH|...'"


def read_urfc_visits(path: str | PathLike[str]) -> np.ndarray:
    """Visit counts of one region, ``(7, 26, 24)`` float32: weekday (Monday=0) x week x hour.

    A cell counts the (user, hour) entries listed for that hour; blank lines are skipped.
    """
    path = Path(path)
    slots: list[int] = []  # day * 24 + hour, one per listed visit
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                text = line.strip()
                if text:
                    slots.extend(_parse_line(text, path, number))
    except FileNotFoundError:
        raise InputError("file not found", file=path) from None
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", file=path) from None
    counts = np.bincount(np.asarray(slots, dtype=np.int64), minlength=_DAYS * 24)
    # day = week * 7 + weekday, so (182, 24) -> (26, 7, 24) -> (7, 26, 24).
    return counts.reshape(URFC_WEEKS, 7, 24).transpose(1, 0, 2).astype(np.float32)


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
