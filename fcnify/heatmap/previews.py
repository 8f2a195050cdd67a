"""Previews drawn from a score map band by band, at a capped size: the heatmap overlay and the class panels.

The map (an in-memory array or the zarr store) is read in bands of rows; each band fills the preview rows
whose cell coordinates fall in it. Values are interpolated bilinearly between cell centres (each cell sits at
its window's centre), ignoring NaN (background) neighbours; pixels with no computed neighbour stay
transparent. The colormap is applied as a 256-entry lookup table on uint8, so the cost is a few array
operations per preview pixel, never a full-resolution figure. Each class's ``ColourRange`` (0–1, ``--vmin``/
``--vmax`` or its own min–max) says which probabilities the table's ends stand for; the heatmap's legend strip
(``legend.add_legend``) says the same in words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fcnify.heatmap.legend import ColourRange
from fcnify.heatmap.render import colormap, label_colours

__all__ = [
    "BilinearAxis", "Previews", "bilinear_sample", "classes_figure", "colour_lut", "panel_side", "preview_shape",
    "render_previews"
]

#: Bytes of map rows held at once while rendering.
_BAND_BYTES = 64 * 2**20
#: Preview rows blended at once.
_PREVIEW_ROWS = 256


def preview_shape(size: tuple[int, int], cap: int) -> tuple[int, int]:
    """The preview's (h, w): the image's size when its longest side is within ``cap``, else scaled down."""
    factor = max(1.0, max(size) / max(1, cap))
    return (max(1, round(size[0] / factor)), max(1, round(size[1] / factor)))


def colour_lut(cmap: str) -> np.ndarray:
    """256×3 uint8: the colormap sampled at 0, 1/255, …, 1."""
    return np.clip(np.round(colormap(cmap)(np.linspace(0.0, 1.0, 256))[:, :3] * 255), 0, 255).astype(np.uint8)


def _cell_coords(n_out: int, length: int, cells: int, stride: float, offset: float, window: float) -> np.ndarray:
    """Cell coordinate of the centre of each of ``n_out`` output pixels spanning ``length`` image pixels."""
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * (length / n_out)
    return np.clip((centres - offset - window / 2) / stride, 0.0, max(cells - 1, 0))


@dataclass
class BilinearAxis:
    """Bilinear sampling positions along one axis."""

    low: np.ndarray
    high: np.ndarray
    t: np.ndarray
    nearest: np.ndarray

    @classmethod
    def of(cls, coords: np.ndarray, cells: int) -> BilinearAxis:
        low = np.floor(coords).astype(np.int64)
        high = np.minimum(low + 1, cells - 1)
        nearest = np.clip(np.floor(coords + 0.5).astype(np.int64), 0, cells - 1)
        return cls(low, high, (coords - low).astype(np.float32), nearest)


def bilinear_sample(block: np.ndarray, first: int, ys: BilinearAxis, rows: np.ndarray, xs: BilinearAxis) -> np.ndarray:
    """NaN-aware bilinear samples of a C×R×w block (map rows from ``first``) at output ``rows`` × all columns."""
    valid = ~np.isnan(block)
    values = np.where(valid, block, 0.0).astype(np.float32)
    weights = valid.astype(np.float32)
    ty = ys.t[rows][None, :, None]
    tx = xs.t[None, None, :]
    out = []
    for array in (values, weights):
        top, bottom = array[:, ys.low[rows] - first], array[:, ys.high[rows] - first]
        vertical = top * (1 - ty) + bottom * ty
        out.append(vertical[:, :, xs.low] * (1 - tx) + vertical[:, :, xs.high] * tx)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(out[1] > 1e-6, out[0] / out[1], np.nan).astype(np.float32)


@dataclass
class Previews:
    """What ``render_previews`` draws.

    Attributes:
        overlays: class index → H×W×3 uint8 heatmap blended over the image (preview size).
        panel_image: the image at panel size (h×w×3 uint8).
        panels: class index → h×w float32 probability at panel size (NaN: background).
        argmax: h×w int64 most probable class at panel size (-1: background).
        preview_scale, panel_scale: image pixels per preview / panel pixel (y, x).
    """

    overlays: dict[int, np.ndarray]
    panel_image: np.ndarray
    panels: dict[int, np.ndarray]
    argmax: np.ndarray
    preview_scale: tuple[float, float]
    panel_scale: tuple[float, float]


def render_previews(scores, geometry, image: np.ndarray, image_size: tuple[int, int], draw: Sequence[int],
                    panel_classes: Sequence[int], cmap: str = "inferno", alpha: float = 0.5,
                    preview_size: int = 4096, panel_size: int = 768,
                    ranges: dict[int, ColourRange] | None = None) -> Previews:
    """Draw the overlays of classes ``draw`` and the class panels of ``panel_classes`` from a score map.

    Args:
        scores: K×h×w probabilities, an array or anything sliced like one (a zarr array), NaN = background.
        geometry: ``stride``, ``offset``, ``window`` (y, x) in the pixels of ``image_size``.
        image: the image at preview size (``preview_shape(image_size, preview_size)``), H×W×3 uint8.
        image_size: the size the geometry refers to.
        ranges: class → the probabilities the colormap's ends stand for in its overlay (default 0–1).
    """
    ranges = ranges or {}
    classes, cells_h, cells_w = (int(v) for v in scores.shape)
    shape = tuple(image.shape[:2])
    panel_shape = preview_shape(image_size, panel_size)
    lut = colour_lut(cmap)
    axes = {}
    for name, out in (("preview", shape), ("panel", panel_shape)):
        ys = BilinearAxis.of(_cell_coords(out[0], image_size[0], cells_h, geometry.stride[0], geometry.offset[0],
                                   geometry.window[0]), cells_h)
        xs = BilinearAxis.of(_cell_coords(out[1], image_size[1], cells_w, geometry.stride[1], geometry.offset[1],
                                   geometry.window[1]), cells_w)
        axes[name] = (ys, xs)
    overlays = {k: image.copy() for k in draw}
    panels = {k: np.full(panel_shape, np.nan, dtype=np.float32) for k in panel_classes}
    argmax = np.full(panel_shape, -1, dtype=np.int64)
    band = max(1, _BAND_BYTES // max(1, classes * cells_w * 4))
    for first in range(0, cells_h, band):
        last = min(first + band, cells_h)
        block = np.asarray(scores[:, first:min(last + 1, cells_h), :], dtype=np.float32)
        ys, xs = axes["preview"]
        rows = np.nonzero((ys.low >= first) & (ys.low < last))[0]
        drawn = block[list(draw)] if draw else None
        # A few hundred preview rows at a time: the float intermediates of a 4096-px-wide band stay small.
        for begin in range(0, len(rows) if draw else 0, _PREVIEW_ROWS):
            chunk = rows[begin:begin + _PREVIEW_ROWS]
            heat = bilinear_sample(drawn, first, ys, chunk, xs)
            for index, k in enumerate(draw):
                _blend_rows(overlays[k], chunk, heat[index], lut, alpha, ranges.get(k, ColourRange()))
        ys, xs = axes["panel"]
        rows = np.nonzero((ys.low >= first) & (ys.low < last))[0]
        if len(rows) and panel_classes:
            heat = bilinear_sample(block[list(panel_classes)], first, ys, rows, xs)
            for index, k in enumerate(panel_classes):
                panels[k][rows] = heat[index]
        rows = np.nonzero((ys.nearest >= first) & (ys.nearest < last))[0]
        step = max(1, (16 * 2**20) // max(1, classes * len(xs.nearest) * 4))
        for begin in range(0, len(rows), step):
            chunk = rows[begin:begin + step]
            picked = block[:, ys.nearest[chunk] - first][:, :, xs.nearest]
            known = ~np.isnan(picked).all(axis=0)
            best = np.where(np.isnan(picked), -np.inf, picked).argmax(axis=0)
            argmax[chunk] = np.where(known, best, -1)
    panel_image = np.asarray(Image.fromarray(image).resize(panel_shape[::-1], Image.Resampling.BOX))
    return Previews(overlays, panel_image, panels, argmax,
                    (image_size[0] / shape[0], image_size[1] / shape[1]),
                    (image_size[0] / panel_shape[0], image_size[1] / panel_shape[1]))


def _blend_rows(target: np.ndarray, rows: np.ndarray, heat: np.ndarray, lut: np.ndarray, alpha: float,
                colours: ColourRange) -> None:
    valid = ~np.isnan(heat)
    index = np.clip(np.round(colours.fraction(np.nan_to_num(heat)) * 255), 0, 255).astype(np.uint8)
    colour = lut[index].astype(np.float32)
    base = target[rows].astype(np.float32)
    blended = np.clip(np.round((1 - alpha) * base + alpha * colour), 0, 255).astype(np.uint8)
    target[rows] = np.where(valid[..., None], blended, target[rows])


#: The classes figure's layout, in inches: an image box's longer side, its limits, and what sits around it.
_BOX_SIDE, _BOX_MAX, _BOX_MIN, _BOX_FLAT = 4.0, 6.0, 0.3, 1.2
_TITLE, _MARGIN, _BAR_GAP, _BAR_WIDTH, _BAR_TEXT = 0.32, 0.15, 0.06, 0.14, 0.7


#: The peak ring: marker size and edge width in points, and its outer radius in inches.
_MARKER, _EDGE = 14.0, 1.5
_RING = (_MARKER + _EDGE) / 2 / 72


def _inside(position: float, length: int, radius: float) -> float:
    """``position`` (data units, pixels span -0.5…length-0.5) moved so a ring of ``radius`` stays inside."""
    low, high = -0.5 + radius, length - 0.5 - radius
    return float(np.clip(position, low, high)) if low <= high else (length - 1) / 2


def _box_size(height: int, width: int) -> tuple[float, float]:
    """An image box's (width, height) in inches with the image's aspect: 4 in on the longer side, at most 6 in
    tall, and at least 1.2 in tall for flat images (at most 8 in wide) so a colorbar beside it stays legible.
    Only extreme shapes (a side under 0.3 in) are stretched to fit."""
    aspect = height / max(width, 1)
    box_w, box_h = (_BOX_SIDE, _BOX_SIDE * aspect) if aspect <= 1 else (_BOX_SIDE / aspect, _BOX_SIDE)
    if box_h > _BOX_MAX:
        box_w, box_h = box_w * _BOX_MAX / box_h, _BOX_MAX
    if box_h < _BOX_FLAT:
        box_w, box_h = min(8.0, box_w * _BOX_FLAT / box_h), _BOX_FLAT
    return max(box_w, _BOX_MIN), max(box_h, _BOX_MIN)


def _blend(base: np.ndarray, layer: np.ndarray, alpha: float) -> np.ndarray:
    """``layer`` (h×w×4 uint8, transparent where its alpha is 0) drawn over ``base`` (h×w×3) at ``alpha``."""
    weight = (layer[..., 3:4].astype(np.float32) / 255) * alpha
    blended = base.astype(np.float32) * (1 - weight) + layer[..., :3].astype(np.float32) * weight
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def panel_side(image_size: tuple[int, int], dpi: int) -> int:
    """The longest side in pixels of the class panels' pictures for an image of ``image_size``: the size their
    boxes in ``classes_figure`` have at ``dpi`` (not more: matplotlib would resample every picture down again,
    the largest part of drawing the figure)."""
    box_w, box_h = _box_size(*image_size)
    return max(16, math.ceil(max(box_w, box_h) * dpi))


def classes_figure(previews: Previews, labels: Sequence[str], classes: Sequence[int],
                   peaks: dict[int, tuple[float, tuple[float, float]]], cmap: str = "inferno", dpi: int = 100,
                   ranges: dict[int, ColourRange] | None = None):
    """A matplotlib ``Figure``: one panel per class (probability over a faded image, its name, peak value and
    a hollow marker around the peak's window centre, a colorbar) and the most probable class per pixel.

    Each panel's axes box is laid out with the picture's own aspect, so the picture fills it whatever the
    image's size (a 20×50 image is drawn as large as a photo, not as a strip in an empty square), and its
    colorbar sits right beside it at its height. A peak whose window centre lies outside the image (images
    smaller than the window are padded) is marked at the nearest point of the image.

    Args:
        peaks: class → (peak probability, (y, x) window centre in image pixels).
        ranges: class → the probabilities its colormap's ends stand for (default 0–1).
    """
    # lazy: matplotlib is heavy, and only the class panels draw figures
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ranges = ranges or {}
    cm = colormap(cmap).with_extremes(bad=(0, 0, 0, 0))
    rgb = previews.panel_image
    height, width = rgb.shape[:2]
    box_w, box_h = _box_size(height, width)
    colours = label_colours(len(labels))
    known = previews.argmax >= 0
    present = [int(v) for v in np.unique(previews.argmax[known])]
    # The label map's legend beside it: as many columns as its entries (0.19 in each, under a title) need.
    legend_rows = max(1, int((box_h + _TITLE) / 0.19) - 1)
    legend_cols = max(1, math.ceil(len(present) / legend_rows))
    legend_w = legend_cols * (0.35 + 0.065 * max([len(str(labels[k])) for k in present] + [5]))
    titles = [f"{labels[k]}  peak {peaks[k][0]:.3f}" for k in classes]
    # A picture narrower than its title (a tall image) is centred under it rather than letting it spill over.
    title_w = 0.085 * max(len(t) for t in titles + ["most probable class"])
    indent = max(0.0, (title_w - box_w) / 2)
    class_cell = 2 * indent + box_w + _BAR_GAP + _BAR_WIDTH + _BAR_TEXT + 2 * _MARGIN
    label_cell = 2 * indent + box_w + 0.1 + legend_w + 2 * _MARGIN
    cell_h = box_h + _TITLE + 2 * _MARGIN
    panels = len(classes) + 1
    ncols = max(1, min(panels, 3, int(16.0 // class_cell)))
    nrows = math.ceil(panels / ncols)
    column_w = [max([class_cell if i < len(classes) else label_cell for i in range(c, panels, ncols)])
                for c in range(ncols)]
    fig_w, fig_h = sum(column_w), cell_h * nrows
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)

    def box(i: int) -> list[float]:
        row, col = divmod(i, ncols)
        left = sum(column_w[:col]) + _MARGIN + indent
        bottom = fig_h - (row + 1) * cell_h + _MARGIN
        return [left / fig_w, bottom / fig_h, box_w / fig_w, box_h / fig_h]

    def picture_axes(i: int, title: str):
        ax = fig.add_axes(box(i))
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
        return ax

    extent = (-0.5, width - 0.5, height - 0.5, -0.5)

    def fill(ax, picture: np.ndarray, **kwargs):
        # aspect="auto": the box already has the picture's aspect, and the picture fills it exactly.
        return ax.imshow(picture, interpolation="nearest", aspect="auto", extent=extent, **kwargs)

    faded = (rgb.astype(np.float32) * 0.35 + 255 * 0.15).astype(np.uint8)
    sy, sx = previews.panel_scale
    for i, k in enumerate(classes):
        peak, (py, px) = peaks[k]
        ax = picture_axes(i, titles[i])
        fill(ax, faded)
        scale = ranges.get(k, ColourRange())
        # A constant map under --normalize still needs a colorbar of some extent.
        high = scale.vmax if scale.vmax > scale.vmin else scale.vmin + 1e-3
        shown = ScalarMappable(Normalize(scale.vmin, high), cm)
        # One picture per panel, blended here: a second image over the faded one would be resampled and
        # composited by matplotlib for every panel, the largest part of drawing the figure.
        fill(ax, _blend(faded, shown.to_rgba(previews.panels[k], bytes=True), 0.75))
        # A hollow ring around the hotspot: the peak stays visible under the marker. The ring is kept whole
        # inside the picture: a peak at the edge, or a window centre beyond a padded image's edge, is drawn
        # with the ring moved inwards (the peak then lies on or inside it), never cut off or lost.
        ax.plot([_inside(px / sx - 0.5, width, _RING * width / box_w)],
                [_inside(py / sy - 0.5, height, _RING * height / box_h)],
                marker="o", markersize=_MARKER, markerfacecolor="none", markeredgecolor="cyan", mew=_EDGE)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        left, bottom, _, tall = box(i)
        cax = fig.add_axes([left + (box_w + _BAR_GAP) / fig_w, bottom, _BAR_WIDTH / fig_w, tall])
        bar = fig.colorbar(shown, cax=cax, label="probability" + (f" ({scale.words})" if scale.words else ""))
        bar.ax.tick_params(labelsize=8)
        bar.ax.yaxis.label.set_size(8)
        bar.ax.locator_params(nbins=max(2, int(box_h / 0.3)))
    label_ax = picture_axes(len(classes), "most probable class")
    label_image = np.zeros((*previews.argmax.shape, 4), np.uint8)
    label_image[known, :3] = np.round(np.asarray(colours)[previews.argmax[known], :3] * 255).astype(np.uint8)
    label_image[known, 3] = 255
    fill(label_ax, _blend(rgb, label_image, 0.6))
    handles = [Patch(color=colours[k], label=labels[k]) for k in present]
    if handles:
        label_ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
                        title="class", title_fontsize=8, ncol=legend_cols)
    return fig
