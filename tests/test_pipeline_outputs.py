"""fcnify.heatmap.pipeline: one image end to end (source → plan → compute → sinks) with real converted networks
and real files: names, the score file's keys and geometry, previews, failures and option checks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from heatmap_helpers import (
    BLOB_META,
    LABELS,
    SMALL_META,
    blob_scene,
    converted_blob,
    converted_small,
    noise_image,
    run_images,
    save,
    split_heatmap,
)
from PIL import Image

from fcnify.errors import InputError, OutputError
from fcnify.heatmap.job import ImageJob, resolve_classes
from fcnify.heatmap.legend import legend_height
from fcnify.heatmap.options import HeatmapOptions, validate_options
from fcnify.heatmap.outputs import output_stems
from fcnify.heatmap.pipeline import run_image
from fcnify.heatmap.render import upsample_to_image
from fcnify.heatmap.runners import run_job

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
NPZ_KEYS = {"scores", "logits", "labels", "stride", "offset", "window", "image_size", "level", "downsample", "mpp",
            "attributes", "summary"}


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden temporaries included)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ classes


def test_resolve_classes_by_name_index_and_case():
    assert resolve_classes(["class3", "10", 2, "BACKGROUND", "class3"], LABELS) == [3, 10, 2]
    assert resolve_classes([], LABELS) == []
    digits = tuple(str(i) for i in range(10)) + ("background",)
    assert resolve_classes(["7"], digits) == [7]  # a name that is also an index: the name


def test_unknown_class_lists_valid_names():
    with pytest.raises(InputError, match="unknown class 'clas3'") as info:
        resolve_classes(["clas3"], LABELS)
    assert "class3" in info.value.hint and "0–10" in info.value.hint
    with pytest.raises(InputError):
        resolve_classes(["11"], LABELS)


def test_output_stems(tmp_path):
    a, b, c = tmp_path / "in" / "a" / "photo.png", tmp_path / "in" / "b" / "photo.jpg", tmp_path / "in" / "other.png"
    assert output_stems([a, b, c]) == ["a/photo", "b/photo", "other"]
    assert output_stems([a, a]) == ["photo", "photo-2"]
    assert output_stems([tmp_path / "case.ome.tif", tmp_path / "x.svs"]) == ["case", "x"]
    # A URI's folders come from its bucket and key, not from the working directory.
    assert output_stems(["s3://bucket/a/x.png", "s3://bucket/b/x.png"]) == ["a/x", "b/x"]


# ------------------------------------------------------------------------------------------------ writing


def test_outputs_round_trip(tmp_path):
    image_path = save(noise_image(size=(48, 64)), tmp_path / "in" / "scene.png")
    row = run_images([image_path], tmp_path / "out", top_k=3)[0]
    assert row.status == "ok" and row.error is None and not row.skipped
    assert row.image_size == (48, 64) and row.map_size == (9, 17) and not row.padded
    assert (row.level, row.downsample, row.mpp, row.scores_format) == (0, 1.0, None, "npz")
    assert (row.tiles, row.tiles_computed, row.tiles_background, row.tiles_resumed) == (1, 1, 0, 0)
    assert len(row.top) == 3 and row.top[0].score >= row.top[1].score >= row.top[2].score
    assert _files(tmp_path / "out") == ["scene.classes.png", "scene.heatmap.png", "scene.scores.npz"]
    assert sorted(Path(p).name for p in row.outputs) == _files(tmp_path / "out")

    with Image.open(tmp_path / "out" / "scene.heatmap.png") as heat:
        assert heat.size == (64, 48 + legend_height(64)) and heat.mode == "RGB"  # the legend strip below
    with Image.open(tmp_path / "out" / "scene.classes.png") as fig:
        assert fig.format == "PNG"
    with np.load(tmp_path / "out" / "scene.scores.npz", allow_pickle=False) as data:
        assert NPZ_KEYS <= set(data.files)
        scores, logits = data["scores"], data["logits"]
        assert scores.dtype == np.float32 and scores.shape == (11, 9, 17)
        assert logits.dtype == np.float32 and logits.shape == (11, 9, 17)
        assert data["labels"].dtype.kind == "U" and tuple(data["labels"]) == LABELS
        for key, value in (("stride", [2, 2]), ("offset", [0, 0]), ("window", [32, 32])):
            assert data[key].dtype == np.int64 and data[key].tolist() == value
        assert data["image_size"].tolist() == [48, 64]
        assert int(data["level"]) == 0 and data["downsample"].tolist() == [1.0, 1.0]
        assert np.isnan(data["mpp"]).all()  # a PNG records no pixel size
        np.testing.assert_allclose(scores.sum(0), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.exp(logits), scores, rtol=1e-5, atol=1e-7)  # logits: log-probabilities
        attributes = json.loads(str(data["attributes"]))
        summary = json.loads(str(data["summary"]))
        best = scores.reshape(11, -1).max(1)
    assert attributes["labels"] == list(LABELS) and attributes["stride"] == [2, 2]
    assert attributes["image_size"] == [48, 64] and attributes["map_size"] == [9, 17]
    assert attributes["receptive_field"] == [32, 32] and attributes["exact"] is True
    assert attributes["preprocessing"] == {"mean": [0.5], "std": [0.25]}
    assert summary["tiles"] == {"total": 1, "computed": 1}
    assert [p["label"] for p in summary["peaks"]] == [p.label for p in row.top]
    assert int(best.argmax()) == row.top[0].index and best.max() == pytest.approx(row.top[0].score, abs=1e-6)
    # The peak's window centre (level-0 pixels) is that of the cell holding the maximum.
    i, j = divmod(int(scores[row.top[0].index].argmax()), 17)
    assert (row.top[0].y, row.top[0].x) == (2 * i + 16, 2 * j + 16)


def test_every_npz_key_loads_without_pickle(tmp_path):
    from fcnify.heatmap.sinks import open_scores

    image_path = save(noise_image(size=(48, 64)), tmp_path / "x.png")
    assert run_images([image_path], tmp_path / "out", top_k=1)[0].status == "ok"
    with np.load(tmp_path / "out" / "x.scores.npz", allow_pickle=False) as data:
        for key in data.files:
            assert data[key].dtype != object, key
    scores, attrs = open_scores(tmp_path / "out" / "x.scores.npz")
    assert scores.shape == (11, 9, 17) and attrs["image_size"] == [48, 64]


def test_a_network_with_batch_norm_runs(tmp_path):
    import torch
    from torch import nn

    from fcnify.convert import convert

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 11))
    fcn = convert(net.eval(), 32, in_chans=1)
    image_path = save(noise_image(size=(48, 64)), tmp_path / "x.png")
    row = run_images([image_path], tmp_path / "out", fcn=fcn, top_k=1)[0]
    assert row.status == "ok" and row.map_size == (17, 33)


def test_scaled_geometry_is_float_in_original_pixels(tmp_path):
    image_path = save(noise_image(size=(96, 128)), tmp_path / "big.png")
    row = run_images([image_path], tmp_path / "out", scale=0.5, top_k=1)[0]
    assert row.status == "ok" and row.map_size == (9, 17) and row.image_size == (96, 128)
    assert row.downsample == 2.0 and row.megapixels == pytest.approx(48 * 64 / 1e6)
    with np.load(tmp_path / "out" / "big.scores.npz") as data:
        assert data["stride"].dtype == np.float64 and data["stride"].tolist() == [4.0, 4.0]
        assert data["window"].tolist() == [64.0, 64.0] and data["offset"].tolist() == [0.0, 0.0]
        assert data["image_size"].tolist() == [96, 128] and data["downsample"].tolist() == [2.0, 2.0]
    # Peaks are window centres in original pixels: offset + cell · 4 + 32.
    assert all((p.y - 32) % 4 == 0 and (p.x - 32) % 4 == 0 for p in row.top)


def test_scaled_heatmap_has_the_input_size(tmp_path):
    image_path = save(noise_image(size=(96, 128)), tmp_path / "big.png")
    assert run_images([image_path], tmp_path / "out", scale=0.5, top_k=1)[0].status == "ok"
    overlay, _ = split_heatmap(tmp_path / "out" / "big.heatmap.png")
    assert overlay.shape == (96, 128, 3)


def test_several_classes_give_one_heatmap_each(tmp_path):
    image_path = save(noise_image(), tmp_path / "x.png")
    row = run_images([image_path], tmp_path / "out", classes=("class1", "10"), top_k=1)[0]
    assert row.status == "ok"
    assert _files(tmp_path / "out") == ["x.classes.png", "x.heatmap.background.png", "x.heatmap.class1.png",
                                        "x.scores.npz"]
    with np.load(tmp_path / "out" / "x.scores.npz") as data:
        scores = data["scores"]
    # Each heatmap draws its own class: opaque grey, the class's map resampled to the image (cell-centred).
    run_images([image_path], tmp_path / "grey", classes=("class1", "10"), top_k=1, cmap="gray", alpha=1.0)
    geometry = SimpleNamespace(stride=(2, 2), offset=(0, 0), window=(32, 32))
    for k, name in ((1, "class1"), (10, "background")):
        heat = split_heatmap(tmp_path / "grey" / f"x.heatmap.{name}.png", "L")[0].astype(float)
        expected = upsample_to_image(scores[k], geometry, (48, 64)) * 255
        assert np.abs(heat - expected).max() <= 1.5, name


def test_small_image_is_padded_and_reported(tmp_path):
    image_path = save(noise_image(size=(20, 50)), tmp_path / "small.png")
    row = run_images([image_path], tmp_path / "out", top_k=1)[0]
    assert row.status == "ok" and row.padded and row.map_size == (1, 10) and row.image_size == (20, 50)
    assert split_heatmap(tmp_path / "out" / "small.heatmap.png")[0].shape == (20, 50, 3)
    with np.load(tmp_path / "out" / "small.scores.npz") as data:
        assert data["scores"].shape == (11, 1, 10) and data["image_size"].tolist() == [20, 50]


@pytest.mark.parametrize("scale, scene, centre", [(1.0, (80, 96), (45, 30)), (0.5, (160, 160), (83, 70))])
def test_heatmap_brightest_pixel_is_at_the_blob(tmp_path, scale, scene, centre):
    """Alignment: the blob detector's heatmap (grey colormap, opaque) is brightest within one stride of the
    blob, in original pixels (the heatmap's pixels mapped back to the input's)."""
    image_path = save(Image.fromarray(blob_scene(size=scene, centre=centre)), tmp_path / "blob.png")
    row = run_images([image_path], tmp_path / "out", meta=BLOB_META, fcn=converted_blob(), classes=("blob",),
                     cmap="gray", alpha=1.0, scale=scale, foreground="all", top_k=1)[0]
    assert row.status == "ok"
    stride = 2 / scale
    heat = split_heatmap(tmp_path / "out" / "blob.heatmap.png", "L")[0].astype(int)
    factor = (scene[0] / heat.shape[0], scene[1] / heat.shape[1])  # input pixels per heatmap pixel
    if scale == 1.0:
        assert heat.shape == scene
    ys, xs = np.nonzero(heat == heat.max())
    assert np.all(np.abs((ys + 0.5) * factor[0] - centre[0]) <= stride)
    assert np.all(np.abs((xs + 0.5) * factor[1] - centre[1]) <= stride)
    peak = next(p for p in row.top if p.label == "blob")
    assert peak.score > 0.9
    assert abs(peak.y - centre[0]) <= stride and abs(peak.x - centre[1]) <= stride


def test_black_background_is_nan_with_auto_and_background_with_all(tmp_path):
    """The digits scenes are white digits on black: ``--foreground auto`` (the default) leaves the empty
    corner's cells NaN and writes the mask; ``all`` computes them, and the model calls them background."""
    from fcnify.convert import convert
    from fcnify.models import load_model

    loaded = load_model("digits")
    fcn = convert(loaded.module, tuple(loaded.input_size), in_chans=loaded.in_chans)
    scene = SAMPLES / "digits_scene_1.png"
    assert np.asarray(Image.open(scene))[:20, :20].max() <= 40  # the top-left corner holds no digit
    maps = {}
    for mode in ("auto", "all"):
        job = ImageJob(fcn, fcn.geometry, loaded, HeatmapOptions(outdir=tmp_path / mode, device="cpu", top_k=1,
                                                                  foreground=mode))
        row = run_image(str(scene), "scene", job)
        assert row.status == "ok", row.error
        with np.load(tmp_path / mode / "scene.scores.npz") as data:
            maps[mode] = data["scores"]
        assert maps[mode].shape == (11, 33, 49)
    auto, full = maps["auto"], maps["all"]
    background = loaded.labels.index("background")
    assert np.isnan(auto[:, 0, 0]).all()  # the empty corner: not computed
    assert full[background, 0, 0] > 0.99 and np.isfinite(full).all()
    computed = ~np.isnan(auto[0])
    assert 0.2 < computed.mean() < 0.9  # the digits' cells are computed, and only they
    np.testing.assert_allclose(auto[:, computed], full[:, computed], rtol=1e-5, atol=1e-6)
    assert np.isnan(auto[:, ~computed]).all()
    with Image.open(tmp_path / "auto" / "scene.mask.png") as mask:
        assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert not (tmp_path / "all" / "scene.mask.png").exists()


def test_tiles_progress_and_the_one_tile_map_agree(tmp_path):
    """--tile 40 cuts the 9×17 map into 5×5-cell tiles: progress counts them one by one, and the map equals the
    one-tile run's."""
    image_path = save(noise_image(size=(48, 64), seed=4), tmp_path / "x.png")
    whole = run_images([image_path], tmp_path / "whole", top_k=1)[0]
    states = []
    row = run_images([image_path], tmp_path / "tiled", top_k=1, tile=40, batch_size=3,
                     progress=lambda s: states.append((s.finished, s.total, s.todo, s.runtime)))[0]
    assert whole.tiles == 1 and (row.tiles, row.tiles_computed, row.tiles_background) == (2 * 4, 8, 0)
    assert states == [(n, 8, 8, "torch") for n in range(9)]
    with np.load(tmp_path / "whole" / "x.scores.npz") as a, np.load(tmp_path / "tiled" / "x.scores.npz") as b:
        np.testing.assert_allclose(b["scores"], a["scores"], rtol=1e-5, atol=1e-7)
        assert json.loads(str(b["summary"]))["tiles"] == {"total": 8, "computed": 8}
    assert [(p.index, p.y, p.x) for p in row.top] == [(p.index, p.y, p.x) for p in whole.top]


def test_existing_outputs_without_overwrite(tmp_path):
    image_path = save(noise_image(), tmp_path / "x.png")
    run_images([image_path], tmp_path / "out", top_k=1)
    before = {p: (tmp_path / "out" / p).read_bytes() for p in _files(tmp_path / "out")}
    row = run_images([image_path], tmp_path / "out", overwrite=False, top_k=1)[0]
    assert row.status == "error" and "already exists" in row.error and "--force" in row.error
    assert {p: (tmp_path / "out" / p).read_bytes() for p in _files(tmp_path / "out")} == before


def _no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["numpy.savez_compressed", "fcnify.heatmap.finish.classes_figure"])
def test_a_failure_mid_image_leaves_no_file(tmp_path, monkeypatch, where):
    """A write failing after the heatmap (the figure or the score file) is the image's error row; the files
    already written to temporaries are removed, and earlier outputs stay as they were."""
    image_path = save(noise_image(), tmp_path / "x.png")
    other = save(noise_image(seed=5), tmp_path / "y.png")
    run_images([other], tmp_path / "out", top_k=1)
    before = {p: (tmp_path / "out" / p).read_bytes() for p in _files(tmp_path / "out")}
    monkeypatch.setattr(where, _no_space)
    rows = run_images([image_path, other], tmp_path / "out", top_k=1)
    assert [r.status for r in rows] == ["error", "error"]
    assert "No space left" in rows[0].error and "cannot write" in rows[0].error
    assert _files(tmp_path / "out") == sorted(before)  # no x.* and no temporaries
    assert {p: (tmp_path / "out" / p).read_bytes() for p in before} == before


# ------------------------------------------------------------------------------------------- colour ranges


def _expected_overlay(image_path: Path, scores: np.ndarray, lo: float, hi: float, cmap: str, alpha: float):
    """What the overlay should be: lut[(p - lo) / (hi - lo)] blended with alpha over the image, p the map
    resampled to the image (cell-centred)."""
    from fcnify.heatmap.previews import colour_lut

    geometry = SimpleNamespace(stride=(2, 2), offset=(0, 0), window=(32, 32))
    rgb = np.asarray(Image.open(image_path).convert("RGB")).astype(np.float64)
    p = upsample_to_image(scores, geometry, rgb.shape[:2])
    index = np.round(np.clip((p - lo) / (hi - lo), 0, 1) * 255).astype(int)
    return (1 - alpha) * rgb + alpha * colour_lut(cmap)[index].astype(np.float64)


def test_vmin_vmax_colour_the_overlay_as_stated(tmp_path):
    """--vmin/--vmax: a pixel of probability p is coloured lut[(p - vmin) / (vmax - vmin)] blended with alpha;
    the legend strip is below the overlay, which is the image's size."""
    image_path = save(noise_image(size=(48, 64), mode="RGB", seed=7), tmp_path / "x.png")
    row = run_images([image_path], tmp_path / "out", classes=("class1",), cmap="viridis", alpha=0.5, vmin=0.05,
                     vmax=0.12, top_k=1)[0]
    assert row.status == "ok", row.error
    with np.load(tmp_path / "out" / "x.scores.npz") as data:
        scores = data["scores"][1]
    assert scores.min() < 0.12 and scores.max() > 0.05  # the range cuts through this map
    overlay, legend = split_heatmap(tmp_path / "out" / "x.heatmap.png")
    assert overlay.shape == (48, 64, 3) and legend.shape == (legend_height(64), 64, 3)
    expected = _expected_overlay(image_path, scores, 0.05, 0.12, "viridis", 0.5)
    diff = np.abs(overlay.astype(np.float64) - expected)
    assert diff.max() <= 3 and diff.mean() <= 0.5  # a neighbouring table entry at most, where p is a tie
    default = run_images([image_path], tmp_path / "plain", classes=("class1",), cmap="viridis", alpha=0.5,
                         top_k=1)[0]
    assert default.status == "ok"
    plain = split_heatmap(tmp_path / "plain" / "x.heatmap.png")[0]
    assert np.abs(plain - _expected_overlay(image_path, scores, 0.0, 1.0, "viridis", 0.5)).max() <= 3
    assert np.abs(plain.astype(int) - overlay).max() > 20  # the range really changed the colours


def test_normalize_uses_each_maps_own_min_and_max_tracked_tile_by_tile(tmp_path):
    """--normalize (grey, opaque): the overlay is (p - min) / (max - min) of the class's computed cells, with
    min and max tracked per tile (--tile 40: 8 tiles) equal to the whole map's."""
    image_path = save(noise_image(size=(48, 64), seed=4), tmp_path / "x.png")
    row = run_images([image_path], tmp_path / "out", classes=("class1", "background"), cmap="gray", alpha=1.0,
                     normalize=True, tile=40, top_k=2)[0]
    assert row.status == "ok" and row.tiles == 8
    with np.load(tmp_path / "out" / "x.scores.npz") as data:
        scores = data["scores"]
    for k, name in ((1, "class1"), (10, "background")):
        overlay, _ = split_heatmap(tmp_path / "out" / f"x.heatmap.{name}.png")
        lo, hi = float(np.nanmin(scores[k])), float(np.nanmax(scores[k]))
        assert hi - lo < 0.5  # a weak map: 0–1 would leave it nearly flat
        expected = _expected_overlay(image_path, scores[k], lo, hi, "gray", 1.0)
        assert np.abs(overlay - expected).max() <= 1.5, name
        # Most of the colormap is used (pixels fall between cell centres, so not quite its ends).
        assert int(overlay.max()) - int(overlay.min()) > 150 > 255 * (hi - lo)


def test_peak_tracker_minima_ignore_nan_and_follow_every_tile():
    from fcnify.heatmap.compute import PeakTracker

    tracker = PeakTracker(2)
    assert np.isposinf(tracker.minima).all()
    block = np.array([[[0.5, np.nan], [0.2, 0.9]], [[np.nan, np.nan], [np.nan, np.nan]]], np.float32)
    tracker.update(block, 0, 0)
    assert tracker.minima[0] == pytest.approx(0.2) and np.isposinf(tracker.minima[1])  # no computed cell
    tracker.update(np.array([[[0.1]], [[0.7]]], np.float32), 5, 5)
    assert tracker.minima.tolist() == pytest.approx([0.1, 0.7]) and tracker.values.tolist() == pytest.approx([0.9, 0.7])


def test_peak_trackers_of_tiles_merge_into_the_whole_maps_tracker():
    """What the Ray engine does with the peaks its workers report tile by tile: the same peaks, cells (first in
    row-major order on ties), and minima as one tracker fed every tile."""
    from fcnify.heatmap.compute import PeakTracker

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(3, 12, 10)).astype(np.float32) / 4  # many ties
    scores[:, :4, :5] = np.nan  # a tile of background
    scores[2] = np.nan  # a class never computed
    whole, merged = PeakTracker(3), PeakTracker(3)
    tiles = [(r, c) for r in range(0, 12, 4) for c in range(0, 10, 5)]
    for r, c in tiles:
        whole.update(scores[:, r:r + 4, c:c + 5], r, c)
    for r, c in reversed(tiles):  # workers report in any order
        part = PeakTracker(3)
        part.update(scores[:, r:r + 4, c:c + 5], r, c)
        merged.merge(part)
    np.testing.assert_array_equal(merged.values, whole.values)
    np.testing.assert_array_equal(merged.cells[:2], whole.cells[:2])
    np.testing.assert_array_equal(merged.minima, whole.minima)
    assert merged.top(3) == whole.top(3) == [0, 1]


@pytest.mark.parametrize("size", [(20, 50), (28, 28)])
def test_tiny_and_padded_images_classes_png_fill_their_panels(tmp_path, monkeypatch, size):
    """A 20×50 image and a 28×28 one (the window is 32: both padded): classes.png is written, and in its figure
    every picture's extent equals its axes' limits and the axes box has the picture's aspect."""
    import fcnify.heatmap.finish as finish

    figures = []

    def keep(*args, **kwargs):
        figures.append(pipeline_figure(*args, **kwargs))
        return figures[-1]

    pipeline_figure = finish.classes_figure
    monkeypatch.setattr(finish, "classes_figure", keep)
    image_path = save(noise_image(size=size), tmp_path / "tiny.png")
    row = run_images([image_path], tmp_path / "out", top_k=2)[0]
    assert row.status == "ok" and row.padded
    with Image.open(tmp_path / "out" / "tiny.classes.png") as png:
        assert png.format == "PNG"
    fig, = figures
    pictures = [ax for ax in fig.axes if ax.images]
    assert len(pictures) == 3
    for ax in pictures:
        left, right, bottom, top = ax.images[0].get_extent()
        assert (left, right) == ax.get_xlim() == (-0.5, size[1] - 0.5)
        assert (bottom, top) == ax.get_ylim() == (size[0] - 0.5, -0.5)
        box = ax.get_window_extent()
        assert box.height / box.width == pytest.approx(size[0] / size[1], rel=0.02)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("flags, fragment", [
    (["--vmin", "0.5", "--vmax", "0.2"], "--vmin 0.5 is not below --vmax 0.2"),
    (["--vmax", "2"], "--vmax 2.0 is not between 0 and 1"),
    (["--normalize", "--vmin", "0.1"], "--normalize and --vmin/--vmax both given"),
])
def test_cli_refuses_bad_colour_ranges_in_one_line(tmp_path, flags, fragment):
    from typer.testing import CliRunner

    from fcnify.cli import app

    result = CliRunner().invoke(app, ["heatmap", str(SAMPLES / "digits_scene_1.png"), "-o", str(tmp_path / "o"),
                                      *flags])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and fragment in result.output and "hint:" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()


def test_cli_passes_the_colour_range_through(tmp_path):
    from typer.testing import CliRunner

    from fcnify.cli import app

    scene = SAMPLES / "digits_scene_1.png"
    result = CliRunner().invoke(app, ["heatmap", str(scene), "-o", str(tmp_path / "o"), "--class", "3", "--cmap",
                                      "gray", "--alpha", "1", "--vmax", "0.001", "--json"])
    assert result.exit_code == 0, result.output
    overlay, _ = split_heatmap(tmp_path / "o" / "digits_scene_1.heatmap.png", "L")
    with np.load(tmp_path / "o" / "digits_scene_1.scores.npz") as data:
        three = data["scores"][list(data["labels"]).index("3")]
    computed = upsample_to_image(np.nan_to_num(three, nan=-1.0), SimpleNamespace(
        stride=(4, 4), offset=(0, 0), window=(32, 32)), overlay.shape)
    # Everything above 0.001 is white; the probability-0–1 map would be nearly black on most digits.
    assert (overlay[computed > 0.002] == 255).all() and (computed > 0.002).sum() > 100


# -------------------------------------------------------------------------------------------------- loop


def test_bad_and_good_images_in_one_run(tmp_path):
    inputs = tmp_path / "in"
    good = save(noise_image(), inputs / "good.png")
    empty = inputs / "empty.png"
    empty.write_bytes(b"")
    text = inputs / "notes.txt"
    text.write_text("hello")
    corrupt = inputs / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff" + os.urandom(300))
    big = save(noise_image(size=(300, 300), seed=3), inputs / "big.png")
    paths = [empty, good, text, tmp_path / "missing.png", corrupt, big]
    states, finished = [], []
    rows = run_images(paths, tmp_path / "out", max_pixels=50_000, top_k=1,
                      progress=lambda s: states.append((s.path, s.finished, s.total)), finished=finished.append)
    assert [r.status for r in rows] == ["error", "ok", "error", "error", "error", "error"]
    assert finished == rows and [r.path for r in rows] == [str(p) for p in paths]
    # Tile progress only for the image that was computed: from none to all of its one tile.
    assert {s[0] for s in states} == {os.path.abspath(good)}
    assert states[0][1:] == (0, 1) and states[-1][1:] == (1, 1)
    assert "empty" in rows[0].error and "not an image format" in rows[2].error
    assert "no such image" in rows[3].error and ("corrupt" in rows[4].error or "truncated" in rows[4].error)
    assert "--max-pixels" in rows[5].error
    assert all(r.image_size is None and r.outputs == () for r in rows if r.status == "error")
    assert _files(tmp_path / "out") == ["good.classes.png", "good.heatmap.png", "good.scores.npz"]
    assert rows[1].to_dict()["top"][0]["label"] in LABELS


def test_a_batch_goes_on_past_a_bad_input_and_reports_it(tmp_path):
    """``runners.run_job`` (the local engine): the bad input is a failed row, the rest are written."""
    a = save(noise_image(seed=1), tmp_path / "a.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    b = save(noise_image(seed=2), tmp_path / "b.png")
    fcn = converted_small()
    result = run_job([a, bad, b], fcn, fcn.geometry, SMALL_META,
                     HeatmapOptions(outdir=tmp_path / "out", device="cpu", top_k=1))
    assert [r.status for r in result.rows] == ["ok", "error", "ok"]
    assert [r.path for r in result.failed] == [str(bad)] and str(bad) in result.failed[0].error
    assert result.engine == "local" and result.processed == 3 and result.summary == tmp_path / "out" / "summary.parquet"
    assert _files(tmp_path / "out") == ["a.classes.png", "a.heatmap.png", "a.scores.npz", "b.classes.png",
                                        "b.heatmap.png", "b.scores.npz", "summary.parquet"]


def test_shared_stems_keep_their_folders(tmp_path):
    a = save(noise_image(seed=1), tmp_path / "in" / "a" / "photo.png")
    b = save(noise_image(seed=2), tmp_path / "in" / "b" / "photo.jpg")
    c = save(noise_image(seed=3), tmp_path / "in" / "other.png")
    rows = run_images([a, b, c], tmp_path / "out", top_k=1)
    assert [r.status for r in rows] == ["ok", "ok", "ok"], [r.error for r in rows]
    assert _files(tmp_path / "out") == sorted(
        [f"{s}.{kind}" for s in ("a/photo", "b/photo", "other") for kind in ("classes.png", "heatmap.png",
                                                                                "scores.npz")])


def test_a_file_where_a_stem_folder_should_be_is_that_images_error(tmp_path):
    """A write failure for one image (its sub-folder is a file) is that image's error row, not the run's."""
    a = save(noise_image(seed=1), tmp_path / "in" / "a" / "photo.png")
    b = save(noise_image(seed=2), tmp_path / "in" / "b" / "photo.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("a file where a folder should be")
    (out / "b").mkdir()
    rows = run_images([a, b], out, top_k=1)
    assert [r.status for r in rows] == ["error", "ok"]
    assert "cannot write" in rows[0].error and str(out / "a") in rows[0].error
    assert _files(out) == ["a", "b/photo.classes.png", "b/photo.heatmap.png", "b/photo.scores.npz"]


@pytest.mark.parametrize("options, fragment", [
    ({"classes": ("cat",)}, "unknown class"),
    ({"cmap": "nope"}, "colormap"),
    ({"precision": "fp16"}, "fp16"),
    ({"alpha": 1.5}, "--alpha"),
    ({"top_k": 0}, "--top-k"),
    ({"scale": 0}, "--scale"),
    ({"batch_size": 0}, "--batch-size"),
    ({"combine": "median"}, "--combine"),
    ({"foreground": "some"}, "--foreground"),
    ({"scores": "hdf5"}, "--scores"),
    ({"scores_dtype": "int8"}, "--scores-dtype"),
    ({"level": 1, "mpp": 0.5}, "--level and --mpp"),
    ({"mpp": -1.0}, "--mpp"),
    ({"preview_size": 8}, "--preview-size"),
    ({"runtime": "tensorrt"}, "--runtime"),
    ({"tile": "huge"}, "--tile"),
    ({"max_memory": "lots"}, "--max-memory"),
    ({"scales": (0, 1)}, "--scales"),
    ({"scales": (1, 2), "scores": "zarr"}, "--scales"),
    ({"vmin": 0.5, "vmax": 0.2}, "--vmin 0.5 is not below --vmax 0.2"),
    ({"vmin": 1.0}, r"--vmin 1 is not below --vmax 1 \(its default\)"),
    ({"vmax": 1.5}, "--vmax 1.5 is not between 0 and 1"),
    ({"vmin": float("nan")}, "--vmin nan is not between 0 and 1"),
    ({"normalize": True, "vmax": 0.3}, "--normalize and --vmin/--vmax both given"),
])
def test_unknown_class_and_bad_options_fail_before_any_image(tmp_path, options, fragment):
    image_path = save(noise_image(), tmp_path / "x.png")
    fcn = converted_small()
    if "classes" not in options and "precision" not in options:
        with pytest.raises(InputError, match=fragment):
            validate_options(HeatmapOptions(outdir=tmp_path / "out", **options))
    with pytest.raises(InputError, match=fragment):
        run_images([image_path], tmp_path / "out", fcn=fcn, **options)
    with pytest.raises(InputError, match=fragment):
        run_job([image_path], fcn, fcn.geometry, SMALL_META, HeatmapOptions(outdir=tmp_path / "out", **options))
    assert not (tmp_path / "out").exists()  # nothing created, nothing read


def test_unwritable_outdir(tmp_path):
    image_path = save(noise_image(), tmp_path / "x.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user (root) who can write to a 0o500 folder")
        with pytest.raises(OutputError, match="not writable"):
            run_images([image_path], locked)
        with pytest.raises(OutputError, match="cannot create"):
            run_images([image_path], locked / "sub")
    finally:
        locked.chmod(0o700)


def test_outdir_that_is_a_file_or_cannot_be_created(tmp_path):
    image_path = save(noise_image(), tmp_path / "x.png")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="cannot create"):
        run_images([image_path], tmp_path / "file" / "sub")
    with pytest.raises(OutputError, match="cannot create|not a folder"):
        run_images([image_path], tmp_path / "file")


def test_outdir_refused_when_access_says_unwritable(tmp_path, monkeypatch):
    """The writability check, made to fail even as root: nothing is read or written."""
    image_path = save(noise_image(), tmp_path / "x.png")
    monkeypatch.setattr("fcnify.heatmap.outputs.os.access", lambda path, mode: False)
    with pytest.raises(OutputError, match="not writable"):
        run_images([image_path], tmp_path / "out")
    assert _files(tmp_path / "out") == []
