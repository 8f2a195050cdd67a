"""The local engine: every input in this process, one after another, on its own device."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from fcnify.heatmap.job import ImageJob
from fcnify.heatmap.pipeline import TileProgress, run_image
from fcnify.heatmap.summary import SummaryRow

__all__ = ["readable_path", "run_paths"]


def readable_path(path: str) -> str:
    """Where a worker reads an input: URIs as given, local paths made absolute (a Ray worker's working
    directory is not the driver's)."""
    return path if "://" in path else os.path.abspath(path)


def run_paths(paths: Sequence[str], stems: Sequence[str], job: ImageJob, resume: bool = False,
              progress: Callable[[TileProgress], None] | None = None,
              finished: Callable[[SummaryRow], None] | None = None) -> list[SummaryRow]:
    """``run_image`` for each input, in order; one row each (a bad input is an error row, the loop goes on)."""
    rows = []
    for path, stem in zip(paths, stems, strict=True):
        row = run_image(readable_path(path), stem, job, resume, progress)
        row.path = str(path)  # the input as given, whichever absolute path was read
        rows.append(row)
        if finished is not None:
            finished(row)
    return rows
