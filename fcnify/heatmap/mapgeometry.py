"""``MapGeometry``: where a score map's cells lie on the image, the one type the heatmap wing uses for it.

Cell (i, j) is the window of ``window`` pixels (y, x) whose top-left corner is ``offset + (i, j) · stride``.
Score files, viewers, previews and peaks all read a map's place through this type, in the pixels they work in
(level 0 for the files a slide gets; the original image's pixels for in-memory ``ScoreMap``s).

Not to be confused with ``fcnify.convert.Geometry``, which describes the *network* (receptive field, padding,
size steps, whether dense cells are exact) in the pixels of its own input. ``MapGeometry.of`` takes the three
numbers that place cells from it, and ``at_downsample``/``at_scale`` carry them to other pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["MapGeometry"]

_NAMES = ("stride", "offset", "window")


@dataclass(frozen=True)
class MapGeometry:
    """Cell (i, j) ↔ the window ``[offset + (i, j)·stride, … + window)`` (y, x), ints or floats.

    Attributes:
        stride: pixels between neighbouring cells' windows.
        offset: the top-left corner of cell (0, 0)'s window (negative for padded networks' border cells).
        window: the window's size (the network's training size, in these pixels).
    """

    stride: tuple
    offset: tuple
    window: tuple

    @classmethod
    def of(cls, source) -> MapGeometry:
        """The placement of ``source``: a network's ``convert.Geometry``, a ``ScoreMap``, another
        ``MapGeometry`` or score-file attributes (a mapping with ``stride``, ``offset``, ``window``)."""
        if isinstance(source, Mapping):
            return cls(*(tuple(source[name]) for name in _NAMES))
        return cls(*(tuple(getattr(source, name)) for name in _NAMES))

    def at_downsample(self, downsample: Sequence[float]) -> MapGeometry:
        """The same cells in level-0 pixels, for a map computed on a level ``downsample`` (y, x) level-0 pixels
        per pixel: ints stay ints when nothing was resampled, floats otherwise."""
        dy, dx = (float(v) for v in downsample)
        if (dy, dx) == (1.0, 1.0):
            return MapGeometry(*(tuple(int(v) for v in getattr(self, name)) for name in _NAMES))
        return MapGeometry(*((float(getattr(self, name)[0] * dy), float(getattr(self, name)[1] * dx))
                             for name in _NAMES))

    def at_scale(self, scale: Sequence[float]) -> MapGeometry:
        """The same cells in the original image's pixels, for a map of the image resized by ``scale`` (y, x)
        first: ints when it was not resized, floats otherwise."""
        sy, sx = (float(v) for v in scale)
        if (sy, sx) == (1.0, 1.0):
            return MapGeometry(*(tuple(int(v) for v in getattr(self, name)) for name in _NAMES))
        return MapGeometry(*((float(getattr(self, name)[0] / sy), float(getattr(self, name)[1] / sx))
                             for name in _NAMES))

    def window_start(self, axis: int, index: int) -> float:
        """The first pixel of cell ``index``'s window along ``axis`` (0: y, 1: x)."""
        return self.offset[axis] + index * self.stride[axis]

    def window_centre(self, i: int, j: int) -> tuple[float, float]:
        """The centre of cell (i, j)'s window (pixel-edge coordinates: pixel p spans [p, p+1))."""
        return (self.window_start(0, i) + self.window[0] / 2, self.window_start(1, j) + self.window[1] / 2)

    def centre_inside(self, cell: Sequence[int], size: Sequence[int]) -> tuple[float, float]:
        """The centre of the part of ``cell``'s window that lies in an image of ``size`` (the window's centre,
        except where an image smaller than the window was padded)."""
        centre = []
        for axis, q in enumerate(int(v) for v in cell):
            start = self.window_start(axis, q)
            low, high = max(0.0, start), min(float(size[axis]), start + self.window[axis])
            centre.append((low + high) / 2 if high > low else start + self.window[axis] / 2)
        return centre[0], centre[1]

    def corner(self, axis: int) -> float:
        """The top (0) or left (1) edge of cell 0's square: the stride-sized square around its window's centre,
        which is what a cell covers when the map is drawn as an image."""
        return self.offset[axis] + self.window[axis] / 2 - self.stride[axis] / 2

    def to_json(self) -> dict[str, list]:
        return {name: list(getattr(self, name)) for name in _NAMES}

    def arrays(self) -> dict[str, np.ndarray]:
        """``stride``, ``offset``, ``window`` as arrays (int64 when all are whole pixels, else float64), as the
        ``.scores.npz`` stores them."""
        values = {name: getattr(self, name) for name in _NAMES}
        exact = all(isinstance(v, (int, np.integer)) for value in values.values() for v in value)
        dtype = np.int64 if exact else np.float64
        return {name: np.asarray(value, dtype=dtype) for name, value in values.items()}
