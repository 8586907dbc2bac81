"""What every figure of the project shares: matplotlib's file-only backend, the display stretch of
a raw tile, and saving a figure without ever leaving a half-written file.

Importing this module selects the ``Agg`` backend (figures are written to files, never shown), so
every plotting module imports from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from fusion.io import atomic_path


def display_rgb(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` raw tile → ``(H, W, 3)`` in [0, 1], 2-98 percentile stretch per band.

    The first three bands are red, green and blue; a tile with fewer is shown grey from its first.
    The percentiles are taken over the ``valid (H, W)`` pixels (all of them when none is valid).
    """
    bands = data[:3] if data.shape[0] >= 3 else np.repeat(data[:1], 3, axis=0)
    out = np.zeros(bands.shape, dtype=np.float32)
    for b, band in enumerate(bands):
        values = band[valid] if valid.any() else band.ravel()
        lo, hi = np.percentile(values, [2, 98])
        out[b] = np.clip((band - lo) / max(hi - lo, 1e-6), 0, 1)
    return out.transpose(1, 2, 0)


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (PNG) atomically and close the figure."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)
