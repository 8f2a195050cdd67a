"""One image end to end: source → plan → compute → sinks, with resume and progress around it.

For an input ``<stem>.<ext>`` it writes, in the output folder:

* ``<stem>.heatmap.png`` (one class: the chosen one, else the top class) or ``<stem>.heatmap.<class>.png``
  (several): the class's probability over the image, at the image's size or, for images whose longest side
  exceeds ``preview_size`` (4096), scaled down to it, with a legend strip below it (``legend.add_legend``:
  class name, colour scale, range);
* ``<stem>.classes.png``: a panel per top-k class and the most probable class per pixel;
* ``<stem>.scores.npz`` (maps held in memory) or ``<stem>.scores.zarr`` (tiled sources and large maps; see
  ``choose_scores_format``): probabilities K×rows×cols with NaN for background cells, and the geometry;
* ``<stem>.mask.png`` when a flat background was found: the foreground mask at thumbnail size;
* with ``formats``: ``<stem>.geojson`` (QuPath annotations) and ``<stem>.heatmap[.<class>].ome.tif`` (pyramidal
  overlays), written from the map by ``viewers``; ``png`` may be left out.

Every file is written under a temporary name and renamed into place only once all of them are complete.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fcnify.dense import with_output_stride
from fcnify.errors import FcnifyError, InputError, InternalError, OutputError
from fcnify.heatmap import compute, geo, plan, sinks, viewers
from fcnify.heatmap.cog import write_cog
from fcnify.heatmap.legend import add_legend, colour_range
from fcnify.heatmap.memory import DEFAULT_TILE_BUDGET, bytes_per_pixel, parse_memory, parse_tile, tile_side
from fcnify.heatmap.multiscale import multiscale_map, parse_scales
from fcnify.heatmap.previews import classes_figure, colour_lut, panel_side, preview_shape, render_previews
from fcnify.heatmap.render import colormap
from fcnify.heatmap.sources import display_rgb, open_view, read_thumbnail
from fcnify.images import PreparedImage

__all__ = [
    "ClassPeak", "HeatmapOptions", "ImageJob", "ImageRun", "SCORE_FORMATS", "SummaryRow", "TileShard",
    "choose_scores_format", "compute_shard", "output_stems", "resolve_classes", "run_image",
]

_logger = logging.getLogger(__name__)

SCORE_FORMATS = ("auto", "npz", "zarr")
#: ``--scores auto`` keeps maps up to this many bytes (float32) in memory and writes them as ``.npz``.
NPZ_MAX_BYTES = 64 * 2**20
COMBINES = ("mean", "max")
DEFAULT_FORMATS = ("png", "scores")
#: zlib level of the preview PNGs: level 1 encodes several times faster than Pillow's default 6, for files
#: about a fifth larger (previews are pictures to look at, rewritten on every run; the scores are the data).
PREVIEW_PNG_LEVEL = 1


@dataclass
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
        tile: None or "auto" (from ``max_memory``), or a tile size in input pixels (768 or "768x1024").
        max_memory: the budget for a tile's working set ("2GB"; default 640 MB).
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
        formats: what to write (``viewers.FORMATS``): "png" (heatmaps and class panels), "scores" (always: the
            map the other outputs and ``--resume`` read), "geojson" (QuPath annotations), "ome-tiff" (a pyramidal
            overlay per drawn class); a tuple or a comma list.
        min_score: GeoJSON regions keep only cells whose top probability is at least this (None: all).
        scores_levels: add 2× downsampled copies of a zarr map (down to ≤ 1024 cells) listed in its OME-NGFF
            ``multiscales``, so viewers open huge maps quickly.
        bands: the 1-based bands of multi-band scenes (GeoTIFF) the model sees, in order (a tuple or "4,3,2").
        scale_range: the band values that become 0 and 1 for non-uint8 scenes (a pair or "0,3000"; None: each
            band's 2–98 percentiles over a thumbnail).
        geojson_crs: GeoJSON of georeferenced scenes in "wgs84" (longitude, latitude) or the "source" CRS.
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
    tile: str | int | None = None
    max_memory: str | None = None
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

    def validate(self) -> None:
        """Raise ``InputError`` for option values that can never work (before any image is read)."""
        uri = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$", str(self.outdir))
        if uri:  # Path() has already folded "s3://b/x" into "s3:/b/x"
            raise InputError(f"-o {uri[1]}://{uri[2]}: fcnify writes its outputs to folders, not to object storage "
                             "or URLs", hint="give a local folder, or a shared filesystem every Ray node mounts "
                                             "(a bucket mounted with s3fs or gcsfuse), and copy the outputs afterwards")
        colormap(self.cmap)
        checks = [
            (0.0 <= float(self.alpha) <= 1.0, f"--alpha {self.alpha} is not between 0 and 1", "e.g. --alpha 0.5"),
            (int(self.top_k) >= 1, f"--top-k {self.top_k} must be at least 1", "e.g. --top-k 4"),
            (float(self.scale) > 0, f"--scale {self.scale} is not a positive number", "e.g. --scale 0.5"),
            (int(self.batch_size) >= 1, f"--batch-size {self.batch_size} must be at least 1", "e.g. --batch-size 8"),
            (self.max_pixels is None or int(self.max_pixels) >= 0, f"--max-pixels {self.max_pixels} is negative",
             "pass 0 for no limit"),
            (self.combine in COMBINES, f"--combine {self.combine!r} is not one of {', '.join(COMBINES)}",
             "e.g. --combine mean"),
            (self.output_stride is None or int(self.output_stride) >= 1,
             f"--output-stride {self.output_stride} must be a positive integer", "e.g. --output-stride 8"),
            (self.level is None or int(self.level) >= 0, f"--level {self.level} is negative", "level 0 is the finest"),
            (self.mpp is None or float(self.mpp) > 0, f"--mpp {self.mpp} is not a positive number", "e.g. --mpp 0.5"),
            (self.level is None or self.mpp is None, "--level and --mpp both given", "choose one of them"),
            (self.foreground in plan.FOREGROUND_MODES, f"--foreground {self.foreground!r} is not default, auto or all",
             "e.g. --foreground all"),
            (self.scores in SCORE_FORMATS, f"--scores {self.scores!r} is not one of {', '.join(SCORE_FORMATS)}",
             "e.g. --scores zarr"),
            (self.scores_dtype in sinks.SCORE_DTYPES, f"--scores-dtype {self.scores_dtype!r} is not float32 or "
             "float16", "e.g. --scores-dtype float16"),
            (int(self.preview_size) >= 16, f"--preview-size {self.preview_size} is below 16 px", "e.g. 4096"),
            (self.runtime in compute.RUNTIMES, f"--runtime {self.runtime!r} is not one of "
             f"{', '.join(compute.RUNTIMES)}", "e.g. --runtime auto"),
        ]
        for ok, message, hint in checks:
            if not ok:
                raise InputError(message, hint=hint)
        self._validate_range()
        self._validate_formats()
        self.bands = geo.parse_bands(self.bands)
        self.scale_range = geo.parse_scale_range(self.scale_range)
        if self.geojson_crs not in geo.GEOJSON_CRS:
            raise InputError(f"--geojson-crs {self.geojson_crs!r} is not one of {', '.join(geo.GEOJSON_CRS)}",
                             hint="--geojson-crs wgs84 (RFC 7946, the default) or source")
        parse_tile(self.tile)
        if self.max_memory is not None:
            parse_memory(self.max_memory)
        if self.scales:
            parse_scales(self.scales)
            if self.scores == "zarr":
                raise InputError("--scales combines maps held in memory, not --scores zarr",
                                 hint="drop --scores zarr, or compute one resolution with --level/--mpp")

    def _validate_formats(self) -> None:
        self.formats = viewers.parse_formats(self.formats)
        unknown = [f for f in self.formats if f not in viewers.FORMATS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], viewers.FORMATS, n=1)
            raise InputError(f"--formats: unknown format {unknown[0]!r}",
                             hint=(f"did you mean {close[0]}? " if close else "")
                             + f"choose from {', '.join(viewers.FORMATS)}, e.g. --formats png,scores,geojson")
        if "scores" not in self.formats:
            raise InputError(f"--formats {','.join(self.formats)} leaves out scores",
                             hint="the score store is what the other outputs and --resume are made from; "
                                  f"e.g. --formats {','.join(dict.fromkeys([*self.formats, 'scores']))}")
        if self.min_score is not None and not 0.0 <= float(self.min_score) <= 1.0:  # also refuses NaN
            raise InputError(f"--min-score {self.min_score} is not between 0 and 1", hint="e.g. --min-score 0.5")

    def _validate_range(self) -> None:
        if self.normalize and (self.vmin is not None or self.vmax is not None):
            raise InputError("--normalize and --vmin/--vmax both given",
                             hint="choose one: --normalize stretches each map over its own min–max, "
                                  "--vmin/--vmax fix one range for all")
        for name, value in (("--vmin", self.vmin), ("--vmax", self.vmax)):
            if value is not None and not 0.0 <= float(value) <= 1.0:  # also refuses NaN
                raise InputError(f"{name} {value} is not between 0 and 1",
                                 hint="the maps hold probabilities; e.g. --vmin 0 --vmax 0.3")
        low = 0.0 if self.vmin is None else float(self.vmin)
        high = 1.0 if self.vmax is None else float(self.vmax)
        if not low < high:
            raise InputError(f"--vmin {low:g} is not below --vmax {high:g}"
                             + (" (its default)" if self.vmin is None or self.vmax is None else ""),
                             hint="e.g. --vmin 0 --vmax 0.3")


@dataclass(frozen=True)
class ClassPeak:
    """A class's best cell in one image: peak probability and its window centre (y, x) in level-0 pixels."""

    index: int
    label: str
    score: float
    y: float
    x: float


@dataclass
class SummaryRow:
    """One input's outcome (a row of ``summary.parquet``).

    Attributes:
        path: the input path as given.
        status: ``"ok"`` or ``"error"``.
        error: the error message (with its hint) when ``status`` is ``"error"``.
        image_size: the image's level-0 (height, width), when it was read.
        map_size: the score map's (rows, cols).
        padded: the image was smaller than the window and was padded.
        top: the top-k classes by peak probability.
        outputs: the files written.
        skipped: a resumed job found the outputs complete and did not redo them.
        level, downsample, mpp: the resolution computed at (level-0 pixels per pixel; µm per pixel).
        tiles, tiles_computed, tiles_background, tiles_resumed: the tile counts.
        background_fraction: the share of tiles skipped as background.
        foreground: the mask mode applied (``auto`` or ``all``, after ``default`` was resolved).
        cells_masked, masked_fraction: map cells left NaN as background, and their share of the map.
        pixels_saved: the share of input pixels (halos included) not pushed through the network because of the
            mask, against computing every cell.
        seconds: time spent on the image; megapixels: its pixels at the resolution computed at.
        runtime: torch or onnxruntime; scores_format: npz or zarr.
        preprocessing: the mean and std the images were normalised with.
        output, output_names: the model output the map is (``--output``) and all the model's outputs.
    """

    path: str
    status: str
    error: str | None = None
    image_size: tuple[int, int] | None = None
    map_size: tuple[int, int] | None = None
    padded: bool = False
    top: tuple[ClassPeak, ...] = ()
    outputs: tuple[str, ...] = field(default_factory=tuple)
    skipped: bool = False
    level: int | None = None
    downsample: float | None = None
    mpp: float | None = None
    tiles: int = 0
    tiles_computed: int = 0
    tiles_background: int = 0
    tiles_resumed: int = 0
    background_fraction: float | None = None
    foreground: str | None = None
    cells_masked: int = 0
    masked_fraction: float | None = None
    pixels_saved: float | None = None
    seconds: float = 0.0
    megapixels: float = 0.0
    runtime: str | None = None
    scores_format: str | None = None
    preprocessing: dict = field(default_factory=dict)
    output: str | None = None
    output_names: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["top"] = [asdict(peak) for peak in self.top]
        data["outputs"] = list(self.outputs)
        return data


# ------------------------------------------------------------------------------------------------ classes


def resolve_classes(names_or_indices: Sequence, labels: Sequence[str]) -> list[int]:
    """Class indices for names or indices (exact name first, then an index, then a unique case-insensitive
    name); duplicates are dropped, the order is kept.

    Raises:
        InputError: a name that is no label and no valid index; the message lists close and valid names.
    """
    labels = [str(v) for v in labels]
    by_name = {name: i for i, name in enumerate(labels)}
    lower: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        lower.setdefault(name.lower(), []).append(i)
    result: list[int] = []
    for item in names_or_indices:
        text = str(item).strip()
        if text in by_name:
            index = by_name[text]
        elif re.fullmatch(r"[+-]?\d+", text) and 0 <= int(text) < len(labels):
            index = int(text)
        elif len(lower.get(text.lower(), [])) == 1:
            index = lower[text.lower()][0]
        else:
            close = difflib.get_close_matches(text, labels, n=3)
            examples = ", ".join(labels[:5]) + (", …" if len(labels) > 5 else "")
            hint = (f"did you mean {', '.join(close)}? " if close else "") + \
                f"give a class name ({examples}) or an index 0–{len(labels) - 1}"
            raise InputError(f"unknown class {text!r}: the model has no such label", hint=hint)
        if index not in result:
            result.append(index)
    return result


def _safe_name(label: str) -> str:
    name = re.sub(r"[^\w.+-]+", "_", label, flags=re.UNICODE).strip("._")
    return name[:80] or "class"


def output_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Output names (without suffixes) for input paths: the file's stem, or, when several inputs share a
    stem, the stem under its folder relative to the inputs' common parent (``a/photo``, ``b/photo``).
    Slide suffixes such as ``.ome.tif`` are dropped whole."""
    # A URI's stem and folders come from its bucket and key ("s3://b/a/x.png" -> /b/a/x.png), not the cwd.
    resolved = [Path("/" + str(p).split("://", 1)[1]) if "://" in str(p) else Path(os.path.abspath(p))
                for p in paths]
    stems = [_stem(p) for p in resolved]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    if all(c == 1 for c in counts.values()):
        return stems
    try:
        common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    except ValueError:  # different drives
        common = None
    result: list[str] = []
    taken: set[str] = set()
    for path, stem in zip(resolved, stems, strict=True):
        if counts[stem] == 1:
            name = stem
        else:
            parent = path.parent.relative_to(common) if common is not None else Path(path.parent.name)
            name = (parent / stem).as_posix() if str(parent) not in ("", ".") else stem
        unique, n = name, 2
        while unique in taken:
            unique = f"{name}-{n}"
            n += 1
        taken.add(unique)
        result.append(unique)
    return result


def _stem(path: Path) -> str:
    name = path.name
    for double in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(double):
            return name[: -len(double)]
    return path.stem


def expected_outputs(stem: str, outdir: Path, classes: Sequence[int], labels: Sequence[str],
                     scores_format: str, formats: Sequence[str] = DEFAULT_FORMATS) -> dict[str, Path]:
    """The files an image gets (heatmaps first, keyed as in ``SummaryRow.outputs``' order, scores last):
    ``heatmap[:<class>]`` and ``classes`` (png), ``ome-tiff[:<class>]``, ``geojson``, ``scores``."""
    base = Path(outdir) / Path(stem)
    chosen = list(classes) or [None]
    targets: dict[str, Path] = {}
    used_names: set[str] = set()
    heatmaps: list[tuple[str, str]] = []  # (key suffix, file name part) per drawn class
    for k in chosen:
        if len(chosen) == 1:
            heatmaps.append(("", ".heatmap"))
            continue
        label = str(labels[k])
        name = _safe_name(label)
        if name in used_names:
            name = f"{name}_{k}"
        used_names.add(name)
        heatmaps.append((f":{label}", f".heatmap.{name}"))
    if "png" in formats:
        for key, part in heatmaps:
            targets[f"heatmap{key}"] = base.with_name(f"{base.name}{part}.png")
        targets["classes"] = base.with_name(base.name + ".classes.png")
    if "ome-tiff" in formats:
        for key, part in heatmaps:
            targets[f"ome-tiff{key}"] = base.with_name(f"{base.name}{part}.ome.tif")
    if "geojson" in formats:
        targets["geojson"] = base.with_name(base.name + ".geojson")
    if "geotiff" in formats:
        targets["geotiff"] = base.with_name(base.name + ".scores.tif")
    targets["scores"] = base.with_name(f"{base.name}.scores.{scores_format}")
    return targets


# ------------------------------------------------------------------------------------------------ the job


@dataclass
class ModelInfo:
    """What the pipeline needs from a ``LoadedModel`` (small and picklable, for Ray workers)."""

    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    source: str = ""
    preprocessing: dict = field(default_factory=dict)

    @classmethod
    def of(cls, loaded) -> ModelInfo:
        preprocessing = dict(getattr(loaded, "preprocessing", None) or {})
        preprocessing.setdefault("mean", list(loaded.mean))
        preprocessing.setdefault("std", list(loaded.std))
        return cls(int(loaded.in_chans), tuple(float(v) for v in loaded.mean), tuple(float(v) for v in loaded.std),
                   tuple(str(v) for v in loaded.labels), str(getattr(loaded, "source", "")), preprocessing)


class ImageJob:
    """What every image of a job shares: the network on its device, its geometry, the options.

    Args:
        fcn, geometry: the converted network and its geometry (``output_stride`` is applied here).
        model: ``ModelInfo`` (or a ``LoadedModel``).
        options: the heatmap options.
        metadata: the network's ``ModelMetadata`` (for an in-memory ONNX export), if known.
    """

    def __init__(self, fcn, geometry, model, options: HeatmapOptions, metadata=None):
        options.validate()
        self.options = options
        self.model = model if isinstance(model, ModelInfo) else ModelInfo.of(model)
        self.classes = resolve_classes(options.classes, self.model.labels)
        # The model output the maps are made of (``--output``; fcnify's converted networks name theirs).
        self.output_names = tuple(str(n) for n in getattr(fcn, "output_names", ()) or ())
        self.output = str(fcn.selected) if getattr(fcn, "selected", None) is not None else None
        fcn, geometry = with_output_stride(fcn, geometry, options.output_stride)
        self.fcn, self.geometry, self.metadata = fcn, geometry, metadata
        self.bounds = plan.bounds_of(geometry)
        self.window = tuple(int(v) for v in geometry.window)
        self.network = compute.TileNetwork.build(fcn, self.model.in_chans, self.model.mean, self.model.std,
                                                 options.device, options.precision)
        self._budget = parse_memory(options.max_memory) if options.max_memory else None
        self._per_pixel: float | None = None
        self._runtimes: dict[str, torch.nn.Module | None] = {}
        _check_outdir(Path(options.outdir))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the network's weights, for a zarr store's resume key (hashed only when a store needs it)."""
        return _fingerprint(self.fcn)

    def per_pixel(self) -> float:
        """Bytes of the network's working set per input pixel (measured once)."""
        if self._per_pixel is None:
            self._per_pixel = bytes_per_pixel(self.fcn, self.model.in_chans, self.window)
        return self._per_pixel

    def tiles_per_batch(self, input_shape: tuple[int, int]) -> int:
        """How many tiles of ``input_shape`` run together: one on the CPU (a tile's convolutions already use
        every core, and a batch would multiply the working set); on a GPU ``batch_size``, but no more than fit
        the memory budget together (a batch's working set is its tiles' sum), and at least one."""
        if self.network.device.type == "cpu":
            return 1
        budget = self._budget or DEFAULT_TILE_BUDGET
        fit = int(budget // max(1.0, self.per_pixel() * input_shape[0] * input_shape[1]))
        return max(1, min(int(self.options.batch_size), fit))

    def tile_cells(self) -> tuple[int, int] | None:
        """Cells per tile for this job's options (None: one tile per image)."""
        tile = parse_tile(self.options.tile)
        if isinstance(tile, tuple):
            return plan.cells_for_tile_size(self.bounds, tile)
        self.per_pixel()
        budget = self._budget
        side = tile_side(self._per_pixel, budget)
        minimum = max(self.bounds.halo(a) + self.bounds.stride[a] for a in range(2))
        if side < minimum:
            if budget is not None:
                raise InputError(f"--max-memory {self.options.max_memory} is too small for one tile of this network "
                                 f"(a {minimum}x{minimum} tile needs about {self._per_pixel * minimum**2 / 1e6:.0f} MB)",
                                 hint="raise --max-memory")
            side = minimum
        return plan.cells_for_tile_size(self.bounds, (side, side))

    def runner(self, pixels: int) -> compute.TileNetwork:
        """The tile network in the runtime ``--runtime`` picks for ``pixels`` input pixels (exported once)."""
        name = compute.choose_runtime(self.fcn, self.metadata, self.options.runtime, self.network.device,
                                      self.options.precision, pixels)
        if name == "torch" or getattr(self.fcn, "runs_outside_torch", False):
            self.network.runtime = name
            return self.network
        if name not in self._runtimes:
            try:
                self._runtimes[name] = compute.onnx_twin(self.fcn, self.metadata)
            except FcnifyError as exc:
                if self.options.runtime != "auto":
                    raise
                _logger.info("--runtime auto: staying with PyTorch (%s)", exc)
                self._runtimes[name] = None
        if self._runtimes[name] is None:
            return self.network
        return compute.TileNetwork(self._runtimes[name], self.network.device, self.network.dtype,
                                   self.network.in_chans, self.network.mean, self.network.std, name)


def _fingerprint(fcn) -> str:
    """A short hash of the network's weights: a partial store is resumed only by the same network."""
    digest = hashlib.sha1()
    source = getattr(fcn, "_source", None)
    if isinstance(source, (bytes, str)):
        digest.update(source if isinstance(source, bytes) else source.encode())
    for name, tensor in sorted(fcn.state_dict().items()) if hasattr(fcn, "state_dict") else []:
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            # reshape(-1): 0-dim buffers (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly.
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            digest.update(str(tuple(tensor.shape)).encode())
    return digest.hexdigest()[:16]


def _check_outdir(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {outdir}: {exc.strerror}",
                          hint="choose a writable -o folder") from exc
    if not outdir.is_dir():
        raise OutputError(f"{outdir} is not a folder", hint="give a folder for -o")
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {outdir} is not writable", hint="choose a writable -o folder")


def choose_scores_format(requested: str, source, map_size: tuple[int, int], classes: int) -> str:
    """``npz`` or ``zarr``: ``auto`` writes zarr for tiled sources (TIFF, slides: never decoded whole) and for
    maps over 64 MiB as float32; ordinary images with smaller maps keep ``.scores.npz``."""
    if requested != "auto":
        return requested
    if not source.whole or classes * map_size[0] * map_size[1] * 4 > NPZ_MAX_BYTES:
        return "zarr"
    return "npz"


# ------------------------------------------------------------------------------------------------ one image


@dataclass
class TileProgress:
    """Progress of one image, reported to the ``progress`` callback after each tile."""

    path: str
    total: int
    computed: int = 0
    background: int = 0
    resumed: int = 0
    todo: int = 0
    pixels: int = 0
    runtime: str | None = None
    peaks: compute.PeakTracker | None = field(default=None, repr=False)

    @property
    def finished(self) -> int:
        return self.computed + self.background + self.resumed


def _level0(view, geometry) -> dict[str, tuple]:
    """The map's geometry in level-0 pixels: ints when the view is level 0 unresized, floats otherwise."""
    dy, dx = view.downsample
    if (dy, dx) == (1.0, 1.0):
        return {name: tuple(int(v) for v in getattr(geometry, name)) for name in ("stride", "offset", "window")}
    return {name: (float(getattr(geometry, name)[0] * dy), float(getattr(geometry, name)[1] * dx))
            for name in ("stride", "offset", "window")}


@dataclass(frozen=True)
class _ViewGeometry:
    stride: tuple
    offset: tuple
    window: tuple


def run_image(path: str, stem: str, job: ImageJob, resume: bool = False,
              progress: Callable[[TileProgress], None] | None = None) -> SummaryRow:
    """Compute and write one image's outputs in this process; any ``FcnifyError`` becomes an error row."""
    started = time.perf_counter()
    run = ImageRun(path, stem, job, resume, progress)
    try:
        row = run.open()
        if row is None:
            run.start()
            run.compute_here()
            row = run.finish()
    except FcnifyError as exc:
        return run.failed(str(exc), started)
    finally:
        run.close()
    row.seconds = time.perf_counter() - started
    return row


@dataclass(frozen=True)
class TileShard:
    """What a worker needs to compute tiles of an image into its store (small and picklable: the engine sends it
    once per image, then only tile indices travel).

    Attributes:
        path: the image, as the worker reads it (absolute, or a URI).
        plan: the tile plan (tile index → input region and cells).
        mask: the foreground mask (None: every cell), so the worker writes NaN where the local engine does.
        store: the partial ``.scores.zarr`` folder; each tile is one chunk, so workers never share one.
        pixels: input pixels of the tiles to do, which pick the runtime as the local engine would.
        grids: the network's other outputs (``plan.OutputGrid``), whose arrays the worker writes too.
    """

    path: str
    plan: plan.TilePlan
    mask: plan.ForegroundMask | None
    store: Path
    pixels: int
    grids: dict = field(default_factory=dict)


class ImageRun:
    """One image's run in steps, so that an engine may compute its tiles elsewhere.

    ``open`` reads the header and plans the tiles (and returns the row of a resumed image that is complete),
    ``start`` finds the background and opens (or resumes) the score store, then the tiles are computed, here
    (``compute_here``) or by workers writing into the store (``shard``; the engine reports each finished tile
    with ``tile_finished``), and ``finish`` writes the previews and viewer files from the map and renames
    everything into place. ``close`` releases the image and the store whatever happened.
    """

    def __init__(self, path: str, stem: str, job: ImageJob, resume: bool = False,
                 progress: Callable[[TileProgress], None] | None = None):
        self.path, self.stem, self.job, self.resume, self.progress = str(path), stem, job, resume, progress
        self.outdir = Path(job.options.outdir)
        self._files = contextlib.ExitStack()
        self.sink = None
        self.state = TileProgress(self.path, 0)
        self.todo: list = []

    # -------------------------------------------------------------------------------------------- open

    def open(self) -> SummaryRow | None:
        """Open the image and plan its tiles; the finished row when ``resume`` finds its outputs complete."""
        job, options, model = self.job, self.job.options, self.job.model
        _make_stem_folder(self.outdir, self.stem)
        self.source = self._files.enter_context(geo.open_source(self.path, options.max_pixels, options.bands,
                                                                options.scale_range))
        compute.check_channels(self.source.channels, model.in_chans)
        self.view = open_view(self.source, level=options.level, mpp=options.mpp, scale=options.scale)
        if options.scales and not self.source.whole:
            raise InputError("--scales needs an image held in memory; this one is read tile by tile",
                             hint="compute one resolution with --level N or --mpp X")
        sinks.remove_stale(self.outdir, self.stem, keep_partial=self.resume)
        cells = None if options.scales else job.tile_cells()
        self.tiles = plan.plan_tiles(job.fcn, job.geometry, model.in_chans, self.view.size, cells)
        self.format = "npz" if options.scales else choose_scores_format(options.scores, self.source,
                                                                        self.tiles.map_size, len(model.labels))
        self.georef = getattr(self.source, "georef", None)
        self.targets = expected_outputs(self.stem, self.outdir, job.classes, model.labels, self.format,
                                        _formats_for(options.formats, self.georef, self.path))
        view = self.view
        self.info = dict(level=view.level, downsample=float(view.downsample[0]),
                         mpp=float(view.mpp[0]) if view.mpp else None, scores_format=self.format,
                         preprocessing=model.preprocessing, output=job.output, output_names=job.output_names)
        if self.resume:
            return _completed(self.path, self.outdir, self.targets, model, self.format, options.top_k)
        return None

    @property
    def splittable(self) -> bool:
        """Whether workers can share this image's tiles: a store on disk (zarr) with more than one tile."""
        return self.format == "zarr" and self.tiles.count > 1  # --scales maps are always npz

    def start(self) -> None:
        """Find the background, open the score store (going on with a partial one when resuming) and list the
        tiles still to compute; the peaks of tiles an earlier run finished are read back."""
        job, options, model = self.job, self.job.options, self.job.model
        view, tiles = self.view, self.tiles
        self.foreground = plan.resolve_foreground(options.foreground, self.source)
        if isinstance(self.source, geo.GeoSource):  # a scene's background is its nodata, whatever its colours
            self.mask = None if options.foreground == "all" else geo.nodata_mask(view, job.window)
        else:
            self.mask = plan.estimate_foreground(view, job.window, self.foreground)
        self.attrs = sinks.MapAttrs(model.labels, image_size=tuple(self.source.size), level=view.level,
                                    downsample=tuple(float(v) for v in view.downsample),
                                    mpp=tuple(view.mpp) if view.mpp else None, **_level0(view, job.geometry),
                                    extra=_attrs_extra(job, tiles, self.mask, model))
        self.attrs.extra.update(geo.map_attrs(self.source, self.attrs.to_json()))
        # A network's other outputs get arrays of their own in the score file (not for --scales maps).
        self.grids, left_out = ({}, {}) if options.scales else plan.output_grids(job.fcn, tiles)
        if self.grids or left_out:
            self.attrs.extra["output_arrays"] = {name: _other_attrs(view, grid) for name, grid in self.grids.items()}
            self.attrs.extra["outputs_left_out"] = left_out
        state = self.state = TileProgress(self.path, tiles.count)
        if options.scales:
            self.computed = [True]
            return
        self.census = compute.foreground_census(tiles, self.mask, job.bounds, whole_tiles=bool(self.grids))
        self.computed = self.census.computed
        state.background = sum(1 for c in self.computed if not c)
        if not any(self.computed):
            raise _nothing_computed(self.path, self.mask)
        if self.format == "zarr":
            run_key = {"model": job.fingerprint, "labels": list(model.labels), "level": view.level,
                       "size": list(view.size), "downsample": list(view.downsample), "cells": list(tiles.cells),
                       "geometry": job.geometry.to_dict(), "foreground": self.foreground,
                       "mean": list(model.mean), "std": list(model.std), "dtype": options.scores_dtype}
            if "reading" in self.attrs.extra:  # other bands or scaling: other values
                run_key["reading"] = self.attrs.extra["reading"]
            if self.grids:  # a resumed store must hold the same other outputs, laid out the same way
                run_key["outputs"] = {name: [g.channels, list(g.map_size), list(g.chunks)]
                                      for name, g in self.grids.items()}
            self.sink = sinks.ZarrSink(self.targets["scores"], tiles, self.attrs, run_key, options.scores_dtype,
                                       self.resume, grids=self.grids)
            self.scores = self.sink.array
        else:
            self.sink = sinks.ArraySink(len(model.labels), tiles.map_size, self.grids)
            self.scores = self.sink.scores
        finished = getattr(self.sink, "done", set())
        self.todo = [t for t, c in zip(tiles.tiles(), self.computed, strict=True)
                     if c and tiles.index(t) not in finished]
        state.resumed = sum(self.computed) - len(self.todo)
        state.todo = len(self.todo)
        # Peaks are tracked as tiles are written; only tiles an earlier run finished are read back for them.
        state.peaks = compute.PeakTracker(len(model.labels))
        for index in sorted(finished):
            tile = tiles.tile(index)
            block = np.asarray(self.scores[:, tile.rows.first:tile.rows.last, tile.cols.first:tile.cols.last],
                               np.float32)
            state.peaks.update(block, tile.rows.first, tile.cols.first)

    # -------------------------------------------------------------------------------------------- tiles

    def compute_here(self) -> None:
        """Compute the tiles still to do in this process."""
        job, state = self.job, self.state
        if job.options.scales:
            self.scores, self.attrs.extra = _multiscale(self.view, job, self.tiles, self.mask, self.attrs)
            state.total = state.computed = 1
            state.runtime = job.network.runtime
            return
        network = job.runner(self._todo_pixels())
        state.runtime = network.runtime
        if self.progress is not None:
            self.progress(state)

        def write(tile, block) -> None:
            self.sink.write(tile, block)
            state.peaks.update(block, tile.rows.first, tile.cols.first)

        def done(tile) -> None:
            self._record(tile)

        batch = job.tiles_per_batch(self.tiles.tile(0).input_shape) if self.todo else 1
        state.pixels += compute.compute_tiles(self.view, self.tiles, network, job.bounds, self.todo, self.mask, write,
                                              batch, labels=len(job.model.labels), done=done, grids=self.grids,
                                              write_others=self.sink.write_others)

    def _todo_pixels(self) -> int:
        return sum(t.input_shape[0] * t.input_shape[1] for t in self.todo)

    def _record(self, tile) -> None:
        if isinstance(self.sink, sinks.ZarrSink):
            self.sink.mark_done(tile)
        self.state.computed += 1
        if self.progress is not None:
            self.progress(self.state)

    def shard(self) -> TileShard:
        """What workers need to compute this image's tiles into its store (``compute_shard``)."""
        if not isinstance(self.sink, sinks.ZarrSink):
            raise InternalError(f"{self.path}: only an image with a zarr store can be shared out tile by tile",
                                hint="please report this")
        return TileShard(self.path, self.tiles, self.mask, self.sink.folder, self._todo_pixels(), self.grids)

    def tile_finished(self, index: int, peaks: compute.PeakTracker, runtime: str | None = None) -> None:
        """A worker wrote tile ``index`` into the store: record it (the resume log) and merge its peaks."""
        self.state.peaks.merge(peaks)
        self.state.runtime = runtime or self.state.runtime
        self._record(self.tiles.tile(index))

    # -------------------------------------------------------------------------------------------- finish

    def finish(self) -> SummaryRow:
        """Write the previews, viewer files and the finished store from the map, all renamed into place."""
        job, options, model = self.job, self.job.options, self.job.model
        view, tiles, state, scores = self.view, self.tiles, self.state, self.scores
        outdir, targets, mask = self.outdir, self.targets, self.mask
        peaks = state.peaks if state.peaks is not None else _peaks(scores, tiles)
        if not np.isfinite(peaks.values).any():  # never report peaks, nor write maps, that hold no computed cell
            raise _nothing_computed(self.path, mask)
        draw = list(job.classes) or peaks.top(1) or [0]
        top = peaks.top(max(1, int(options.top_k))) or [0]
        view_geometry = _ViewGeometry(*(tuple(getattr(job.geometry, n)) for n in ("stride", "offset", "window")))
        centres = {k: _centre(peaks, k, view_geometry, view.downsample, view.size)
                   for k in range(len(model.labels))}
        summary_top = tuple(ClassPeak(k, model.labels[k], float(peaks.values[k]) if np.isfinite(peaks.values[k])
                                      else float("nan"), *centres[k]) for k in top)
        staged = sinks.Staged(options.overwrite)
        try:
            ranges = _ranges(options, peaks, {*draw, *top})
            if "png" in options.formats:
                _write_previews(staged, view, scores, view_geometry, targets, draw, top, peaks, ranges, centres,
                                job)
            _write_viewers(staged, scores, self.attrs, targets, draw, ranges, tuple(self.source.size), options,
                           self.georef)
            if mask is not None:
                target = outdir / Path(self.stem).with_name(Path(self.stem).name + ".mask.png")
                tmp = staged.path(target)
                Image.fromarray(mask.mask.astype(np.uint8) * 255).save(tmp, format="PNG")
            mask_name = [] if mask is None else [str(target)]
            outputs = [str(t) for key, t in targets.items() if key != "scores"] + mask_name + [str(targets["scores"])]
            padded = tiles.canvas != tuple(view.size)
            summary = {"tiles": {"total": tiles.count, "computed": int(sum(self.computed))},
                       "peaks": [asdict(p) for p in summary_top],
                       # What a --resume row reports without redoing the image (see _completed).
                       "row": {"padded": padded, "outputs": [os.path.relpath(o, outdir) for o in outputs],
                               **self.info, **self._masking()}}
            if self.format == "zarr":
                staged.folder(self.sink.finish(sinks.status_grid(tiles, self.computed), summary,
                                               options.scores_levels), targets["scores"])
            else:
                tmp = staged.path(targets["scores"])
                sinks.write_npz(tmp, scores, self.attrs, summary, others=getattr(self.sink, "others", None))
            written = staged.commit()
        except OSError as exc:
            raise OutputError(f"cannot write the outputs of {self.stem}: {exc.strerror or exc}",
                              hint="check the output folder's permissions and free space") from exc
        finally:
            staged.discard()
        return SummaryRow(path=self.path, status="ok", image_size=tuple(self.source.size), map_size=tiles.map_size,
                          padded=padded, top=summary_top, outputs=tuple(map(str, written)), tiles=tiles.count,
                          tiles_computed=state.computed, tiles_background=state.background,
                          tiles_resumed=state.resumed, background_fraction=state.background / max(1, tiles.count),
                          **self._masking(), megapixels=view.size[0] * view.size[1] / 1e6, runtime=state.runtime, **self.info)

    def _masking(self) -> dict:
        """The mask's columns of the row: the mode, the cells it left NaN and the input pixels it saved."""
        census = getattr(self, "census", None)
        if census is None:  # --scales: one pass over the whole image, masked afterwards
            masked = 0 if self.mask is None else int(np.isnan(np.asarray(self.scores[0])).sum())
            cells = self.tiles.map_size[0] * self.tiles.map_size[1]
            return dict(foreground=self.foreground, cells_masked=masked, masked_fraction=masked / max(1, cells),
                        pixels_saved=0.0)
        cells = self.tiles.map_size[0] * self.tiles.map_size[1]
        return dict(foreground=self.foreground, cells_masked=census.masked_cells,
                    masked_fraction=census.masked_cells / max(1, cells), pixels_saved=census.saved_fraction)

    def failed(self, error: str, started: float) -> SummaryRow:
        """The error row; a damaged input fails the same way again, so no partial store is left behind (a
        killed run keeps its store: it never gets here)."""
        _logger.info("%s: %s", self.path, error)
        self.close()
        sinks.remove_stale(self.outdir, self.stem, keep_partial=False)
        return SummaryRow(path=self.path, status="error", error=error, seconds=time.perf_counter() - started)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
        self._files.close()


def compute_shard(shard: TileShard, indices: Sequence[int], job: ImageJob, view) -> tuple[list, str]:
    """Compute tiles ``indices`` of ``shard`` (a worker's part of an image) into its store.

    Args:
        view: the image at the resolution the job computes at (``open_view`` with the job's options).

    Returns:
        ``[(index, PeakTracker of the tile)]`` in the order the tiles were written, and the runtime used.
    """
    store = sinks.TileWriter(shard.store, shard.grids)
    network = job.runner(shard.pixels)
    labels = len(job.model.labels)
    finished: list[tuple[int, compute.PeakTracker]] = []

    def write(tile, block) -> None:
        store.write(tile, block)
        peaks = compute.PeakTracker(labels)
        peaks.update(block, tile.rows.first, tile.cols.first)
        finished.append((shard.plan.index(tile), peaks))

    tiles = [shard.plan.tile(i) for i in indices]
    batch = job.tiles_per_batch(tiles[0].input_shape) if tiles else 1
    compute.compute_tiles(view, shard.plan, network, job.bounds, tiles, shard.mask, write, batch, labels=labels,
                          grids=shard.grids, write_others=store.write_others)
    return finished, network.runtime


def _formats_for(formats: Sequence[str], georef, path: str) -> tuple[str, ...]:
    """The formats one image gets: a georeferenced scene always gets its score GeoTIFF; ``geotiff`` for an
    image without a CRS is an error."""
    if georef is not None:
        return tuple(dict.fromkeys([*formats, "geotiff"]))
    if "geotiff" in formats:
        raise InputError(f"{path} has no CRS: its score map cannot be placed on a map (--formats geotiff)",
                         hint="give a GeoTIFF with a CRS (gdalinfo shows it), or leave geotiff out of --formats")
    return tuple(formats)


def _make_stem_folder(outdir: Path, stem: str) -> None:
    """Create the sub-folder of a stem such as ``a/photo`` (inputs sharing a file name keep their folders)."""
    folder = (outdir / stem).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror or exc}",
                          hint="remove the file in the way or choose another -o folder") from exc


def _attrs_extra(job: ImageJob, tiles, mask, model: ModelInfo) -> dict:
    g = job.geometry
    return {"receptive_field": list(g.receptive_field), "exact": bool(g.exact), "map_size": list(tiles.map_size),
            "preprocessing": model.preprocessing, "model": model.source,
            "output": job.output, "output_names": list(job.output_names),
            "foreground": None if mask is None else {"kind": mask.kind, "background": list(mask.background),
                                                     "fraction": round(mask.fraction, 6)}}


def _other_attrs(view, grid) -> dict:
    """The attributes of another output's array: its name, channels and geometry in level-0 pixels."""
    return {"output": grid.name, "array": sinks.other_array(grid.name), "values": "raw",
            "labels": [str(k) for k in range(grid.channels)], "map_size": list(grid.map_size),
            **{key: list(value) for key, value in _level0(view, grid.geometry).items()}}


def _multiscale(view, job: ImageJob, tiles, mask, attrs):
    """One map per scale (each computed in one pass), combined on the grid of scale 1 (``multiscale``)."""
    options = job.options
    image = view.read(0, 0, *view.size)
    tensor = compute.to_model_input(image, job.model.in_chans, job.network.mean, job.network.std, tiles.canvas)
    prepared = PreparedImage(tensor, tuple(view.source.size), float(options.scale), tuple(view.size),
                             tiles.canvas != tuple(view.size))
    network = job.network
    smap = multiscale_map(lambda x: network.run(x[None])[0], prepared, job.geometry, job.model.labels,
                          options.scales, options.combine)
    scores = smap.scores.numpy().astype(np.float32)
    if mask is not None:
        keep = mask.cells((0, scores.shape[1]), (0, scores.shape[2]), job.bounds)
        scores = np.where(keep[None], scores, np.float32(np.nan))
    return scores, {**attrs.extra, **smap.extra}


def _peaks(scores, tiles) -> compute.PeakTracker:
    """Each class's peak over the whole map, read band by band (the store is never loaded whole)."""
    tracker = compute.PeakTracker(int(scores.shape[0]))
    band = max(1, (64 * 2**20) // max(1, int(scores.shape[0]) * int(scores.shape[2]) * 4))
    for first in range(0, int(scores.shape[1]), band):
        block = np.asarray(scores[:, first:first + band, :], dtype=np.float32)
        tracker.update(block, first, 0)
    return tracker


def _centre(peaks, k: int, geometry, downsample, size) -> tuple[float, float]:
    """Class ``k``'s peak in level-0 pixels: the centre of its window's part inside the image (the window's
    centre, except where an image smaller than the window was padded)."""
    centre = []
    for axis, q in enumerate(int(v) for v in peaks.cells[k]):
        start = geometry.offset[axis] + q * geometry.stride[axis]
        low, high = max(0.0, start), min(float(size[axis]), start + geometry.window[axis])
        centre.append((low + high) / 2 * downsample[axis] if high > low else (start + geometry.window[axis] / 2)
                      * downsample[axis])
    return centre[0], centre[1]


def _nothing_computed(path: str, mask) -> InputError:
    """The error of an image whose map would hold no computed cell (everything masked as background)."""
    found = "" if mask is None else f" (a flat {mask.kind} background, {mask.fraction:.1%} of the thumbnail " \
                                    "foreground)"
    return InputError(f"{path}: no cell was computed: the whole image was taken for background{found}",
                      hint="if there is tissue, pass --foreground all (or a finer --mpp/--level)")


def _ranges(options: HeatmapOptions, peaks, classes) -> dict:
    """What the colormap's ends stand for per class; --normalize: each class's own computed min and max,
    tracked tile by tile as the map was written."""
    return {k: colour_range(options.vmin, options.vmax, options.normalize, float(peaks.minima[k]),
                            float(peaks.values[k])) for k in classes}


def _write_viewers(staged, scores, attrs: sinks.MapAttrs, targets, draw, ranges, size0, options,
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


def _write_previews(staged, view, scores, geometry, targets, draw, top, peaks, ranges, centres,
                    job: ImageJob) -> None:
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
    dy, dx = view.downsample
    level0 = _ViewGeometry(*((v[0] * dy, v[1] * dx) for v in (geometry.stride, geometry.offset, geometry.window)))
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


def _completed(path, outdir: Path, targets: dict[str, Path], model: ModelInfo, fmt: str,
               top_k: int) -> SummaryRow | None:
    """The row of an image whose outputs are all in place and belong to this model, else None (redo it)."""
    if not all(t.exists() for t in targets.values()):
        return None
    scores = targets["scores"]
    try:
        if fmt == "zarr":
            attrs = sinks.read_store_attrs(scores)
            if attrs is None:
                return None
            labels, peaks, row = tuple(attrs["labels"]), attrs.get("peaks", []), attrs.get("row")
            image_size, map_size = tuple(attrs["image_size"]), tuple(attrs["map_size"])
        else:
            with np.load(scores, allow_pickle=False) as data:
                labels = tuple(str(v) for v in data["labels"])
                image_size = tuple(int(v) for v in data["image_size"])
                map_size = tuple(int(v) for v in data["scores"].shape[1:])
                summary = json.loads(str(data["summary"])) if "summary" in data.files else {}
                peaks, row = summary.get("peaks", []), summary.get("row")
    except Exception as exc:  # a damaged or foreign file: redo the image
        _logger.info("%s: redoing, %s does not load (%s)", path, scores, exc)
        return None
    if labels != tuple(model.labels):
        _logger.info("%s: redoing, %s is from another model", path, scores)
        return None
    if not isinstance(row, dict) or not isinstance(row.get("outputs"), list):
        _logger.info("%s: redoing, %s has no record of its outputs", path, scores)
        return None
    outputs = tuple(str(outdir / name) for name in row["outputs"])
    if not all(Path(o).exists() for o in outputs):
        return None
    top = tuple(ClassPeak(**p) for p in (peaks or [])[:top_k])
    facts = {key: row.get(key) for key in ("padded", "level", "downsample", "mpp", "preprocessing", "output",
                                           "foreground", "masked_fraction", "pixels_saved")}
    facts["cells_masked"] = int(row.get("cells_masked") or 0)
    facts["preprocessing"] = facts["preprocessing"] or {}
    facts["output_names"] = tuple(row.get("output_names") or ())
    return SummaryRow(path=str(path), status="ok", image_size=image_size, map_size=map_size, top=top,
                      outputs=outputs, skipped=True, scores_format=fmt, **facts)
