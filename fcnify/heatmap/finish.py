"""Drawing a finished map: peaks and their window centres, colour ranges, the previews (heatmaps, class panels,
mask) and the viewer files (GeoJSON, OME-TIFF overlays, the score GeoTIFF), all from the map band by band."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from fcnify.errors import InputError
from fcnify.heatmap import compute, geo, sinks, viewers
from fcnify.heatmap.cog import write_cog
from fcnify.heatmap.legend import add_legend, colour_range
from fcnify.heatmap.mapgeometry import MapGeometry
from fcnify.heatmap.options import HeatmapOptions
from fcnify.heatmap.previews import classes_figure, colour_lut, panel_side, preview_shape, render_previews
from fcnify.heatmap.sources import display_rgb, read_thumbnail

__all__ = [
    "PREVIEW_PNG_LEVEL", "colour_ranges", "level0_centre", "map_peaks", "nothing_computed", "write_mask",
    "write_previews", "write_viewers"
]

_logger = logging.getLogger(__name__)

#: zlib level of the preview PNGs: level 1 encodes several times faster than Pillow's default 6, for files
#: about a fifth larger (previews are pictures to look at, rewritten on every run; the scores are the data).
PREVIEW_PNG_LEVEL = 1


def map_peaks(scores, tiles) -> compute.PeakTracker:
    """Each class's peak over the whole map, read band by band (the store is never loaded whole)."""
    tracker = compute.PeakTracker(int(scores.shape[0]))
    band = max(1, (64 * 2**20) // max(1, int(scores.shape[0]) * int(scores.shape[2]) * 4))
    for first in range(0, int(scores.shape[1]), band):
        block = np.asarray(scores[:, first:first + band, :], dtype=np.float32)
        tracker.update(block, first, 0)
    return tracker


def level0_centre(peaks, k: int, geometry: MapGeometry, view) -> tuple[float, float]:
    """Class ``k``'s peak in level-0 pixels: the centre of its window's part inside the image (``geometry`` in
    the pixels of ``view``, the level or resized image the map was computed on)."""
    y, x = geometry.centre_inside(peaks.cells[k], view.size)
    return y * view.downsample[0], x * view.downsample[1]


def nothing_computed(path: str, mask) -> InputError:
    """The error of an image whose map would hold no computed cell (everything masked as background)."""
    found = "" if mask is None else f" (a flat {mask.kind} background, {mask.fraction:.1%} of the thumbnail " \
                                    "foreground)"
    return InputError(f"{path}: no cell was computed: the whole image was taken for background{found}",
                      hint="if there is tissue, pass --foreground all (or a finer --mpp/--level)")


def colour_ranges(options: HeatmapOptions, peaks, classes) -> dict:
    """What the colormap's ends stand for per class; --normalize: each class's own computed min and max,
    tracked tile by tile as the map was written."""
    return {k: colour_range(options.vmin, options.vmax, options.normalize, float(peaks.minima[k]),
                            float(peaks.values[k])) for k in classes}


def write_viewers(staged, scores, attrs: sinks.MapAttrs, targets, draw, ranges, size0, options,
                   georef: geo.GeoReference | None = None) -> None:
    """The GeoJSON annotations (in map coordinates for a georeferenced scene), the OME-TIFF overlays
    (``viewers``) and the score GeoTIFF (``cog``), from the map band by band."""
    described = attrs.to_json()
    if "geojson" in targets:
        to_map, crs = geo.geojson_placement(georef, options.geojson_crs) if georef is not None else (None, None)
        viewers.write_geojson(staged.path(targets["geojson"]), scores, described, options.min_score,
                              to_map=to_map, crs=crs)
    if "geotiff" in targets:
        write_cog(staged.path(targets["geotiff"]), scores, described, georef)
    overlays = [t for key, t in targets.items() if key.startswith("ome-tiff")]
    if overlays:
        lut = colour_lut(options.cmap)
        for k, target in zip(draw, overlays, strict=True):
            viewers.write_ome_tiff(staged.path(target), scores, described, k, size0, lut, options.alpha, ranges[k])


def write_previews(staged, view, scores, geometry, targets, draw, top, peaks, ranges, centres, job) -> None:
    """Overlays and class panels over the whole image at level 0 (capped at ``preview_size``), whatever level or
    scale the map was computed at: they lie on the input pixel for pixel."""
    options = job.options
    source = view.source
    size0 = tuple(source.size)
    shape = preview_shape(size0, options.preview_size)
    if tuple(shape) == size0:
        picture = display_rgb(source.read_region(0, 0, 0, *size0))
    else:
        # Box-averaged to about the preview's size from the nearest pyramid level, then fitted exactly.
        thumb, _ = read_thumbnail(source, max_pixels=shape[0] * shape[1], min_downsample=1.0)
        picture = np.asarray(Image.fromarray(thumb).resize(shape[::-1], Image.Resampling.BILINEAR))
        del thumb
    level0 = MapGeometry.of(geometry).at_downsample(view.downsample)
    if options.normalize and any(ranges[k].mode != "per-map" for k in draw):
        _logger.info("--normalize: a drawn class has no computed cell; its legend keeps 0–1")
    previews = render_previews(scores, level0, picture, size0, draw, top, options.cmap, options.alpha,
                               options.preview_size, panel_side(size0, options.dpi), ranges=ranges)
    heat_targets = [t for key, t in targets.items() if key.startswith("heatmap")]
    lut = colour_lut(options.cmap)
    for k, target in zip(draw, heat_targets, strict=True):
        tmp = staged.path(target)
        framed = add_legend(previews.overlays[k], job.model.labels[k], ranges[k], lut)
        Image.fromarray(framed, mode="RGB").save(tmp, format="PNG", compress_level=PREVIEW_PNG_LEVEL)
    view_peaks = {k: (float(peaks.values[k]), centres[k]) for k in top}  # level-0 window centres
    figure = classes_figure(previews, job.model.labels, top, view_peaks, options.cmap, dpi=options.dpi,
                            ranges=ranges)
    tmp = staged.path(targets["classes"])
    figure.savefig(tmp, format="png", dpi=options.dpi, pil_kwargs={"compress_level": PREVIEW_PNG_LEVEL})


def write_mask(staged, target, mask) -> None:
    """The foreground mask at thumbnail size, white where cells were computed."""
    Image.fromarray(mask.mask.astype(np.uint8) * 255).save(staged.path(target), format="PNG")
