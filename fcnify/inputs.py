"""Turning what the user names (files, folders, glob patterns, manifests) into a list of image paths."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from fcnify.errors import InputError
from fcnify.images import IMAGE_EXTENSIONS

#: Whole-slide and tiled formats read through tifffile or openslide (``heatmap.sources``).
SLIDE_EXTENSIONS = frozenset({".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf", ".tf8", ".mrxs", ".vms", ".vmu",
                              ".svslide"})
READABLE_EXTENSIONS = IMAGE_EXTENSIONS | SLIDE_EXTENSIONS


def expand_inputs(items: list[str]) -> list[str]:
    """Files as given (missing ones too: they become error rows), folders recursively, globs expanded.

    Order is kept and duplicates are dropped. A folder or pattern that matches no image is an error.
    """
    paths: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in READABLE_EXTENSIONS)
            if not found:
                raise InputError(f"the folder {item} holds no image files",
                                 hint=f"fcnify reads {', '.join(sorted(READABLE_EXTENSIONS)[:8])}, …")
            paths.extend(found)
        elif not path.exists() and glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise InputError(f"the pattern {item} matches no file", hint="check the pattern, or quote it")
            paths.extend(found)
        else:
            paths.append(item)
    return list(dict.fromkeys(paths))


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
