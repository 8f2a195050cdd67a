"""Output names: what ``--formats`` may ask for, the files each image gets, and which names are fcnify's.

One place knows the output kinds: ``FORMATS`` (what a user asks for), ``expected_outputs`` (the files of one
image), ``OUTPUT_KINDS``/``output_kind`` (recognising those files again: inputs never come from them, and a
killed run's temporaries are found by them, ``remove_stale``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from fcnify.errors import InputError, OutputError

__all__ = ["DEFAULT_FORMATS", "FORMAT_FILES", "FORMATS", "NPZ_MAX_BYTES", "OUTPUT_KINDS", "PARTIAL_SUFFIX",
           "STEM_SUFFIXES", "check_outdir", "choose_scores_format", "expected_outputs", "formats_for", "is_output_name",
           "make_stem_folder", "output_kind", "output_stems", "parse_formats", "remove_stale"]

#: What ``--formats`` may name, and what each writes (the CLI's help is made from this).
FORMAT_FILES = {
    "png": "<stem>.heatmap.png and <stem>.classes.png previews",
    "scores": "<stem>.scores.npz or .scores.zarr, always: the map the other outputs and --resume read",
    "geojson": "<stem>.geojson, QuPath annotations",
    "ome-tiff": "<stem>.heatmap.ome.tif, a pyramidal overlay",
    "geotiff": "<stem>.scores.tif, a Cloud-Optimized GeoTIFF of the map; automatic for scenes with a CRS",
}
FORMATS = tuple(FORMAT_FILES)
DEFAULT_FORMATS = ("png", "scores")
#: ``--scores auto`` keeps maps up to this many bytes (float32) in memory and writes them as ``.npz``.
NPZ_MAX_BYTES = 64 * 2**20
#: The second part of every output name, ``<stem>.<kind>…``.
OUTPUT_KINDS = ("heatmap", "classes", "scores", "mask")
#: Outputs whose temporaries are ``.<stem>.XXXXXXXX.tmp<suffix>`` (``atomic.temp_beside`` of ``<stem><suffix>``).
STEM_SUFFIXES = (".geojson",)
PARTIAL_SUFFIX = ".partial"


def output_kind(name: str) -> str | None:
    """The part of an output's file name after its stem (``.heatmap.png``, ``.scores.zarr``, ``.geojson``), or
    None for a name that is not one of fcnify's outputs: ``<stem>.<kind>[.…].<ext>`` for a kind of
    ``OUTPUT_KINDS`` (heatmaps and their OME-TIFF overlays, class panels, masks, scores) or ``<stem><suffix>``
    for ``STEM_SUFFIXES`` (GeoJSON)."""
    parts = name.split(".")
    for i, part in enumerate(parts[1:-1], 1):
        if part in OUTPUT_KINDS:
            return "." + ".".join(parts[i:])
    for suffix in STEM_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def is_output_name(name: str) -> bool:
    """Whether a file name is one of fcnify's outputs (see ``output_kind``)."""
    return output_kind(name) is not None


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"png,scores,geojson"`` (or a sequence of names) as a tuple without duplicates, order kept."""
    items = formats.split(",") if isinstance(formats, str) else [str(v) for v in formats]
    result: list[str] = []
    for item in (v.strip().lower() for v in items):
        if item and item not in result:
            result.append(item)
    return tuple(result)


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


def _safe_name(label: str) -> str:
    name = re.sub(r"[^\w.+-]+", "_", label, flags=re.UNICODE).strip("._")
    return name[:80] or "class"


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


def formats_for(formats: Sequence[str], georef, path: str) -> tuple[str, ...]:
    """The formats one image gets: a georeferenced scene always gets its score GeoTIFF; ``geotiff`` for an
    image without a CRS is an error."""
    if georef is not None:
        return tuple(dict.fromkeys([*formats, "geotiff"]))
    if "geotiff" in formats:
        raise InputError(f"{path} has no CRS: its score map cannot be placed on a map (--formats geotiff)",
                         hint="give a GeoTIFF with a CRS (gdalinfo shows it), or leave geotiff out of --formats")
    return tuple(formats)


def check_outdir(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {outdir}: {exc.strerror}",
                          hint="choose a writable -o folder") from exc
    if not outdir.is_dir():
        raise OutputError(f"{outdir} is not a folder", hint="give a folder for -o")
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {outdir} is not writable", hint="choose a writable -o folder")


def make_stem_folder(outdir: Path, stem: str) -> None:
    """Create the sub-folder of a stem such as ``a/photo`` (inputs sharing a file name keep their folders)."""
    folder = (outdir / stem).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror or exc}",
                          hint="remove the file in the way or choose another -o folder") from exc


def choose_scores_format(requested: str, source, map_size: tuple[int, int], classes: int) -> str:
    """``npz`` or ``zarr``: ``auto`` writes zarr for tiled sources (TIFF, slides: never decoded whole) and for
    maps over 64 MiB as float32; ordinary images with smaller maps keep ``.scores.npz``."""
    if requested != "auto":
        return requested
    if not source.whole or classes * map_size[0] * map_size[1] * 4 > NPZ_MAX_BYTES:
        return "zarr"
    return "npz"


def remove_stale(outdir: Path, stem: str, keep_partial: bool) -> None:
    """Delete temporaries a killed run left for ``stem`` (``.<stem>.*.tmp*`` files, old store folders) and,
    unless resuming, its partial store."""
    base = (outdir / stem)
    folder = base.parent
    if not folder.is_dir():
        return
    # Only this stem's own outputs: "a" must not touch the temporaries of an image named "a.b".
    prefixes = tuple(f".{base.name}.{kind}" for kind in OUTPUT_KINDS)
    beside = re.compile(rf"\.{re.escape(base.name)}\.[a-z0-9_]{{8}}\.tmp({'|'.join(map(re.escape, STEM_SUFFIXES))})$")
    for entry in folder.iterdir():
        if beside.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            continue
        if not entry.name.startswith(prefixes):
            continue
        if entry.name.endswith(PARTIAL_SUFFIX):
            if not keep_partial:
                shutil.rmtree(entry, ignore_errors=True)
        elif ".tmp" in entry.name and entry.is_file():
            entry.unlink(missing_ok=True)
        elif ".old-" in entry.name and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
