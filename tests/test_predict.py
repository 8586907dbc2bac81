"""``fusion predict``: a checkpoint alone on new pairs (manifest) and on a real raster + regions."""

from __future__ import annotations

import dataclasses
import shutil
import signal
from pathlib import Path

import geopandas as gpd
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from shapely.affinity import translate
from shapely.geometry import Polygon
from torch.utils.data import default_collate

import fusion.predict as predict_module
from fusion.cli import main
from fusion.conformal import ConformalCalibration
from fusion.data.contract import DataContract
from fusion.data.prediction import ManifestSamples, PredictionDataModule, RegionSamples
from fusion.errors import InputError, InputErrors
from fusion.ood import OodCalibration, energy
from fusion.predict import Prediction, load_model, predict, score
from tests.browser import Chromium
from tests.conftest import TrainedRun


@pytest.fixture(scope="module")
def model(trained_run: TrainedRun):
    return load_model(trained_run.ckpt)


@pytest.fixture(scope="module")
def series_path(shared_data: Path) -> Path:
    return shared_data / "footfall" / "counts.csv.gz"


def run(task, samples, output: Path, batch_size: int = 32) -> Prediction:
    """``predict`` over ``samples`` (the datamodule ``fusion predict`` builds)."""
    return predict(task, PredictionDataModule(samples, batch_size=batch_size), output)


def write_manifest(frame: pd.DataFrame, folder: Path) -> Path:
    path = folder / "manifest.csv"
    frame.to_csv(path, index=False)
    return path


def test_the_checkpoint_is_enough(model, trained_run: TrainedRun) -> None:
    task, inputs = model
    saved = torch.load(trained_run.ckpt, weights_only=True, map_location="cpu")
    info = saved["hyper_parameters"]["data_info"]
    assert inputs.classes == tuple(info["classes"]) and inputs.hours == 672
    assert inputs.in_chans == 3 and inputs.image_size == 56
    assert inputs.band_stats.mean == tuple(info["band_stats"]["mean"])
    assert task.temperature.item() == pytest.approx(float(saved["state_dict"]["temperature"]))
    assert task.net.image_encoder is not None and task.net.series_encoder is not None


def test_manifest_form_reproduces_fusion_test(
    trained_run: TrainedRun, small_manifest: Path, series_path: Path, tmp_path: Path, capsys
) -> None:
    """The test rows predicted from files alone match what ``fusion test`` wrote for them."""
    out = tmp_path / "preds.csv"
    argv = ["predict", "--ckpt_path", str(trained_run.ckpt), "--manifest", str(small_manifest),
            "--series", str(series_path), "--split", "test", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    tested = pd.read_csv(trained_run.root / "predictions_test.csv")
    preds = pd.read_csv(out)
    assert len(preds) == len(tested) == 24
    assert preds["pred"].tolist() == tested["pred"].tolist()
    # The fused probabilities and each view's alone, as fusion test wrote them.
    columns = [c for c in tested.columns if c.startswith("p_")]
    assert len(columns) == 3 * 6 and set(columns) <= set(preds.columns)
    assert np.abs(preds[columns].to_numpy() - tested[columns].to_numpy()).max() < 1e-6
    for view in ("image", "series"):
        assert preds[f"pred_{view}"].tolist() == tested[f"pred_{view}"].tolist()
    # Both views read; `fusion predict` flags unfamiliar tiles by default (status uncertain).
    assert preds["has_image"].all() and preds["has_series"].all()
    assert preds["status"].isin(["image+series", "uncertain"]).all()
    # The printed metrics are those of the tested predictions.
    classes = [f"p_{c}" for c in load_model(trained_run.ckpt)[1].classes]
    index = {c[2:]: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c in tested["label"]])
    log_probs = np.log(tested[classes].to_numpy(np.float32))
    expected = score(log_probs, labels, log_probs.argmax(axis=1), temperature=1.0)
    assert (
        f"OA {expected['OA']:.4f}" in printed and f"macro-F1 {expected['macro_f1']:.4f}" in printed
    )


def test_each_view_alone_is_the_model_with_the_other_view_removed(
    model, small_manifest: Path, series_path: Path, tmp_path: Path
) -> None:
    task, inputs = model
    assert task.net.head_names == ("fused", "image", "series")  # the config's experts
    frame = pd.read_csv(small_manifest, dtype=str, keep_default_na=False)
    frame = frame[frame["split"] == "test"].head(6).copy()
    frame.loc[frame.index[0], "sensor_id"] = ""  # image only: no series view to report
    samples = ManifestSamples(write_manifest(frame, tmp_path), inputs, series=series_path)
    run(task, samples, tmp_path / "out.csv", batch_size=4)
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    batch = default_collate([samples[i] for i in range(len(samples))])
    batch.pop("note")  # not a tensor
    with torch.no_grad():
        alone = {
            "image": task.calibrated(task({**batch, "has_series": torch.zeros(6, dtype=bool)})),
            "series": task.calibrated(task({**batch, "has_image": torch.zeros(6, dtype=bool)})),
        }
    classes = list(inputs.classes)
    for view, probs in alone.items():
        rows = slice(1, None) if view == "series" else slice(None)
        written = out[[f"p_{view}_{c}" for c in classes]].iloc[rows].astype(float).to_numpy()
        assert np.abs(written - probs[rows].numpy()).max() < 1e-5, view
        expected = [classes[k] for k in probs[rows].argmax(dim=1).tolist()]
        assert out[f"pred_{view}"].iloc[rows].tolist() == expected
    assert out["pred_series"][0] == "" and out[f"p_series_{classes[0]}"][0] == ""
    # With both views, the fused output is neither view alone.
    both = out[[f"p_{c}" for c in classes]].iloc[1:].astype(float).to_numpy()
    assert not np.allclose(both, alone["image"][1:].numpy(), atol=1e-4)


def test_missing_views_are_flagged_and_nothing_is_guessed(
    model, small_manifest: Path, series_path: Path, tmp_path: Path
) -> None:
    task, inputs = model
    frame = pd.read_csv(small_manifest, dtype=str, keep_default_na=False)
    frame = frame[frame["split"] == "val"].head(6).copy()
    frame.loc[frame.index[0], "image"] = ""  # series only
    frame.loc[frame.index[1], "sensor_id"] = ""  # image only
    frame.loc[frame.index[2], ["image", "sensor_id"]] = ""  # neither: skipped
    frame.loc[frame.index[3], "sensor_id"] = "no_such_sensor"  # unknown key: image only
    frame.loc[frame.index[4], "start"] = "2030-01-01T00:00:00+00:00"  # after the series
    samples = ManifestSamples(write_manifest(frame, tmp_path), inputs, series=series_path)
    result = run(task, samples, tmp_path / "out.csv", batch_size=4)
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert out["status"].tolist() == [
        "series only", "image only", "skipped", "image only", "image only", "image+series",
    ]  # fmt: skip
    assert "no image" in out["note"][0] and "not found" in out["note"][3]
    assert "outside the span" in out["note"][4]
    skipped = out.iloc[2]
    assert skipped["pred"] == "" and all(skipped[f"p_{c}"] == "" for c in inputs.classes)
    assert result.pred[2] == -1 and (np.delete(result.pred, 2) >= 0).all()
    probs = out.drop(index=2)[[f"p_{c}" for c in inputs.classes]].astype(float).to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert result.metrics["n"] == 5  # labelled and predicted rows only


def test_bad_manifest_rows_are_named_before_anything_is_written(
    model, small_manifest: Path, series_path: Path, tmp_path: Path
) -> None:
    _, inputs = model
    frame = pd.read_csv(small_manifest, dtype=str, keep_default_na=False).head(4).copy()
    frame.loc[frame.index[0], "hours"] = "168"  # not the model's window length
    frame.loc[frame.index[1], "label"] = "stadium"  # not a class of the model
    gray = tmp_path / "gray.png"
    Image.new("L", (40, 40), 128).save(gray)
    frame.loc[frame.index[2], "image"] = str(gray)  # one band, the model has three
    frame.loc[frame.index[3], "start"] = "2021-06-01 00:00"  # no zone, none given
    path = write_manifest(frame, tmp_path)
    with pytest.raises(InputErrors) as info:
        ManifestSamples(path, inputs, series=series_path)
    text = str(info.value)
    for line, field, words in [(2, "hours", "672-hour"), (3, "label", "stadium"),
                               (4, "image", "has 1 bands"), (5, "start", "")]:  # fmt: skip
        assert f"{path}, line {line}, column '{field}'" in text and words in text
    assert not (tmp_path / "out.csv").exists()


def test_an_interrupted_run_leaves_no_output(
    model, small_manifest: Path, series_path: Path, tmp_path: Path
) -> None:
    """A tile that fails to decode mid-stream: an error naming it, the old output untouched."""
    task, inputs = model
    frame = pd.read_csv(small_manifest, dtype=str, keep_default_na=False).head(10).copy()
    data = Path(frame["image"].iloc[8]).read_bytes()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data[: len(data) // 3])  # a truncated JPEG: its header still reads
    frame.loc[frame.index[8], "image"] = str(broken)
    samples = ManifestSamples(write_manifest(frame, tmp_path), inputs, series=series_path)
    out = tmp_path / "out" / "preds.csv"
    out.parent.mkdir()
    out.write_text("an earlier run's output\n")
    with pytest.raises(InputError) as info:
        run(task, samples, out, batch_size=4)  # the third batch fails
    assert str(broken) in str(info.value) and "line 10" in str(info.value)
    assert out.read_text() == "an earlier run's output\n"
    assert [p.name for p in out.parent.iterdir()] == ["preds.csv"]  # no temporary left behind

    calls = 0

    def stop(batch, batch_idx=0):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return original(batch, batch_idx)

    original = task.predict_step
    task.predict_step = stop
    fresh = tmp_path / "fresh.csv"
    try:
        # Lightning shuts down and exits on Ctrl-C (and ignores further ones meanwhile).
        with pytest.raises(SystemExit):
            run(task, samples, fresh, batch_size=4)
    finally:
        del task.predict_step
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert not fresh.exists() and not list(tmp_path.glob(".fresh-*"))


# ------------------------------------------------------------------ raster + regions (real files)
@pytest.fixture(scope="module")
def geotiff(shared_data: Path) -> Path:
    return shared_data / "geotiff"


def test_regions_form_writes_a_geopackage_and_a_map(
    trained_run: TrainedRun, geotiff: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "preds.gpkg"
    argv = ["predict", "--ckpt_path", str(trained_run.ckpt), "--raster", str(geotiff / "rgbn.tif"),
            "--regions", str(geotiff / "regions.gpkg"), "--bands", "1", "2", "3",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    regions = gpd.read_file(geotiff / "regions.gpkg")
    preds = gpd.read_file(out)
    assert len(preds) == len(regions) == 252
    assert preds["region_id"].tolist() == regions["region_id"].tolist()
    assert preds.crs == regions.crs
    assert preds.geometry.geom_equals(regions.geometry).all()
    # Complete cells are wholly on the raster; cells sticking out of it count their pixels.
    complete = regions["complete"].to_numpy()
    assert (preds["valid_share"][complete] == 1).all()
    assert (preds["valid_share"][~complete] < 1).all()
    used = preds["valid_share"] >= 0.5
    assert 221 <= used.sum() < 252
    assert preds["status"][used].isin(["image only", "uncertain"]).all()
    assert not preds["has_series"][used].any()
    assert preds["pred"][used].isin(load_model(trained_run.ckpt)[1].classes).all()
    assert (preds["status"][~used] == "skipped").all() and (preds["pred"][~used] == "").all()
    assert preds["note"][~used].str.contains("of the pixels have data").all()
    png = out.with_suffix(".png")
    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 200
    html = out.with_suffix(".html")
    printed = capsys.readouterr().out
    assert "252 rows" in printed and f"wrote {html}" in printed
    drawn = map_features(html)
    assert {region: pred for region, (pred, _) in drawn.items()} == dict(
        zip(preds["region_id"].astype(str), preds["pred"], strict=True)
    )


def map_features(html: Path) -> dict[str, tuple[str, list[float]]]:
    """Region id -> (predicted class, [south, west, north, east]) of every region drawn on the
    HTML map, opened offline without an error."""
    with Chromium() as browser:
        browser.open(html)
        assert browser.events.errors() == []
        assert all(url.startswith(("file:", "data:")) for url in browser.events.requests)
        drawn = browser.evaluate(
            "(() => { const out = []; window[document.querySelector('.folium-map').id]"
            ".eachLayer(l => { if (l.feature) { const b = l.getBounds();"
            " out.push([l.feature.properties.id, l.feature.properties.pred || '',"
            " [b.getSouth(), b.getWest(), b.getNorth(), b.getEast()]]); } }); return out; })()"
        )
    return {region: (pred, bounds) for region, pred, bounds in drawn}


def test_band_count_mismatch_names_the_raster(model, geotiff: Path) -> None:
    _, inputs = model
    with pytest.raises(InputError, match="has 4 bands, expected 3") as info:
        RegionSamples(geotiff / "rgbn.tif", geotiff / "regions.gpkg", inputs)
    assert info.value.file == str(geotiff / "rgbn.tif")


def test_crs_mismatch_is_an_error(model, geotiff: Path, tmp_path: Path) -> None:
    """Regions whose file claims the wrong CRS land nowhere near the raster."""
    _, inputs = model
    regions = gpd.read_file(geotiff / "regions.gpkg").set_crs("EPSG:32619", allow_override=True)
    wrong = tmp_path / "wrong_crs.gpkg"
    regions.to_file(wrong)
    with pytest.raises(InputError, match="no region overlaps the raster") as info:
        RegionSamples(geotiff / "rgbn.tif", wrong, rgb(inputs))
    assert "EPSG:32619" in str(info.value) and "EPSG:32618" in str(info.value)
    regions.set_crs(None, allow_override=True).to_file(tmp_path / "no_crs.gpkg")
    with pytest.raises(InputError, match="regions have no CRS"):
        RegionSamples(geotiff / "rgbn.tif", tmp_path / "no_crs.gpkg", rgb(inputs))


def rgb(inputs: DataContract) -> DataContract:
    """The model's contract with bands 1-3 of the 4-band ``rgbn.tif`` selected."""
    return dataclasses.replace(inputs, bands=(1, 2, 3))


def test_regions_outside_the_raster_and_series_joined_by_key(
    model, geotiff: Path, series_path: Path, tmp_path: Path
) -> None:
    """A region off the raster is predicted from its series if it has one, else skipped."""
    task, inputs = model
    regions = gpd.read_file(geotiff / "regions.gpkg").head(6)
    far = regions.iloc[:2].copy()
    far["geometry"] = far.geometry.apply(lambda g: translate(g, xoff=50_000))
    far["region_id"] = [1000, 1001]
    regions = pd.concat([regions, far], ignore_index=True)
    regions["sensor_id"] = ["mel_MCEC_T", "", "", "", "", "", "akl_297_Queen_Street", ""]
    path = tmp_path / "regions.gpkg"
    gpd.GeoDataFrame(regions, crs=far.crs).to_file(path)
    samples = RegionSamples(
        geotiff / "rgbn.tif", path, rgb(inputs), series=series_path,
        key="sensor_id", start="2022-04-05T00:00:00+10:00",
    )  # fmt: skip
    result = run(task, samples, tmp_path / "preds.gpkg")
    out = gpd.read_file(tmp_path / "preds.gpkg")
    assert out["status"].tolist() == ["image+series"] + ["image only"] * 5 + [
        "series only", "skipped",
    ]  # fmt: skip
    assert "outside the raster" in out["note"].iloc[7] and result.pred[7] == -1
    assert result.map is not None and result.map.is_file()


def test_regions_written_to_a_csv_get_both_maps(model, geotiff: Path, tmp_path: Path) -> None:
    """The HTML map of a CSV output takes each row's geometry from the regions, in order."""
    task, inputs = model
    regions = gpd.read_file(geotiff / "regions.gpkg").iloc[131:119:-1]  # ids descending
    regions.to_file(tmp_path / "regions.gpkg")
    samples = RegionSamples(geotiff / "rgbn.tif", tmp_path / "regions.gpkg", rgb(inputs))
    result = run(task, samples, tmp_path / "preds.csv")
    rows = pd.read_csv(tmp_path / "preds.csv", dtype=str, keep_default_na=False)
    assert result.map == tmp_path / "preds.png" and result.web_map == tmp_path / "preds.html"
    drawn = map_features(result.web_map)
    assert {region: pred for region, (pred, _) in drawn.items()} == dict(
        zip(rows["region_id"], rows["pred"], strict=True)
    )
    centres = regions.geometry.centroid.to_crs("EPSG:4326")
    for region, centre in zip(regions["region_id"].astype(str), centres, strict=True):
        south, west, north, east = drawn[region][1]  # each row drawn in its own cell
        assert south < centre.y < north and west < centre.x < east


def test_a_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"data_info": Payload()}}, bad)
    with pytest.raises(InputError, match="not a fusion checkpoint") as info:
        load_model(bad)
    assert "weights_only" not in str(info.value) and "trust" not in str(info.value)
    assert (tmp_path / "victim").is_dir()


def test_a_file_that_is_not_a_checkpoint_is_called_that(tmp_path: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a model\n")
    with pytest.raises(InputError, match="not a checkpoint") as info:
        load_model(text)
    assert info.value.file == str(text)


def test_degenerate_regions_are_flagged_not_divided_by_zero(
    model, geotiff: Path, tmp_path: Path
) -> None:
    """A collapsed polygon (no area) has no image and a note; a self-intersecting one is repaired
    and predicted, its note saying so; the others are untouched."""
    task, inputs = model
    regions = gpd.read_file(geotiff / "regions.gpkg")
    regions = regions[regions["complete"]].head(3).reset_index(drop=True)  # wholly on the raster
    x0, y0, x1, y1 = regions.geometry.iloc[1].bounds
    regions.loc[1, "geometry"] = Polygon([(x0, y0), (x1, y1), (x0, y0)])  # zero area
    regions.loc[2, "geometry"] = Polygon([(x0, y0), (x1, y1), (x1, y0), (x0, y1)])  # bow-tie
    path = tmp_path / "regions.gpkg"
    regions.to_file(path)
    result = run(task, RegionSamples(geotiff / "rgbn.tif", path, rgb(inputs)), tmp_path / "p.csv")
    out = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert out["status"].tolist() == ["image only", "skipped", "image only"]
    assert "zero-area" in out["note"][1] and result.pred[1] == -1
    assert "self-intersection" in out["note"][2] and 0 < float(out["valid_share"][2]) <= 1
    assert out["note"][0] == "no series" and float(out["valid_share"][0]) == 1


def test_coverage_adds_conformal_sets_and_they_survive_a_checkpoint(
    trained_run: TrainedRun, small_manifest: Path, series_path: Path, tmp_path: Path
) -> None:
    task, contract = load_model(trained_run.ckpt)
    # Its val rows calibrated it while training (saved in the checkpoint, read back).
    assert task.conformal is not None and task.conformal.n_places > 1
    samples = ManifestSamples(small_manifest, contract, series=series_path)
    task.conformal = None  # as for a checkpoint of an earlier version
    with pytest.raises(InputError, match="no conformal calibration"):
        predict(task, PredictionDataModule(samples), tmp_path / "none.csv", coverage=0.9)
    assert not (tmp_path / "none.csv").exists()
    # Calibrate on the manifest's val rows (each sensor a place), then predict its test rows.
    plain = run(task, samples, tmp_path / "plain.csv")
    frame = pd.read_csv(tmp_path / "plain.csv")
    classes = list(contract.classes)
    val = pd.read_csv(small_manifest)["split"].eq("val").to_numpy()
    probs = frame[[f"p_{c}" for c in classes]].to_numpy()
    labels = np.array([classes.index(c) for c in pd.read_csv(small_manifest)["label"]])
    places = pd.read_csv(small_manifest)["sensor_id"].to_numpy()
    task.conformal = ConformalCalibration.fit(probs[val], labels[val], places[val])
    checkpoint: dict = {}
    task.on_save_checkpoint(checkpoint)
    restored, _ = load_model(trained_run.ckpt)
    restored.on_load_checkpoint({**checkpoint, "state_dict": {}})
    assert (restored.conformal.thresholds(0.9) == task.conformal.thresholds(0.9)).all()
    predict(restored, PredictionDataModule(samples), tmp_path / "sets.csv", coverage=0.9)
    sets = pd.read_csv(tmp_path / "sets.csv")
    assert (sets["pred"] == frame["pred"]).all() and (sets["set_size"] >= 1).all()
    member = task.conformal.sets(probs, 0.9)  # row i's randomisation is u[i] in both
    assert sets["set_size"].tolist() == member.sum(axis=1).tolist()
    assert sets["pred_set"].tolist() == ["|".join(np.array(classes)[m]) for m in member]
    assert all(p in s.split("|") for p, s in zip(sets["pred"], sets["pred_set"], strict=True))
    wider = predict(restored, PredictionDataModule(samples), tmp_path / "w.csv", coverage=0.99)
    assert (pd.read_csv(tmp_path / "w.csv")["set_size"] >= sets["set_size"]).all()
    assert len(wider.pred) == len(plain.pred)


def test_unfamiliar_tiles_and_large_sets_are_flagged_uncertain(
    trained_run: TrainedRun, small_manifest: Path, series_path: Path, geotiff: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    task, contract = load_model(trained_run.ckpt)
    samples = ManifestSamples(small_manifest, contract, series=series_path)
    outputs = L.Trainer(logger=False, enable_progress_bar=False).predict(
        task, PredictionDataModule(samples)
    )
    heads = torch.cat([o["heads"] for o in outputs]).numpy()
    image = heads[:, task.net.head_names.index("image")]
    sensors = pd.read_csv(small_manifest)["sensor_id"].to_numpy()
    task.ood = OodCalibration.fit(image, sensors)  # a logic check, not a held-out calibration
    threshold = task.ood.threshold(0.25)
    predict(task, PredictionDataModule(samples), tmp_path / "flags.csv", flag_rate=0.25)
    rows = pd.read_csv(tmp_path / "flags.csv")
    np.testing.assert_allclose(rows["image_energy"], energy(image), rtol=1e-5)
    far = rows["image_energy"] > threshold
    assert 0 < far.sum() < len(rows)
    assert (rows.loc[far, "status"] == "uncertain").all() and rows["pred"].notna().all()
    assert rows.loc[far, "note"].str.contains("unlike the training tiles").all()
    assert (rows.loc[~far, "status"] == "image+series").all()
    # A raster's regions: flagged ones hatched on the map, counted in its legend.
    regions = RegionSamples(geotiff / "rgbn.tif", geotiff / "regions.gpkg",
                            dataclasses.replace(contract, bands=(3, 2, 1)))  # fmt: skip
    result = predict(task, PredictionDataModule(regions), tmp_path / "r.gpkg", flag_rate=0.25)
    flagged = result.counts().get("uncertain", 0)
    assert flagged > 0 and result.map is not None and result.map.stat().st_size > 10_000
    layer = gpd.read_file(tmp_path / "r.gpkg")
    assert (layer["status"] == "uncertain").sum() == flagged
    assert layer.loc[layer["status"] == "uncertain", "pred"].notna().all()


@pytest.mark.parametrize("suffix", [".gpkg", ".csv"])
def test_regions_streamed_in_chunks_write_what_one_chunk_writes(
    model, geotiff: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    """Regions read 40 at a time and rows written 64 at a time give the rows, geometries and
    sets of one pass; above MAP_REGIONS the PNG map is rasterised and no HTML map is left."""
    task, inputs = model
    whole = RegionSamples(geotiff / "rgbn.tif", geotiff / "regions.gpkg", rgb(inputs))
    one = predict(task, PredictionDataModule(whole), tmp_path / f"one{suffix}", coverage=0.9)
    streamed = RegionSamples(geotiff / "rgbn.tif", geotiff / "regions.gpkg", rgb(inputs))
    streamed.raster.chunk = 40
    monkeypatch.setattr(predict_module, "CHUNK", 64)  # the maps read the rows back 64 at a time
    monkeypatch.setattr(predict_module, "MAP_REGIONS", 100)
    stale = tmp_path / "many.html"
    stale.write_text("an older run's map")
    data = PredictionDataModule(streamed, batch_size=24)
    many = predict(task, data, tmp_path / f"many{suffix}", coverage=0.9)
    read = gpd.read_file if suffix == ".gpkg" else pd.read_csv
    first, second = read(one.output), read(many.output)
    assert len(second) == 252 and "pred_set" in second.columns
    pd.testing.assert_frame_equal(pd.DataFrame(first), pd.DataFrame(second))
    np.testing.assert_array_equal(one.pred, many.pred)
    assert one.counts() == many.counts() and sum(many.counts().values()) == 252
    assert one.web_map is not None and many.web_map is None and not stale.exists()
    with Image.open(many.map) as image:
        assert image.size[0] > 300
