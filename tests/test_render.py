"""fcnify.render: cell-centred upsampling, colour overlays and the per-class figure (pure, no files)."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from heatmap_helpers import LABELS, MEAN, STD, converted_small, noise_image

from fcnify.dense import ScoreMap, score_map
from fcnify.errors import InputError
from fcnify.images import prepare
from fcnify.render import classes_figure, colormap, label_colours, overlay, upsample_to_image

GEOM = SimpleNamespace(stride=(4, 4), offset=(0, 0), window=(16, 16))  # cell (i, j) centred at (8+4i, 8+4j)


def test_one_hot_cell_peaks_at_its_window_centre():
    cells = np.zeros((5, 7), dtype=np.float32)
    cells[2, 3] = 1.0
    heat = upsample_to_image(cells, GEOM, (32, 40))
    assert heat.shape == (32, 40) and heat.dtype == np.float32
    # window centre (16, 20) in pixel-edge coordinates lies between pixels 15 and 16 (and 19 and 20)
    assert heat[15, 19] == heat[16, 20] == pytest.approx(0.875 ** 2)
    ys, xs = np.nonzero(heat == heat.max())
    assert set(ys) == {15, 16} and set(xs) == {19, 20}
    assert heat[16 + 4, 20] == pytest.approx(0.0) and heat[16, 20 + 4] == pytest.approx(0.0)


def test_interpolates_between_centres_and_clamps_outside():
    cells = np.array([[0.0, 1.0]], dtype=np.float32)  # centres at x = 8 and 12
    heat = upsample_to_image(cells, GEOM, (10, 24))
    assert np.all(heat[:, :8] == 0.0)  # pixel centres up to 7.5 lie before the first centre: clamp
    assert np.all(heat[:, 12:] == 1.0)
    assert heat[0, 9] == pytest.approx(0.375)  # centre 9.5 → u = 0.375
    assert np.allclose(heat, heat[0])  # one row of cells: every row the same


def test_constant_map_and_nearest_mode():
    heat = upsample_to_image(torch.full((3, 3), 0.25), GEOM, (20, 20))
    assert np.allclose(heat, 0.25)
    labels = np.array([[0, 1], [2, 3]], dtype=np.float32)
    nearest = upsample_to_image(labels, GEOM, (20, 20), mode="nearest")
    assert set(np.unique(nearest)) == {0, 1, 2, 3}
    assert nearest[9, 9] == 0 and nearest[10, 10] == 3  # the boundary lies half-way between centres 8 and 12


def test_overlay_blends_with_a_matplotlib_colormap():
    image = np.full((6, 8, 3), 100, dtype=np.uint8)
    heat = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    assert np.array_equal(overlay(image, heat, alpha=0.0), image)
    full = overlay(image, heat, "viridis", alpha=1.0)
    expected = np.round(matplotlib.colormaps["viridis"](heat)[:, :, :3] * 255)
    assert full.dtype == np.uint8 and full.shape == (6, 8, 3)
    assert np.abs(full.astype(int) - expected).max() <= 1
    half = overlay(image[:, :, 0], heat, "inferno", alpha=0.5)  # grayscale input
    assert np.abs(half.astype(int) - np.round(50 + 0.5 * np.round(
        matplotlib.colormaps["inferno"](heat)[:, :, :3] * 255))).max() <= 1


def test_bad_colormap_and_alpha():
    with pytest.raises(InputError, match="unknown colormap") as info:
        colormap("infern")
    assert "inferno" in info.value.hint
    with pytest.raises(InputError, match="alpha"):
        overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2)), alpha=1.5)


def test_label_colours_are_distinct():
    for count in (2, 11, 25):
        colours = label_colours(count)
        assert colours.shape == (count, 3)
        assert len({tuple(c) for c in colours}) == count


def test_classes_figure_has_a_panel_per_class_and_a_label_map(tmp_path):
    fcn = converted_small()
    image = noise_image(size=(48, 64))
    smap = score_map(fcn, prepare(image, 1, MEAN, STD, min_size=(32, 32)), fcn.geometry, LABELS, "cpu")
    fig = classes_figure(smap, image, top_k=4, cmap="viridis")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(titles) == 5 and titles[-1] == "most probable class"
    for k, title in zip(smap.top_classes(4), titles[:4], strict=True):
        assert title.startswith(LABELS[k]) and f"{smap.peak(k)[0]:.3f}" in title
    colorbars = [ax for ax in fig.axes if ax.get_ylabel() == "probability"]
    assert len(colorbars) == 4
    legend = fig.axes[4].get_legend()
    assert legend is not None and {t.get_text() for t in legend.get_texts()} == {
        LABELS[int(k)] for k in np.unique(smap.argmax_map().numpy())}
    fig.savefig(tmp_path / "f.png")  # renders on the Agg canvas without pyplot
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_classes_figure_with_one_class():
    smap = ScoreMap(torch.zeros(2, 1, 1), ("a", "b"), (1, 1), (0, 0), (4, 4), (4, 4))
    fig = classes_figure(smap, np.zeros((4, 4, 3), np.uint8), top_k=1)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["a  peak 0.500", "most probable class"]
