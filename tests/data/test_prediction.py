"""Inputs of new places that do not fit the model: a label outside its classes, tiles of another
pixel type, a checkpoint whose weights do not fit its config.

Covered in ``tests/test_predict.py`` and not repeated here:
``test_bad_manifest_rows_are_named_before_anything_is_written`` (a label outside a trained model's
classes), ``test_a_checkpoint_with_pickled_code_is_refused``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusion.data.contract import DataContract
from fusion.data.prediction import ManifestSamples, RegionSamples
from fusion.data.tiles import BandStats
from fusion.errors import InputError, InputErrors
from tests.data.real_inputs import REAL_AIRPORT, REAL_JPEG


def test_label_outside_the_models_classes(tmp_path: Path) -> None:
    contract = DataContract(
        classes=("civic", "commercial", "park", "railway_station", "residential", "school"),
        band_stats=BandStats(mean=(100.0, 100.0, 100.0), std=(50.0, 50.0, 50.0)),
        image_size=56,
        bands=None,
        nodata=None,
        hours=672,
        value_columns=("count",),
    )
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "sample_id,image,sensor_id,start,hours,label\n"
        f"a,{REAL_JPEG},,,,civic\n"
        f"b,{REAL_AIRPORT},,,,airport\n"
    )
    with pytest.raises(InputErrors) as info:
        ManifestSamples(manifest, contract)
    (err,) = info.value.errors
    assert (err.file, err.line, err.field) == (str(manifest), 3, "label")
    assert "unknown label 'airport'" in err.message
    # Without the unseen row the same manifest is accepted.
    manifest.write_text(f"sample_id,image,sensor_id,start,hours,label\na,{REAL_JPEG},,,,civic\n")
    samples = ManifestSamples(manifest, contract)
    assert len(samples) == 1 and samples.labels.tolist() == [0]
    assert samples[0]["label"].item() == 0 and samples[0]["has_image"]


def test_tiles_of_another_pixel_type_are_refused_by_name(tmp_path: Path) -> None:
    """A model trained on 8-bit tiles never scores 16-bit ones on another scale."""
    contract = DataContract(
        classes=("civic", "park"),
        band_stats=BandStats(mean=(100.0,) * 3, std=(50.0,) * 3),
        image_size=56,
        bands=None,
        nodata=None,
        hours=672,
        value_columns=("count",),
        dtype="uint8",
    )
    landsat = REAL_JPEG.parents[2] / "geotiff" / "landsat8_224078_20200518.tif"  # uint16
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        f"sample_id,image,sensor_id,start,hours\na,{REAL_JPEG},,,\nb,{landsat},,,\n"
    )
    with pytest.raises(InputErrors) as info:
        ManifestSamples(manifest, contract)
    (err,) = info.value.errors
    assert (err.line, err.field) == (3, "image") and "uint16" in err.message
    assert "trained on uint8" in err.message
    regions = REAL_JPEG.parents[2] / "geotiff"
    with pytest.raises(InputError, match="uint16") as raster:
        RegionSamples(landsat, regions / "regions_landsat.gpkg", contract)
    assert raster.value.file == str(landsat)


DATA_INFO = {
    "classes": ["civic", "commercial", "park", "railway_station", "residential", "school"],
    "class_weights": [1.0] * 6,
    "band_stats": {"mean": [100.0, 100.0, 100.0], "std": [50.0, 50.0, 50.0]},
    "in_chans": 3,
    "image_size": 56,
    "bands": None,
    "nodata": None,
    "value_columns": ["count"],
    "n_features": 5,
    "hours": 168,
}
CONCAT = {"fusion": "concat", "vit_weights": None, "token_grid": 2}


@pytest.fixture(scope="module")
def fast_vit_init():
    """Skip timm's random ViT init (seconds on a CPU): every weight here is loaded or compared,
    never used."""
    import timm.models.vision_transformer as vision_transformer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vision_transformer, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)
        yield


@pytest.fixture(scope="module")
def concat_state(fast_vit_init) -> dict[str, torch.Tensor]:
    from fusion.task import FusionTask

    return FusionTask(data_info=DATA_INFO, net=CONCAT).state_dict()


def _checkpoint(path: Path, net: dict, state: dict, **info) -> Path:
    hparams = {"data_info": {**DATA_INFO, **info}, "net": net}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    return path


def test_checkpoint_from_another_config(fast_vit_init, concat_state: dict, tmp_path: Path) -> None:
    from fusion.predict import load_model

    # The checkpoint itself is sound: with its own config it loads.
    _, inputs = load_model(_checkpoint(tmp_path / "concat.ckpt", CONCAT, concat_state))
    assert inputs.hours == 168 and inputs.in_chans == 3
    # MBT settings with concat weights.
    path = _checkpoint(tmp_path / "mbt.ckpt", {**CONCAT, "fusion": "mbt"}, concat_state)
    with pytest.raises(InputError, match="weights do not fit the checkpoint's own config") as exc:
        load_model(path)
    assert exc.value.file == str(path) and "net.fusion" in exc.value.message
    # Data facts of a 4-band model with 3-band weights.
    four = {"mean": [100.0] * 4, "std": [50.0] * 4}
    path = _checkpoint(tmp_path / "bands.ckpt", CONCAT, concat_state, band_stats=four)
    with pytest.raises(InputError, match="size mismatch") as exc:
        load_model(path)
    assert exc.value.file == str(path)
    # Settings this version does not know (a checkpoint from another version of the code).
    path = _checkpoint(tmp_path / "newer.ckpt", {**CONCAT, "fusion_gate": True}, concat_state)
    with pytest.raises(InputError, match="fusion_gate") as exc:
        load_model(path)
    assert exc.value.file == str(path)
