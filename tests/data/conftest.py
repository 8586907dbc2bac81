"""Fixtures of the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.data.real_inputs import read_real_counts


@pytest.fixture(scope="session")
def real_counts(shared_data: Path) -> pd.DataFrame:
    """See :func:`tests.data.real_inputs.read_real_counts`; read once, never modified."""
    return read_real_counts(shared_data)
