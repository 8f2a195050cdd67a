"""``<stem>.scores.tif``: the score map of a georeferenced scene as a Cloud-Optimized GeoTIFF.

One float32 band per class (described by its label), NaN — the nodata value — where a cell was not computed,
DEFLATE-compressed 256 × 256 tiles with a floating-point predictor, and 2× overviews (average of the computed
cells) down to one tile. Its geotransform is the map's ``cell_transform``: pixel ``(i, j)`` is the stride × stride
square centred on cell ``(i, j)``'s window centre in the scene's CRS, so a GIS lays it over the scene exactly.

The map is copied from its store band of rows by band of rows into a tiled GeoTIFF beside the target (memory
follows the band), and GDAL's COG driver then lays that out with its overviews (GDAL works block by block in its
bounded cache), so the map is never held whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fcnify.atomic import temp_beside
from fcnify.heatmap.geo import GeoReference, require_rasterio
from fcnify.optional import require

__all__ = ["COG_BLOCK", "write_cog"]

_logger = logging.getLogger(__name__)

#: The COG's tile side (and the size its smallest overview fits in).
COG_BLOCK = 256
#: Bytes of map rows copied at once.
_BAND_BYTES = 32 * 2**20


def write_cog(path: Path, scores, attrs: dict, georef: GeoReference, block: int = COG_BLOCK) -> None:
    """Write ``scores`` (K×rows×cols probabilities, an array or a zarr array) as a Cloud-Optimized GeoTIFF.

    Args:
        path: the file to write (a temporary the caller renames into place).
        scores: the map, NaN where not computed.
        attrs: the map's attributes (``labels``, level-0 ``stride``, ``offset``, ``window``).
        georef: the scene's CRS and level-0 transform.
        block: the tile side (a multiple of 16).
    """
    rasterio = require_rasterio("write the score map as a GeoTIFF (--formats geotiff)")
    copy = require("rasterio.shutil", "geo", "write the score map as a GeoTIFF").copy
    from rasterio.windows import Window

    classes, rows, cols = (int(v) for v in scores.shape)
    transform = rasterio.Affine(*georef.cell_transform(attrs))
    crs = rasterio.crs.CRS.from_wkt(georef.crs_wkt)
    labels = [str(v) for v in attrs["labels"]]
    stride, offset, window = (attrs[n] for n in ("stride", "offset", "window"))
    tags = {"FCNIFY_CONTENT": "class probabilities (softmax), NaN where not computed",
            "FCNIFY_STRIDE": ",".join(map(str, stride)), "FCNIFY_OFFSET": ",".join(map(str, offset)),
            "FCNIFY_WINDOW": ",".join(map(str, window)),
            "FCNIFY_PLACEMENT": "pixel (i, j) is centred on cell (i, j)'s window centre in the source CRS"}
    staging = temp_beside(path)
    try:
        with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"):
            with rasterio.open(staging, "w", driver="GTiff", width=cols, height=rows, count=classes,
                               dtype="float32", crs=crs, transform=transform, nodata=float("nan"), tiled=True,
                               blockxsize=block, blockysize=block, compress="deflate", predictor=3,
                               bigtiff="if_safer") as dst:
                band = max(block, _BAND_BYTES // max(1, classes * cols * 4) // block * block)
                for first in range(0, rows, band):
                    last = min(rows, first + band)
                    data = np.asarray(scores[:, first:last, :], dtype=np.float32)
                    dst.write(data, window=Window(0, first, cols, last - first))
                for k, label in enumerate(labels, start=1):
                    dst.set_band_description(k, label)
                dst.update_tags(**tags)
            copy(staging, path, driver="COG", COMPRESS="DEFLATE", PREDICTOR="FLOATING_POINT",
                                 BLOCKSIZE=str(block), OVERVIEW_RESAMPLING="AVERAGE", RESAMPLING="AVERAGE",
                                 BIGTIFF="IF_SAFER")
    finally:
        staging.unlink(missing_ok=True)
    _logger.info("%s: %d bands, %d×%d cells, CRS %s", path, classes, rows, cols, georef.crs_name)
