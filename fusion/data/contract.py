"""What a trained model expects of its inputs: the checkpoint's contract with the data.

The datamodule writes it when training starts (:meth:`FusionDataModule.contract`); the task saves
it in the checkpoint as plain types (``data_info``, loadable with ``weights_only``); prediction
reads it back and checks new inputs against it (:mod:`fusion.data.prediction`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from fusion.data.series import KEY_COLUMN, MIN_PRESENT, TIME_COLUMN, feature_count
from fusion.data.tiles import BandStats


@dataclass(frozen=True)
class DataContract:
    """Classes, tile and window settings a model was trained with.

    ``dtype`` is the training tiles' pixel type (e.g. ``uint8``): tiles of another type are on
    another scale and refused at prediction. ``class_weights`` are the training loss's weights.
    """

    classes: tuple[str, ...]
    band_stats: BandStats
    image_size: int
    bands: tuple[int, ...] | None
    nodata: float | None
    hours: int
    value_columns: tuple[str, ...]
    key_column: str = KEY_COLUMN
    time_column: str = TIME_COLUMN
    timezone: str | None = None
    log1p: bool = True
    min_present: float = MIN_PRESENT
    dtype: str | None = None
    class_weights: tuple[float, ...] | None = None

    @property
    def in_chans(self) -> int:
        return len(self.band_stats)

    @property
    def n_features(self) -> int:
        """Features per hour of a window: the counts and the calendar features."""
        return feature_count(self.value_columns)

    def to_dict(self) -> dict[str, Any]:
        """Plain types (lists, numbers, strings) for a checkpoint's hyperparameters."""
        out = asdict(self)
        out["band_stats"] = self.band_stats.to_dict()
        for name in ("classes", "bands", "value_columns", "class_weights"):
            out[name] = None if out[name] is None else list(out[name])
        return out

    @classmethod
    def from_dict(
        cls, info: dict[str, Any], fallback: dict[str, Any] | None = None
    ) -> DataContract:
        """Read :meth:`to_dict`'s output. Checkpoints written before the contract held the
        series settings keep them in the datamodule's hyperparameters: ``fallback``."""
        known = {f.name for f in fields(cls)}
        values = {**{k: v for k, v in (fallback or {}).items() if k in known}}
        values.update({k: v for k, v in info.items() if k in known})
        values["band_stats"] = BandStats.from_dict(info["band_stats"])
        for name in ("classes", "bands", "value_columns", "class_weights"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)
