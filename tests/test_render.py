"""fcnify.heatmap.render (cell-centred upsampling, colour overlays, colormaps) and fcnify.heatmap.previews (the
previews drawn from a score map and the per-class figure): pure, no files."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from heatmap_helpers import LABELS, MEAN, STD, converted_small, noise_image

from fcnify.dense import score_map
from fcnify.errors import InputError
from fcnify.heatmap.legend import (
    LEGEND_MAX_HEIGHT,
    LEGEND_MIN_HEIGHT,
    ColourRange,
    add_legend,
    colour_range,
    legend_height,
    legend_text,
    range_ticks,
)
from fcnify.heatmap.previews import classes_figure, colour_lut, preview_shape, render_previews
from fcnify.heatmap.render import colormap, label_colours, overlay, upsample_to_image
from fcnify.images import prepare

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


def test_colour_lut_is_the_colormap_sampled_at_256_points():
    for name in ("inferno", "viridis", "gray"):
        lut = colour_lut(name)
        expected = np.round(matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255)
        assert lut.dtype == np.uint8 and lut.shape == (256, 3)
        np.testing.assert_array_equal(lut, expected.astype(np.uint8))
    with pytest.raises(InputError, match="unknown colormap"):
        colour_lut("nope")


def test_preview_shape_caps_the_longest_side():
    assert preview_shape((480, 640), 4096) == (480, 640)
    assert preview_shape((3000, 8000), 4000) == (1500, 4000)
    assert preview_shape((100000, 10), 100) == (100, 1)


def _one_hot(shape=(5, 7), cell=(2, 3), classes=2) -> np.ndarray:
    """Probabilities K×h×w: class 1 is 1 at ``cell`` and 0 elsewhere (class 0 the rest)."""
    scores = np.zeros((classes, *shape), dtype=np.float32)
    scores[0] = 1.0
    scores[0][cell] = 0.0
    scores[1][cell] = 1.0
    return scores


@pytest.mark.parametrize("image_size, geometry, cap", [
    ((32, 40), GEOM, 4096),  # full size: the window centre (16, 20)
    ((320, 400), SimpleNamespace(stride=(40, 40), offset=(0, 0), window=(160, 160)), 64),  # capped: 51×64
    ((96, 100), SimpleNamespace(stride=(10.5, 10.5), offset=(3.0, 3.0), window=(21.0, 21.0)), 50),  # floats
])
def test_render_previews_peak_at_the_window_centre(image_size, geometry, cap):
    """The overlay of a map whose one cell is 1 (grey colormap, opaque) is brightest at that cell's window
    centre, within a pixel, at full size and at a capped preview size; so is the class panel."""
    scores = _one_hot()
    shape = preview_shape(image_size, cap)
    image = np.zeros((*shape, 3), np.uint8)
    previews = render_previews(scores, geometry, image, image_size, [1], [0, 1], "gray", 1.0, cap, panel_size=32)
    centre = (geometry.offset[0] + 2 * geometry.stride[0] + geometry.window[0] / 2,
              geometry.offset[1] + 3 * geometry.stride[1] + geometry.window[1] / 2)
    overlay_1 = previews.overlays[1]
    assert overlay_1.shape == (*shape, 3) and overlay_1.dtype == np.uint8
    assert previews.preview_scale == pytest.approx((image_size[0] / shape[0], image_size[1] / shape[1]))
    for picture, scale in ((overlay_1[..., 0].astype(float), previews.preview_scale),
                           (previews.panels[1], previews.panel_scale)):
        ys, xs = np.nonzero(picture == np.nanmax(picture))
        assert np.all(np.abs(ys + 0.5 - centre[0] / scale[0]) <= 1.0), (ys, centre, scale)
        assert np.all(np.abs(xs + 0.5 - centre[1] / scale[1]) <= 1.0), (xs, centre, scale)
    # Far from the cell the map is 0: black under an opaque grey colormap; the label map is class 0 there.
    assert overlay_1[0, 0].tolist() == [0, 0, 0] and previews.argmax[0, 0] == 0
    ys, xs = np.nonzero(previews.argmax == 1)
    assert len(ys) and np.all(np.abs(ys + 0.5 - centre[0] / previews.panel_scale[0]) <= 0.5 * (
        geometry.stride[0] / previews.panel_scale[0]) + 1)


def test_render_previews_leave_background_cells_transparent():
    scores = np.full((2, 5, 7), np.nan, dtype=np.float32)
    scores[:, :, 4:] = 0.5  # only the right part computed
    image = np.full((32, 40, 3), 77, np.uint8)
    previews = render_previews(scores, GEOM, image, (32, 40), [0], [0], "gray", 1.0)
    left, right = previews.overlays[0][:, :12], previews.overlays[0][:, 30:]
    assert (left == 77).all() and (right == 128).all()  # the image where nothing was computed
    assert np.isnan(previews.panels[0][:, :12]).all() and (previews.argmax[:, :12] == -1).all()
    assert (previews.argmax[:, 30:] == 0).all()


def test_classes_figure_has_a_panel_per_class_and_a_label_map(tmp_path):
    fcn = converted_small()
    image = noise_image(size=(48, 64))
    smap = score_map(fcn, prepare(image, 1, MEAN, STD, min_size=(32, 32)), fcn.geometry, LABELS, "cpu")
    rgb = np.asarray(image.convert("RGB"))
    top = smap.top_classes(4)
    previews = render_previews(smap.scores.numpy(), smap, rgb, smap.image_size, [], top, "viridis")
    fig = classes_figure(previews, LABELS, top, {k: smap.peak(k) for k in top}, cmap="viridis")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(titles) == 5 and titles[-1] == "most probable class"
    for k, title in zip(top, titles[:4], strict=True):
        assert title.startswith(LABELS[k]) and f"{smap.peak(k)[0]:.3f}" in title
    colorbars = [ax for ax in fig.axes if ax.get_ylabel() == "probability"]
    assert len(colorbars) == 4
    present = {int(k) for k in np.unique(smap.argmax_map().numpy())}
    assert {int(k) for k in np.unique(previews.argmax)} == present  # every cell owns some panel pixels
    legend = next(ax for ax in fig.axes if ax.get_title() == "most probable class").get_legend()
    assert legend is not None and {t.get_text() for t in legend.get_texts()} == {LABELS[k] for k in present}
    fig.savefig(tmp_path / "f.png")  # renders on the Agg canvas without pyplot
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_classes_figure_with_one_class():
    scores = np.full((2, 1, 1), 0.5, dtype=np.float32)
    geometry = SimpleNamespace(stride=(1, 1), offset=(0, 0), window=(4, 4))
    previews = render_previews(scores, geometry, np.zeros((4, 4, 3), np.uint8), (4, 4), [0], [0])
    fig = classes_figure(previews, ("a", "b"), [0], {0: (0.5, (2.0, 2.0))})
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["a  peak 0.500", "most probable class"]


# ------------------------------------------------------------------------------------------------ legend


def test_colour_range_from_the_options():
    assert colour_range() == ColourRange(0.0, 1.0, "probability")
    assert colour_range(0.1, 0.4) == ColourRange(0.1, 0.4, "fixed")
    assert colour_range(vmax=0.3) == ColourRange(0.0, 0.3, "fixed")  # the other end keeps its default
    assert colour_range(vmin=0.2) == ColourRange(0.2, 1.0, "fixed")
    assert colour_range(normalize=True, low=0.02, high=0.31) == ColourRange(0.02, 0.31, "per-map")
    # No computed cell (the tracker's +inf/-inf, or NaN): nothing is coloured, the range stays 0–1.
    assert colour_range(normalize=True, low=np.inf, high=-np.inf) == ColourRange()
    assert colour_range(normalize=True, low=float("nan"), high=0.5) == ColourRange()


def test_range_fraction_clips_and_survives_a_constant_map():
    values = np.array([0.0, 0.1, 0.2, 0.3, 0.9], np.float32)
    np.testing.assert_allclose(ColourRange(0.1, 0.3, "fixed").fraction(values), [0, 0, 0.5, 1, 1], atol=1e-6)
    assert ColourRange().fraction(values).tolist() == pytest.approx(values.tolist())
    assert ColourRange(0.4, 0.4, "per-map").fraction(np.array([0.4])).tolist() == [0.0]


def test_legend_text_names_the_class_the_range_and_how_it_was_chosen():
    assert legend_text("tiger cat", ColourRange()) == "tiger cat — probability 0–1"
    per_map = ColourRange(0.0213, 0.3087, "per-map")
    assert legend_text("cat", per_map) == "cat — probability 0.02–0.31 (per-map min–max)"
    assert legend_text("7", ColourRange(0.1, 0.5, "fixed")) == "7 — probability 0.1–0.5 (fixed range)"
    constant = ColourRange(0.25, 0.25, "per-map")
    assert legend_text("a", constant) == "a — probability 0.25 everywhere (per-map min–max)"


def test_range_ticks_use_the_fewest_decimals_that_keep_the_ends():
    assert range_ticks(ColourRange()) == ("0", "1")
    assert range_ticks(ColourRange(0.0213, 0.3087)) == ("0.02", "0.31")
    assert range_ticks(ColourRange(0.9912, 0.9957)) == ("0.9912", "0.9957")  # a narrow range keeps its digits
    assert range_ticks(ColourRange(1e-7, 0.5)) == ("0", "0.5")


def test_legend_height_grows_with_the_width_within_bounds():
    assert legend_height(1) == legend_height(640) == LEGEND_MIN_HEIGHT
    assert legend_height(4096) == legend_height(100_000) == LEGEND_MAX_HEIGHT
    assert LEGEND_MIN_HEIGHT <= legend_height(2500) <= LEGEND_MAX_HEIGHT


@pytest.mark.parametrize("width", [1, 2, 12, 50, 300, 4096])
def test_add_legend_appends_a_strip_and_keeps_the_overlay(width):
    """The overlay rows come back untouched; below them a white strip with text and the colormap's gradient
    (every colour of the table from its first to its last entry) — at any width, text cut to fit."""
    rng = np.random.default_rng(width)
    overlay_rgb = rng.integers(0, 256, size=(7, width, 3), dtype=np.uint8)
    lut = colour_lut("viridis")
    framed = add_legend(overlay_rgb, "a rather long class name, longer than a small image", ColourRange(), lut)
    assert framed.dtype == np.uint8 and framed.shape == (7 + legend_height(width), width, 3)
    np.testing.assert_array_equal(framed[:7], overlay_rgb)
    strip = framed[7:]
    if width >= 12:
        colours = {tuple(c) for c in strip.reshape(-1, 3)}
        assert tuple(lut[0]) in colours and tuple(lut[255]) in colours  # the bar's two ends
        assert (255, 255, 255) in colours  # the strip's background
        assert (strip.min(axis=2) < 100).any()  # and dark ink (text, frame)


def test_render_previews_colour_a_fixed_range():
    """An overlay pixel of probability p is lut[(p - vmin) / (vmax - vmin)] blended with alpha; outside the
    range the end colours."""
    scores = np.zeros((2, 5, 7), dtype=np.float32)
    scores[0, :, :3], scores[0, :, 3], scores[0, :, 4:] = 0.15, 0.05, 0.6  # columns: in range, below, above
    scores[1] = 1 - scores[0]
    image = np.full((32, 40, 3), 100, np.uint8)
    lut = colour_lut("viridis")
    colours = ColourRange(0.1, 0.3, "fixed")
    previews = render_previews(scores, GEOM, image, (32, 40), [0], [0], "viridis", 0.5, ranges={0: colours})
    blend = np.round(0.5 * 100 + 0.5 * lut.astype(np.float64))
    overlay_0 = previews.overlays[0]
    assert overlay_0[0, 0].tolist() == blend[round((0.15 - 0.1) / 0.2 * 255)].tolist()  # lut[64]
    assert overlay_0[0, 39].tolist() == blend[255].tolist()  # 0.6 > vmax: the last colour
    default = render_previews(scores, GEOM, image, (32, 40), [0], [0], "viridis", 0.5)
    assert default.overlays[0][0, 0].tolist() == blend[round(0.15 * 255)].tolist()  # 0–1 as before


def _tiny_figure(image_size, geometry, peak_centre, scores=None):
    scores = _one_hot(shape=(1, 1), cell=(0, 0)) if scores is None else scores
    image = np.full((*image_size, 3), 120, np.uint8)
    previews = render_previews(scores, geometry, image, image_size, [], [0, 1], panel_size=768)
    return previews, classes_figure(previews, ("a", "b"), [1, 0], {1: (1.0, peak_centre), 0: (0.5, peak_centre)})


@pytest.mark.parametrize("image_size, cells", [((20, 50), (1, 10)), ((28, 28), (1, 1)), ((10, 12), (1, 1)),
                                               ((300, 40), (68, 5))])
def test_classes_figure_of_a_tiny_or_padded_image_fills_its_panels(image_size, cells):
    """A small or padded image (window 32): each picture's extent equals its axes' limits and the axes box has
    the picture's aspect (no empty axis around a small picture), each colorbar sits right beside its panel at
    its height, and the peak ring lies whole inside the picture even when the window centre (16, 16) lies
    beyond a padded image's edge."""
    geometry = SimpleNamespace(stride=(4, 4), offset=(0, 0), window=(32, 32))
    scores = np.full((2, *cells), 0.5, dtype=np.float32)
    previews, fig = _tiny_figure(image_size, geometry, (16.0, 16.0), scores)
    fig.canvas.draw()
    height, width = previews.panel_image.shape[:2]
    pictures = [ax for ax in fig.axes if ax.images]
    assert len(pictures) == 3
    for ax in pictures:
        for shown in ax.images:
            left, right, bottom, top = shown.get_extent()
            assert (left, right) == ax.get_xlim() == (-0.5, width - 0.5)
            assert (bottom, top) == ax.get_ylim() == (height - 0.5, -0.5)
        box = ax.get_window_extent()
        assert box.height / box.width == pytest.approx(height / width, rel=0.02)
    colorbars = [ax for ax in fig.axes if ax.get_ylabel() == "probability"]
    assert len(colorbars) == 2
    for ax, cax in zip(pictures[:2], colorbars, strict=True):
        box, bar = ax.get_window_extent(), cax.get_window_extent()
        assert 0 < bar.x0 - box.x1 <= 0.1 * fig.dpi  # attached: within a tenth of an inch
        assert (bar.y0, bar.y1) == pytest.approx((box.y0, box.y1))
        ring = ax.lines[0]
        radius = ring.get_markersize() / 2 / 72 * fig.dpi  # pixels
        (x, y), = ax.transData.transform(np.column_stack([ring.get_xdata(), ring.get_ydata()]))
        assert box.x0 + radius - 1 <= x <= box.x1 - radius + 1 and box.y0 + radius - 1 <= y <= box.y1 - radius + 1
