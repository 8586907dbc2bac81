"""Shared fixtures: paths to the real data bundle beside the checkout (../shared)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FUSION_SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights" / "dinov2_vits14_imgfocus.safetensors"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data bundle (``../shared/data``); the suite needs it and fails loudly without it."""
    assert DATA.is_dir(), f"real data bundle not found at {DATA} (set FUSION_SHARED)"
    return DATA


@pytest.fixture(scope="session")
def vit_weights() -> Path:
    assert WEIGHTS.is_file(), f"pretrained ViT weights not found at {WEIGHTS}"
    return WEIGHTS
