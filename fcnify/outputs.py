"""The per-image heatmap job: read → prepare → dense scores → the image's output files.

For an input ``<stem>.<ext>`` it writes, in the output folder:

* ``<stem>.heatmap.png`` (one chosen class) or ``<stem>.heatmap.<class>.png`` (several): the class's
  probability map, upsampled to exactly the input's size (each cell centred on its window centre), coloured
  with a matplotlib colormap and blended over the image;
* ``<stem>.classes.png``: a panel per top-k class and an argmax label map (``render.classes_figure``);
* ``<stem>.scores.npz``: ``scores`` and ``logits`` (float32, K×h×w), ``labels`` (a unicode array),
  ``stride``, ``offset``, ``window`` (y, x in the original image's pixels: int64 when the image was not
  resized, float64 when ``scale`` ≠ 1) and ``image_size`` (int64 height, width).

Each file is written to a temp file in its folder and renamed into place only once every file of the image
has been written; if anything fails, none of the image's files is left behind. ``run_images`` is the loop the
CLI and other engines share: a bad image becomes an error row and the loop goes on.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fcnify.atomic import temp_beside
from fcnify.errors import FcnifyError, InputError, OutputError

__all__ = [
    "ClassPeak", "HeatmapOptions", "SummaryRow", "expected_outputs", "output_stems", "process_images",
    "resolve_classes", "run_images", "start_run", "top_peaks", "write_outputs",
]

_logger = logging.getLogger(__name__)


@dataclass
class HeatmapOptions:
    """What ``fcnify heatmap`` does with each image.

    Attributes:
        outdir: the output folder (created if missing).
        classes: class names or indices to draw (empty: the image's top class, by peak probability).
        top_k: classes shown in ``<stem>.classes.png``.
        cmap: a matplotlib colormap name.
        alpha: heatmap opacity over the image (0–1).
        scale: resize images by this factor before evaluation (1.0: no resize).
        max_pixels: refuse larger images (None: Pillow's default; 0: no limit).
        device: auto, cpu, cuda, cuda:N or mps.
        precision: fp32, fp16 (GPU only) or bf16.
        batch_size: images of the same size evaluated together.
        overwrite: replace existing outputs (otherwise an existing output is an ``OutputError``).
        dpi: resolution of ``<stem>.classes.png``.
        tile: None (one pass), a tile size (768 or "768x1024") or "auto": exact tiled inference
            (``fcnify.tiling``), memory following the tile.
        max_memory: the budget for ``tile="auto"`` ("2GB"); alone it implies ``tile="auto"``.
        output_stride: a finer output stride dividing the network's (dilation rewrite), None: native.
        scales: an image pyramid (e.g. (0.5, 1, 2)), combined on the grid of scale 1 (``fcnify.multiscale``).
        combine: "mean" or "max" of the scales' probabilities.
    """

    outdir: Path
    classes: tuple = ()
    top_k: int = 4
    cmap: str = "inferno"
    alpha: float = 0.5
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

    def validate(self) -> None:
        """Raise ``InputError`` for option values that can never work (before any image is read)."""
        from fcnify.render import colormap

        colormap(self.cmap)
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise InputError(f"--alpha {self.alpha} is not between 0 and 1", hint="e.g. --alpha 0.5")
        if int(self.top_k) < 1:
            raise InputError(f"--top-k {self.top_k} must be at least 1", hint="e.g. --top-k 4")
        if not float(self.scale) > 0:
            raise InputError(f"--scale {self.scale} is not a positive number", hint="e.g. --scale 0.5")
        if int(self.batch_size) < 1:
            raise InputError(f"--batch-size {self.batch_size} must be at least 1", hint="e.g. --batch-size 8")
        if self.max_pixels is not None and int(self.max_pixels) < 0:
            raise InputError(f"--max-pixels {self.max_pixels} is negative", hint="pass 0 for no limit")
        from fcnify.dense import check_dense_options

        check_dense_options(self.tile, self.max_memory, self.scales or None, self.combine, self.output_stride)


@dataclass(frozen=True)
class ClassPeak:
    """A class's best cell in one image: peak probability and its window centre (y, x) in image pixels."""

    index: int
    label: str
    score: float
    y: float
    x: float


@dataclass
class SummaryRow:
    """One input's outcome.

    Attributes:
        path: the input path as given.
        status: ``"ok"`` or ``"error"``.
        error: the error message (with its hint) when ``status`` is ``"error"``.
        image_size: the image's (height, width), when it was read.
        map_size: the score map's (h, w).
        padded: the image was smaller than the window and was padded.
        top: the top-k classes by peak probability.
        outputs: the files written.
        skipped: a resumed job found the outputs complete and did not redo them (``top`` is read back from
            the ``scores.npz``).
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


# ------------------------------------------------------------------------------------------- atomic files


class _Staged:
    """Files written to temp names beside their targets, renamed into place all together on ``commit``."""

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.pending: list[tuple[Path, Path]] = []

    def path(self, target: Path) -> Path:
        if target.exists() and not self.overwrite:
            raise OutputError(f"{target} already exists", hint="pass --force to overwrite it, or another -o")
        if target.is_dir():
            raise OutputError(f"{target} is a directory", hint="choose another output folder")
        tmp = temp_beside(target)
        self.pending.append((tmp, target))
        return tmp

    def commit(self) -> list[Path]:
        placed: list[Path] = []
        try:
            for tmp, target in self.pending:
                os.replace(tmp, target)
                placed.append(target)
        except OSError as exc:
            for target in placed:
                _unlink(target)
            raise OutputError(f"cannot write {target}: {exc.strerror}", hint="check the output folder") from exc
        finally:
            self.discard()
        return placed

    def discard(self) -> None:
        for tmp, _ in self.pending:
            _unlink(tmp)
        self.pending = []


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - best effort clean-up
        _logger.warning("could not remove %s: %s", path, exc)


# ------------------------------------------------------------------------------------------------ writing


def _geometry_arrays(score_map) -> dict[str, np.ndarray]:
    values = {name: getattr(score_map, name) for name in ("stride", "offset", "window")}
    exact = all(isinstance(v, (int, np.integer)) for value in values.values() for v in value)
    dtype = np.int64 if exact else np.float64
    return {name: np.asarray(value, dtype=dtype) for name, value in values.items()}


def write_outputs(score_map, image, stem: str | os.PathLike, options: HeatmapOptions,
                  classes: Sequence[int] | None = None) -> dict[str, Path]:
    """Write one image's heatmap(s), class figure and scores under ``options.outdir`` (all or nothing).

    Args:
        score_map: the image's ``ScoreMap`` (geometry in the original image's pixels).
        image: the original image (PIL, EXIF-oriented), the size of ``score_map.image_size``.
        stem: the output name without suffixes, possibly with sub-folders (``a/photo``).
        options: the heatmap options (``classes`` is used when ``classes`` is None).
        classes: class indices to draw (None: resolve ``options.classes``; empty: the top class).

    Returns:
        {"heatmap" or "heatmap:<label>": path, …, "classes": path, "scores": path}.

    Raises:
        OutputError: an existing file (without overwrite) or a folder that cannot be written.
        InputError: a bad colormap, alpha or class.
    """
    from PIL import Image

    from fcnify.images import display_rgb
    from fcnify.render import classes_figure, overlay, upsample_to_image

    if classes is None:
        classes = resolve_classes(options.classes, score_map.labels)
    chosen = list(classes) or score_map.top_classes(1)
    targets = expected_outputs(stem, options.outdir, chosen, score_map.labels)
    base = Path(options.outdir) / Path(stem)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {base.parent}: {exc.strerror}", hint="choose a writable folder") from exc
    rgb = display_rgb(image) if hasattr(image, "mode") else np.asarray(image)
    if tuple(rgb.shape[:2]) != tuple(score_map.image_size):
        raise InputError(f"the image is {rgb.shape[0]}x{rgb.shape[1]} but its scores are for "
                         f"{score_map.image_size[0]}x{score_map.image_size[1]}", hint="pass the original image")
    scores = score_map.scores.numpy()
    staged = _Staged(options.overwrite)
    written: dict[str, Path] = {}
    try:
        for k, (key, target) in zip(chosen, list(targets.items())[:len(chosen)], strict=True):
            heat = upsample_to_image(scores[k], score_map, score_map.image_size)
            blended = overlay(rgb, heat, options.cmap, options.alpha)
            tmp = staged.path(target)
            with open(tmp, "wb") as f:
                Image.fromarray(blended, mode="RGB").save(f, format="PNG")
            written[key] = target

        target = targets["classes"]
        tmp = staged.path(target)
        figure = classes_figure(score_map, rgb, options.top_k, options.cmap, dpi=options.dpi)
        with open(tmp, "wb") as f:
            figure.savefig(f, format="png", dpi=options.dpi)
        written["classes"] = target

        target = targets["scores"]
        tmp = staged.path(target)
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, scores=scores.astype(np.float32), logits=score_map.logits.numpy().astype(np.float32),
                labels=np.asarray([str(v) for v in score_map.labels], dtype=np.str_),
                image_size=np.asarray(score_map.image_size, dtype=np.int64), **_geometry_arrays(score_map),
                **{key: np.asarray(value) for key, value in score_map.extra.items()},  # e.g. per-scale maps
            )
        written["scores"] = target
        staged.commit()
    except OSError as exc:
        raise OutputError(f"cannot write the outputs of {base.name}: {exc.strerror or exc}",
                          hint="check the output folder's permissions and free space") from exc
    finally:
        staged.discard()
    return written


def expected_outputs(stem: str | os.PathLike, outdir: str | os.PathLike, classes: Sequence[int],
                     labels: Sequence[str]) -> dict[str, Path]:
    """The files ``write_outputs`` writes for ``stem`` when drawing ``classes`` (none: the top class, whose
    heatmap is ``<stem>.heatmap.png`` whichever class it is), keyed as in its result, heatmaps first."""
    base = Path(outdir) / Path(stem)
    chosen = list(classes) or [None]
    targets: dict[str, Path] = {}
    used_names: set[str] = set()
    for k in chosen:
        if len(chosen) == 1:
            targets["heatmap"] = base.with_name(base.name + ".heatmap.png")
            continue
        label = str(labels[k])
        name = _safe_name(label)
        if name in used_names:
            name = f"{name}_{k}"
        used_names.add(name)
        targets[f"heatmap:{label}"] = base.with_name(f"{base.name}.heatmap.{name}.png")
    targets["classes"] = base.with_name(base.name + ".classes.png")
    targets["scores"] = base.with_name(base.name + ".scores.npz")
    return targets


# -------------------------------------------------------------------------------------------------- loop


def output_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Output names (without suffixes) for input paths: the file's stem, or, when several inputs share a
    stem, the stem under its folder relative to the inputs' common parent (``a/photo``, ``b/photo``)."""
    # A URI's stem and folders come from its bucket and key ("s3://b/a/x.png" -> /b/a/x.png), not the cwd.
    resolved = [Path("/" + str(p).split("://", 1)[1]) if "://" in str(p) else Path(os.path.abspath(p))
                for p in paths]
    stems = [p.stem for p in resolved]
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


def _error_row(path, exc: FcnifyError, **extra) -> SummaryRow:
    return SummaryRow(path=str(path), status="error", error=str(exc), **extra)


def run_images(paths: Sequence[str | os.PathLike], fcn, geometry, loaded_meta, options: HeatmapOptions,
               progress: Callable[[str], None] | None = None, stems: Sequence[str] | None = None,
               read: Callable | None = None) -> list[SummaryRow]:
    """Heatmaps for every path, one summary row each, in input order.

    Each image is read, prepared, evaluated (batched with others of the same size) and written; a bad
    image (unreadable, too large, failing to write) becomes an error row with the error's message and the
    loop goes on.

    Args:
        paths: image files (a path given twice is written twice, as `<stem>` and `<stem>-2`).
        fcn: the fully-convolutional network (moved to the device in place).
        geometry: its ``Geometry``.
        loaded_meta: anything with ``in_chans``, ``mean``, ``std`` and ``labels`` (a ``LoadedModel``).
        options: the ``HeatmapOptions``.
        progress: called with each path once it is done (ok or not).
        stems: the output names (default: ``output_stems(paths)``); an engine that splits a job passes the
            names computed over all of its inputs.
        read: ``read(path, max_pixels) -> PIL image`` (default: ``images.read_image``).

    Raises:
        InputError: bad options, an unavailable device or precision, an unknown class: nothing would work.
        OutputError: an output folder that cannot be created or written.
    """
    classes, device = start_run(fcn, loaded_meta, options)
    stems = list(stems) if stems is not None else output_stems(paths)
    rows: list[SummaryRow] = []
    for start in range(0, len(paths), options.batch_size):
        chunk = slice(start, start + options.batch_size)
        rows += process_images(paths[chunk], stems[chunk], fcn, geometry, loaded_meta, options, classes, device,
                               read=read, progress=progress)
    return rows


def start_run(fcn, loaded_meta, options: HeatmapOptions) -> tuple[list[int], object]:
    """What every engine does once before its first image: check the options, resolve the classes, pick
    and check the device, check the output folder and put the network on the device.

    Returns:
        (class indices to draw, the ``torch.device``).
    """
    from fcnify.dense import check_precision, place_model, select_device

    options.validate()
    classes = resolve_classes(options.classes, tuple(str(v) for v in loaded_meta.labels))
    device = select_device(options.device)
    check_precision(options.precision, device)
    _check_outdir(Path(options.outdir))
    place_model(fcn, device)
    return classes, device


def process_images(paths: Sequence[str | os.PathLike], stems: Sequence[str], fcn, geometry, loaded_meta,
                   options: HeatmapOptions, classes: Sequence[int], device, read: Callable | None = None,
                   progress: Callable[[str], None] | None = None) -> list[SummaryRow]:
    """The work on one batch of images, shared by every engine: read, prepare, evaluate (images of the same
    size together), write each image's outputs under its stem; one summary row per path, in order.

    Call ``start_run`` once first (it gives ``classes`` and ``device``). A bad image becomes an error row.
    """
    from fcnify.dense import dense_kwargs, score_maps, with_output_stride
    from fcnify.images import prepare, read_image

    fcn, geometry = with_output_stride(fcn, geometry, options.output_stride)  # cached on fcn after the first

    read = read or read_image
    labels = tuple(str(v) for v in loaded_meta.labels)
    window = tuple(int(v) for v in geometry.window)
    rows: list[SummaryRow | None] = [None] * len(paths)
    top_k = max(1, int(options.top_k))

    def finish(i: int, row: SummaryRow) -> None:
        rows[i] = row
        if progress is not None:
            progress(str(paths[i]))

    loaded: dict[int, tuple] = {}
    for i in range(len(paths)):
        try:
            image = read(paths[i], options.max_pixels)
            prepared = prepare(image, loaded_meta.in_chans, loaded_meta.mean, loaded_meta.std,
                               scale=options.scale, min_size=window)
            loaded[i] = (image, prepared)
        except FcnifyError as exc:
            _logger.info("%s: %s", paths[i], exc)
            finish(i, _error_row(paths[i], exc))
    order = list(loaded)
    maps: dict[int, object] = {}
    try:
        results = score_maps(fcn, [loaded[i][1] for i in order], geometry, labels, device,
                             options.precision, options.batch_size, **dense_kwargs(options))
        maps = dict(zip(order, results, strict=True))
    except FcnifyError:  # find out which image failed: run them one by one
        for i in order:
            try:
                maps[i] = score_maps(fcn, [loaded[i][1]], geometry, labels, device, options.precision, 1,
                                     **dense_kwargs(options))[0]
            except FcnifyError as exc:
                finish(i, _error_row(paths[i], exc, image_size=loaded[i][1].original_size))
    for i in order:
        if i not in maps:
            continue
        image, prepared = loaded[i]
        smap = maps[i]
        try:
            files = write_outputs(smap, image, stems[i], options, classes)
        except FcnifyError as exc:
            _logger.info("%s: %s", paths[i], exc)
            finish(i, _error_row(paths[i], exc, image_size=prepared.original_size, map_size=smap.map_size,
                                 padded=prepared.padded))
            continue
        finish(i, SummaryRow(path=str(paths[i]), status="ok", image_size=prepared.original_size,
                             map_size=smap.map_size, padded=prepared.padded, top=top_peaks(smap, top_k),
                             outputs=tuple(str(p) for p in files.values())))
    return rows  # type: ignore[return-value]


def top_peaks(score_map, top_k: int) -> tuple[ClassPeak, ...]:
    """The ``top_k`` classes of a ``ScoreMap`` by peak probability, with where they peak (image pixels)."""
    top = []
    for k in score_map.top_classes(max(1, int(top_k))):
        score, (y, x) = score_map.peak(k)
        top.append(ClassPeak(k, str(score_map.labels[k]), score, y, x))
    return tuple(top)
