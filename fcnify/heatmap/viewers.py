"""Outputs for slide viewers: GeoJSON annotations (QuPath), a pyramidal OME-TIFF overlay, OME-NGFF metadata.

All three place the map on the slide's level-0 pixels through the map's geometry (``stride``, ``offset``,
``window`` in level-0 pixels; cell ``(i, j)`` is the window whose top-left is ``offset + (i, j)·stride``):

* ``write_geojson``: for each class (but ``background``), the connected regions where it is the most probable
  class (optionally at least ``min_score``), as polygons. A cell stands for the stride×stride square centred on
  its window's centre, so a region's area is its cells × stride². The map is read in bands of rows; each band
  is polygonized with rasterio (in cell coordinates, where every corner is an exact integer), and a region that
  reaches the band's lower edge stays open until the next band says whether it goes on: regions meeting along
  the border are merged with shapely. Finished regions are written out at once, so memory follows the band.
* ``write_ome_tiff``: one class's probability as an RGBA overlay (colormap colours; alpha ``alpha`` where the
  map was computed, 0 elsewhere) whose level 0 has the slide's level-0 size, tiled and pyramidal (2× levels
  in SubIFDs down to ≤ 1024 px). Viewers put it over the slide themselves; the slide is not drawn in. Tiles are
  generated row of tiles by row of tiles from the map (bilinear between cell centres, as the previews), so the
  full-resolution overlay never exists in memory.
* ``ngff_attrs``: the ``ome`` group attributes (OME-NGFF 0.5 ``multiscales``) of the zarr score store.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tifffile
import zarr

from fcnify.heatmap.legend import ColourRange
from fcnify.heatmap.mapgeometry import MapGeometry
from fcnify.heatmap.previews import BilinearAxis, bilinear_sample
from fcnify.heatmap.render import label_colours
from fcnify.optional import require

__all__ = ["background_classes", "level_path", "ngff_attrs", "write_ngff_levels", "overlay_levels", "polygonize",
           "write_geojson", "write_ome_tiff"]

_logger = logging.getLogger(__name__)

#: Bytes of map rows read at once (the polygonizer holds a few times this).
_BAND_BYTES = 32 * 2**20
#: Regions encoded together (shapely's vectorised placing and GeoJSON encoding).
_BATCH = 4096
#: The OME-TIFF's tile side, and the longest side its smallest level may have.
TIFF_TILE = 256
SMALLEST_LEVEL = 1024


def background_classes(labels: Sequence[str]) -> set[int]:
    """The classes no annotation is drawn for: those named "background" (any case)."""
    return {k for k, name in enumerate(labels) if str(name).strip().lower() == "background"}


def level0_mpp(attrs: dict) -> tuple[float, float] | None:
    """µm per level-0 pixel (y, x), from the map's ``mpp`` (of the level computed at) and ``downsample``."""
    mpp = attrs.get("mpp")
    if not mpp or any(v is None or not math.isfinite(float(v)) for v in mpp):
        return None
    downsample = attrs.get("downsample") or (1.0, 1.0)
    return float(mpp[0]) / float(downsample[0]), float(mpp[1]) / float(downsample[1])


def _band_rows(scores, row_bytes: int, budget: int) -> int:
    """Map rows per band: about ``budget`` bytes of ``row_bytes`` rows, in whole chunk rows of a chunked store
    (a chunk is then decoded once, not once per band it straddles)."""
    rows = max(1, budget // max(1, row_bytes))
    chunk = int(getattr(scores, "chunks", (1, 1))[1])
    return max(chunk, rows // chunk * chunk)


# -------------------------------------------------------------------------------------------------- GeoJSON


@dataclass
class Region:
    """A connected region of one class, in cell coordinates (x = column, y = row), with its score sum."""

    label: int
    shape: object  # a shapely Polygon (MultiPolygon only if a merge touched at a corner)
    total: float
    cells: int


def _band_regions(block: np.ndarray, first: int, skip: set[int], min_score: float | None) -> list[Region]:
    """The 4-connected regions of each class's argmax cells in ``block`` (K×R×W, map rows from ``first``)."""
    # rasterio and shapely load GDAL and GEOS: only runs asked for --formats geojson pay for them.
    import shapely

    features = require("rasterio.features", "geo", "write --formats geojson (polygons of the map's regions)")
    known = ~np.isnan(block).all(axis=0)
    filled = np.where(np.isnan(block), -np.inf, block)
    best = filled.argmax(axis=0)
    peak = np.take_along_axis(filled, best[None], axis=0)[0]
    keep = known & ~np.isin(best, list(skip))
    if min_score is not None:
        keep &= peak >= min_score
    if not keep.any():
        return []
    classes = np.where(keep, best, -1).astype(np.int32)
    geoms, labels = zip(*features.shapes(classes, mask=keep, connectivity=4), strict=True)
    # Each region's score sum: burn the regions back as ids (a cell belongs to the polygon holding its centre).
    ids = features.rasterize(zip(geoms, range(1, len(geoms) + 1), strict=True), out_shape=classes.shape, fill=0,
                             dtype=np.int32)
    totals = np.bincount(ids.ravel(), weights=np.where(keep, peak, 0.0).ravel(), minlength=len(geoms) + 1)
    counts = np.bincount(ids.ravel(), minlength=len(geoms) + 1)
    # Built and moved to the map's rows by shapely for the whole band at once (per-polygon calls dominate).
    shapes = shapely.transform(shapely.from_geojson([json.dumps(g) for g in geoms]), lambda xy: xy + (0, first))
    return [Region(int(k), p, float(totals[i + 1]), int(counts[i + 1]))
            for i, (p, k) in enumerate(zip(shapes, labels, strict=True))]


def _merge(open_regions: list[Region], new: list[Region], border: float) -> list[Region]:
    """``open_regions`` (reaching row ``border`` from above) joined with the ``new`` band's regions they share
    an edge with along it; regions meeting at a corner only stay apart (4-connectivity)."""
    import shapely

    top = [r for r in new if r.shape.bounds[1] <= border]
    rest = [r for r in new if r.shape.bounds[1] > border]
    if not open_regions or not top:
        return open_regions + new
    group = list(range(len(open_regions) + len(top)))

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    tree = shapely.STRtree([r.shape for r in top])
    above, below = tree.query([r.shape for r in open_regions], predicate="intersects")
    for a, b in zip(above, below, strict=True):
        upper, lower = open_regions[a], top[b]
        if upper.label == lower.label and shapely.intersection(upper.shape, lower.shape).length > 0:
            group[find(a)] = find(len(open_regions) + b)
    members: dict[int, list[Region]] = {}
    for i, region in enumerate(open_regions + top):
        members.setdefault(find(i), []).append(region)
    merged = [parts[0] if len(parts) == 1 else
              Region(parts[0].label, shapely.union_all([p.shape for p in parts]), sum(p.total for p in parts),
                     sum(p.cells for p in parts)) for parts in members.values()]
    return merged + rest


def polygonize(scores, skip: set[int] = frozenset(), min_score: float | None = None,
               band_rows: int | None = None) -> Iterator[Region]:
    """The regions where each class is the most probable, in cell coordinates, read band by band.

    Args:
        scores: K×rows×cols probabilities (an array or a zarr array), NaN where not computed.
        skip: classes to leave out (background).
        min_score: leave out cells whose top probability is below it.
        band_rows: map rows per band (default: about 32 MiB of float32, in whole chunk rows).
    """
    classes, rows, cols = (int(v) for v in scores.shape)
    band = band_rows or _band_rows(scores, classes * cols * 4, _BAND_BYTES)
    open_regions: list[Region] = []
    for first in range(0, rows, band):
        last = min(first + band, rows)
        block = np.asarray(scores[:, first:last, :], dtype=np.float32)
        regions = _merge(open_regions, _band_regions(block, first, set(skip), min_score), float(first))
        # A region reaching the band's lower edge may go on in the next band; the others are finished.
        open_regions = []
        for region in regions:
            if region.shape.bounds[3] >= last and last < rows:
                open_regions.append(region)
            else:
                yield region
    yield from open_regions


def _features(regions: list[Region], geometry: MapGeometry, labels: Sequence[str], colours: np.ndarray,
              mpp: tuple[float, float] | None, to_map: Callable[[np.ndarray], np.ndarray] | None = None) -> list[str]:
    """GeoJSON Feature texts of ``regions``, their geometry placed and encoded by shapely for all at once."""
    import shapely

    sy, sx = geometry.stride
    # Cell coordinates (x = column, y = row) to level-0 pixels: column j's square starts at corner + j·stride.
    scale, shift = np.array([sx, sy]), np.array([geometry.corner(1), geometry.corner(0)])
    placed = shapely.transform(np.array([r.shape for r in regions], dtype=object), lambda xy: xy * scale + shift)
    if to_map is not None:
        placed = shapely.transform(placed, to_map)
    texts = []
    for region, encoded in zip(regions, shapely.to_geojson(placed), strict=True):
        area = region.cells * sy * sx
        measurements = {"mean score": round(region.total / max(1, region.cells), 6), "area px^2": float(area),
                        "cells": region.cells}
        if mpp is not None:
            measurements["area µm^2"] = float(area * mpp[0] * mpp[1])
        colour = [int(round(float(c) * 255)) for c in colours[region.label][:3]]
        properties = {"objectType": "annotation", "isLocked": False,
                      "classification": {"name": str(labels[region.label]), "color": colour},
                      "measurements": measurements}
        texts.append(f'{{"type": "Feature", "geometry": {encoded}, '
                     f'"properties": {json.dumps(properties, ensure_ascii=False)}}}')
    return texts


def write_geojson(path: Path, scores, attrs: dict, min_score: float | None = None,
                  band_rows: int | None = None, to_map: Callable[[np.ndarray], np.ndarray] | None = None,
                  crs: dict | None = None) -> dict[str, int]:
    """Write the map's class regions as a GeoJSON FeatureCollection QuPath imports as annotations.

    Args:
        path: the file to write.
        scores: K×rows×cols probabilities (an array or a zarr array).
        attrs: the map's attributes (``labels``, ``stride``, ``offset``, ``window``, ``mpp``, ``downsample``).
        min_score: leave out cells whose top probability is below it.
        to_map: level-0 pixel (x, y) rows → map coordinates (georeferenced scenes, ``geo.geojson_placement``);
            None: pixel coordinates.
        crs: the collection's ``crs`` member naming the map coordinates' CRS.

    Returns:
        class name → number of regions written.
    """
    labels = [str(v) for v in attrs["labels"]]
    geometry, mpp = MapGeometry.of(attrs), level0_mpp(attrs)
    colours = label_colours(len(labels))
    counts = {labels[k]: 0 for k in range(len(labels))}
    with open(path, "w", encoding="utf-8") as f:
        # One feature per line as each region is finished: the file is streamed, never built in memory.
        named = f'"crs": {json.dumps(crs)}, ' if crs is not None else ""
        f.write(f'{{"type": "FeatureCollection", {named}"features": [\n')
        separator, batch = "", []
        regions = polygonize(scores, background_classes(labels), min_score, band_rows)
        for region in (*regions, None):
            if region is not None:
                batch.append(region)
                counts[labels[region.label]] += 1
            if batch and (region is None or len(batch) >= _BATCH):
                f.write(separator + ",\n".join(_features(batch, geometry, labels, colours, mpp, to_map)))
                separator, batch = ",\n", []
        f.write("\n]}\n")
    _logger.info("%s: %s", path, ", ".join(f"{n} {name}" for name, n in counts.items() if n) or "no regions")
    return counts


# ------------------------------------------------------------------------------------------------- OME-TIFF


def overlay_levels(size: tuple[int, int], smallest: int = SMALLEST_LEVEL) -> list[tuple[int, int]]:
    """The pyramid's (h, w) per level: level 0 is ``size``, each next one half (rounded up), until the longest
    side is at most ``smallest``."""
    levels = [tuple(int(v) for v in size)]
    while max(levels[-1]) > smallest:
        h, w = levels[-1]
        levels.append(((h + 1) // 2, (w + 1) // 2))
    return levels


def _axis(first: int, count: int, factor: float, cells: int, geometry: MapGeometry, axis: int) -> BilinearAxis:
    """Bilinear positions, in map cells, of the centres of pixels first..first+count of a level ``factor``×
    smaller than level 0."""
    centres = (np.arange(first, first + count, dtype=np.float64) + 0.5) * factor
    coords = (centres - geometry.offset[axis] - geometry.window[axis] / 2) / geometry.stride[axis]
    return BilinearAxis.of(np.clip(coords, 0.0, max(cells - 1, 0)), cells)


class _Rows:
    """One class's map rows for the overlay's rows of tiles. Rows close together (level 0 and the first levels)
    come from a band of whole chunk rows read once (a chunk is not decoded again for every row of tiles); the
    few, far apart rows a coarse level samples are read alone, so memory stays a band whatever the level."""

    def __init__(self, scores, k: int):
        self.scores, self.k = scores, k
        # A zarr chunk holds every class: the rows read are what a band of all classes would cost.
        self.rows = _band_rows(scores, int(scores.shape[0]) * int(scores.shape[2]) * 4, _BAND_BYTES // 2)
        self.chunk = int(getattr(scores, "chunks", (1, 1))[1])
        self.first, self.block = 0, np.zeros((1, 0, int(scores.shape[2])), dtype=np.float32)

    def get(self, wanted: np.ndarray) -> np.ndarray:
        """Map rows ``wanted`` (sorted, unique) as 1×len(wanted)×cols float32."""
        first, last = int(wanted[0]), int(wanted[-1]) + 1
        if last - first > self.rows:
            if hasattr(self.scores, "oindex"):  # zarr: only the chunks holding these rows are read
                return np.asarray(self.scores.oindex[self.k:self.k + 1, wanted, :], dtype=np.float32)
            return np.asarray(self.scores[self.k:self.k + 1][:, wanted], dtype=np.float32)
        if first < self.first or last > self.first + self.block.shape[1]:
            start = first // self.chunk * self.chunk
            end = min(int(self.scores.shape[1]), max(last, start + self.rows))
            self.first = start
            self.block = np.asarray(self.scores[self.k:self.k + 1, start:end, :], dtype=np.float32)
        return self.block[:, wanted - self.first]


def _overlay_tiles(scores, k: int, geometry: MapGeometry, size: tuple[int, int], factor: float, lut: np.ndarray,
                   alpha: float, colours: ColourRange) -> Iterator[np.ndarray]:
    """The RGBA tiles of one level, row of tiles by row of tiles, each TIFF_TILE² (edge tiles padded)."""
    cells_h, cells_w = int(scores.shape[1]), int(scores.shape[2])
    # One 4-byte gather per pixel: entries 0–255 are the colormap at the overlay's opacity, 256 is transparent.
    rgba = np.zeros((257, 4), dtype=np.uint8)
    rgba[:256, :3], rgba[:256, 3] = lut, round(alpha * 255)
    packed = rgba.view(np.uint32)[:, 0]
    empty = np.zeros((TIFF_TILE, TIFF_TILE, 4), dtype=np.uint8)
    rows = _Rows(scores, k)
    for top in range(0, size[0], TIFF_TILE):
        height = min(TIFF_TILE, size[0] - top)
        ys = _axis(top, height, factor, cells_h, geometry, 0)
        # The map rows this row of tiles samples, renumbered as rows of the block read.
        wanted = np.unique(np.concatenate([ys.low, ys.high]))
        band = rows.get(wanted)
        ys = replace(ys, low=np.searchsorted(wanted, ys.low), high=np.searchsorted(wanted, ys.high))
        for left in range(0, size[1], TIFF_TILE):
            width = min(TIFF_TILE, size[1] - left)
            xs = _axis(left, width, factor, cells_w, geometry, 1)
            start = int(xs.low.min())
            block = band[:, :, start:int(xs.high.max()) + 1]
            if np.isnan(block).all():  # background: nothing computed under this tile
                yield empty
                continue
            shifted = replace(xs, low=xs.low - start, high=xs.high - start)
            heat = bilinear_sample(block, 0, ys, np.arange(height), shifted)[0]
            index = np.clip(np.round(colours.fraction(np.nan_to_num(heat)) * 255), 0, 255).astype(np.int16)
            index[np.isnan(heat)] = 256
            tile = np.zeros((TIFF_TILE, TIFF_TILE), dtype=np.uint32)
            tile[:height, :width] = packed[index]
            yield tile.view(np.uint8).reshape(TIFF_TILE, TIFF_TILE, 4)


def write_ome_tiff(path: Path, scores, attrs: dict, k: int, image_size: tuple[int, int], lut: np.ndarray,
                   alpha: float = 0.5, colours: ColourRange | None = None, compression: str = "zlib") -> int:
    """Write class ``k``'s probability as a tiled, pyramidal RGBA OME-TIFF lying on the slide's level 0.

    Args:
        path: the file to write (BigTIFF).
        scores: K×rows×cols probabilities (an array or a zarr array).
        attrs: the map's attributes (geometry in level-0 pixels, ``mpp``, ``downsample``, ``labels``).
        image_size: the slide's level-0 (height, width): the overlay's level 0.
        lut: 256×3 uint8 colormap table; ``colours``: the probabilities its ends stand for (default 0–1).
        alpha: the overlay's opacity where the map was computed.

    Returns:
        the number of pyramid levels written.
    """

    geometry, mpp = MapGeometry.of(attrs), level0_mpp(attrs)
    colours = colours or ColourRange()
    levels = overlay_levels(image_size)
    metadata = {"axes": "YXS", "Name": f"{attrs['labels'][k]} probability"}
    if mpp is not None:
        metadata.update(PhysicalSizeY=mpp[0], PhysicalSizeYUnit="µm", PhysicalSizeX=mpp[1],
                        PhysicalSizeXUnit="µm")
    options = dict(dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE), photometric="rgb", extrasamples=("unassalpha",),
                   compression=compression, compressionargs={"level": 1} if compression == "zlib" else None)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for level, size in enumerate(levels):
            factor = 2.0**level
            tiles = _overlay_tiles(scores, k, geometry, size, factor, lut, alpha, colours)
            if level == 0:
                tif.write(tiles, shape=(*size, 4), subifds=len(levels) - 1, metadata=metadata, **options)
            else:
                tif.write(tiles, shape=(*size, 4), subfiletype=1, metadata=None, **options)
    return len(levels)


# ---------------------------------------------------------------------------------------------------- NGFF


def ngff_attrs(attrs: dict, dataset: str = "scores", levels: int = 1) -> dict:
    """OME-NGFF 0.5 group attributes (``{"ome": {...}}``) placing the store's ``dataset`` (class × y × x) and its
    ``levels - 1`` 2× downsampled copies (``<dataset>_1``, …) on the slide: in µm when the pixel size is known,
    else in level-0 pixels.

    Coordinates follow the pixel-centre convention of NGFF readers (napari draws pixel ``i`` centred on
    ``i·scale + translation``): the slide's level-0 pixel ``(y, x)`` sits at ``(y, x)`` (× mpp), so cell
    ``(i, j)`` sits at its window's centre, ``offset + window/2 − ½ + (i, j)·stride``; a cell of level ``L``
    (the mean of 2^L × 2^L cells) at the centre of the cells it averages.
    """
    geometry, mpp = MapGeometry.of(attrs), level0_mpp(attrs)
    unit = (mpp[0], mpp[1]) if mpp is not None else (1.0, 1.0)
    space = {"type": "space", **({"unit": "micrometer"} if mpp is not None else {})}
    datasets = []
    for level in range(levels):
        factor = 2**level
        scale = [1.0] + [geometry.stride[a] * factor * unit[a] for a in range(2)]
        translation = [0.0] + [(geometry.offset[a] + geometry.window[a] / 2 - 0.5
                                + geometry.stride[a] * (factor - 1) / 2) * unit[a] for a in range(2)]
        datasets.append({"path": level_path(dataset, level), "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]})
    return {"ome": {"version": "0.5", "multiscales": [{
        "name": "scores",
        "axes": [{"name": "class", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}],
        "datasets": datasets,
        **({"type": "mean of 2x2 cells, NaN ignored"} if levels > 1 else {}),
        "metadata": {"labels": [str(v) for v in attrs["labels"]],
                     "description": "class probabilities; NaN where not computed"},
    }]}}


def level_path(dataset: str, level: int) -> str:
    """The array of a store's downsampled level: ``scores``, ``scores_1``, ``scores_2``, …"""
    return dataset if level == 0 else f"{dataset}_{level}"


def write_ngff_levels(group, dataset: str = "scores", smallest: int = SMALLEST_LEVEL) -> int:
    """Add 2× downsampled copies of ``group[dataset]`` (NaN-aware means of 2×2 cells) until the longest side is
    at most ``smallest``, each written band by band from the one above; return the number of levels in all."""

    source = group[dataset]
    level = 0
    while max(source.shape[1:]) > smallest:
        level += 1
        classes, rows, cols = (int(v) for v in source.shape)
        shape = (classes, (rows + 1) // 2, (cols + 1) // 2)
        target = group.create_array(
            level_path(dataset, level), shape=shape, chunks=(classes, min(512, shape[1]), min(512, shape[2])),
            dtype=source.dtype, fill_value=np.nan, dimension_names=source.metadata.dimension_names,
            compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), overwrite=True)
        band = 2 * max(1, _band_rows(source, classes * cols * 4, _BAND_BYTES) // 2)
        for first in range(0, rows, band):
            block = np.asarray(source[:, first:first + band, :], dtype=np.float32)
            padded = np.full((classes, block.shape[1] + block.shape[1] % 2, cols + cols % 2), np.nan, np.float32)
            padded[:, :block.shape[1], :cols] = block
            quads = padded.reshape(classes, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN 2×2 blocks stay NaN
                target[:, first // 2:first // 2 + quads.shape[1], :] = np.nanmean(quads, axis=(2, 4)).astype(
                    target.dtype)
        source = target
    return level + 1
