"""Satellite and aerial scenes: georeferencing, band selection and scaling, nodata as background.

A GeoTIFF (a TIFF with GeoTIFF tags: ModelPixelScale/ModelTiepoint/ModelTransformation/GeoKeyDirectory) is read
with rasterio (GDAL), an optional extra (``pip install 'fcnify[geo]'``), as a ``GeoSource``:

* **Georeferencing.** The CRS (WKT) and the affine transform of level 0 (``GeoReference``; a stored overview's
  transform is level 0's scaled by its downsample). GDAL's area convention: pixel ``(col, row)`` spans
  ``[col, col+1) × [row, row+1)`` and the transform maps its top-left corner.
* **Bands.** ``bands`` (``--bands 4,3,2``, 1-based as GDAL counts them) picks the bands the model sees, in that
  order; by default the first three bands that are not alpha (or the first band of a one- or two-band scene).
* **Scaling.** The model reads 0–1 values (then its mean/std): uint8 bands are taken as they are (÷ 255); other
  types are scaled linearly, ``(v − lo) / (hi − lo)`` clipped to 0–1, with one range for every band
  (``--scale-range lo,hi``) or, by default, each band's 2nd and 98th percentile over a thumbnail (≤ 1 Mpx, nearest
  samples of the coarsest level that is fine enough, nodata left out). Values are then quantised to 8 bits like
  every image the pipeline reads. The rule and the ranges are recorded in the outputs (``Scaling.to_json``).
* **Nodata.** A pixel is nodata when GDAL's dataset mask says so (every band equal to the nodata value, an alpha
  band, an internal mask); such pixels read as 0 and count as background (``nodata_mask``): a cell is computed
  only when its window holds a valid pixel, else it is NaN — like slide background.

Outputs place each cell on its window's centre in the source CRS: ``cell_transform`` (the cell grid's affine:
cell ``(i, j)`` is the stride × stride square centred on ``offset + (i, j)·stride + window/2`` level-0 pixels)
is what the score GeoTIFF (``cog.write_cog``) and the zarr attributes carry, and ``geojson_placement`` moves
GeoJSON regions to map coordinates (source CRS or WGS84).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageFilter

from fcnify.errors import InputError, MissingDependencyError, first_line
from fcnify.heatmap import sources
from fcnify.heatmap.plan import ForegroundMask
from fcnify.optional import require

__all__ = ["GEOJSON_CRS", "GeoReference", "GeoSource", "Scaling", "georeference_of", "geojson_placement",
           "map_attrs", "nodata_mask", "open_source", "parse_bands", "parse_scale_range", "require_rasterio"]

_logger = logging.getLogger(__name__)

#: ``--geojson-crs``: WGS84 longitude/latitude (RFC 7946, the default) or the scene's own CRS.
GEOJSON_CRS = ("wgs84", "source")
#: The default scaling of non-uint8 bands: these percentiles of each band over the thumbnail.
PERCENTILES = (2.0, 98.0)
#: Pixels of the thumbnail the percentiles are taken over.
SCALING_THUMBNAIL_PIXELS = 1_000_000
#: GDAL's block cache for scene reads (MB), unless the user set ``GDAL_CACHEMAX``: GDAL's own default (5 % of
#: RAM) would let a scene's decoded blocks grow the process by gigabytes.
GDAL_CACHE_MB = "256"
_WGS84_URN = "urn:ogc:def:crs:OGC:1.3:CRS84"


def require_rasterio(purpose: str):
    """rasterio, or ``MissingDependencyError`` with ``pip install 'fcnify[geo]'``."""
    # rasterio brings GDAL: an optional extra, imported only for georeferenced scenes and the outputs needing it
    return require("rasterio", "geo", purpose)


# ------------------------------------------------------------------------------------------------ options


def parse_bands(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"4,3,2"`` → ``(4, 3, 2)`` (1-based band numbers, as GDAL counts them); None stays None.

    Raises:
        InputError: not a comma list of positive integers.
    """
    if text is None or text == "":
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        bands = tuple(int(str(v).strip()) for v in items)
    except ValueError:
        bands = ()
    if not bands or any(b < 1 for b in bands):
        raise InputError(f"--bands {text!r} is not a comma list of band numbers",
                         hint="bands count from 1, as in GDAL: e.g. --bands 4,3,2")
    return bands


def parse_scale_range(text: str | Sequence[float] | None) -> tuple[float, float] | None:
    """``"0,3000"`` → ``(0.0, 3000.0)``; None stays None.

    Raises:
        InputError: not two finite numbers with min < max.
    """
    if text is None or text == "":
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        low, high = (float(str(v).strip()) for v in items)
    except ValueError:
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InputError(f"--scale-range {text!r} is not MIN,MAX with MIN < MAX",
                         hint="the values that become 0 and 1 for the model, e.g. --scale-range 0,3000")
    return (low, high)


# ------------------------------------------------------------------------------------------------ georeference


@dataclass(frozen=True)
class GeoReference:
    """Where a scene lies: its CRS and the affine transform of its level-0 pixels.

    Attributes:
        crs_wkt: the CRS as WKT (OGC WKT 1, as GDAL writes it).
        crs_name: a short name (``"EPSG:32633"``) when the CRS has an authority code, else the WKT.
        transform: level-0 pixel (col, row) → map (x, y), in affine order ``(a, b, c, d, e, f)``:
            ``x = a·col + b·row + c``, ``y = d·col + e·row + f``.
    """

    crs_wkt: str
    crs_name: str
    transform: tuple[float, float, float, float, float, float]

    def level_transform(self, downsample: tuple[float, float]) -> tuple[float, ...]:
        """The transform of a level ``downsample`` (y, x) level-0 pixels per pixel (affine order)."""
        return _compose(self.transform, (downsample[1], 0.0, 0.0, 0.0, downsample[0], 0.0))

    def cell_transform(self, attrs: dict) -> tuple[float, ...]:
        """The score map's cell (col, row) → map transform (affine order), from the map's level-0 ``stride``,
        ``offset`` and ``window`` (y, x): cell ``(i, j)`` is the stride × stride square centred on its window's
        centre, ``offset + (i, j)·stride + window/2``, so the transform's origin is cell 0's centre − stride/2."""
        stride, offset, window = (tuple(float(v) for v in attrs[n]) for n in ("stride", "offset", "window"))
        corner = [offset[a] + window[a] / 2 - stride[a] / 2 for a in range(2)]
        return _compose(self.transform, (stride[1], 0.0, corner[1], 0.0, stride[0], corner[0]))


def _compose(outer: Sequence[float], inner: Sequence[float]) -> tuple[float, ...]:
    """The affine ``outer ∘ inner`` (both in affine order a, b, c, d, e, f)."""
    a, b, c, d, e, f = outer
    p, q, r, s, t, u = inner
    return (a * p + b * s, a * q + b * t, a * r + b * u + c, d * p + e * s, d * q + e * t, d * r + e * u + f)


def gdal_order(affine: Sequence[float]) -> list[float]:
    """Affine order ``(a, b, c, d, e, f)`` → GDAL's geotransform ``(c, a, b, f, d, e)``."""
    a, b, c, d, e, f = (float(v) for v in affine)
    return [c, a, b, f, d, e]


def georeference_of(dataset) -> GeoReference | None:
    """A rasterio dataset's georeference, or None without a CRS (or with the identity transform)."""
    if dataset.crs is None or dataset.transform.is_identity:
        return None
    crs = dataset.crs
    epsg = crs.to_epsg()
    name = f"EPSG:{epsg}" if epsg else crs.to_wkt()
    return GeoReference(crs.to_wkt(), name, tuple(float(v) for v in tuple(dataset.transform)[:6]))


# ------------------------------------------------------------------------------------------------ scaling


@dataclass(frozen=True)
class Scaling:
    """How band values become the model's 0–1 input: ``(v − lo) / (hi − lo)``, clipped, per band.

    Attributes:
        rule: ``"uint8"`` (÷ 255), ``"scale-range"`` (``--scale-range``) or ``"percentiles 2-98"`` (of each band
            over the thumbnail).
        ranges: (lo, hi) per band, in the bands' order.
    """

    rule: str
    ranges: tuple[tuple[float, float], ...]

    def apply(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """C×h×w band values → h×w×C uint8 (0–255 stands for 0–1); invalid pixels and NaN become 0."""
        out = np.empty((data.shape[1], data.shape[2], data.shape[0]), np.uint8)
        for c, (low, high) in enumerate(self.ranges):
            band = data[c]
            if self.rule == "uint8" and band.dtype == np.uint8:
                out[..., c] = band
            else:
                values = (band.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
                out[..., c] = np.clip(np.rint(np.nan_to_num(values, nan=0.0)), 0, 255).astype(np.uint8)
        out[~valid] = 0
        return out

    def to_json(self) -> dict:
        return {"rule": self.rule, "ranges": [[float(lo), float(hi)] for lo, hi in self.ranges]}


def _percentile_scaling(data: np.ndarray, valid: np.ndarray) -> Scaling:
    ranges = []
    for band in data:
        values = band[valid & np.isfinite(band)] if np.issubdtype(band.dtype, np.floating) else band[valid]
        if values.size == 0:
            ranges.append((0.0, 1.0))
            continue
        low, high = (float(v) for v in np.percentile(values, PERCENTILES))
        ranges.append((low, high if high > low else low + 1.0))
    name = f"percentiles {PERCENTILES[0]:g}-{PERCENTILES[1]:g}"
    return Scaling(name, tuple(ranges))


# ------------------------------------------------------------------------------------------------ source


class GeoSource(sources.ImageSource):
    """A GeoTIFF (or a multi-band TIFF read with ``bands``) read window by window with rasterio.

    Levels are the file's overviews. ``read_region`` gives h×w×C uint8, C = ``len(bands)``, scaled by
    ``scaling``; nodata pixels are 0.

    Attributes:
        georef: the CRS and transform (None for a TIFF without a CRS).
        bands: the 1-based bands read, in order.
        band_count: the file's bands.
        dtype: the bands' data type.
        nodata: the nodata value, when the file has one.
        masked: whether some pixels may be invalid (nodata value, alpha band or mask).
        scaling: the value scaling (decided on the first read).
    """

    kind = "rasterio"
    whole = False

    def __init__(self, path: str, bands: tuple[int, ...] | None = None,
                 scale_range: tuple[float, float] | None = None):
        self.path = str(path)
        self._datasets: list = []
        rasterio = require_rasterio(f"read {Path(self.path).name} with its georeferencing")
        os.environ.setdefault("GDAL_CACHEMAX", GDAL_CACHE_MB)  # read by GDAL when its block cache starts
        self._rasterio = rasterio
        self._lock = threading.Lock()
        try:
            dataset = rasterio.open(self.path)
            self._datasets.append(dataset)
            overviews = dataset.overviews(1) if dataset.count else []
            for k in range(len(overviews)):
                self._datasets.append(rasterio.open(self.path, overview_level=k))
        except rasterio.errors.RasterioError as exc:
            self.close()
            raise InputError(f"{self.path} cannot be read by GDAL ({first_line(exc, 160)})",
                             hint="the file is damaged or incomplete; re-export or re-download it") from exc
        self.band_count = dataset.count
        self.bands = self._choose_bands(dataset, bands)
        self.channels = len(self.bands)
        self.dtype = np.dtype(dataset.dtypes[self.bands[0] - 1])
        self.nodata = None if dataset.nodata is None else float(dataset.nodata)
        flags = dataset.mask_flag_enums
        self.masked = any(rasterio.enums.MaskFlags.all_valid not in band for band in flags)
        self.georef = georeference_of(dataset)
        height0, width0 = dataset.height, dataset.width
        self.levels = tuple(sources.Level((d.height, d.width), (height0 / d.height, width0 / d.width))
                            for d in self._datasets)
        self.mpp = None  # a map's ground units are not a microscope's pixel size
        self._scale_range = scale_range
        self._scaling: Scaling | None = None
        _logger.info("%s: %d bands (%s), reading %s; CRS %s; nodata %s", self.path, self.band_count, self.dtype,
                     ",".join(map(str, self.bands)), self.georef.crs_name if self.georef else None, self.nodata)

    def _choose_bands(self, dataset, bands: tuple[int, ...] | None) -> tuple[int, ...]:
        count = dataset.count
        if bands is not None:
            wrong = [b for b in bands if not 1 <= b <= count]
            if wrong:
                raise InputError(f"{self.path} has {count} band{'s' if count != 1 else ''}: no band {wrong[0]}",
                                 hint=f"--bands numbers run from 1 to {count}")
            return tuple(bands)
        alpha = self._rasterio.enums.ColorInterp.alpha
        colour = [i + 1 for i, ci in enumerate(dataset.colorinterp) if ci != alpha] or [1]
        return tuple(colour[:3]) if len(colour) >= 3 else (colour[0],)

    @property
    def scaling(self) -> Scaling:
        """The rule turning band values into 0–1 (percentiles are taken on the first call)."""
        with self._lock:
            if self._scaling is None:
                self._scaling = self._decide_scaling()
            return self._scaling

    def _decide_scaling(self) -> Scaling:
        if self._scale_range is not None:
            scaling = Scaling("scale-range", tuple(self._scale_range for _ in self.bands))
        elif self.dtype == np.uint8:
            scaling = Scaling("uint8", tuple((0.0, 255.0) for _ in self.bands))
        else:
            data, valid = self._sample(SCALING_THUMBNAIL_PIXELS, self.bands)
            scaling = _percentile_scaling(data, valid)
        _logger.info("%s: %s scaled by %s %s", self.path, self.dtype, scaling.rule, scaling.ranges)
        return scaling

    def _sample(self, max_pixels: int, bands: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Nearest samples of the whole scene (≤ ``max_pixels``) from the coarsest level fine enough, with the
        valid-pixel mask (caller holds the lock)."""
        height0, width0 = self.size
        d = max(1.0, math.sqrt(height0 * width0 / max_pixels))
        shape = (max(1, int(height0 / d)), max(1, int(width0 / d)))
        dataset = self._datasets[_coarsest(self.levels, d)]
        data = dataset.read(list(bands), out_shape=(len(bands), *shape))
        valid = dataset.dataset_mask(out_shape=shape) > 0
        return data, valid

    def valid_thumbnail(self, shape: tuple[int, int]) -> np.ndarray:
        """Whether each pixel of a ``shape`` thumbnail of the scene is valid (GDAL's dataset mask, nearest)."""
        d = max(self.size[0] / shape[0], self.size[1] / shape[1])
        with self._lock:
            return self._datasets[_coarsest(self.levels, d)].dataset_mask(out_shape=shape) > 0

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        scaling = self.scaling
        window = self._rasterio.windows.Window(x, y, w, h)
        with self._lock:
            dataset = self._datasets[level]
            try:
                data = dataset.read(list(self.bands), window=window)
                valid = dataset.dataset_mask(window=window) > 0 if self.masked else np.ones((h, w), bool)
            except self._rasterio.errors.RasterioError as exc:
                raise InputError(f"{self.path}: a block at level {level} near y {y}, x {x} cannot be decoded "
                                 f"({first_line(exc, 160)})", hint="the file is damaged or incomplete") from exc
        return scaling.apply(data, valid)

    def reading(self) -> dict:
        """What was read and how, for the outputs: bands, type, nodata, scaling."""
        return {"bands": list(self.bands), "band_count": self.band_count, "dtype": str(self.dtype),
                "nodata": self.nodata, "scaling": self.scaling.to_json()}

    def close(self) -> None:
        for dataset in self._datasets:
            dataset.close()
        self._datasets = []


def _coarsest(levels: Sequence[sources.Level], downsample: float) -> int:
    usable = [i for i, lv in enumerate(levels) if max(lv.downsample) <= downsample * (1 + 1e-9)]
    return usable[-1] if usable else 0


def _is_geotiff(path: str) -> bool:
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.pages.first.is_geotiff)
    except Exception:  # not for us to judge: the TIFF reader reports damaged files
        return False


def open_source(path: str | os.PathLike, max_pixels: int | None = None, bands: tuple[int, ...] | None = None,
                scale_range: tuple[float, float] | None = None) -> sources.ImageSource:
    """``sources.open_source``, but GeoTIFFs (and TIFFs read with ``bands``/``scale_range``) as ``GeoSource``.

    Without rasterio a GeoTIFF is read as an ordinary TIFF (pixel coordinates, a warning says how to get its
    georeferencing), unless ``bands`` or ``scale_range`` ask for what only ``GeoSource`` does.

    Raises:
        InputError: as ``sources.open_source``; ``bands``/``scale_range`` for an image that is not a TIFF.
        MissingDependencyError: rasterio missing where ``bands``/``scale_range`` need it.
    """
    path = str(path)
    asked = bands is not None or scale_range is not None
    local_tiff = "://" not in path and os.path.isfile(path) and sources.is_tiff(path)
    if local_tiff and (asked or _is_geotiff(path)):
        try:
            return GeoSource(path, bands, scale_range)
        except MissingDependencyError as exc:
            if asked:
                raise
            _logger.warning("%s is a GeoTIFF: read in pixel coordinates (%s for its georeferencing)", path, exc.hint)
    elif asked:
        raise InputError(f"{path}: --bands and --scale-range read multi-band TIFF scenes (GeoTIFF)",
                         hint="leave them out for ordinary images")
    return sources.open_source(path, max_pixels)


# ------------------------------------------------------------------------------------------------ background


def nodata_mask(view, window: tuple[int, int]) -> ForegroundMask | None:
    """Where a scene holds valid pixels, as a foreground mask (None: every pixel is valid).

    The thumbnail has about an eighth of the window per pixel (≤ 4 Mpx) like ``plan.estimate_foreground``'s;
    a thumbnail pixel is GDAL's mask at its sample (nearest), widened by one pixel so that windows at the
    scene's borders are kept.
    """
    source = view.source
    if not isinstance(source, GeoSource) or not source.masked:
        return None
    height0, width0 = source.size
    d = max(1.0, min(window) / 8 * view.downsample[0], math.sqrt(height0 * width0 / 4_000_000))
    shape = (max(1, round(height0 / d)), max(1, round(width0 / d)))
    valid = source.valid_thumbnail(shape)
    widened = np.asarray(Image.fromarray(valid.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0
    downsample = (height0 / shape[0] / view.downsample[0], width0 / shape[1] / view.downsample[1])
    _logger.info("%s: nodata mask, %.1f%% valid", source.path, 100 * valid.mean())
    return ForegroundMask(widened, downsample, (0, 0, 0), "nodata")


# ------------------------------------------------------------------------------------------------ outputs


def map_attrs(source: sources.ImageSource, attrs: dict) -> dict:
    """The score stores' ``reading`` (bands, scaling) and ``geo`` (CRS, transforms) attributes of a scene."""
    if not isinstance(source, GeoSource):
        return {}
    result: dict = {"reading": source.reading()}
    georef = source.georef
    if georef is not None:
        cells = georef.cell_transform(attrs)
        result["geo"] = {
            "crs": georef.crs_name, "crs_wkt": georef.crs_wkt,
            "transform": list(georef.transform), "cell_transform": list(cells),
            "cell_geotransform": gdal_order(cells),
            "convention": "transform: level-0 pixel (col, row) -> map (x, y); cell_transform: cell (col, row) -> "
                          "map, cell (i, j) the stride square centred on its window's centre; affine order "
                          "(a, b, c, d, e, f): x = a*col + b*row + c, y = d*col + e*row + f; "
                          "cell_geotransform: the same in GDAL order (c, a, b, f, d, e)"}
    return result


def geojson_placement(georef: GeoReference, target: str) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """Level-0 pixel (x, y) → map coordinates in ``target`` (``"source"`` or ``"wgs84"``), and the GeoJSON
    ``crs`` member naming them (the form GDAL writes: ``urn:ogc:def:crs:EPSG::32633``, or OGC's CRS84 URN).

    WGS84 coordinates are longitude, latitude (RFC 7946), transformed vertex by vertex by GDAL/PROJ
    (``rasterio.warp.transform``).
    """
    if target not in GEOJSON_CRS:
        raise InputError(f"--geojson-crs {target!r} is not one of {', '.join(GEOJSON_CRS)}",
                         hint="--geojson-crs wgs84 (RFC 7946, the default) or source")
    rasterio = require_rasterio("write GeoJSON in map coordinates")
    warp = require("rasterio.warp", "geo", "write GeoJSON in map coordinates")

    a, b, c, d, e, f = georef.transform

    def to_source(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack((a * x + b * y + c, d * x + e * y + f))

    if target == "source":
        name = georef.crs_name
        urn = f"urn:ogc:def:crs:EPSG::{name.split(':', 1)[1]}" if name.startswith("EPSG:") else name
        return to_source, {"type": "name", "properties": {"name": urn}}
    source_crs = rasterio.crs.CRS.from_wkt(georef.crs_wkt)

    def to_wgs84(xy: np.ndarray) -> np.ndarray:
        mapped = to_source(xy)
        if not len(mapped):
            return mapped
        lon, lat = warp.transform(source_crs, "OGC:CRS84", mapped[:, 0].tolist(), mapped[:, 1].tolist())
        return np.column_stack((lon, lat))

    return to_wgs84, {"type": "name", "properties": {"name": _WGS84_URN}}

