"""One image end to end: source → plan → compute → sinks → finish, with resume and progress around it.

For an input ``<stem>.<ext>`` it writes, in the output folder (names: ``outputs.expected_outputs``):

* ``<stem>.heatmap.png`` (one class: the chosen one, else the top class) or ``<stem>.heatmap.<class>.png``
  (several): the class's probability over the image, at the image's size or, for images whose longest side
  exceeds ``preview_size`` (4096), scaled down to it, with a legend strip below it (``legend.add_legend``:
  class name, colour scale, range);
* ``<stem>.classes.png``: a panel per top-k class and the most probable class per pixel;
* ``<stem>.scores.npz`` (maps held in memory) or ``<stem>.scores.zarr`` (tiled sources and large maps; see
  ``outputs.choose_scores_format``): probabilities K×rows×cols with NaN for background cells, and the geometry;
* ``<stem>.mask.png`` when a flat background was found: the foreground mask at thumbnail size;
* with ``formats``: ``<stem>.geojson`` (QuPath annotations), ``<stem>.heatmap[.<class>].ome.tif`` (pyramidal
  overlays) and ``<stem>.scores.tif`` (georeferenced scenes), drawn from the map by ``finish``.

Every file is written under a temporary name and renamed into place only once all of them are complete.
The job every image shares is ``job.ImageJob``; the options it reads, ``options.HeatmapOptions``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fcnify.errors import FcnifyError, InputError, InternalError, OutputError
from fcnify.heatmap import compute, finish, geo, plan, sinks
from fcnify.heatmap.job import ImageJob, ModelInfo
from fcnify.heatmap.mapgeometry import MapGeometry
from fcnify.heatmap.multiscale import multiscale_map
from fcnify.heatmap.outputs import (
    choose_scores_format,
    expected_outputs,
    formats_for,
    make_stem_folder,
    remove_stale,
)
from fcnify.heatmap.resume import completed_row
from fcnify.heatmap.sources import open_view
from fcnify.heatmap.summary import ClassPeak, SummaryRow
from fcnify.images import PreparedImage

__all__ = ["ImageRun", "TileProgress", "TileShard", "compute_shard", "run_image"]

_logger = logging.getLogger(__name__)


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
        make_stem_folder(self.outdir, self.stem)
        self.source = self._files.enter_context(geo.open_source(self.path, options.max_pixels, options.bands,
                                                                options.scale_range))
        compute.check_channels(self.source.channels, model.in_chans)
        self.view = open_view(self.source, level=options.level, mpp=options.mpp, scale=options.scale)
        if options.scales and not self.source.whole:
            raise InputError("--scales needs an image held in memory; this one is read tile by tile",
                             hint="compute one resolution with --level N or --mpp X")
        remove_stale(self.outdir, self.stem, keep_partial=self.resume)
        cells = None if options.scales else job.tile_cells()
        self.tiles = plan.plan_tiles(job.fcn, job.geometry, model.in_chans, self.view.size, cells)
        self.format = "npz" if options.scales else choose_scores_format(options.scores, self.source,
                                                                        self.tiles.map_size, len(model.labels))
        self.georef = getattr(self.source, "georef", None)
        self.targets = expected_outputs(self.stem, self.outdir, job.classes, model.labels, self.format,
                                        formats_for(options.formats, self.georef, self.path))
        view = self.view
        self.info = dict(level=view.level, downsample=float(view.downsample[0]),
                         mpp=float(view.mpp[0]) if view.mpp else None, scores_format=self.format,
                         preprocessing=model.preprocessing, output=job.output, output_names=job.output_names)
        if self.resume:
            return completed_row(self.path, self.outdir, self.targets, model, self.format, options.top_k)
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
        self.attrs = sinks.MapAttrs(model.labels, MapGeometry.of(job.geometry).at_downsample(view.downsample),
                                    image_size=tuple(self.source.size), level=view.level,
                                    downsample=tuple(float(v) for v in view.downsample),
                                    mpp=tuple(view.mpp) if view.mpp else None,
                                    extra=_attrs_extra(job, tiles, self.mask, model))
        self.attrs.extra.update(geo.map_attrs(self.source, self.attrs.to_json()))
        # A network's other outputs get arrays of their own in the score file (not for --scales maps).
        self.grids, left_out = ({}, {}) if options.scales else plan.output_grids(job.fcn, tiles)
        if self.grids or left_out:
            self.attrs.extra["output_arrays"] = {name: _other_attrs(view, grid)
                                                 for name, grid in self.grids.items()}
            self.attrs.extra["outputs_left_out"] = left_out
        state = self.state = TileProgress(self.path, tiles.count)
        if options.scales:
            self.computed = [True]
            return
        self.census = compute.foreground_census(tiles, self.mask, job.bounds, whole_tiles=bool(self.grids))
        self.computed = self.census.computed
        state.background = sum(1 for c in self.computed if not c)
        if not any(self.computed):
            raise finish.nothing_computed(self.path, self.mask)
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
        peaks = state.peaks if state.peaks is not None else finish.map_peaks(scores, tiles)
        if not np.isfinite(peaks.values).any():  # never report peaks, nor write maps, that hold no computed cell
            raise finish.nothing_computed(self.path, mask)
        draw = list(job.classes) or peaks.top(1) or [0]
        top = peaks.top(max(1, int(options.top_k))) or [0]
        view_geometry = MapGeometry.of(job.geometry)  # in the pixels of the view computed at
        centres = {k: finish.level0_centre(peaks, k, view_geometry, view) for k in range(len(model.labels))}
        summary_top = tuple(ClassPeak(k, model.labels[k], float(peaks.values[k]) if np.isfinite(peaks.values[k])
                                      else float("nan"), *centres[k]) for k in top)
        staged = sinks.Staged(options.overwrite)
        try:
            ranges = finish.colour_ranges(options, peaks, {*draw, *top})
            if "png" in options.formats:
                finish.write_previews(staged, view, scores, view_geometry, targets, draw, top, peaks, ranges, centres,
                                job)
            finish.write_viewers(staged, scores, self.attrs, targets, draw, ranges, tuple(self.source.size), options,
                           self.georef)
            if mask is not None:
                target = outdir / Path(self.stem).with_name(Path(self.stem).name + ".mask.png")
                finish.write_mask(staged, target, mask)
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
                          **self._masking(), megapixels=view.size[0] * view.size[1] / 1e6, runtime=state.runtime,
                          **self.info)

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
        remove_stale(self.outdir, self.stem, keep_partial=False)
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
            **MapGeometry.of(grid.geometry).at_downsample(view.downsample).to_json()}


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


