"""Where scores go: the in-memory map written as ``.scores.npz``, or the chunked ``.scores.zarr`` store.

Both hold class probabilities K×rows×cols (float32, or float16 for zarr by option), NaN where a cell was not
computed (background), with the geometry in level-0 pixels under the same names: ``stride``, ``offset``,
``window`` (y, x; window ``(i, j)`` has its top-left corner at ``offset + (i, j)·stride``), ``labels``,
``image_size``, plus ``level``, ``downsample`` and ``mpp``.

The zarr store is written while it is computed: one chunk per tile (the plan's cell blocks), so no two tiles
share a chunk. Until the image is finished it lives in a hidden ``.<stem>.scores.zarr.partial`` folder beside
its target with a ``fcnify-done.log`` listing finished tiles, one line each, appended after the tile's chunk
is written: a run killed at any moment (``kill -9`` included) leaves a store whose log names only complete
tiles, and ``--resume`` computes the rest. ``Staged`` renames it into place together with the image's other
files; a finished store is replaced only by another finished one.

A network with several outputs: ``scores`` is the selected output's map (``--output``) and every other output
gets an array of its own beside it, ``output.<name>`` (npz key; zarr array in the same group), holding that
output's raw values (its channels as the network gives them, not softmaxed), NaN where not computed, on its own
grid: the group attribute ``output_arrays`` (also in the npz ``attributes``) gives each one's ``array``,
``labels``, ``stride``, ``offset``, ``window`` and ``map_size``, and each zarr array carries its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from fcnify.atomic import temp_beside
from fcnify.errors import OutputError
from fcnify.heatmap.mapgeometry import MapGeometry
from fcnify.heatmap.outputs import PARTIAL_SUFFIX
from fcnify.heatmap.plan import Tile, TilePlan
from fcnify.heatmap.viewers import ngff_attrs, write_ngff_levels

__all__ = ["ArraySink", "OTHER_PREFIX", "SCORE_DTYPES", "Staged", "TileWriter", "ZarrSink", "open_scores",
           "other_array", "partial_path", "read_store_attrs", "write_npz"]

_logger = logging.getLogger(__name__)

SCORE_DTYPES = ("float32", "float16")
DONE_LOG = "fcnify-done.log"
#: The array of another output of a multi-output network: ``output.<name>``.
OTHER_PREFIX = "output."


def other_array(name: str) -> str:
    """The score files' array name for the (not selected) output ``name``."""
    return f"{OTHER_PREFIX}{name}"



# ------------------------------------------------------------------------------------------------ staging


class Staged:
    """An image's output files (and the store folder) renamed into place together on ``commit``.

    Files are written to hidden temp names beside their targets; a folder is built under its own hidden
    name. If anything fails before ``commit``, ``discard`` removes every temporary and the previous outputs
    stay as they were.
    """

    def __init__(self, overwrite: bool = True):
        self.overwrite = overwrite
        self.pending: list[tuple[Path, Path]] = []

    def path(self, target: Path) -> Path:
        """A temp file to write ``target``'s content to."""
        self._check(target)
        if target.is_dir():
            raise OutputError(f"{target} is a directory", hint="choose another output folder")
        tmp = temp_beside(target)
        self.pending.append((tmp, target))
        return tmp

    def folder(self, built: Path, target: Path) -> None:
        """Move the finished folder ``built`` to ``target`` on commit (replacing an earlier one)."""
        self._check(target)
        self.pending.append((built, target))

    def _check(self, target: Path) -> None:
        if target.exists() and not self.overwrite:
            raise OutputError(f"{target} already exists", hint="pass --force to overwrite it, or another -o")

    def commit(self) -> list[Path]:
        placed: list[Path] = []
        try:
            for tmp, target in self.pending:
                if tmp.is_dir():
                    _replace_folder(tmp, target)
                else:
                    os.replace(tmp, target)
                placed.append(target)
        except OSError as exc:
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}", hint="check the output folder") from exc
        finally:
            self.pending = [(tmp, target) for tmp, target in self.pending if target not in placed]
            self.discard()
        return placed

    def discard(self) -> None:
        for tmp, _ in self.pending:
            if tmp.is_dir():
                continue  # a partial store stays for --resume
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self.pending = []


def _replace_folder(built: Path, target: Path) -> None:
    """Put the folder ``built`` at ``target``; an earlier ``target`` is removed only once the new one is in."""
    old = None
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            target.unlink()
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ attrs


@dataclass
class MapAttrs:
    """What the score files say about their map: the labels, where its cells lie (level-0 pixels), the image.

    Attributes:
        labels: the class names, one per band of the map.
        geometry: cell (i, j) ↔ its window, in level-0 pixels.
        image_size: the image's level-0 (height, width).
        level, downsample, mpp: the resolution the map was computed at.
        extra: every other attribute (receptive field, exactness, preprocessing, foreground, georeferencing).
    """

    labels: tuple[str, ...]
    geometry: MapGeometry
    image_size: tuple[int, int]
    level: int
    downsample: tuple[float, float]
    mpp: tuple[float, float] | None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"labels": list(self.labels), **self.geometry.to_json(), "image_size": list(self.image_size),
                "level": int(self.level), "downsample": list(self.downsample),
                "mpp": list(self.mpp) if self.mpp else None, **self.extra}


# ------------------------------------------------------------------------------------------------- sinks


class ArraySink:
    """The whole map in memory (small images: the rule in ``outputs.choose_scores_format``)."""

    def __init__(self, classes: int, map_size: tuple[int, int], grids: dict | None = None):
        self.scores = np.full((classes, *map_size), np.nan, dtype=np.float32)
        self.grids = grids or {}
        self.others = {name: np.full((g.channels, *g.map_size), np.nan, dtype=np.float32)
                       for name, g in self.grids.items()}

    def write(self, tile: Tile, scores: np.ndarray) -> None:
        self.scores[:, tile.rows.first:tile.rows.last, tile.cols.first:tile.cols.last] = scores

    def write_others(self, tile: Tile, blocks: dict[str, np.ndarray]) -> None:
        """The tile's cells of the other outputs (``plan.OutputGrid``)."""
        for name, block in blocks.items():
            (r0, r1), (c0, c1) = self.grids[name].cells(tile)
            self.others[name][:, r0:r1, c0:c1] = block

    def close(self) -> None:
        """Nothing to release: the map is written whole by ``write_npz``."""


def write_npz(path: Path, scores: np.ndarray, attrs: MapAttrs, summary: dict | None = None,
              others: dict[str, np.ndarray] | None = None) -> None:
    """``scores`` (probabilities) and ``logits`` (their logarithms; NaN where not computed), the labels, the
    geometry and the image's size, level and resolution, compressed; ``attributes`` holds every attribute
    the zarr store has (receptive field, exactness, preprocessing, foreground) and ``summary`` the tile
    counts and peaks, both as JSON text. ``others``: the other outputs' maps by name, as ``output.<name>``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logits = np.log(np.maximum(scores, np.float32(1e-30)))
    # Plain values also get a key of their own; None and nested ones live only in the JSON ``attributes``
    # (np.asarray(None) is an object array, which np.load(allow_pickle=False) refuses).
    extra = {}
    for key, value in attrs.extra.items():
        if value is not None and not isinstance(value, dict):
            array = np.asarray(value)
            if array.dtype != object:
                extra[key] = array
    with open(path, "wb") as f:
        np.savez_compressed(
            f, scores=scores.astype(np.float32), logits=logits.astype(np.float32),
            labels=np.asarray([str(v) for v in attrs.labels], dtype=np.str_),
            image_size=np.asarray(attrs.image_size, dtype=np.int64), level=np.int64(attrs.level),
            downsample=np.asarray(attrs.downsample, dtype=np.float64),
            mpp=np.asarray(attrs.mpp if attrs.mpp else (np.nan, np.nan), dtype=np.float64),
            **attrs.geometry.arrays(), **extra, attributes=np.asarray(json.dumps(attrs.to_json(), default=str)),
            summary=np.asarray(json.dumps(summary or {}, default=str)),
            **{other_array(name): np.asarray(values, np.float32) for name, values in (others or {}).items()},
        )


def partial_path(target: Path) -> Path:
    """Where the store for ``target`` is built: a hidden folder beside it."""
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


class ZarrSink:
    """A zarr v3 group being filled tile by tile; see the module docstring.

    Args:
        target: the final ``<stem>.scores.zarr``.
        plan: the tile plan (chunks = its cell blocks).
        attrs: the map's attributes (group attributes).
        run_key: what must match for ``--resume`` to go on with a partial store (model, sizes, options).
        dtype: float32 or float16.
        resume: go on with a matching partial store; otherwise start afresh.
    """

    def __init__(self, target: Path, plan: TilePlan, attrs: MapAttrs, run_key: dict, dtype: str = "float32",
                 resume: bool = False, grids: dict | None = None):
        self.target, self.plan = Path(target), plan
        self.grids = grids or {}
        self.folder = partial_path(self.target)
        self.done: set[int] = set()
        key = json.loads(json.dumps(run_key, default=str))
        if resume and self.folder.is_dir():
            self.done = self._resumable(key)
        if not self.done:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            group = zarr.open_group(str(self.folder), mode="w", zarr_format=3)
            # The "ome" attributes (OME-NGFF multiscales) let napari and ome-zarr readers place the map on the slide.
            group.attrs.update({**attrs.to_json(), "complete": False, "run": key,
                                "tile_grid": list(plan.grid), "tile_cells": list(plan.cells),
                                **ngff_attrs(attrs.to_json())})
            group.create_array(
                "scores", shape=(len(attrs.labels), *plan.map_size), chunks=(len(attrs.labels), *plan.cells),
                dtype=dtype, fill_value=np.nan, dimension_names=("class", "y", "x"),
                compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"))
            described = attrs.extra.get("output_arrays") or {}
            for name, grid in self.grids.items():  # the other outputs: chunks are the tiles' blocks of each
                array = group.create_array(
                    other_array(name), shape=(grid.channels, *grid.map_size), chunks=(grid.channels, *grid.chunks),
                    dtype=dtype, fill_value=np.nan, dimension_names=("channel", "y", "x"),
                    compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"))
                array.attrs.update(described.get(name, {}))
        self.group = zarr.open_group(str(self.folder), mode="r+")
        self.array = self.group["scores"]
        self.others = {name: self.group[other_array(name)] for name in self.grids}
        self._log = open(self.folder / DONE_LOG, "a")

    def _resumable(self, key: dict) -> set[int]:
        try:
            group = zarr.open_group(str(self.folder), mode="r")
            if group.attrs.get("run") != key:
                _logger.info("%s: the partial store is from another run; starting afresh", self.folder)
                return set()
            for name, grid in self.grids.items():  # every other output's array, as this run lays it out
                array = group[other_array(name)]
                if tuple(array.shape) != (grid.channels, *grid.map_size) or tuple(array.chunks[1:]) != grid.chunks:
                    _logger.info("%s: output %s's array does not match; starting afresh", self.folder, name)
                    return set()
            lines = (self.folder / DONE_LOG).read_text().split("\n")
        except Exception as exc:  # unreadable or foreign: start afresh rather than trust it
            _logger.info("%s: cannot resume (%s); starting afresh", self.folder, exc)
            return set()
        done = set()
        for line in lines[:-1]:  # the last piece has no newline yet: written by a killed process, or empty
            if line.strip().isdigit() and int(line) < self.plan.count:
                done.add(int(line))
        _logger.info("%s: resuming with %d of %d tiles done", self.folder, len(done), self.plan.count)
        return done

    def write(self, tile: Tile, scores: np.ndarray) -> None:
        write_tile(self.array, tile, scores)

    def write_others(self, tile: Tile, blocks: dict[str, np.ndarray]) -> None:
        """The tile's cells of the other outputs, into their arrays (before ``mark_done``)."""
        write_other_tiles(self.others, self.grids, tile, blocks)

    def mark_done(self, tile: Tile) -> None:
        """Record ``tile`` as finished (after its chunk is written)."""
        index = self.plan.index(tile)
        self._log.write(f"{index}\n")
        self._log.flush()
        self.done.add(index)

    def finish(self, status: np.ndarray, summary: dict, levels: bool = False) -> Path:
        """Mark the store complete (tile status grid: 1 computed, 2 background) and return its folder.

        Args:
            levels: also write 2× downsampled copies of the map for NGFF viewers (``scores_1``, …).
        """
        self._log.close()
        self.group.create_array("tiles", data=status.astype(np.uint8), chunks=status.shape,
                                dimension_names=("tile_row", "tile_col"))
        if levels:
            count = write_ngff_levels(self.group)
            self.group.attrs.update(ngff_attrs(dict(self.group.attrs), levels=count))
        self.group.attrs.update({"complete": True, **summary})
        (self.folder / DONE_LOG).unlink(missing_ok=True)
        return self.folder

    def close(self) -> None:
        if not self._log.closed:
            self._log.close()


def write_tile(array, tile: Tile, scores: np.ndarray) -> None:
    """Write a tile's K×h×w probabilities into its chunk of the store's ``scores``."""
    array[:, tile.rows.first:tile.rows.last, tile.cols.first:tile.cols.last] = scores.astype(array.dtype, copy=False)


def write_other_tiles(arrays: dict, grids: dict, tile: Tile, blocks: dict[str, np.ndarray]) -> None:
    """Write a tile's blocks of the other outputs into their arrays (each at its own grid's cells)."""
    for name, block in blocks.items():
        (r0, r1), (c0, c1) = grids[name].cells(tile)
        arrays[name][:, r0:r1, c0:c1] = block.astype(arrays[name].dtype, copy=False)


class TileWriter:
    """A worker's handle on a partial store made by ``ZarrSink``: it writes tiles' chunks and nothing else (the
    process that owns the store records finished tiles, once the worker has reported them).

    Args:
        grids: the other outputs' grids (``plan.OutputGrid``), whose arrays it writes too.
    """

    def __init__(self, folder: Path, grids: dict | None = None):
        self.grids = grids or {}
        try:
            self.array = zarr.open_array(str(Path(folder) / "scores"), mode="r+", zarr_format=3)
            self.others = {name: zarr.open_array(str(Path(folder) / other_array(name)), mode="r+", zarr_format=3)
                           for name in self.grids}
        except Exception as exc:
            raise OutputError(f"cannot open the score store {folder} to write tiles: {exc}",
                              hint="workers must see the output folder at the same path as the driver "
                                   "(a shared filesystem on a cluster)") from exc

    def write(self, tile: Tile, scores: np.ndarray) -> None:
        write_tile(self.array, tile, scores)

    def write_others(self, tile: Tile, blocks: dict[str, np.ndarray]) -> None:
        write_other_tiles(self.others, self.grids, tile, blocks)


def read_store_attrs(path: Path) -> dict | None:
    """The attributes of a complete store, or None (missing, partial or unreadable)."""
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:
        return None
    return attrs if attrs.get("complete") else None


def open_scores(path: str | os.PathLike):
    """The ``scores`` array of a ``.scores.zarr`` store (zarr, read lazily) or of a ``.scores.npz`` (numpy),
    and the attributes as a dict."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            attrs = {name: data[name].tolist() for name in data.files
                     if name not in ("scores", "logits") and not name.startswith(OTHER_PREFIX)}
            return data["scores"], attrs
    group = zarr.open_group(str(path), mode="r")
    return group["scores"], dict(group.attrs)


def status_grid(plan: TilePlan, computed: Sequence[bool]) -> np.ndarray:
    """The tile status grid: 1 computed, 2 background (skipped)."""
    return np.where(np.asarray(computed, dtype=bool), 1, 2).reshape(plan.grid).astype(np.uint8)
