"""Viewer outputs: GeoJSON annotations for QuPath (schema, areas equal to the argmax cells), the pyramidal OME-TIFF
overlay read back with tifffile, and the OME-NGFF attributes of the zarr score store.

Slides are small synthetic pyramidal TIFFs (``slides.py``); the model is the embedded digits model, whose
``background`` class gets no annotations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from scipy import ndimage
from shapely.geometry import shape
from slides import write_slide
from typer.testing import CliRunner

from fcnify.cli import app
from fcnify.heatmap import outputs, viewers
from fcnify.heatmap.options import HeatmapOptions, validate_options
from fcnify.heatmap.outputs import expected_outputs
from fcnify.heatmap.previews import colour_lut

runner = CliRunner()
ALL = "png,scores,geojson,ome-tiff"


def heatmap(*args) -> object:
    return runner.invoke(app, ["heatmap", *map(str, args)])


def argmax_cells(scores: np.ndarray, labels, min_score: float | None = None) -> dict[str, int]:
    """Cells per class where it is the most probable (NaN cells and background left out)."""
    known = ~np.isnan(scores).all(axis=0)
    filled = np.where(np.isnan(scores), -np.inf, scores)
    best = filled.argmax(axis=0)
    if min_score is not None:
        known &= filled.max(axis=0) >= min_score
    skip = viewers.background_classes(labels)
    return {str(labels[k]): int((known & (best == k)).sum()) for k in range(len(labels)) if k not in skip}


def areas(features: list[dict]) -> dict[str, float]:
    result: dict[str, float] = {}
    for feature in features:
        name = feature["properties"]["classification"]["name"]
        result[name] = result.get(name, 0.0) + shape(feature["geometry"]).area
    return result


# ------------------------------------------------------------------------------------------ the polygonizer


def hand_made_map() -> np.ndarray:
    """3 classes (a, b, background) on 9×10 cells: a ring of "a" around a "b" hole, a U of "a" that only joins
    up in its bottom rows, a lone "b" cell touching the ring at a corner, and NaN cells."""
    best = np.full((9, 10), 2)
    best[1:6, 1:6] = 0          # ring of a ...
    best[2:5, 2:5] = 1          # ... around a block of b (a hole in a)
    best[0:8, 7] = 0            # U of a: left arm
    best[0:8, 9] = 0            # right arm
    best[7, 7:10] = 0           # bottom, joining the arms only in row 7
    best[6, 6] = 1              # b touching the ring's corner (5, 5) diagonally: a separate region
    scores = np.full((3, *best.shape), 0.1, dtype=np.float32)
    for k in range(3):
        scores[k][best == k] = 0.6 + 0.05 * k
    scores[:, 8, 0:3] = np.nan  # not computed
    return scores


@pytest.mark.parametrize("band_rows", [1, 2, 3, None])
def test_polygonizer_regions_and_areas_equal_the_argmax_cells_whatever_the_bands(band_rows):
    scores = hand_made_map()
    regions = list(viewers.polygonize(scores, skip={2}, band_rows=band_rows))
    best = np.where(np.isnan(scores).all(axis=0), -1, np.nan_to_num(scores, nan=-1).argmax(axis=0))
    for k in (0, 1):
        mine = [r for r in regions if r.label == k]
        _, expected = ndimage.label(best == k)  # 4-connected components
        assert len(mine) == expected
        assert sum(r.shape.area for r in mine) == pytest.approx((best == k).sum())
        assert sum(r.cells for r in mine) == (best == k).sum()
        assert all(r.shape.is_valid for r in mine)
        for region in mine:
            assert region.total / region.cells == pytest.approx(0.6 + 0.05 * k)
    (ring,) = [r for r in regions if r.label == 0 and r.shape.bounds[0] < 7]
    assert ring.shape.geom_type == "Polygon" and len(ring.shape.interiors) == 1  # the b block is a hole
    assert ring.shape.area == 16  # 5×5 minus the 3×3 hole
    u = [r for r in regions if r.label == 0 and r.shape.bounds[0] >= 7]
    assert len(u) == 1 and u[0].cells == 8 + 8 + 1  # both arms joined through row 7, across band borders


def test_polygonizer_min_score_keeps_only_confident_cells():
    scores = hand_made_map()
    regions = list(viewers.polygonize(scores, skip={2}, min_score=0.63, band_rows=2))
    assert {r.label for r in regions} == {1}  # a's 0.6 is below, b's 0.65 above
    assert sum(r.cells for r in regions) == argmax_cells(scores, ["a", "b", "background"], 0.63)["b"]


def test_geojson_places_cells_as_stride_squares_around_window_centres(tmp_path):
    scores = hand_made_map()
    attrs = {"labels": ["a", "b", "Background"], "stride": [8, 4], "offset": [2, 6], "window": [32, 16],
             "mpp": [0.5, 0.5], "downsample": [2.0, 2.0]}
    path = tmp_path / "map.geojson"
    counts = viewers.write_geojson(path, scores, attrs, band_rows=2)
    data = json.loads(path.read_text())
    assert counts == {"a": 2, "b": 2, "Background": 0}
    cells = argmax_cells(scores, attrs["labels"])
    assert areas(data["features"]) == pytest.approx({name: n * 8 * 4 for name, n in cells.items()})
    # Cell (0, 7) (a, the U's top-left) covers the 8×4 square around its window centre (2+16, 6+7·4+8).
    corner = [f for f in data["features"] if shape(f["geometry"]).bounds[0] == 6 + 7 * 4 + 8 - 2][0]
    assert shape(corner["geometry"]).bounds[1] == 2 + 16 - 4
    measured = corner["properties"]["measurements"]
    # mpp is that of the level computed at: level 0 has 0.25 µm pixels.
    assert measured["area µm^2"] == pytest.approx(measured["area px^2"] * 0.25 * 0.25)


# --------------------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory) -> Path:
    """A 2100×2300 OME slide (levels /2, 0.5 µm) computed at level 1 with every format."""
    folder = tmp_path_factory.mktemp("viewers")
    slide = write_slide(folder / "case.ome.tif", size=(2100, 2300), kind="ome", background="white", tile=256,
                        levels=2, mpp=0.5, compression="zlib", seed=3, density=0.35)
    result = heatmap(slide, "--level", "1", "--formats", ALL, "--device", "cpu", "-o", folder / "out")
    assert result.exit_code == 0, result.output
    return folder / "out"


def test_slide_geojson_is_a_qupath_feature_collection_with_areas_of_the_argmax_cells(slide_run):
    data = json.loads((slide_run / "case.geojson").read_text())
    group = zarr.open_group(str(slide_run / "case.scores.zarr"), mode="r")
    attrs = dict(group.attrs)
    assert data["type"] == "FeatureCollection" and len(data["features"]) > 3
    for feature in data["features"]:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        classification = props["classification"]
        assert classification["name"] in attrs["labels"] and classification["name"] != "background"
        assert len(classification["color"]) == 3 and all(0 <= c <= 255 for c in classification["color"])
        measured = props["measurements"]
        assert 0 < measured["mean score"] <= 1 and measured["area px^2"] > 0
        assert shape(feature["geometry"]).is_valid
    # Geometry in level-0 pixels although the map was computed at level 1.
    stride = attrs["stride"]
    assert stride == [8.0, 8.0] and attrs["downsample"] == [2.0, 2.0]
    cells = argmax_cells(group["scores"][:], attrs["labels"])
    expected = {name: n * stride[0] * stride[1] for name, n in cells.items() if n}
    assert areas(data["features"]) == pytest.approx(expected)
    bounds = np.array([shape(f["geometry"]).bounds for f in data["features"]])
    assert bounds[:, 2].max() > 1500 and bounds[:, 3].max() > 1500  # level-0 coordinates, not level 1's


def test_slide_ome_tiff_is_tiled_pyramidal_at_level0_size_with_the_pixel_size(slide_run):
    with tifffile.TiffFile(slide_run / "case.heatmap.ome.tif") as tif:
        assert tif.is_ome and tif.is_bigtiff
        series = tif.series[0]
        assert [level.shape for level in series.levels] == [(2100, 2300, 4), (1050, 1150, 4), (525, 575, 4)]
        assert all(level.keyframe.is_tiled and level.keyframe.tile == (256, 256) for level in series.levels)
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert pixels["PhysicalSizeX"] == pytest.approx(0.5) and pixels["PhysicalSizeY"] == pytest.approx(0.5)
        assert pixels["PhysicalSizeXUnit"] == "µm"
        overlay = series.levels[0].asarray()
        small = series.levels[2].asarray()
    alpha = overlay[..., 3]
    assert set(np.unique(alpha)) <= {0, 128} and (alpha == 128).mean() > 0.2
    assert (alpha == 0).mean() > 0.02  # the white background was not computed: transparent there
    assert (overlay[..., :3][alpha == 0] == 0).all()
    # The smaller level shows the same overlay: its alpha agrees with level 0's at its pixels' centres.
    assert (small[..., 3] == overlay[2::4, 2::4, 3][:525, :575]).mean() > 0.95
    # The colours are the colormap's (inferno) at the drawn class's probability.
    lut = colour_lut("inferno")
    shown = overlay[alpha > 0][:, :3]
    assert np.isin(shown.view([("", shown.dtype)] * 3), lut.copy().view([("", lut.dtype)] * 3)).all()


def test_zarr_store_carries_ome_ngff_multiscales_consistent_with_its_geometry(slide_run):
    group = zarr.open_group(str(slide_run / "case.scores.zarr"), mode="r")
    attrs = dict(group.attrs)
    ome = attrs["ome"]
    assert ome["version"] == "0.5"
    (multiscale,) = ome["multiscales"]
    axes = multiscale["axes"]
    assert [a["name"] for a in axes] == list(group["scores"].metadata.dimension_names)
    assert [a["type"] for a in axes] == ["channel", "space", "space"]
    assert axes[1]["unit"] == axes[2]["unit"] == "micrometer"
    (dataset,) = multiscale["datasets"]
    assert dataset["path"] == "scores" and "scores" in group
    scale, translation = (t[t["type"]] for t in dataset["coordinateTransformations"])
    mpp0 = 0.5  # level 0; the map was computed at level 1 (1 µm) with stride 4 there = 8 level-0 pixels
    assert scale == pytest.approx([1.0, 8 * mpp0, 8 * mpp0])
    for axis in (1, 2):
        centre = attrs["offset"][axis - 1] + attrs["window"][axis - 1] / 2  # cell 0's window centre, level 0
        assert translation[axis] == pytest.approx((centre - 0.5) * mpp0)  # pixel-centre convention
    assert translation[0] == 0


def test_outputs_are_listed_and_resume_skips_them_when_complete(slide_run, tmp_path):
    names = sorted(p.name for p in slide_run.iterdir())
    assert names == ["case.classes.png", "case.geojson", "case.heatmap.ome.tif", "case.heatmap.png",
                     "case.mask.png", "case.scores.zarr", "summary.parquet"]
    targets = expected_outputs("case", slide_run, [], ["0", "background"], "zarr", ("scores", "geojson"))
    assert list(targets) == ["geojson", "scores"]
    targets = expected_outputs("case", slide_run, [0, 1], ["0", "background"], "npz", ("ome-tiff", "scores"))
    assert [p.name for p in targets.values()] == ["case.heatmap.0.ome.tif", "case.heatmap.background.ome.tif",
                                                  "case.scores.npz"]


def test_png_image_without_previews_min_score_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    image = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (96, 120), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    result = heatmap(image, "--formats", "scores, GeoJSON,ome-tiff", "--min-score", "0.3", "--foreground", "all",
                     "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["photo.geojson", "photo.heatmap.ome.tif", "photo.scores.npz",
                                                     "summary.parquet"]
    with tifffile.TiffFile(out / "photo.heatmap.ome.tif") as tif:  # from a map held in memory; no pixel size
        assert tif.is_ome and [level.shape for level in tif.series[0].levels] == [(96, 120, 4)]
        assert "PhysicalSizeX" not in tif.ome_metadata
    with np.load(out / "photo.scores.npz") as data:
        scores, labels, stride = data["scores"], [str(v) for v in data["labels"]], data["stride"]
    data = json.loads((out / "photo.geojson").read_text())
    expected = {k: n * stride[0] * stride[1] for k, n in argmax_cells(scores, labels, 0.3).items() if n}
    assert areas(data["features"]) == pytest.approx(expected)
    assert all(f["properties"]["measurements"]["mean score"] >= 0.3 for f in data["features"])
    # --resume finds the outputs complete.
    again = heatmap(image, "--formats", "scores,geojson,ome-tiff", "--min-score", "0.3", "--foreground", "all",
                    "--device", "cpu", "-o", out, "--resume")
    assert again.exit_code == 0 and "1 skipped as complete" in again.output


@pytest.mark.parametrize("args, message", [
    (["--formats", "png,scores,kml"], "unknown format 'kml'"),
    (["--formats", "png,geojson"], "leaves out scores"),
    (["--min-score", "1.5"], "--min-score 1.5 is not between 0 and 1"),
])
def test_bad_format_options_are_one_clear_line(tmp_path, args, message):
    image = tmp_path / "x.png"
    Image.new("L", (40, 40)).save(image)
    result = heatmap(image, *args, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())
    with pytest.raises(Exception, match="did you mean geojson"):
        validate_options(HeatmapOptions(outdir=tmp_path, formats="png,scores,gejson"))


def test_stale_geojson_temporaries_are_removed_but_not_another_stems(tmp_path):
    mine = tmp_path / ".case.abcd1234.tmp.geojson"
    other = tmp_path / ".case.b.abcd1234.tmp.geojson"
    overlay = tmp_path / ".case.heatmap.ome.abcd1234.tmp.tif"
    for path in (mine, other, overlay):
        path.write_text("{}")
    outputs.remove_stale(tmp_path, "case", keep_partial=False)
    assert not mine.exists() and not overlay.exists() and other.exists()


def test_ngff_levels_are_nan_aware_2x_means_placed_on_the_cells_they_average(tmp_path):
    rng = np.random.default_rng(1)
    scores = rng.random((2, 11, 9)).astype(np.float32)
    scores[:, 0:2, 0:2] = np.nan  # a whole 2×2 block not computed
    scores[:, 4, 4] = np.nan      # one cell of a block
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    group.create_array("scores", data=scores, chunks=(2, 4, 4), dimension_names=("class", "y", "x"))
    assert viewers.write_ngff_levels(group, smallest=4) == 3
    one, two = group["scores_1"][:], group["scores_2"][:]
    assert one.shape == (2, 6, 5) and two.shape == (2, 3, 3)
    assert np.isnan(one[:, 0, 0]).all()
    np.testing.assert_allclose(one[:, 2, 2], np.nanmean(scores[:, 4:6, 4:6].reshape(2, -1), axis=1), rtol=1e-6)
    np.testing.assert_allclose(one[:, 5, 4], scores[:, 10, 8], rtol=1e-6)  # the odd edge: one cell
    np.testing.assert_allclose(two[:, 1, 1], np.nanmean(one[:, 2:4, 2:4].reshape(2, -1), axis=1), rtol=1e-6)
    attrs = {"labels": ["a", "b"], "stride": [4, 4], "offset": [0, 0], "window": [32, 32], "mpp": None,
             "downsample": [1.0, 1.0]}
    (multiscale,) = viewers.ngff_attrs(attrs, levels=3)["ome"]["multiscales"]
    assert "unit" not in multiscale["axes"][1]  # no pixel size: level-0 pixels
    for level, dataset in enumerate(multiscale["datasets"]):
        assert dataset["path"] == viewers.level_path("scores", level) and dataset["path"] in group
        scale, translation = (t[t["type"]] for t in dataset["coordinateTransformations"])
        assert scale == [1.0, 4.0 * 2**level, 4.0 * 2**level]
        # Cell 0 of level L averages cells 0 … 2^L − 1: its centre lies midway between their window centres.
        assert translation[1] == pytest.approx(16 - 0.5 + 4 * (2**level - 1) / 2)


def test_scores_levels_through_the_cli(tmp_path):
    slide = write_slide(tmp_path / "wide.ome.tif", size=(256, 4400), kind="ome", background="white", tile=128,
                        levels=2, compression="zlib", density=0.5)
    result = heatmap(slide, "--formats", "scores", "--scores-levels", "--device", "cpu", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(tmp_path / "out" / "wide.scores.zarr"), mode="r")
    assert group.attrs["complete"] is True
    assert group["scores"].shape[2] > 1024 and group["scores_1"].shape[2] == (group["scores"].shape[2] + 1) // 2
    paths = [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
    assert paths == ["scores", "scores_1"]
