"""Satellite and aerial scenes: score GeoTIFF placement, GeoJSON in map coordinates, nodata, bands and scaling."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.warp
import zarr
from affine import Affine
from heatmap_helpers import BLOB_META, converted_blob, run_images
from typer.testing import CliRunner

from fcnify.cli import app
from fcnify.errors import MissingDependencyError
from fcnify.heatmap import geo
from fcnify.heatmap.cog import write_cog
from fcnify.heatmap.sources import TiffSource

#: (crs, level-0 transform): UTM 33N at 10 m, and WGS84 at 1e-4°.
PLACES = {"utm": ("EPSG:32633", Affine(10, 0, 500000, 0, -10, 4600000)),
          "wgs84": ("EPSG:4326", Affine(1e-4, 0, 14.5, 0, -1e-4, 41.5))}
STRIDE, WINDOW = 2, 32  # the blob detector's geometry (offset 0)


def write_scene(path: Path, bands: np.ndarray, place: str = "utm", nodata=None) -> Path:
    crs, transform = PLACES[place]
    count, height, width = bands.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count, dtype=bands.dtype,
                       crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=64,
                       blockysize=64) as dst:
        dst.write(bands)
    return path


def disc_scene(centre=(76.0, 96.0), size=(160, 192), count=4, value=4000) -> np.ndarray:
    """uint16 bands of noise; band 3 is 100 with one bright disc at ``centre`` (pixel-edge coordinates)."""
    rng = np.random.default_rng(0)
    bands = rng.integers(50, 3000, size=(count, *size), dtype=np.uint16)
    yy, xx = np.mgrid[0:size[0], 0:size[1]] + 0.5
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 9.0
    bands[2] = np.where(disc, value, 100).astype(np.uint16)
    return bands


def run_scene(path, outdir, **options):
    fcn = converted_blob()
    rows = run_images([path], outdir, meta=BLOB_META, fcn=fcn, **options)
    assert rows[0].status == "ok", rows[0].error
    return rows[0]


@pytest.mark.parametrize("place", ["utm", "wgs84"])
def test_cog_places_each_cell_on_its_window_centre(tmp_path, place):
    i0, j0 = 30, 40  # the disc sits on this cell's window centre
    centre = (i0 * STRIDE + WINDOW / 2, j0 * STRIDE + WINDOW / 2)
    path = write_scene(tmp_path / "scene.tif", disc_scene(centre), place)
    run_scene(path, tmp_path / "out", bands=(3,), scale_range=(0, 4000), scores="zarr")
    crs, transform = PLACES[place]
    x_map, y_map = transform @ (centre[1], centre[0])
    with rasterio.open(tmp_path / "out" / "scene.scores.tif") as cog:
        assert cog.crs == rasterio.crs.CRS.from_string(crs)
        assert cog.count == 2 and cog.descriptions == ("none", "blob") and cog.dtypes[0] == "float32"
        assert cog.block_shapes[0] == (256, 256) or cog.profile["tiled"]
        assert cog.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert cog.compression is not None
        blob = cog.read(2)
        row, col = np.unravel_index(np.nanargmax(blob), blob.shape)
        assert (row, col) == (i0, j0)
        x_cell, y_cell = cog.xy(row, col)  # the pixel's centre
        half = STRIDE / 2 * abs(transform.a)
        assert abs(x_cell - x_map) <= half * 1e-6 + 1e-9 and abs(y_cell - y_map) <= half * 1e-6 + 1e-9
        assert cog.index(x_map, y_map) == (i0, j0)
        scores = zarr.open_group(str(tmp_path / "out" / "scene.scores.zarr"), mode="r")
        np.testing.assert_array_equal(cog.read(), np.asarray(scores["scores"]))
        attrs = scores.attrs
        assert attrs["geo"]["crs"] == crs
        np.testing.assert_allclose(attrs["geo"]["cell_transform"], tuple(cog.transform)[:6], rtol=1e-12)
        np.testing.assert_allclose(attrs["geo"]["cell_geotransform"], cog.transform.to_gdal(), rtol=1e-12)
        assert attrs["reading"]["bands"] == [3]
        assert attrs["reading"]["scaling"] == {"rule": "scale-range", "ranges": [[0.0, 4000.0]]}


@pytest.mark.parametrize("target", ["wgs84", "source"])
def test_geojson_coordinates_are_the_transformed_pixel_polygons(tmp_path, target):
    bands = disc_scene((76.0, 96.0))
    path = write_scene(tmp_path / "scene.tif", bands, "utm")
    plain = tmp_path / "plain" / "scene.tif"  # the same band, without georeferencing: pixel coordinates
    plain.parent.mkdir()
    import tifffile

    tifffile.imwrite(plain, ((bands[2].astype(np.float64) / 4000 * 255).round()).astype(np.uint8))
    run_scene(path, tmp_path / "geo", bands=(3,), scale_range=(0, 4000), formats="png,scores,geojson",
              geojson_crs=target, foreground="all")
    run_scene(plain, tmp_path / "px", formats="png,scores,geojson", foreground="all")
    mapped = json.loads((tmp_path / "geo" / "scene.geojson").read_text())
    pixels = json.loads((tmp_path / "px" / "scene.geojson").read_text())
    assert "crs" not in pixels and len(mapped["features"]) == len(pixels["features"]) >= 1
    crs, transform = PLACES["utm"]
    expected_name = "urn:ogc:def:crs:OGC:1.3:CRS84" if target == "wgs84" else "urn:ogc:def:crs:EPSG::32633"
    assert mapped["crs"]["properties"]["name"] == expected_name
    for got, ref in zip(mapped["features"], pixels["features"], strict=True):
        ring = np.asarray(ref["geometry"]["coordinates"][0], dtype=np.float64)
        xs, ys = transform @ (ring[:, 0], ring[:, 1])
        if target == "wgs84":
            xs, ys = rasterio.warp.transform(crs, "EPSG:4326", list(xs), list(ys))
        np.testing.assert_allclose(np.asarray(got["geometry"]["coordinates"][0]), np.column_stack((xs, ys)),
                                   rtol=1e-12, atol=1e-9)
        assert got["properties"]["classification"] == ref["properties"]["classification"]


def test_nodata_is_nan_in_the_scores_and_the_cog(tmp_path):
    bands = disc_scene((76.0, 136.0))
    bands[:, :, :64] = 0  # nodata in every band: the scene's left border
    path = write_scene(tmp_path / "scene.tif", bands, "utm", nodata=0)
    run_scene(path, tmp_path / "out", bands=(3,), scale_range=(0, 4000), scores="npz")
    with np.load(tmp_path / "out" / "scene.scores.npz") as data:
        scores = data["scores"]
        attrs = json.loads(str(data["attributes"]))
    assert attrs["foreground"]["kind"] == "nodata"
    assert attrs["reading"]["nodata"] == 0.0
    cols = np.arange(scores.shape[2])
    outside = cols * STRIDE + WINDOW <= 56  # windows wholly in nodata, with the mask's one-pixel (4 px) margin
    inside = cols * STRIDE >= 64
    assert np.isnan(scores[:, :, outside]).all()
    assert np.isfinite(scores[:, :, inside]).all()
    with rasterio.open(tmp_path / "out" / "scene.scores.tif") as cog:
        assert np.isnan(cog.nodata)
        values = cog.read()
        np.testing.assert_array_equal(np.isnan(values), np.isnan(scores))
        assert (cog.read_masks(1)[:, outside] == 0).all() and (cog.read_masks(1)[:, inside] == 255).all()


def test_uint16_scenes_are_scaled_by_percentiles_and_it_is_recorded(tmp_path):
    bands = disc_scene(count=3)
    path = write_scene(tmp_path / "scene.tif", bands, "wgs84")
    fcn = converted_blob()
    rows = run_images([path], tmp_path / "out", meta=BLOB_META, fcn=fcn, scores="zarr")  # 3 bands → luma
    assert rows[0].status == "ok", rows[0].error
    reading = zarr.open_group(str(tmp_path / "out" / "scene.scores.zarr"), mode="r").attrs["reading"]
    assert reading["bands"] == [1, 2, 3] and reading["dtype"] == "uint16"
    assert reading["scaling"]["rule"] == "percentiles 2-98"
    expected = [[float(v) for v in np.percentile(b, (2, 98))] for b in bands]  # the whole scene is its thumbnail
    expected = [[lo, hi if hi > lo else lo + 1] for lo, hi in expected]
    np.testing.assert_allclose(reading["scaling"]["ranges"], expected, rtol=1e-12)
    with geo.GeoSource(str(path)) as source:  # what the model saw: the stated rule, applied
        lo, hi = expected[0]
        got = source.read_region(0, 10, 20, 4, 5)[..., 0]
        want = np.clip(np.rint((bands[0, 10:14, 20:25].astype(np.float32) - lo) * (255 / (hi - lo))), 0, 255)
        np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_band_count_mismatch_is_one_line(tmp_path):
    path = write_scene(tmp_path / "scene.tif", disc_scene(), "utm")
    result = CliRunner().invoke(app, ["heatmap", str(path), "--bands", "1,2", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--bands gives 2 bands but the model takes 1" in lines[0], result.output
    bad = CliRunner().invoke(app, ["heatmap", str(path), "--bands", "7", "-o", str(tmp_path / "out")])
    assert bad.exit_code == 1 and "no band 7" in bad.output and "Traceback" not in bad.output


def test_write_cog_has_overviews_and_keeps_values(tmp_path):
    rng = np.random.default_rng(1)
    scores = rng.random((3, 300, 280)).astype(np.float32)
    scores[:, :40, :] = np.nan
    attrs = {"labels": ["a", "b", "c"], "stride": [4, 4], "offset": [0, 0], "window": [32, 32]}
    georef = geo.GeoReference("", "EPSG:32633", tuple(PLACES["utm"][1])[:6])
    georef = geo.GeoReference(rasterio.crs.CRS.from_epsg(32633).to_wkt(), "EPSG:32633", georef.transform)
    write_cog(tmp_path / "s.tif", scores, attrs, georef, block=64)
    with rasterio.open(tmp_path / "s.tif") as cog:
        assert cog.overviews(1) and cog.block_shapes[0] == (64, 64)
        np.testing.assert_array_equal(cog.read(), scores)
        # cell (0, 0)'s centre: window centre (16, 16) px → 500160 E, 4599840 N
        assert cog.xy(0, 0) == pytest.approx((500160.0, 4599840.0))
    assert not [p for p in tmp_path.iterdir() if p.name != "s.tif"]  # no staging file left


def test_without_rasterio_a_geotiff_reads_in_pixels_and_bands_name_the_extra(tmp_path, monkeypatch):
    path = write_scene(tmp_path / "scene.tif", disc_scene(count=3).astype(np.uint8), "utm")
    monkeypatch.setitem(sys.modules, "rasterio", None)  # import rasterio now fails as if it were not installed
    source = geo.open_source(path)
    assert isinstance(source, TiffSource)
    source.close()
    with pytest.raises(MissingDependencyError) as info:
        geo.open_source(path, bands=(1,))
    assert info.value.hint == "pip install 'fcnify[geo]'"


def test_geotiff_format_needs_a_crs(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((64, 64), np.uint8))
    rows = run_images([tmp_path / "plain.tif"], tmp_path / "out", meta=BLOB_META, fcn=converted_blob(),
                      formats="png,scores,geotiff")
    assert rows[0].status == "error" and "has no CRS" in rows[0].error
