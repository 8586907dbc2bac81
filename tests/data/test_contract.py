"""The checkpoint's contract with the data: plain types in, the same contract out."""

from __future__ import annotations

import torch

from fusion.data.contract import DataContract
from fusion.data.tiles import BandStats

CONTRACT = DataContract(
    classes=("civic", "park"),
    band_stats=BandStats(mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0)),
    image_size=56,
    bands=(3, 2, 1),
    nodata=0.0,
    hours=672,
    value_columns=("count",),
    timezone="Australia/Melbourne",
    dtype="uint8",
    class_weights=(0.5, 1.5),
)


def test_round_trip_through_a_weights_only_checkpoint(tmp_path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"data_info": CONTRACT.to_dict()}, path)
    info = torch.load(path, weights_only=True)["data_info"]  # plain types only
    assert DataContract.from_dict(info) == CONTRACT
    assert CONTRACT.in_chans == 3 and CONTRACT.n_features == 1 + 4


def test_old_checkpoints_keep_their_series_settings_in_the_datamodule_hparams() -> None:
    old = {  # data_info as written before the contract existed
        "classes": ["civic", "park"], "class_weights": [0.5, 1.5],
        "band_stats": {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]}, "in_chans": 3,
        "image_size": 56, "bands": None, "nodata": None, "value_columns": ["count"],
        "n_features": 5, "hours": 672,
    }  # fmt: skip
    datamodule = {"key_column": "cell", "time_column": "hour", "timezone": "Asia/Shanghai",
                  "log1p": False, "min_present": 0.25, "manifest": "m.csv"}  # fmt: skip
    contract = DataContract.from_dict(old, datamodule)
    assert (contract.key_column, contract.time_column, contract.timezone) == (
        "cell", "hour", "Asia/Shanghai",
    )  # fmt: skip
    assert contract.log1p is False and contract.min_present == 0.25 and contract.dtype is None
    assert DataContract.from_dict(old).key_column == "sensor_id"  # without them: the defaults
