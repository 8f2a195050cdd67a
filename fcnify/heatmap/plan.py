"""Planning one image: the score map's size, the tile grid with halos, and the foreground mask.

Tiles partition the *output* cells into blocks of ``cells`` × ``cells`` (the last row and column of blocks may
be smaller); these blocks are also the chunks of the zarr score store, so no two tiles ever write the same
chunk. A tile's input is the union of its cells' receptive fields, widened so that it starts on a multiple of
the network's stride and clipped to the image. Why that is exact: a cell depends only on the input pixels of
its receptive field (zero padding included); a tile that starts on a multiple of the stride lines every layer's
grid up with the whole image's grid, so a cell whose receptive field lies inside the tile reads the same values
as in one pass; where the tile's edge is the image's edge, the padding there is the one-pass padding too (the
last tile of each axis ends where the image ends, which also keeps ceil-mode pools aligned). The whole
network runs on each tile — its suffix too — so no map larger than a tile's is ever held.

Networks whose cells depend on the whole image (squeeze-excitation, "same" padding computed from the input
size, geometry fcnify could not derive) cannot be tiled exactly: they get one tile, and images too large for
one tile are refused.

Foreground: which images are masked at all depends on ``--foreground``: ``auto`` looks for a flat background,
``all`` computes every cell, and the default (``default``) means ``auto`` for slides and tiled TIFFs (glass
around tissue) and ``all`` for ordinary pictures read by Pillow (a sky or a white wall is content there, not
glass): see ``resolve_foreground``.

A thumbnail is read from a coarse pyramid level (about an eighth of the window per pixel, but never fewer than
``MASK_MIN_SIDE`` pixels along the image's longer side, so that at a coarse ``--mpp`` tissue does not average
away into the glass); if it shows a flat background (one colour, low
saturation, near white — brightfield slides — or near black — fluorescence, the digits scenes — covering at
least ``FLAT_FRACTION`` of it), a pixel is foreground when its colour lies more than ``DISTANCE`` from the
background colour, or (on white) is more saturated than the background by ``SATURATION``; the mask is cleaned
with a 3×3 median and widened by one thumbnail pixel. A cell is foreground when its *window* holds a foreground
pixel; a tile is computed when any of its cells is. Images without a flat background are all foreground.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from fcnify.errors import InputError, InternalError
from fcnify.heatmap.sources import read_thumbnail
from fcnify.introspect import placement

__all__ = [
    "DISTANCE", "FLAT_FRACTION", "FOREGROUND_MODES", "MASK_MIN_SIDE", "SATURATION", "AxisTile", "ForegroundMask",
    "NetworkBounds", "OutputGrid", "Tile", "TilePlan", "bounds_of", "cells_for_tile_size", "estimate_foreground",
    "map_size", "output_grids", "plan_tiles", "resolve_foreground", "tile_span"
]

_logger = logging.getLogger(__name__)

FOREGROUND_MODES = ("default", "auto", "all")
#: The mask's thumbnail has at least this many pixels along the image's longer side (the whole image where it is
#: smaller): at a coarse ``--mpp`` an eighth of the window would be so many slide pixels that the thumbnail
#: shrinks to a few pixels, in which small tissue averages away into the glass.
MASK_MIN_SIDE = 512
#: The background must cover at least this fraction of the thumbnail to count as a flat background.
FLAT_FRACTION = 0.25
#: Foreground: Euclidean RGB distance (0–255 per channel) from the background colour above this.
DISTANCE = 30.0
#: Foreground on white backgrounds also: saturation (max − min channel) above the background's by this.
SATURATION = 18.0
#: Pixels within this distance of the background colour count towards its share of the thumbnail.
_FLAT_DISTANCE = 24.0


# ---------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class NetworkBounds:
    """Where a network's cells read their input (per axis y, x; input pixels).

    Cell q reads input pixels ``[q·stride + lo, q·stride + hi)`` (its receptive field; ``lo`` may be negative
    for padded networks); its window is ``[q·stride + offset, q·stride + offset + window)``.
    """

    stride: tuple[int, int]
    lo: tuple[int, int]
    hi: tuple[int, int]
    offset: tuple[int, int]
    window: tuple[int, int]
    tileable: bool
    why_not: str = ""

    def halo(self, axis: int) -> int:
        """Input pixels a tile needs beyond ``cells · stride``: the receptive field plus the stride alignment."""
        return self.hi[axis] - (self.lo[axis] // self.stride[axis]) * self.stride[axis] - self.stride[axis]


def bounds_of(geometry) -> NetworkBounds:
    """The receptive-field bounds of a network from its ``Geometry``."""
    stride = tuple(int(s) for s in geometry.stride)
    offset = tuple(int(o) for o in geometry.offset)
    lo = tuple(offset[a] + math.floor(geometry.rf_centre[a] - geometry.receptive_field[a] / 2) for a in range(2))
    hi = tuple(offset[a] + math.ceil(geometry.rf_centre[a] + geometry.receptive_field[a] / 2) for a in range(2))
    why = ""
    if geometry.size_dependent_padding:
        why = "it pads by an amount computed from the input size ('same' padding)"
    elif geometry.global_context:
        why = "it pools over the whole image inside its body (squeeze-excitation)"
    elif geometry.notes:  # a ceil-mode pool's partial window is no note: tiles keep the one-pass grid
        why = f"its geometry is approximate ({geometry.notes[0]})"
    return NetworkBounds(stride, lo, hi, offset, tuple(int(w) for w in geometry.window), not why, why)


def map_size(fcn: nn.Module, geometry, in_chans: int, size: tuple[int, int]) -> tuple[int, int]:
    """The score map's (h, w) for an input of ``size``: the cells a one-pass forward gives, without computing it.

    One rule for every runtime and file format: the geometry's size steps (``Geometry.map_size``), which
    count the partial cells at the border of padded networks as one pass does. A geometry without them (a
    file written before fcnify recorded them) is counted by running a PyTorch network on fake tensors
    (shapes only), or, for onnxruntime, by the cells whose window lies in the image.
    """
    if getattr(geometry, "size_steps", None) is not None:
        return tuple(int(v) for v in geometry.map_size(*size))
    if not isinstance(fcn, nn.Module) or getattr(fcn, "runs_outside_torch", False):
        _logger.warning("the model's geometry has no size steps (a file from an older fcnify): the map keeps only "
                        "the cells whose window lies in the image; convert the model again for every cell")
        return tuple(geometry.valid_map_size(*size))
    dtype = placement(fcn)[1]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            out = fcn(torch.empty(1, in_chans, *size, dtype=dtype))
        return int(out.shape[-2]), int(out.shape[-1])
    except Exception as exc:  # an op fake tensors do not support: the geometry gives the same for most nets
        _logger.info("map size from the geometry (fake run failed: %s)", type(exc).__name__)
        return tuple(geometry.valid_map_size(*size))


# ------------------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class AxisTile:
    """One axis of a tile: output cells ``[first, last)`` and input pixels ``[start, stop)``."""

    first: int
    last: int
    start: int
    stop: int


@dataclass(frozen=True)
class Tile:
    """A tile: its index in the grid, its cells and its input region."""

    row: int
    col: int
    rows: AxisTile
    cols: AxisTile

    @property
    def input_shape(self) -> tuple[int, int]:
        return (self.rows.stop - self.rows.start, self.cols.stop - self.cols.start)


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one image.

    Attributes:
        image_size: the image (view) size (h, w) in pixels.
        canvas: the network's input size: the image, padded up to the window where it is smaller.
        map_size: the score map's cells (h, w).
        cells: cells per tile per axis (the zarr chunk size).
        rows, cols: the axis spans; the tiles are their product, row-major.
        stride: the network's stride (tile starts are multiples of it).
        min_input: the smallest input a tile may have per axis (the largest window of the network's outputs:
            the whole network runs on each tile, its other heads too).
    """

    image_size: tuple[int, int]
    canvas: tuple[int, int]
    map_size: tuple[int, int]
    cells: tuple[int, int]
    rows: tuple[AxisTile, ...]
    cols: tuple[AxisTile, ...]
    stride: tuple[int, int]
    min_input: tuple[int, int] = (0, 0)

    @property
    def grid(self) -> tuple[int, int]:
        return (len(self.rows), len(self.cols))

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

    def index(self, tile: Tile) -> int:
        return tile.row * len(self.cols) + tile.col

    def tiles(self) -> Iterator[Tile]:
        for i, r in enumerate(self.rows):
            for j, c in enumerate(self.cols):
                yield Tile(i, j, r, c)

    def tile(self, index: int) -> Tile:
        i, j = divmod(int(index), len(self.cols))
        return Tile(i, j, self.rows[i], self.cols[j])

    def input_pixels(self) -> int:
        """Pixels all tiles push through the network (halos included)."""
        return sum(r.stop - r.start for r in self.rows) * sum(c.stop - c.start for c in self.cols)


def tile_span(first: int, last: int, cells: int, canvas: int, stride: int, lo: int, hi: int,
              min_input: int = 0) -> AxisTile:
    """One axis of a tile holding cells ``[first, last)`` of a map of ``cells`` over an input of ``canvas`` px
    (at least ``min_input`` px where the canvas allows: earlier starts, still on the stride, keep the cells)."""
    # Start on a multiple of the stride so that every layer's grid in the tile is the image's, shifted.
    start = max(0, first * stride + (lo // stride) * stride)
    stop = canvas if last == cells else min(canvas, (last - 1) * stride + hi)
    if stop - start < min_input:
        start = max(0, ((stop - min_input) // stride) * stride)
    return AxisTile(first, last, start, stop)


def _plan_axis(cells: int, canvas: int, stride: int, lo: int, hi: int, per_tile: int,
               min_input: int = 0) -> tuple[AxisTile, ...]:
    return tuple(tile_span(first, min(first + per_tile, cells), cells, canvas, stride, lo, hi, min_input)
                 for first in range(0, cells, per_tile))


def _all_outputs(fcn: nn.Module, geometry, bounds: NetworkBounds) -> tuple[list[int], list[int], list[int]]:
    """(lo, hi, min_input) per axis widened for a network's other outputs: a tile's input then holds the
    receptive fields of the cells it owns of each output whose stride divides the selected one's
    (``output_grids``), and is never smaller than any output's window."""
    lo, hi = list(bounds.lo), list(bounds.hi)
    windows = [int(w) for w in geometry.window]
    selected = getattr(fcn, "selected", None)
    for name, other in (getattr(fcn, "geometries", None) or {}).items():
        if other is None or name == selected:
            continue
        theirs = bounds_of(other)
        for a in range(2):
            windows[a] = max(windows[a], theirs.window[a])
            if theirs.tileable and bounds.stride[a] % theirs.stride[a] == 0:
                lo[a] = min(lo[a], theirs.lo[a])
                hi[a] = max(hi[a], bounds.stride[a] - theirs.stride[a] + theirs.hi[a])
    return lo, hi, windows


def cells_for_tile_size(bounds: NetworkBounds, tile: tuple[int, int]) -> tuple[int, int]:
    """Cells per tile per axis for tiles of about ``tile`` input pixels (at least one cell).

    Raises:
        InputError: a tile smaller than the receptive field plus a stride.
    """
    cells = []
    for a in range(2):
        need = bounds.halo(a) + bounds.stride[a]
        if tile[a] < need:
            raise InputError(f"--tile {tile[0]}x{tile[1]} is smaller than the {bounds.hi[a] - bounds.lo[a]} px "
                             "receptive field plus a stride", hint=f"use a tile of at least {need} px, or --tile auto")
        cells.append((tile[a] - bounds.halo(a)) // bounds.stride[a])
    return tuple(cells)


def plan_tiles(fcn: nn.Module, geometry, in_chans: int, image_size: tuple[int, int],
               cells: tuple[int, int] | None) -> TilePlan:
    """The tile grid of an image of ``image_size`` for ``fcn``.

    Args:
        cells: cells per tile per axis; None: one tile for the whole image.

    Raises:
        InputError: the network cannot be tiled exactly and the image needs more than one tile.
    """
    bounds = bounds_of(geometry)
    lo, hi, windows = _all_outputs(fcn, geometry, bounds)
    canvas = tuple(max(int(image_size[a]), windows[a]) for a in range(2))
    size = map_size(fcn, geometry, in_chans, canvas)
    if min(size) < 1:
        raise InputError(f"the network gives an empty map for a {canvas[0]}x{canvas[1]} image",
                         hint="the model's window is larger than the image; pass --scale above 1")
    per_tile = tuple(size) if cells is None else tuple(max(1, min(int(c), s)) for c, s in zip(cells, size))
    if per_tile != tuple(size) and not bounds.tileable:
        raise InputError(f"this network cannot be computed tile by tile: {bounds.why_not}, so every cell depends "
                         f"on the whole image, and a {image_size[0]}x{image_size[1]} image needs several tiles",
                         hint="choose a coarser level (--level N or --mpp X) or --scale below 1 so that the image "
                         "fits one tile (--max-memory SIZE), or use a model without global context")
    rows = _plan_axis(size[0], canvas[0], bounds.stride[0], lo[0], hi[0], per_tile[0], windows[0])
    cols = _plan_axis(size[1], canvas[1], bounds.stride[1], lo[1], hi[1], per_tile[1], windows[1])
    return TilePlan(tuple(int(v) for v in image_size), canvas, tuple(size), per_tile, rows, cols, bounds.stride,
                    tuple(windows))


# ------------------------------------------------------------------------------------------ other outputs


@dataclass(frozen=True)
class OutputGrid:
    """Where the cells of one *other* output of a multi-output network come from in a tile plan.

    Each tile of the plan (laid out for the selected output) also gives this output's cells ``[first, last)``
    per axis: blocks of ``chunks`` cells (the zarr chunks of its array), the last block of an axis running to
    the map's end. Every such cell's receptive field lies inside its tile's input (or meets the image's edge
    where the tile does), and tiles start on multiples of this output's stride, so the cells equal one pass.

    Attributes:
        name: the output's name; channels: its channel count.
        geometry: its geometry (network input pixels).
        map_size: its one-pass map's (h, w); chunks: cells per tile block (h, w).
        rows, cols: per tile row / column, the cells ``(first, last)`` it owns.
    """

    name: str
    channels: int
    geometry: object
    map_size: tuple[int, int]
    chunks: tuple[int, int]
    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]

    def cells(self, tile: Tile) -> tuple[tuple[int, int], tuple[int, int]]:
        """The (rows, cols) cell ranges of this output that ``tile`` owns."""
        return self.rows[tile.row], self.cols[tile.col]

    def kept(self, tile: Tile, output: torch.Tensor) -> torch.Tensor:
        """The cells ``tile`` owns out of its K×h×w map of this output."""
        (r0, r1), (c0, c1) = self.cells(tile)
        top = r0 - tile.rows.start // int(self.geometry.stride[0])
        left = c0 - tile.cols.start // int(self.geometry.stride[1])
        if top < 0 or left < 0 or output.shape[-2] < top + r1 - r0 or output.shape[-1] < left + c1 - c0:
            raise InternalError(f"output {self.name}: a tile of {tile.input_shape[0]}x{tile.input_shape[1]} px gave "
                                f"a {output.shape[-2]}x{output.shape[-1]} map, which lacks its cells",
                                hint="please report this model: its geometry does not match its output")
        return output[..., top:top + r1 - r0, left:left + c1 - c0]


def output_grids(fcn: nn.Module, tiles: TilePlan) -> tuple[dict[str, OutputGrid], dict[str, str]]:
    """The grids of a network's outputs other than the selected one on ``tiles``, and why others are left out.

    A single-output network gives ``({}, {})``. An output is left out (name → reason) when its geometry is
    unknown, its map is empty, or, on a plan of several tiles, its cells cannot be cut along the tiles exactly
    (its stride does not divide the selected output's, a cell's receptive field crosses its tile's edge, or it
    has global context): one-tile plans always give its one-pass map.
    """
    names = tuple(getattr(fcn, "output_names", ()) or ())
    if len(names) < 2:
        return {}, {}
    grids: dict[str, OutputGrid] = {}
    skipped: dict[str, str] = {}
    for name in names:
        if name == fcn.selected:
            continue
        geometry = (getattr(fcn, "geometries", None) or {}).get(name)
        if geometry is None:
            skipped[name] = "its geometry is unknown"
            continue
        sizer = geometry.map_size if getattr(geometry, "size_steps", None) is not None else geometry.valid_map_size
        size = tuple(int(v) for v in sizer(*tiles.canvas))
        if min(size) < 1:
            skipped[name] = "its map is empty for this image"
            continue
        if tiles.count == 1:
            grids[name] = OutputGrid(name, int(fcn.channels[name]), geometry, size, size, ((0, size[0]),),
                                     ((0, size[1]),))
            continue
        bounds = bounds_of(geometry)
        if not bounds.tileable:
            skipped[name] = f"it cannot be computed tile by tile: {bounds.why_not}"
            continue
        if any(tiles.stride[a] % bounds.stride[a] for a in range(2)):
            skipped[name] = (f"its stride {bounds.stride[0]}x{bounds.stride[1]} does not divide the selected output's "
                             f"{tiles.stride[0]}x{tiles.stride[1]}, so its cells cannot follow the tiles (compute the "
                             "image in one tile with --tile larger than the image, or select it with --output)")
            continue
        axes = [_output_axis(spans, tiles.cells[a], tiles.stride[a], bounds, a, size[a], tiles.canvas[a])
                for a, spans in enumerate((tiles.rows, tiles.cols))]
        if None in axes:
            skipped[name] = "its receptive field crosses the tiles of the selected output"
            continue
        (chunk_r, rows), (chunk_c, cols) = axes
        grids[name] = OutputGrid(name, int(fcn.channels[name]), geometry, size, (chunk_r, chunk_c), rows, cols)
    for name, why in skipped.items():
        _logger.warning("output %s is left out of the score file: %s", name, why)
    return grids, skipped


def _output_axis(spans: tuple[AxisTile, ...], cells: int, stride: int, bounds: NetworkBounds, axis: int,
                 size: int, canvas: int) -> tuple[int, tuple[tuple[int, int], ...]] | None:
    """(cells per block, per tile (first, last)) of another output along one axis, or None where not exact."""
    step = bounds.stride[axis]
    if stride % step:
        return None
    chunk = cells * (stride // step)
    owned = []
    for t, span in enumerate(spans):
        first = min(size, t * chunk)
        last = size if t == len(spans) - 1 else min(size, (t + 1) * chunk)
        if span.start % step:
            return None
        for q in ((first, last - 1) if last > first else ()):
            inside_lo = q * step + bounds.lo[axis] >= span.start or span.start == 0
            inside_hi = q * step + bounds.hi[axis] <= span.stop or span.stop == canvas
            if not (inside_lo and inside_hi):
                return None
        owned.append((first, last))
    return chunk, tuple(owned)


# -------------------------------------------------------------------------------------------- foreground


@dataclass
class ForegroundMask:
    """Where an image holds something other than its flat background.

    Attributes:
        mask: bool, on the thumbnail's grid.
        downsample: image (view) pixels per mask pixel (y, x).
        background: the background colour (RGB 0–255).
        kind: "white" or "black".
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    background: tuple[int, int, int]
    kind: str

    def __post_init__(self):
        # A summed-area table answers "any foreground in this box?" for every cell in O(1).
        integral = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
        integral[1:, 1:] = np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1)
        self._integral = integral

    @property
    def fraction(self) -> float:
        """The foreground share of the thumbnail."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def _edges(self, first: int, last: int, axis: int, bounds: NetworkBounds) -> tuple[np.ndarray, np.ndarray]:
        starts = bounds.offset[axis] + np.arange(first, last, dtype=np.float64) * bounds.stride[axis]
        stops = starts + bounds.window[axis]
        n = self.mask.shape[axis]
        lo = np.clip(np.floor(starts / self.downsample[axis]), 0, n).astype(np.int64)
        hi = np.clip(np.ceil(stops / self.downsample[axis]), 0, n).astype(np.int64)
        return lo, np.maximum(hi, lo)

    def cells(self, rows: tuple[int, int], cols: tuple[int, int], bounds: NetworkBounds) -> np.ndarray:
        """bool (rows) × (cols): the cells whose window holds a foreground pixel."""
        y0, y1 = self._edges(rows[0], rows[1], 0, bounds)
        x0, x1 = self._edges(cols[0], cols[1], 1, bounds)
        s = self._integral
        counts = s[y1][:, x1] - s[y0][:, x1] - s[y1][:, x0] + s[y0][:, x0]
        return counts > 0


def _flat_background(thumb: np.ndarray) -> tuple[np.ndarray, str] | None:
    """The background colour and kind, when one flat white or black colour dominates; else None."""
    pixels = thumb.reshape(-1, 3)
    if not len(pixels):
        return None
    bins = (pixels[:, 0] // 32).astype(np.int64) * 64 + (pixels[:, 1] // 32) * 8 + pixels[:, 2] // 32
    mode = np.bincount(bins, minlength=512).argmax()
    colour = np.median(pixels[bins == mode], axis=0)
    saturation = float(colour.max() - colour.min())
    if saturation > 40:
        return None
    kind = "white" if colour.min() >= 170 else "black" if colour.max() <= 70 else None
    if kind is None:
        return None
    share = float((np.linalg.norm(pixels - colour, axis=1) <= _FLAT_DISTANCE).mean())
    if share < FLAT_FRACTION:
        return None
    return colour, kind


def resolve_foreground(mode: str, source) -> str:
    """``auto`` or ``all`` for ``--foreground mode`` on ``source``: ``default`` is ``auto`` for slides and tiled
    TIFFs (tifffile, OpenSlide), ``all`` for ordinary pictures (Pillow).

    Raises:
        InputError: an unknown mode.
    """
    if mode not in FOREGROUND_MODES:
        raise InputError(f"--foreground {mode!r} is not one of {', '.join(FOREGROUND_MODES)}",
                         hint="--foreground auto (skip a flat background), all, or leave it out (default: auto for "
                              "slides, all for ordinary pictures)")
    if mode == "default":
        return "all" if source.kind == "pillow" else "auto"
    return mode


def estimate_foreground(view, window: tuple[int, int], mode: str = "auto") -> ForegroundMask | None:
    """The foreground mask of an image (see the module docstring), or None when everything counts.

    The thumbnail is read at about an eighth of the window per pixel, but with at least ``MASK_MIN_SIDE`` pixels
    along the longer side (and at most 4 Mpx), from the coarsest pyramid level that is fine enough.
    """
    if resolve_foreground(mode, view.source) == "all":
        return None
    per_mask_pixel = max(1.0, min(window) / 8) * view.downsample[0]  # level-0 pixels
    fine_enough = max(view.source.size) / MASK_MIN_SIDE
    thumb, down0 = read_thumbnail(view, max_pixels=4_000_000, min_downsample=min(per_mask_pixel, fine_enough))
    downsample = (down0[0] / view.downsample[0], down0[1] / view.downsample[1])
    found = _flat_background(np.asarray(thumb, dtype=np.uint8))
    if found is None:
        _logger.info("no flat background: every cell is computed")
        return None
    colour, kind = found
    rgb = thumb.astype(np.float32)
    foreground = np.linalg.norm(rgb - colour, axis=2) > DISTANCE
    if kind == "white":
        saturation = rgb.max(axis=2) - rgb.min(axis=2)
        foreground |= saturation > float(colour.max() - colour.min()) + SATURATION
    cleaned = Image.fromarray(foreground.astype(np.uint8) * 255).filter(ImageFilter.MedianFilter(3))
    cleaned = cleaned.filter(ImageFilter.MaxFilter(3))
    mask = np.asarray(cleaned) > 0
    background = tuple(int(round(v)) for v in colour)
    _logger.info("%s background %s: %.1f%% foreground", kind, background, 100 * mask.mean())
    return ForegroundMask(mask, downsample, background, kind)
