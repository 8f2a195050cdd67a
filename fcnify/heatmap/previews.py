"""Previews drawn from a score map band by band, at a capped size: the heatmap overlay and the class panels.

The map (an in-memory array or the zarr store) is read in bands of rows; each band fills the preview rows
whose cell coordinates fall in it. Values are interpolated bilinearly between cell centres (each cell sits at
its window's centre), ignoring NaN (background) neighbours; pixels with no computed neighbour stay
transparent. The colormap is applied as a 256-entry lookup table on uint8, so the cost is a few array
operations per preview pixel, never a full-resolution figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fcnify.heatmap.render import colormap, label_colours

__all__ = ["Previews", "classes_figure", "colour_lut", "preview_shape", "render_previews"]

#: Bytes of map rows held at once while rendering.
_BAND_BYTES = 64 * 2**20


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
class _Axis:
    """Bilinear sampling positions along one axis."""

    low: np.ndarray
    high: np.ndarray
    t: np.ndarray
    nearest: np.ndarray

    @classmethod
    def of(cls, coords: np.ndarray, cells: int) -> _Axis:
        low = np.floor(coords).astype(np.int64)
        high = np.minimum(low + 1, cells - 1)
        nearest = np.clip(np.floor(coords + 0.5).astype(np.int64), 0, cells - 1)
        return cls(low, high, (coords - low).astype(np.float32), nearest)


def _bilinear(block: np.ndarray, first: int, ys: _Axis, rows: np.ndarray, xs: _Axis) -> np.ndarray:
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
                    preview_size: int = 4096, panel_size: int = 768) -> Previews:
    """Draw the overlays of classes ``draw`` and the class panels of ``panel_classes`` from a score map.

    Args:
        scores: K×h×w probabilities, an array or anything sliced like one (a zarr array), NaN = background.
        geometry: ``stride``, ``offset``, ``window`` (y, x) in the pixels of ``image_size``.
        image: the image at preview size (``preview_shape(image_size, preview_size)``), H×W×3 uint8.
        image_size: the size the geometry refers to.
    """
    classes, cells_h, cells_w = (int(v) for v in scores.shape)
    shape = tuple(image.shape[:2])
    panel_shape = preview_shape(image_size, panel_size)
    lut = colour_lut(cmap)
    axes = {}
    for name, out in (("preview", shape), ("panel", panel_shape)):
        ys = _Axis.of(_cell_coords(out[0], image_size[0], cells_h, geometry.stride[0], geometry.offset[0],
                                   geometry.window[0]), cells_h)
        xs = _Axis.of(_cell_coords(out[1], image_size[1], cells_w, geometry.stride[1], geometry.offset[1],
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
        if len(rows) and draw:
            heat = _bilinear(block[list(draw)], first, ys, rows, xs)
            for index, k in enumerate(draw):
                _blend_rows(overlays[k], rows, heat[index], lut, alpha)
        ys, xs = axes["panel"]
        rows = np.nonzero((ys.low >= first) & (ys.low < last))[0]
        if len(rows) and panel_classes:
            heat = _bilinear(block[list(panel_classes)], first, ys, rows, xs)
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


def _blend_rows(target: np.ndarray, rows: np.ndarray, heat: np.ndarray, lut: np.ndarray, alpha: float) -> None:
    valid = ~np.isnan(heat)
    index = np.clip(np.round(np.nan_to_num(heat) * 255), 0, 255).astype(np.uint8)
    colour = lut[index].astype(np.float32)
    base = target[rows].astype(np.float32)
    blended = np.clip(np.round((1 - alpha) * base + alpha * colour), 0, 255).astype(np.uint8)
    target[rows] = np.where(valid[..., None], blended, target[rows])


def classes_figure(previews: Previews, labels: Sequence[str], classes: Sequence[int],
                   peaks: dict[int, tuple[float, tuple[float, float]]], cmap: str = "inferno", dpi: int = 100):
    """A matplotlib ``Figure``: one panel per class (probability over a faded image, its name, peak value and
    a hollow marker around the peak's window centre, a colorbar) and the most probable class per pixel.

    Args:
        peaks: class → (peak probability, (y, x) window centre in image pixels).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    cm = colormap(cmap).with_extremes(bad=(0, 0, 0, 0))
    rgb = previews.panel_image
    height, width = rgb.shape[:2]
    panels = len(classes) + 1
    ncols = min(panels, 3)
    nrows = math.ceil(panels / ncols)
    panel_w = 4.0
    panel_h = max(2.0, min(8.0, panel_w * height / max(width, 1))) + 0.6
    fig = Figure(figsize=(panel_w * ncols + 1.0, panel_h * nrows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    faded = (rgb.astype(np.float32) * 0.35 + 255 * 0.15).astype(np.uint8)
    sy, sx = previews.panel_scale
    for ax, k in zip(axes[:len(classes)], classes, strict=True):
        ax.imshow(faded, interpolation="nearest")
        shown = ax.imshow(previews.panels[k], cmap=cm, vmin=0.0, vmax=1.0, alpha=0.75, interpolation="nearest")
        peak, (py, px) = peaks[k]
        # A hollow ring around the hotspot: the peak stays visible under the marker.
        ax.plot([px / sx - 0.5], [py / sy - 0.5], marker="o", markersize=14, markerfacecolor="none",
                markeredgecolor="cyan", mew=1.5)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_title(f"{labels[k]}  peak {peak:.3f}", fontsize=10)
        ax.set_axis_off()
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="probability")
    label_ax = axes[len(classes)]
    colours = label_colours(len(labels))
    label_image = np.zeros((*previews.argmax.shape, 4))
    known = previews.argmax >= 0
    label_image[known, :3] = colours[previews.argmax[known]]
    label_image[known, 3] = 0.6
    label_ax.imshow(rgb, interpolation="nearest")
    label_ax.imshow(label_image, interpolation="nearest")
    label_ax.set_title("most probable class", fontsize=10)
    label_ax.set_axis_off()
    present = [int(v) for v in np.unique(previews.argmax[known])]
    handles = [Patch(color=colours[k], label=labels[k]) for k in present]
    if handles:
        label_ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                        title="class", title_fontsize=8)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig
