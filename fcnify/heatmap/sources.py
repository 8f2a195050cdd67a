"""Image sources: every input the heatmap pipeline reads, from a small PNG to a gigapixel pyramidal slide.

An ``ImageSource`` has a pyramid of ``levels`` (finest first; ordinary images have one) and reads RGB regions of
any level on demand. ``open_source`` picks the reader:

* **Pillow** for ordinary images (PNG, JPEG, BMP, WebP, GIF, …), decoded whole through ``fcnify.images`` with its
  checks — the decompression-bomb guard (``max_pixels``) applies here, and only here.
* **tifffile + zarr** for the TIFF family (.tif, .svs, .ome.tif, .ndpi, .scn, .bif, .qptiff, BigTIFF, or any
  file with a TIFF header): regions are read tile by tile from the file, never a whole level, so there is no
  pixel limit.
* **OpenSlide** (an optional extra) for whole-slide formats tifffile cannot read (MIRAX, Hamamatsu VMS, …).

A ``LevelView`` is one resolution of a source — a stored level, or a level resampled to a pixel size (``mpp``)
or by a factor (``scale``) — and is what the pipeline reads tiles from. ``read_thumbnail`` gives a small picture
of the whole image with bounded memory.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from PIL import Image, UnidentifiedImageError

from fcnify import images
from fcnify.errors import InputError, MissingDependencyError, first_line
from fcnify.optional import require

__all__ = [
    "ImageSource", "Level", "LevelView", "OpenSlideSource", "PillowSource", "TiffSource", "open_source",
    "display_rgb", "is_tiff", "open_view", "read_thumbnail",
]

_logger = logging.getLogger(__name__)

TIFF_SUFFIXES: frozenset[str] = frozenset(
    (".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2", ".ndpi", ".scn", ".qptiff", ".bif"))
"""Suffixes of the TIFF family, read with tifffile (``.ome.tif`` ends in ``.tif``)."""

OPENSLIDE_SUFFIXES: frozenset[str] = frozenset((".mrxs", ".vms", ".vmu", ".svslide", ".dcm", ".czi"))
"""Whole-slide formats that only OpenSlide reads."""

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
_OPENSLIDE_HINT = "pip install 'fcnify[openslide]' to read whole-slide formats such as MIRAX (.mrxs) or VMS"
_DAMAGED_HINT = "the file is damaged or incomplete; re-export or re-download it"
# Series tifffile names for a slide's associated images (not the tissue): never the image to read.
_ASSOCIATED = frozenset(("thumbnail", "label", "macro", "overview", "map"))
# Micrometres per unit of OME's PhysicalSize units (µm is OME's default).
_OME_UNITS = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4,
              "mm": 1e3, "cm": 1e4, "dm": 1e5, "m": 1e6}


# ------------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Level:
    """One stored resolution of an image.

    Attributes:
        size: (height, width) in this level's pixels.
        downsample: level-0 pixels per pixel of this level, (y, x); level 0 is (1.0, 1.0).
    """

    size: tuple[int, int]
    downsample: tuple[float, float]


class ImageSource(abc.ABC):
    """An image with a pyramid of resolutions whose RGB regions can be read on demand.

    Attributes:
        path: the path or URI as given.
        kind: "pillow", "tifffile" or "openslide".
        levels: the stored resolutions, finest first; ``levels[0]`` is the full-resolution image.
        mpp: micrometres per level-0 pixel (y, x), when the file records it.
        whole: True when the image is decoded whole in memory (Pillow); False when regions are read on demand.
        channels: the channels ``read_region`` gives: 3 (RGB), or the bands a scene is read with
            (``geo.GeoSource``).
    """

    path: str
    kind: str
    levels: tuple[Level, ...]
    mpp: tuple[float, float] | None
    whole: bool
    channels: int = 3

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of level 0."""
        return self.levels[0].size

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The pixels [y, y+h) × [x, x+w) of ``level`` as uint8 h×w×3 RGB (h×w×``channels``).

        Only the stored tiles the region touches are decoded.

        Raises:
            InputError: a level out of range, a region not inside the level, or a tile that cannot be decoded
                (truncated or corrupt file).
        """
        if not 0 <= level < len(self.levels):
            raise InputError(f"{self.path} has no level {level}", hint=f"levels: {_describe_levels(self)}")
        height, width = self.levels[level].size
        if h < 0 or w < 0 or y < 0 or x < 0 or y + h > height or x + w > width:
            raise InputError(
                f"{self.path}: region y {y}, x {x}, {h}×{w} is not inside level {level} ({height}×{width})",
                hint="read regions inside the image")
        if h == 0 or w == 0:
            return np.zeros((h, w, self.channels), np.uint8)
        return self._read(level, int(y), int(x), int(h), int(w))

    @abc.abstractmethod
    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """``read_region`` after its checks: the region is non-empty and inside the level."""

    def close(self) -> None:  # noqa: B027 - not abstract: a source decoded in memory holds no file
        """Release the file (idempotent)."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, levels={_describe_levels(self)}, mpp={self.mpp})"


def _describe_levels(source: ImageSource) -> str:
    return ", ".join(f"{i} ({lv.size[0]}×{lv.size[1]})" for i, lv in enumerate(source.levels))


class PillowSource(ImageSource):
    """An ordinary image decoded whole by Pillow (one level), with ``fcnify.images``' checks.

    ``mpp`` comes from the image's DPI (25400 / dpi) when it records one.
    """

    kind = "pillow"
    whole = True

    def __init__(self, path: str, max_pixels: int | None = None):
        self.path = str(path)
        if "://" in self.path:
            with images.open_uri(self.path) as f:
                image = images.read_image_bytes(f.read(), self.path, max_pixels)
        else:
            image = images.read_image(self.path, max_pixels)
        self._array = np.ascontiguousarray(images.display_rgb(image))
        self.levels = (Level((self._array.shape[0], self._array.shape[1]), (1.0, 1.0)),)
        self.mpp = _dpi_mpp(image.info.get("dpi"))

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self._array[y:y + h, x:x + w].copy()


def _dpi_mpp(dpi) -> tuple[float, float] | None:
    try:
        x_dpi, y_dpi = (float(v) for v in dpi)
    except (TypeError, ValueError):
        return None
    if not (x_dpi > 0 and y_dpi > 0 and math.isfinite(x_dpi) and math.isfinite(y_dpi)):
        return None
    return (25400.0 / y_dpi, 25400.0 / x_dpi)


class TiffSource(ImageSource):
    """A TIFF-family file read tile by tile with tifffile and zarr (v3).

    The image is the file's largest series that is not an associated image (thumbnail, label, macro, reduced
    pages); its ``series.levels`` are the pyramid (SVS reduced pages, OME SubIFDs, generic multi-page pyramids).
    The TiffFile and one zarr array per level stay open until ``close``.

    Pixels become RGB uint8: RGB(A) samples (alpha dropped), grey replicated to 3 channels, planar channels
    (C = 1, 3 or 4) moved last, singleton axes (OME T, Z) squeezed; of other non-singleton axes (focal planes,
    time points) the first plane is read. Palette images go through their colour map, min-is-white ones are
    inverted. Data that is not uint8 (uint16, float, …) is scaled linearly by 255 / the maximum of the coarsest
    level (computed once, on the first read; negative values and NaN become 0).

    ``mpp`` comes from the Aperio description (``MPP``), OME-XML (``PhysicalSizeX/Y`` with their units), or the
    X/YResolution tags with ResolutionUnit inch or centimetre; GeoTIFFs (ground units) and files without a unit
    have none.
    """

    kind = "tifffile"
    whole = False

    def __init__(self, path: str):
        self.path = str(path)
        self._handle = None
        self._tif = None
        self._stores: list[Any] = []
        self._scale_lock = threading.Lock()
        self._scale: float | None = None
        try:
            if "://" in self.path:
                self._handle = images.open_uri(self.path)
                self._tif = tifffile.TiffFile(self._handle, name=self.path)
            else:
                self._tif = tifffile.TiffFile(self.path)
            tif = self._tif
            index, series = _main_series(tif, self.path)
            self._series = series
            self._arrays = []
            for j in range(len(series.levels)):
                store = tif.aszarr(series=index, level=j)
                self._stores.append(store)
                self._arrays.append(zarr.open_array(store, mode="r"))
            self._axes = [_axes_plan(self.path, series.levels[j], self._arrays[j]) for j in range(len(series.levels))]
            keyframe = series.keyframe
            self._photometric = int(keyframe.photometric)
            self._colormap = _colormap(keyframe) if self._photometric == 3 else None
            self._check_photometric(self._photometric)
            self._dtype = np.dtype(self._arrays[0].dtype)
            height0, width0 = self._axes[0].size
            levels = []
            for plan in self._axes:
                height, width = plan.size
                levels.append(Level((height, width), (height0 / height, width0 / width)))
            self.levels = tuple(levels)
            self.mpp = _tiff_mpp(tif, index, keyframe)
        except InputError:
            self.close()
            raise
        except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error… on damaged headers
            self.close()
            raise InputError(f"{self.path} is not a TIFF file tifffile can read ({type(exc).__name__}: "
                             f"{first_line(exc, 160)})", hint=_DAMAGED_HINT) from exc
        _logger.debug("%s: %s series %r, levels %s, mpp %s", self.path, series.kind, series.name,
                      _describe_levels(self), self.mpp)

    def _check_photometric(self, photometric: int) -> None:
        # 0 min-is-white, 1 min-is-black, 2 RGB, 3 palette, 6 YCbCr (JPEG tiles are decoded to RGB by tifffile)
        if photometric not in (0, 1, 2, 3, 6):
            name = tifffile.PHOTOMETRIC(photometric).name if photometric in tifffile.PHOTOMETRIC._value2member_map_ \
                else str(photometric)
            raise InputError(f"{self.path} has {name} colours, which fcnify cannot convert to RGB",
                             hint="convert it to an RGB or greyscale TIFF")

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        plan = self._axes[level]
        array = self._arrays[level]
        try:
            data = np.asarray(array[plan.index(y, x, h, w)])
        except Exception as exc:  # zarr, imagecodecs and tifffile errors on a truncated or corrupt tile
            ty, tx = self._failing_tile(level, y, x, h, w, exc)
            raise InputError(f"{self.path}: a tile at level {level}, y {ty}, x {tx} cannot be decoded "
                             f"(truncated or corrupt file: {type(exc).__name__}: {first_line(exc, 160)})",
                             hint=_DAMAGED_HINT) from exc
        return self._to_rgb(plan.arrange(data))

    def _failing_tile(self, level: int, y: int, x: int, h: int, w: int, exc: Exception) -> tuple[int, int]:
        """The origin of the first stored tile of the region that fails to decode (the region's corner if none
        fails on its own)."""
        plan, array = self._axes[level], self._arrays[level]
        th, tw = plan.chunk
        for ty in range(y // th * th, y + h, th):
            for tx in range(x // tw * tw, x + w, tw):
                y0, x0 = max(ty, y), max(tx, x)
                try:
                    array[plan.index(y0, x0, min(ty + th, y + h) - y0, min(tx + tw, x + w) - x0)]
                except Exception:
                    return ty, tx
        return y, x

    def _to_rgb(self, data: np.ndarray) -> np.ndarray:
        """h×w×C data of the file's type → h×w×3 uint8."""
        if self._colormap is not None:
            return self._colormap[np.clip(data[..., 0].astype(np.intp), 0, len(self._colormap) - 1)]
        if data.dtype != np.uint8:
            data = self._to_uint8(data)
        if self._photometric == 0:  # min-is-white
            data = 255 - data
        channels = data.shape[2]
        if channels == 1:
            return np.repeat(data, 3, axis=2)
        return np.ascontiguousarray(data[..., :3])

    def _to_uint8(self, data: np.ndarray) -> np.ndarray:
        if data.dtype == np.bool_:
            return data.astype(np.uint8) * 255
        scale = self._value_scale()
        values = np.nan_to_num(data.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0) * np.float32(scale)
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)

    def _value_scale(self) -> float:
        """255 / the maximum of the coarsest level, read block by block once (bounded memory)."""
        with self._scale_lock:
            if self._scale is None:
                level = len(self.levels) - 1
                plan, array = self._axes[level], self._arrays[level]
                height, width = plan.size
                top = 0.0
                for y in range(0, height, 1024):
                    for x in range(0, width, 1024):
                        block = np.asarray(array[plan.index(y, x, min(1024, height - y), min(1024, width - x))])
                        if block.size:
                            top = max(top, float(np.nanmax(np.where(np.isfinite(block), block, 0))))
                self._scale = 255.0 / top if top > 0 else 1.0
                _logger.info("%s: %s data scaled by 255/%g to 8 bits", self.path, self._dtype, top)
            return self._scale

    def close(self) -> None:
        for store in self._stores:
            try:
                store.close()
            except Exception:  # closing is best effort; the TiffFile below is what holds the file
                pass
        self._stores = []
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _is_associated(tif, series) -> bool:
    """A thumbnail, label or macro image (or another reduced page), not the tissue."""
    if (series.name or "").strip().lower() in _ASSOCIATED:
        return True
    keyframe = series.keyframe
    if keyframe.is_reduced:
        return True
    # OME keeps the whole XML (which may name a label image) on the first page; other formats describe each
    # associated page in its own description ("label 387x463" in SVS)
    if not tif.is_ome and keyframe.offset != tif.pages.first.offset:
        description = (keyframe.description or "").lower()
        if "label" in description or "macro" in description:
            return True
    return False


def _plane_pixels(series) -> int:
    shape = dict(zip(series.axes, series.shape))
    return int(shape.get("Y", 0)) * int(shape.get("X", 0))


def _main_series(tif, path: str) -> tuple[int, Any]:
    """(index, series) of the largest series that is not an associated image."""
    series = tif.series
    if not series:
        raise InputError(f"{path} has no images", hint=_DAMAGED_HINT)
    candidates = [(i, s) for i, s in enumerate(series) if not _is_associated(tif, s)] or list(enumerate(series))
    index, chosen = max(candidates, key=lambda item: _plane_pixels(item[1]))
    ignored = [s.name or f"#{s.index}" for i, s in enumerate(series) if i != index]
    if ignored:
        _logger.debug("%s: reading series %d; ignoring %s", path, index, ", ".join(ignored))
    return index, chosen


@dataclass(frozen=True)
class _AxesPlan:
    """How to slice one level's zarr array and arrange the result as h×w×C."""

    axes: str
    shape: tuple[int, ...]
    chunk: tuple[int, int]
    channel: int | None  # the channel axis' position in ``axes``, if any

    @property
    def size(self) -> tuple[int, int]:
        return self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")]

    def index(self, y: int, x: int, h: int, w: int) -> tuple:
        key = []
        for i, axis in enumerate(self.axes):
            if axis == "Y":
                key.append(slice(y, y + h))
            elif axis == "X":
                key.append(slice(x, x + w))
            elif i == self.channel:
                key.append(slice(None))
            else:
                key.append(0)
        return tuple(key)

    def arrange(self, data: np.ndarray) -> np.ndarray:
        kept = [a for i, a in enumerate(self.axes) if a in "YX" or i == self.channel]
        if self.channel is None:
            return data.transpose(kept.index("Y"), kept.index("X"))[..., None]
        return data.transpose(kept.index("Y"), kept.index("X"), kept.index(self.axes[self.channel]))


def _axes_plan(path: str, series, array) -> _AxesPlan:
    axes = series.axes
    if len(axes) != array.ndim:
        axes = series.get_axes(False)
    if len(axes) != array.ndim or "Y" not in axes or "X" not in axes:
        raise InputError(f"{path}: cannot read images with axes {series.axes!r}",
                         hint="convert it to an RGB or greyscale TIFF")
    shape = tuple(int(n) for n in array.shape)
    others = [i for i, a in enumerate(axes) if a not in "YX" and shape[i] > 1]
    channel_axes = [i for i in others if axes[i] in "SC"]
    channel = channel_axes[-1] if channel_axes else None
    if channel is not None and shape[channel] not in (3, 4):
        raise InputError(f"{path} has {shape[channel]} channels",
                         hint="fcnify reads greyscale (1 channel), RGB (3) or RGBA (4) images")
    extra = [i for i in others if i != channel]
    if extra:
        _logger.warning("%s: reading the first of %s along axes %s", path,
                        "×".join(str(shape[i]) for i in extra), "".join(axes[i] for i in extra))
    chunks = tuple(int(c) for c in array.chunks)
    chunk = (chunks[axes.index("Y")], chunks[axes.index("X")])
    return _AxesPlan(axes, shape, chunk, channel)


def _colormap(keyframe) -> np.ndarray | None:
    colormap = keyframe.colormap
    if colormap is None:
        return None
    colormap = np.asarray(colormap)
    if colormap.max() > 255:  # TIFF colour maps are 16-bit
        colormap = colormap >> 8
    return np.ascontiguousarray(colormap.T.astype(np.uint8))


def _tiff_mpp(tif, index: int, keyframe) -> tuple[float, float] | None:
    if tif.is_svs:
        # Aperio descriptions are "header|key = value|…" (tifffile's svs_description_metadata is not exported
        # at the package level in every version, and only MPP is needed)
        found = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", tif.pages.first.description or "")
        try:
            value = float(found.group(1)) if found else 0.0
        except ValueError:
            value = 0.0
        if value > 0 and math.isfinite(value):
            return (value, value)
    if tif.is_ome:
        found = _ome_mpp(tif.ome_metadata, index)
        if found is not None:
            return found
    if keyframe.is_geotiff:  # resolution tags of a map are not a microscope's pixel size
        return None
    return _resolution_mpp(keyframe)


def _ome_mpp(xml: str | None, index: int) -> tuple[float, float] | None:
    if not xml:
        return None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    pixels = [e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return None
    element = pixels[index] if index < len(pixels) else pixels[0]
    values = []
    for axis in ("Y", "X"):
        try:
            value = float(element.get(f"PhysicalSize{axis}", "nan"))
        except ValueError:
            return None
        unit = _OME_UNITS.get(element.get(f"PhysicalSize{axis}Unit", "µm").strip())
        if unit is None or not (value > 0 and math.isfinite(value)):
            return None
        values.append(value * unit)
    return (values[0], values[1])


def _resolution_mpp(keyframe) -> tuple[float, float] | None:
    unit = int(keyframe.resolutionunit)
    per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # µm per inch, per centimetre; 1 (none): no physical unit
    if per_unit is None:
        return None
    try:
        x_res, y_res = (float(v) for v in keyframe.resolution)
    except (TypeError, ValueError):
        return None
    if not (x_res > 0 and y_res > 0 and math.isfinite(x_res) and math.isfinite(y_res)):
        return None
    return (per_unit / y_res, per_unit / x_res)


class OpenSlideSource(ImageSource):
    """A whole-slide image read with OpenSlide (an optional dependency: ``pip install 'fcnify[openslide]'``).

    Levels come from ``level_dimensions`` (downsample = level-0 size / level size per axis), ``mpp`` from the
    ``openslide.mpp-y``/``openslide.mpp-x`` properties. Transparent pixels (outside scanned areas) are
    composited onto white.
    """

    kind = "openslide"
    whole = False

    def __init__(self, path: str):
        self.path = str(path)
        openslide = _import_openslide(self.path)
        if "://" in self.path:
            raise InputError(f"{self.path}: OpenSlide reads local files only",
                             hint="copy the slide to a local disk first")
        try:
            self._slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise InputError(f"{self.path} is not an image format fcnify can read",
                             hint="give a TIFF, SVS, OME-TIFF, PNG, JPEG or a format OpenSlide reads") from exc
        except Exception as exc:  # OpenSlideError: a damaged slide
            raise InputError(f"{self.path} cannot be opened by OpenSlide ({type(exc).__name__}: "
                             f"{first_line(exc, 160)})", hint=_DAMAGED_HINT) from exc
        self._error = openslide.OpenSlideError
        width0, height0 = self._slide.level_dimensions[0]
        self.levels = tuple(Level((int(h), int(w)), (height0 / h, width0 / w))
                            for w, h in self._slide.level_dimensions)
        # OpenSlide maps level coordinates to level 0 with its own (single) downsample per level
        self._downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        props = self._slide.properties
        try:
            mpp = (float(props["openslide.mpp-y"]), float(props["openslide.mpp-x"]))
            self.mpp = mpp if all(v > 0 and math.isfinite(v) for v in mpp) else None
        except (KeyError, ValueError):
            self.mpp = None

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        ds = self._downsamples[level]
        try:
            rgba = np.asarray(self._slide.read_region((round(x * ds), round(y * ds)), level, (w, h)))
        except self._error as exc:
            raise InputError(f"{self.path}: a tile at level {level} near y {y}, x {x} cannot be decoded "
                             f"(truncated or corrupt file: {first_line(exc, 160)})", hint=_DAMAGED_HINT) from exc
        alpha = rgba[..., 3:4].astype(np.uint16)
        if bool((alpha == 255).all()):
            return np.ascontiguousarray(rgba[..., :3])
        # OpenSlide returns un-premultiplied RGBA; what lies outside the scanned area is transparent
        rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None


def _import_openslide(path: str):
    # openslide-python is an optional extra (it needs the OpenSlide C library): import it only for the
    # formats that need it, so everything else works without it
    return require("openslide", "openslide", f"read {Path(path).name} (whole-slide formats such as MIRAX or VMS)")


def is_tiff(path: str) -> bool:
    """Whether the file starts with a TIFF or BigTIFF header."""
    try:
        return _header(path)[:4] in _TIFF_MAGIC
    except OSError:
        return False


def display_rgb(pixels: np.ndarray) -> np.ndarray:
    """h×w×C uint8 as h×w×3 for pictures: grey (C = 1 or 2) repeated, the first three of more channels."""
    channels = pixels.shape[2]
    if channels == 3:
        return pixels
    if channels < 3:
        return np.repeat(pixels[..., :1], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def _header(path: str) -> bytes:
    if "://" in path:
        with images.open_uri(path) as f:
            return f.read(8)
    with open(path, "rb") as f:
        return f.read(8)


def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1] if "://" in path else Path(path).name
    return Path(name).suffix.lower()


def _pillow_identifies(path: str) -> bool:
    """Whether Pillow recognises the file (header only; the real decode and its checks come later)."""
    # Pillow's pixel limit is a global: lift it only under images' lock, so that identifying a large image
    # neither fails here nor disturbs another thread's decode
    with images.PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path):
                return True
        except UnidentifiedImageError:
            return False
        except Exception:  # damaged but recognised: read_image reports it properly
            return True
        finally:
            Image.MAX_IMAGE_PIXELS = old


def open_source(path: str | os.PathLike, max_pixels: int | None = None) -> ImageSource:
    """Open an image with the reader its format needs.

    Args:
        path: a local path, or a URI pyarrow reads (``s3://…``) for Pillow and TIFF files.
        max_pixels: the decompression-bomb guard for images Pillow decodes whole (None: Pillow's default;
            0: no limit). TIFF-family files are read tile by tile and are never subject to it.

    Returns:
        A ``PillowSource`` for ordinary images, a ``TiffSource`` for TIFF-family files (by suffix or header),
        an ``OpenSlideSource`` for whole-slide formats only OpenSlide reads.

    Raises:
        InputError: a missing file ("no such image: PATH"), a folder, an empty, damaged or unknown file, an image
            over ``max_pixels``, or a format that needs the missing OpenSlide extra.
    """
    path = str(path)
    if "://" not in path:
        if not os.path.exists(path):
            raise InputError(f"no such image: {path}", hint="check the path")
        if os.path.isdir(path):
            raise InputError(f"{path} is a folder, not an image", hint="give image files, or the folder's images")
        try:
            if os.path.getsize(path) == 0:
                raise InputError(f"{path} is empty (0 bytes)", hint="the file was not written completely")
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}", hint="check the file's permissions") from exc
    try:
        header = _header(path)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}", hint="check the file's permissions") from exc
    suffix = _suffix(path)
    if header[:4] in _TIFF_MAGIC:
        return TiffSource(path)
    if suffix in TIFF_SUFFIXES:
        raise InputError(f"{path} is not a TIFF file (its header is {header[:4]!r})",
                         hint=_DAMAGED_HINT + ", or give it the suffix of its real format")
    if suffix in OPENSLIDE_SUFFIXES:
        return OpenSlideSource(path)
    if "://" in path or _pillow_identifies(path):
        return PillowSource(path, max_pixels)
    try:
        openslide = _import_openslide(path)
    except MissingDependencyError as exc:  # an unknown format is first of all not an image we can read
        raise InputError(f"{path} is not an image format Pillow or tifffile can read",
                         hint=f"if it is a whole-slide image, {_OPENSLIDE_HINT}") from exc
    if openslide.OpenSlide.detect_format(path) is None:
        raise InputError(f"{path} is not an image format fcnify can read",
                         hint="give a PNG, JPEG, TIFF, SVS, OME-TIFF or a format OpenSlide reads")
    return OpenSlideSource(path)


# ------------------------------------------------------------------------------------------------ views


@dataclass(frozen=True)
class LevelView:
    """One resolution of a source: a stored level, possibly resampled. This is what the pipeline reads.

    Attributes:
        source: the image.
        level: the pyramid level read from.
        size: (height, width) at this resolution (after resampling).
        downsample: level-0 pixels per pixel of this view (y, x).
        mpp: micrometres per pixel of this view, when the source has a pixel size.
    """

    source: ImageSource
    level: int
    size: tuple[int, int]
    downsample: tuple[float, float]
    mpp: tuple[float, float] | None

    @property
    def resampled(self) -> bool:
        """Whether reads are resampled from the level (False: the level's pixels as stored)."""
        return self.size != self.source.levels[self.level].size

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The view's pixels [y, y+h) × [x, x+w) as uint8 h×w×3.

        A resampled view reads the level's region plus a margin and resizes it with Pillow (bilinear, with
        antialiasing when shrinking) through ``box``, so that any region equals the same region of the whole
        level resized at once.

        Raises:
            InputError: a region not inside ``size``, or an unreadable tile.
        """
        height, width = self.size
        if h < 0 or w < 0 or y < 0 or x < 0 or y + h > height or x + w > width:
            raise InputError(f"{self.source.path}: region y {y}, x {x}, {h}×{w} is not inside the view "
                             f"({height}×{width})", hint="read regions inside the image")
        if not self.resampled:
            return self.source.read_region(self.level, y, x, h, w)
        if h == 0 or w == 0:
            return np.zeros((h, w, self.source.channels), np.uint8)
        level_h, level_w = self.source.levels[self.level].size
        sy, sx = level_h / height, level_w / width  # level pixels per view pixel
        top, bottom = y * sy, (y + h) * sy
        left, right = x * sx, (x + w) * sx
        # Pillow's bilinear filter reaches max(1, scale) source pixels either side of a sample: read that much
        # more (and one pixel for rounding), clipped to the level, where Pillow clips too
        my, mx = math.ceil(max(1.0, sy)) + 1, math.ceil(max(1.0, sx)) + 1
        y0, y1 = max(0, math.floor(top) - my), min(level_h, math.ceil(bottom) + my)
        x0, x1 = max(0, math.floor(left) - mx), min(level_w, math.ceil(right) + mx)
        region = self.source.read_region(self.level, y0, x0, y1 - y0, x1 - x0)
        box = (left - x0, top - y0, right - x0, bottom - y0)
        if region.shape[2] != 3:  # bands of a scene: each resized on its own, as Pillow has no mode for them
            return np.stack([np.asarray(Image.fromarray(region[..., c]).resize((w, h), Image.Resampling.BILINEAR,
                                                                                 box=box))
                             for c in range(region.shape[2])], axis=2)
        return np.asarray(Image.fromarray(region).resize((w, h), Image.Resampling.BILINEAR, box=box))


def _level_mpp(source: ImageSource, level: int) -> tuple[float, float]:
    assert source.mpp is not None
    ds = source.levels[level].downsample
    return (source.mpp[0] * ds[0], source.mpp[1] * ds[1])


def _view(source: ImageSource, level: int, size: tuple[int, int]) -> LevelView:
    level_h, level_w = source.levels[level].size
    ds = source.levels[level].downsample
    downsample = (ds[0] * level_h / size[0], ds[1] * level_w / size[1])
    mpp = None if source.mpp is None else (source.mpp[0] * downsample[0], source.mpp[1] * downsample[1])
    return LevelView(source, level, size, downsample, mpp)


# A level whose pixel size is within this fraction above the requested one is used as if it were finer:
# upsampling by under 1% costs nothing visible, reading the next finer level costs 4–16× the pixels.
MPP_TOLERANCE = 0.01


def open_view(source: ImageSource, level: int | None = None, mpp: float | None = None,
              scale: float = 1.0) -> LevelView:
    """The resolution of ``source`` the network sees.

    Args:
        source: the image.
        level: read that pyramid level as stored.
        mpp: read at this many micrometres per pixel: the nearest level at least as fine (its pixel size
            ≤ ``mpp``, within ``MPP_TOLERANCE``), resampled. When even level 0 is coarser, level 0 is
            upsampled (with a warning). The view's size is the level's size × (level mpp / ``mpp``) rounded to
            whole pixels, so its ``mpp`` attribute is ``mpp`` up to that rounding (exact where it divides).
        scale: resize factor (``--scale`` for ordinary images); applies to level 0, or to ``level`` when given.

    Raises:
        InputError: ``level`` out of range (the message lists the levels), ``mpp`` for a source without a pixel
            size, ``mpp`` together with ``level`` or ``scale``, or a non-positive ``mpp``/``scale``.
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InputError(f"--scale {scale} is not a positive number", hint="e.g. --scale 0.5 halves the image")
    if mpp is not None and level is not None:
        raise InputError("--mpp and --level choose the resolution twice", hint="give one of them")
    if mpp is not None and scale != 1.0:
        raise InputError("--mpp and --scale choose the resolution twice", hint="give one of them")
    if level is not None:
        if not (isinstance(level, (int, np.integer)) and 0 <= level < len(source.levels)):
            raise InputError(f"{source.path} has no level {level}; its levels are {_describe_levels(source)}",
                             hint=f"--level 0 to --level {len(source.levels) - 1}")
        return _scaled(source, int(level), scale)
    if mpp is None:
        return _scaled(source, 0, scale)
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise InputError(f"--mpp {mpp} is not a positive number", hint="e.g. --mpp 0.5 (20× magnification)")
    if source.mpp is None:
        raise InputError(f"{source.path} does not record its pixel size, so --mpp {mpp} cannot be honoured",
                         hint=f"--level N instead (levels: {_describe_levels(source)})")
    finer = [i for i in range(len(source.levels)) if max(_level_mpp(source, i)) <= mpp * (1 + MPP_TOLERANCE)]
    if finer:
        chosen = finer[-1]  # levels are finest first: the last fine-enough one is the nearest
    else:
        chosen = 0
        _logger.warning("%s: level 0 is %.4g µm/px, coarser than --mpp %g: upsampling", source.path,
                        max(source.mpp), mpp)
    level_mpp = _level_mpp(source, chosen)
    level_h, level_w = source.levels[chosen].size
    factor = (level_mpp[0] / mpp, level_mpp[1] / mpp)
    size = (max(1, round(level_h * factor[0])), max(1, round(level_w * factor[1])))
    view = _view(source, chosen, size)
    _logger.info("%s: --mpp %g reads level %d (%.4g µm/px) resampled to %d×%d", source.path, mpp, chosen,
                 max(level_mpp), size[0], size[1])
    return view


def _scaled(source: ImageSource, level: int, scale: float) -> LevelView:
    level_h, level_w = source.levels[level].size
    if scale == 1.0:
        return _view(source, level, (level_h, level_w))
    return _view(source, level, (max(1, round(level_h * scale)), max(1, round(level_w * scale))))


# ------------------------------------------------------------------------------------------------ thumbnails

_THUMBNAIL_BLOCK = 2048  # level pixels per block side read for a thumbnail: bounds its memory


def read_thumbnail(view_or_source: LevelView | ImageSource, max_pixels: int = 4_000_000,
                   min_downsample: float = 1.0) -> tuple[np.ndarray, tuple[float, float]]:
    """A small RGB picture of the whole image and its downsample relative to level 0.

    The downsample d ≥ ``min_downsample`` (and ≥ 1) is the least that keeps the thumbnail within
    ``max_pixels``; the thumbnail is box-averaged (Pillow ``BOX``) from the coarsest stored level whose
    downsample ≤ d, block by block, so memory stays bounded by the thumbnail and one block — never a whole
    fine level.

    Args:
        view_or_source: the image (a view's source is used: the thumbnail is of the whole stored image).
        max_pixels: the most pixels the thumbnail may have.
        min_downsample: the least level-0 pixels per thumbnail pixel.

    Returns:
        (thumbnail uint8 h×w×3 (``display_rgb`` of other channel counts), (level-0 rows per thumbnail row,
        level-0 columns per thumbnail column)).
    """
    source = view_or_source.source if isinstance(view_or_source, LevelView) else view_or_source
    height0, width0 = source.size
    if max_pixels < 1:
        raise InputError(f"a thumbnail of {max_pixels} pixels is impossible", hint="allow at least one pixel")
    d = max(1.0, float(min_downsample), math.sqrt(height0 * width0 / max_pixels))
    while True:
        th, tw = max(1, round(height0 / d)), max(1, round(width0 / d))
        if th * tw <= max_pixels:
            break
        d *= 1.001
    downsample = (height0 / th, width0 / tw)
    usable = [i for i, lv in enumerate(source.levels)
              if lv.downsample[0] <= downsample[0] * (1 + 1e-9) and lv.downsample[1] <= downsample[1] * (1 + 1e-9)]
    level = usable[-1] if usable else 0
    level_h, level_w = source.levels[level].size
    if (level_h, level_w) == (th, tw):
        return display_rgb(source.read_region(level, 0, 0, th, tw)), downsample
    sy, sx = level_h / th, level_w / tw  # level pixels per thumbnail pixel
    rows = max(1, int(_THUMBNAIL_BLOCK / sy))  # thumbnail pixels per block
    cols = max(1, int(_THUMBNAIL_BLOCK / sx))
    thumb = np.empty((th, tw, 3), np.uint8)
    for i0 in range(0, th, rows):
        i1 = min(th, i0 + rows)
        top, bottom = i0 * sy, i1 * sy
        y0, y1 = max(0, math.floor(top) - 1), min(level_h, math.ceil(bottom) + 1)
        for j0 in range(0, tw, cols):
            j1 = min(tw, j0 + cols)
            left, right = j0 * sx, j1 * sx
            x0, x1 = max(0, math.floor(left) - 1), min(level_w, math.ceil(right) + 1)
            block = display_rgb(source.read_region(level, y0, x0, y1 - y0, x1 - x0))
            # box averaging over exactly this block of thumbnail pixels, as a resize of the whole level would
            thumb[i0:i1, j0:j1] = np.asarray(Image.fromarray(block).resize(
                (j1 - j0, i1 - i0), Image.Resampling.BOX, box=(left - x0, top - y0, right - x0, bottom - y0)))
    return thumb, downsample
