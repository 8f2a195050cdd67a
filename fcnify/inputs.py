"""Turning what the user names (files, folders, glob patterns, manifests) into a list of image paths."""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fcnify.errors import InputError
from fcnify.heatmap.sinks import is_output_name
from fcnify.heatmap.summary import SUMMARY_NAME
from fcnify.images import IMAGE_EXTENSIONS

__all__ = ["READABLE_EXTENSIONS", "SLIDE_EXTENSIONS", "expand_inputs", "ExpandedInputs", "read_manifest"]

_logger = logging.getLogger(__name__)

#: Whole-slide and tiled formats read through tifffile or openslide (``heatmap.sources``).
SLIDE_EXTENSIONS = frozenset({".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf", ".tf8", ".mrxs", ".vms", ".vmu",
                              ".svslide"})
READABLE_EXTENSIONS = IMAGE_EXTENSIONS | SLIDE_EXTENSIONS


@dataclass
class ExpandedInputs:
    """The inputs found, and how many files were left out as fcnify's own outputs."""

    paths: list[str]
    skipped: int = 0


def _output_folders(folder: Path, outdir: Path | None) -> set[Path]:
    """Folders below ``folder`` that hold fcnify's outputs: the job's ``-o`` folder, and any folder with a
    ``summary.parquet`` (an earlier job's). ``folder`` itself is not one: its own images stay inputs."""
    found = {p.parent.resolve() for p in folder.rglob(SUMMARY_NAME)}
    if outdir is not None:
        found.add(outdir.resolve())
    return {f for f in found if f != folder.resolve()}


def _is_output(path: Path, output_folders: set[Path]) -> bool:
    if is_output_name(path.name):
        return True
    return bool(output_folders) and any(parent in output_folders for parent in path.resolve().parents)


def expand_inputs(items: list[str], outdir: str | os.PathLike | None = None) -> ExpandedInputs:
    """Files as given (missing ones too: they become error rows), folders recursively, globs expanded.

    Order is kept and duplicates are dropped. A folder or pattern that matches no image is an error.
    fcnify's own outputs are never inputs (``x.heatmap.png`` would become ``x.heatmap.heatmap.png`` on the
    next run): files named as outputs (``sinks.is_output_name``), and in a folder, everything under the
    ``outdir`` of this job or under a folder holding an earlier job's ``summary.parquet``.
    """
    paths: list[str] = []
    skipped = 0
    out = Path(outdir) if outdir is not None else None
    for item in items:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in READABLE_EXTENSIONS)
            folders = _output_folders(path, out)
            found = [str(p) for p in images if not _is_output(p, folders)]
            skipped += len(images) - len(found)
            if not found:
                if images:
                    raise InputError(f"the folder {item} holds only fcnify's own outputs ({len(images)} files)",
                                     hint="name the folder of the original images")
                raise InputError(f"the folder {item} holds no image files",
                                 hint=f"fcnify reads {', '.join(sorted(READABLE_EXTENSIONS)[:8])}, …")
            paths.extend(found)
        elif not path.exists() and glob.has_magic(item):
            matched = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matched:
                raise InputError(f"the pattern {item} matches no file", hint="check the pattern, or quote it")
            found = [p for p in matched if not is_output_name(Path(p).name)]
            skipped += len(matched) - len(found)
            paths.extend(found)
        elif is_output_name(path.name) and path.is_file():
            skipped += 1
        else:
            paths.append(item)
    if skipped:
        _logger.info("left out %d of fcnify's own output files", skipped)
    return ExpandedInputs(list(dict.fromkeys(paths)), skipped)


def read_manifest(path: str | os.PathLike) -> list[str]:
    """Paths from a manifest: ``.txt`` (one a line), ``.csv`` or ``.parquet`` (a ``path`` column).

    Relative paths are taken relative to the manifest's folder.
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise InputError(f"no such manifest: {manifest}", hint="give a .txt, .csv or .parquet file")
    suffix = manifest.suffix.lower()
    if suffix == ".txt":
        entries = [line.strip() for line in manifest.read_text().splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    elif suffix in (".csv", ".parquet"):
        import pyarrow.csv  # lazy: heavy, and only these manifests need it
        import pyarrow.parquet

        try:
            table = pyarrow.csv.read_csv(manifest) if suffix == ".csv" else pyarrow.parquet.read_table(manifest)
        except Exception as exc:
            raise InputError(f"cannot read the manifest {manifest}: {exc}", hint="check its format") from exc
        if "path" not in table.column_names:
            raise InputError(f"the manifest {manifest} has no 'path' column",
                             hint=f"its columns are {', '.join(table.column_names)}; name the column 'path'")
        entries = [str(v) for v in table.column("path").to_pylist() if v]
    else:
        raise InputError(f"unknown manifest type {manifest.suffix!r}", hint="use .txt, .csv or .parquet")
    base = manifest.parent
    return [e if "://" in e or os.path.isabs(e) else str(base / e) for e in entries]
