"""URFC visit files: a hand-written region file with hand-computed cells, and malformed lines."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fusion.data.urfc import read_urfc_dir, read_urfc_visits
from fusion.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures" / "urfc"

# tests/data/fixtures/urfc/000001_001.txt, worked out by hand (2018-10-01 is day 0, a Monday):
#   u1  20181001&08|09|10 -> Monday of week 0, hours 8, 9, 10
#       20181003&20       -> Wednesday (2) of week 0, hour 20
#   u2  20181001&09       -> Monday of week 0, hour 9 (second visit in that cell)
#       20181008&00|23    -> day 7: Monday of week 1, hours 0 and 23
#   (blank line 3)
#   u3  20181231&07       -> day 91: Monday of week 13, hour 7
#       20190331&12       -> day 181 (the last): Sunday (6) of week 25, hour 12
EXPECTED = {
    (0, 0, 8): 1,
    (0, 0, 9): 2,
    (0, 0, 10): 1,
    (2, 0, 20): 1,
    (0, 1, 0): 1,
    (0, 1, 23): 1,
    (0, 13, 7): 1,
    (6, 25, 12): 1,
}


def test_fixture_cells() -> None:
    visits = read_urfc_visits(FIXTURES / "000001_001.txt")
    assert visits.shape == (7, 26, 24)
    assert visits.dtype == np.float32
    expected = np.zeros((7, 26, 24), dtype=np.float32)
    for cell, count in EXPECTED.items():
        expected[cell] = count
    np.testing.assert_array_equal(visits, expected)
    assert visits.sum() == 9


def test_read_dir_sorted(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "000001_001.txt", tmp_path / "000002_004.txt")
    (tmp_path / "000001_002.txt").write_text("u9\t20181002&05\n")
    (tmp_path / "notes.md").write_text("not a visit file")
    ids, visits = read_urfc_dir(tmp_path)
    assert ids == ["000001_002", "000002_004"]
    assert visits.shape == (2, 7, 26, 24)
    assert visits[0].sum() == 1 and visits[0][1, 0, 5] == 1
    assert visits[1][0, 0, 9] == 2


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("u2 20181002&05", "expected 'USERID<TAB>"),
        ("\t20181002&05", "expected 'USERID<TAB>"),
        ("u2\t20181002", "has no '&HH' hours"),
        ("u2\t20181002&24", "hour '24' on 20181002 is not 00-23"),
        ("u2\t20181002&05|", "hour '' on 20181002"),
        ("u2\t2018-10-02&05", "date '2018-10-02' is not YYYYMMDD"),
        ("u2\t20181032&05", "date '20181032' is not YYYYMMDD"),
        ("u2\t20190401&05", "date 20190401 is outside the 26 weeks 2018-10-01 .. 2019-03-31"),
        ("u2\t20180930&05", "outside the 26 weeks"),
    ],
)
def test_malformed_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "000003_001.txt"
    path.write_text(f"u1\t20181001&08\n{line}\n")
    with pytest.raises(InputError, match=match) as info:
        read_urfc_visits(path)
    assert (info.value.file, info.value.line) == (str(path), 2)


def test_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_urfc_visits(tmp_path / "absent.txt")
    with pytest.raises(InputError, match="no URFC visit files"):
        read_urfc_dir(tmp_path)
