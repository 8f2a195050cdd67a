"""What ``fcnify heatmap`` does with each image: ``HeatmapOptions``, and ``validate_options``, the one check.

The CLI and the library build a ``HeatmapOptions`` from what the user gave (strings such as ``"png,geojson"``
or ``"2GB"`` are fine); ``validate_options`` checks every value once, before any image is read, and returns a
new, ``checked`` object with the parsed values that every later step reads as they are.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from fcnify.errors import InputError
from fcnify.heatmap import compute, geo, plan, sinks
from fcnify.heatmap.memory import parse_memory, parse_tile
from fcnify.heatmap.multiscale import parse_scales
from fcnify.heatmap.outputs import DEFAULT_FORMATS, FORMATS, parse_formats
from fcnify.heatmap.render import colormap

__all__ = ["COMBINES", "SCORE_FORMATS", "HeatmapOptions", "validate_options"]

SCORE_FORMATS = ("auto", "npz", "zarr")
COMBINES = ("mean", "max")


@dataclass(frozen=True)
class HeatmapOptions:
    """What ``fcnify heatmap`` does with each image.

    Attributes:
        outdir: the output folder (created if missing).
        classes: class names or indices to draw (empty: the image's top class, by peak probability).
        top_k: classes shown in ``<stem>.classes.png``.
        cmap: a matplotlib colormap name.
        alpha: heatmap opacity over the image (0–1).
        vmin, vmax: the probabilities the colormap's ends stand for (default 0 and 1; values outside take
            the end colours), so a weak model's map can use the whole colormap.
        normalize: colour each map from its own lowest to its highest computed probability instead.
        scale: resize the image by this factor first (ordinary images; slides use ``level``/``mpp``).
        max_pixels: refuse larger ordinary images (None: Pillow's default; 0: no limit). Tiled sources
            (TIFF, slides) are never decoded whole and are not limited.
        device: auto, cpu, cuda, cuda:N or mps.
        precision: fp32, fp16 (GPU only) or bf16.
        batch_size: tiles of the same size run together (and images per Ray batch).
        overwrite: replace existing outputs (otherwise an existing output is an ``OutputError``).
        dpi: resolution of ``<stem>.classes.png``.
        tile: None or "auto" (from ``max_memory``), or a tile size in input pixels (768 or "768x1024"); once
            checked, None, "auto" or (height, width).
        max_memory: the budget for a tile's working set ("2GB"; default 640 MB); once checked, bytes.
        output_stride: a finer output stride dividing the network's (dilation rewrite), None: native.
        scales: an image pyramid (e.g. (0.5, 1, 2)), combined on the grid of scale 1 (maps in memory only).
        combine: "mean" or "max" of the scales' probabilities.
        level: the pyramid level to read (None: level 0, or the level ``mpp`` picks).
        mpp: the resolution to compute at, in µm per pixel (the nearest finer level, resampled).
        foreground: "auto" (skip a flat background, NaN there), "all", or "default": auto for slides and tiled
            TIFFs, all for ordinary pictures (``plan.resolve_foreground``).
        scores: "auto", "npz" or "zarr".
        scores_dtype: "float32" or "float16" (zarr).
        preview_size: the longest side of the previews.
        runtime: "auto", "torch" or "onnxruntime".
        formats: what to write (``outputs.FORMATS``): "png" (heatmaps and class panels), "scores" (always: the
            map the other outputs and ``--resume`` read), "geojson" (QuPath annotations), "ome-tiff" (a pyramidal
            overlay per drawn class); a tuple or a comma list.
        min_score: GeoJSON regions keep only cells whose top probability is at least this (None: all).
        scores_levels: add 2× downsampled copies of a zarr map (down to ≤ 1024 cells) listed in its OME-NGFF
            ``multiscales``, so viewers open huge maps quickly.
        bands: the 1-based bands of multi-band scenes (GeoTIFF) the model sees, in order (a tuple or "4,3,2").
        scale_range: the band values that become 0 and 1 for non-uint8 scenes (a pair or "0,3000"; None: each
            band's 2–98 percentiles over a thumbnail).
        geojson_crs: GeoJSON of georeferenced scenes in "wgs84" (longitude, latitude) or the "source" CRS.
        checked: made by ``validate_options``: every value is valid and parsed (``formats``, ``tile``,
            ``max_memory``, ``scales``, ``bands``, ``scale_range`` in their parsed forms).
    """

    outdir: Path
    classes: tuple = ()
    top_k: int = 4
    cmap: str = "inferno"
    alpha: float = 0.5
    vmin: float | None = None
    vmax: float | None = None
    normalize: bool = False
    scale: float = 1.0
    max_pixels: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 8
    overwrite: bool = True
    dpi: int = 100
    tile: str | int | tuple | None = None
    max_memory: str | int | None = None
    output_stride: int | None = None
    scales: tuple = ()
    combine: str = "mean"
    level: int | None = None
    mpp: float | None = None
    foreground: str = "default"
    scores: str = "auto"
    scores_dtype: str = "float32"
    preview_size: int = 4096
    runtime: str = "auto"
    formats: tuple | str = DEFAULT_FORMATS
    min_score: float | None = None
    scores_levels: bool = False
    bands: tuple | str | None = None
    scale_range: tuple | str | None = None
    geojson_crs: str = "wgs84"
    checked: bool = field(default=False, repr=False)


def validate_options(options: HeatmapOptions) -> HeatmapOptions:
    """``options`` checked, with every value in its parsed form (``checked`` set); checked options come back as
    they are, so that each entry point may call it and the checks still run once.

    Raises:
        InputError: an option value that can never work (before any image is read).
    """
    if options.checked:
        return options
    _check_outdir_name(options.outdir)
    colormap(options.cmap)
    _check_values(options)
    _check_range(options)
    formats = _checked_formats(options)
    if options.geojson_crs not in geo.GEOJSON_CRS:
        raise InputError(f"--geojson-crs {options.geojson_crs!r} is not one of {', '.join(geo.GEOJSON_CRS)}",
                         hint="--geojson-crs wgs84 (RFC 7946, the default) or source")
    scales = tuple(parse_scales(options.scales)) if options.scales else ()
    if scales and options.scores == "zarr":
        raise InputError("--scales combines maps held in memory, not --scores zarr",
                         hint="drop --scores zarr, or compute one resolution with --level/--mpp")
    max_memory = options.max_memory
    if max_memory is not None and not isinstance(max_memory, int):
        max_memory = parse_memory(max_memory)
    return replace(options, outdir=Path(options.outdir), classes=tuple(options.classes or ()), formats=formats,
                   tile=parse_tile(options.tile), max_memory=max_memory, scales=scales,
                   bands=geo.parse_bands(options.bands), scale_range=geo.parse_scale_range(options.scale_range),
                   checked=True)


def _check_outdir_name(outdir) -> None:
    uri = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$", str(outdir))
    if uri:  # Path() has already folded "s3://b/x" into "s3:/b/x"
        raise InputError(f"-o {uri[1]}://{uri[2]}: fcnify writes its outputs to folders, not to object storage "
                         "or URLs", hint="give a local folder, or a shared filesystem every Ray node mounts "
                                         "(a bucket mounted with s3fs or gcsfuse), and copy the outputs afterwards")


def _check_values(o: HeatmapOptions) -> None:
    checks = [
        (0.0 <= float(o.alpha) <= 1.0, f"--alpha {o.alpha} is not between 0 and 1", "e.g. --alpha 0.5"),
        (int(o.top_k) >= 1, f"--top-k {o.top_k} must be at least 1", "e.g. --top-k 4"),
        (float(o.scale) > 0, f"--scale {o.scale} is not a positive number", "e.g. --scale 0.5"),
        (int(o.batch_size) >= 1, f"--batch-size {o.batch_size} must be at least 1", "e.g. --batch-size 8"),
        (o.max_pixels is None or int(o.max_pixels) >= 0, f"--max-pixels {o.max_pixels} is negative",
         "pass 0 for no limit"),
        (o.combine in COMBINES, f"--combine {o.combine!r} is not one of {', '.join(COMBINES)}",
         "e.g. --combine mean"),
        (o.output_stride is None or int(o.output_stride) >= 1,
         f"--output-stride {o.output_stride} must be a positive integer", "e.g. --output-stride 8"),
        (o.level is None or int(o.level) >= 0, f"--level {o.level} is negative", "level 0 is the finest"),
        (o.mpp is None or float(o.mpp) > 0, f"--mpp {o.mpp} is not a positive number", "e.g. --mpp 0.5"),
        (o.level is None or o.mpp is None, "--level and --mpp both given", "choose one of them"),
        (o.foreground in plan.FOREGROUND_MODES, f"--foreground {o.foreground!r} is not default, auto or all",
         "e.g. --foreground all"),
        (o.scores in SCORE_FORMATS, f"--scores {o.scores!r} is not one of {', '.join(SCORE_FORMATS)}",
         "e.g. --scores zarr"),
        (o.scores_dtype in sinks.SCORE_DTYPES, f"--scores-dtype {o.scores_dtype!r} is not float32 or float16",
         "e.g. --scores-dtype float16"),
        (int(o.preview_size) >= 16, f"--preview-size {o.preview_size} is below 16 px", "e.g. 4096"),
        (o.runtime in compute.RUNTIMES, f"--runtime {o.runtime!r} is not one of {', '.join(compute.RUNTIMES)}",
         "e.g. --runtime auto"),
    ]
    for ok, message, hint in checks:
        if not ok:
            raise InputError(message, hint=hint)


def _checked_formats(o: HeatmapOptions) -> tuple[str, ...]:
    formats = parse_formats(o.formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], FORMATS, n=1)
        raise InputError(f"--formats: unknown format {unknown[0]!r}",
                         hint=(f"did you mean {close[0]}? " if close else "")
                         + f"choose from {', '.join(FORMATS)}, e.g. --formats png,scores,geojson")
    if "scores" not in formats:
        raise InputError(f"--formats {','.join(formats)} leaves out scores",
                         hint="the score store is what the other outputs and --resume are made from; "
                              f"e.g. --formats {','.join(dict.fromkeys([*formats, 'scores']))}")
    if o.min_score is not None and not 0.0 <= float(o.min_score) <= 1.0:  # also refuses NaN
        raise InputError(f"--min-score {o.min_score} is not between 0 and 1", hint="e.g. --min-score 0.5")
    return formats


def _check_range(o: HeatmapOptions) -> None:
    if o.normalize and (o.vmin is not None or o.vmax is not None):
        raise InputError("--normalize and --vmin/--vmax both given",
                         hint="choose one: --normalize stretches each map over its own min–max, "
                              "--vmin/--vmax fix one range for all")
    for name, value in (("--vmin", o.vmin), ("--vmax", o.vmax)):
        if value is not None and not 0.0 <= float(value) <= 1.0:  # also refuses NaN
            raise InputError(f"{name} {value} is not between 0 and 1",
                             hint="the maps hold probabilities; e.g. --vmin 0 --vmax 0.3")
    low = 0.0 if o.vmin is None else float(o.vmin)
    high = 1.0 if o.vmax is None else float(o.vmax)
    if not low < high:
        raise InputError(f"--vmin {low:g} is not below --vmax {high:g}"
                         + (" (its default)" if o.vmin is None or o.vmax is None else ""),
                         hint="e.g. --vmin 0 --vmax 0.3")
