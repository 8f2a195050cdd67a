"""Heatmap jobs over many images: choose the engine, run every input, write ``summary.parquet``.

Both engines run ``pipeline.run_image`` on each input, so a job gives the same files whichever engine runs it.
What differs is only who calls it: ``local`` (this process, ``local.run_paths``) or ``ray`` (a pool of Ray
Data actors, ``ray_engine.run_ray``). With ``resume``, an image whose outputs are complete is not redone (its
row has ``skipped`` set), and a slide whose store is partial goes on from its finished tiles.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fcnify.errors import InputError
from fcnify.heatmap.compute import check_channels
from fcnify.heatmap.job import ImageJob, ModelInfo
from fcnify.heatmap.local import run_paths
from fcnify.heatmap.options import HeatmapOptions, validate_options
from fcnify.heatmap.outputs import output_stems
from fcnify.heatmap.pipeline import TileProgress
from fcnify.heatmap.ray_engine import RayOptions, run_ray
from fcnify.heatmap.summary import JobResult, SummaryRow, rows_to_table, write_summary

__all__ = ["ENGINES", "run_job"]

ENGINES = ("local", "ray")


def _missing_folders(outdir: Path) -> list[Path]:
    """The folders of ``outdir`` (itself first, then its parents) that do not exist yet."""
    missing = []
    for folder in (outdir, *outdir.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _remove_if_empty(folders: Sequence[Path]) -> None:
    """Remove the folders this job created, innermost first, where they are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else wrote there), or already gone
            return


def run_job(paths: Sequence[str], fcn, geometry, loaded, options: HeatmapOptions, engine: str = "local",
            ray_options: RayOptions | None = None, resume: bool = False,
            progress: Callable[[TileProgress], None] | None = None,
            finished: Callable[[SummaryRow], None] | None = None, model_file: str | os.PathLike | None = None,
            trust_model: bool = False, metadata=None) -> JobResult:
    """Heatmaps for every input with the chosen engine, and ``OUTDIR/summary.parquet``.

    With the local engine, a job in which no input ran (every one missing or unreadable) writes no summary
    and removes the output folder it created.

    Args:
        paths: inputs (local paths or URIs pyarrow reads).
        fcn, geometry: the converted network and its geometry.
        loaded: the ``LoadedModel`` (for ``in_chans``, ``mean``, ``std``, ``labels``, ``source``).
        options: the heatmap options.
        engine: ``local`` or ``ray``.
        ray_options: the Ray engine's options.
        resume: skip inputs whose outputs are complete; go on with partial slide stores.
        progress: called after each tile of each image (local engine; Ray shows its own progress bars).
        finished: called with each input's row once it is done (local engine).
        model_file: the ``.pt2``/``.onnx`` the network came from, shipped to Ray workers as it is.
        trust_model: the workers may load a ``.pt2`` holding pickles or compiled code (as on the driver).
        metadata: the network's ``ModelMetadata`` (lets ``--runtime`` export it to ONNX in memory).

    Raises:
        InputError: bad options, an unknown engine; FcnifyError: Ray missing or failing as a whole.
    """
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}", hint="use --engine local or --engine ray")
    options = validate_options(options)
    paths = [str(p) for p in paths]
    stems = output_stems(paths)  # once, over all inputs: every engine and worker uses the same names
    model = ModelInfo.of(loaded)
    if options.bands is not None:  # once, before any image: every scene would fail the same way
        check_channels(len(options.bands), model.in_chans)
    if engine == "local":
        created = _missing_folders(Path(options.outdir))
        job = ImageJob(fcn, geometry, model, options, metadata)
        start = time.perf_counter()
        rows = run_paths(paths, stems, job, resume, progress, finished)
        seconds = time.perf_counter() - start
        summary = None
        if any(row.status == "ok" for row in rows):
            summary = write_summary(rows_to_table(rows, range(len(rows)), stems, options.outdir), options.outdir)
        else:  # nothing ran (every input missing or unreadable): leave no trace of the job
            _remove_if_empty(created)
        return JobResult(rows, "local", seconds, sum(1 for row in rows if not row.skipped), summary)
    ray_options = ray_options or RayOptions()
    ray_options.validate()
    return run_ray(paths, stems, fcn, geometry, loaded, model, options, ray_options, resume, model_file,
                   trust_model, metadata)
