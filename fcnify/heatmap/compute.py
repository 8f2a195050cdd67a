"""Compute: tiles through the network, their cells' class probabilities out.

A reader thread reads and decodes the next tiles into a bounded queue while the network runs on the current
ones (decoding JPEG tiles and running convolutions both release the GIL), tiles of the same size run together
in batches, and each tile's kept cells leave as a K×h×w float32 probability block with the background cells
set to NaN. The network runs in PyTorch or, where it is exact and faster, onnxruntime (``choose_runtime``).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import queue
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fcnify.convert.from_export import rebuild_modules
from fcnify.device import check_precision, guarded_forward, place_model, run_network, select_device
from fcnify.errors import InputError, InternalError
from fcnify.heatmap.plan import ForegroundMask, NetworkBounds, OutputGrid, Tile, TilePlan, tile_span
from fcnify.heatmap.scoremap import check_class_count
from fcnify.onnx_export import export_onnx
from fcnify.onnx_runtime import OnnxNet

__all__ = ["RUNTIMES", "ForegroundCensus", "PeakTracker", "TileNetwork", "check_channels", "choose_runtime",
           "compute_tiles", "foreground_blocks", "foreground_census", "foreground_tiles", "onnx_twin", "read_tiles",
           "to_model_input"]

_logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
#: ``--runtime auto`` exports to onnxruntime on the CPU for jobs of at least this many input pixels: below
#: it, the export and its equivalence check (seconds) cost more than onnxruntime saves.
AUTO_ONNX_PIXELS = 64_000_000


def to_model_input(rgb: np.ndarray, in_chans: int, mean: torch.Tensor, std: torch.Tensor,
                   canvas: tuple[int, int] | None = None) -> torch.Tensor:
    """An H×W×3 uint8 region (H×W×C: a scene's bands) as a normalised C×H×W float32 tensor, zero-padded (the
    mean colour) to ``canvas``.

    A region with as many channels as the model takes goes in as it is. RGB for a one-channel model is Pillow's
    ITU-R 601-2 luma (``Image.convert("L")``, the same integer arithmetic), so a grey image gives back its grey
    values exactly.
    """
    check_channels(rgb.shape[2], in_chans)
    if in_chans == 1 and rgb.shape[2] == 3:
        r, g, b = (rgb[..., c].astype(np.uint32) for c in range(3))
        rgb = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]
    tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(255.0)
    tensor = (tensor - mean[:, None, None]) / std[:, None, None]
    if canvas is not None and tuple(tensor.shape[1:]) != tuple(canvas):
        pad_h, pad_w = canvas[0] - tensor.shape[1], canvas[1] - tensor.shape[2]
        tensor = torch.nn.functional.pad(tensor, (0, pad_w, 0, pad_h), value=0.0)
    return tensor


def check_channels(channels: int, in_chans: int) -> None:
    """Raise ``InputError`` unless images with ``channels`` channels can feed a model of ``in_chans``: the same
    count, or RGB for a one-channel model (luma)."""
    if channels == in_chans or (channels == 3 and in_chans == 1):
        return
    if channels == 3:
        raise InputError(f"the model takes {in_chans} input channels, but images give 3 (RGB)",
                         hint="for a multi-band scene (GeoTIFF) choose that many bands with --bands, e.g. "
                              f"--bands {','.join(str(b) for b in range(1, in_chans + 1))}")
    raise InputError(f"--bands gives {channels} band{'s' if channels != 1 else ''} but the model takes {in_chans} "
                     "input channels", hint=f"name {in_chans} band{'s' if in_chans != 1 else ''} with --bands")


@dataclass
class TileNetwork:
    """A network ready to run tiles: on its device, in its precision, with its input normalisation."""

    module: nn.Module
    device: torch.device
    dtype: torch.dtype
    in_chans: int
    mean: torch.Tensor
    std: torch.Tensor
    runtime: str = "torch"

    @classmethod
    def build(cls, fcn: nn.Module, in_chans: int, mean, std, device: str | torch.device = "auto",
              precision: str = "fp32", runtime: str = "torch") -> TileNetwork:
        device = device if isinstance(device, torch.device) else select_device(device)
        dtype = check_precision(precision, device)
        mean_t = torch.as_tensor(tuple(mean), dtype=torch.float32)
        std_t = torch.as_tensor(tuple(std), dtype=torch.float32)
        if mean_t.numel() != in_chans or std_t.numel() != in_chans:
            raise InputError(f"mean/std have {mean_t.numel()}/{std_t.numel()} values for {in_chans} channels",
                             hint="give one mean and one std per input channel")
        place_model(fcn, device)
        return cls(fcn, device, dtype, int(in_chans), mean_t, std_t, runtime)

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """N×C×H×W normalised input → N×K×h×w float32 logits on the CPU (one-line errors)."""
        return guarded_forward(lambda: run_network(self.module, batch, self.device, self.dtype), batch.shape,
                               len(batch))

    def run_every(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """N×C×H×W normalised input → every output's N×K×h×w float32 map by name, on the CPU."""
        return guarded_forward(lambda: run_network(self.module, batch, self.device, self.dtype, every=True),
                               batch.shape, len(batch))


def choose_runtime(fcn: nn.Module, metadata, runtime: str, device: torch.device, precision: str,
                   pixels: int) -> str:
    """Which runtime runs the tiles: ``torch`` or ``onnxruntime``.

    ``torch`` keeps the PyTorch network. ``onnxruntime`` exports it in memory to ONNX (``onnx_twin``),
    gated by the same equivalence check as ``fcnify convert --onnx``. ``auto`` picks onnxruntime on the CPU
    in fp32 for jobs of at least ``AUTO_ONNX_PIXELS`` input pixels (it runs convolutions in about 0.55×
    PyTorch's time there), and PyTorch otherwise. A network loaded from ``.onnx`` always runs on
    onnxruntime.

    Raises:
        InputError: an unknown runtime, or ``onnxruntime`` for a network that cannot be exported.
    """
    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime!r} is not one of {', '.join(RUNTIMES)}", hint="e.g. --runtime auto")
    if getattr(fcn, "runs_outside_torch", False):
        return "onnxruntime"
    exportable = metadata is not None  # a converted network, in memory or from a .pt2 (``_exportable``)
    if runtime == "auto":
        fast = device.type == "cpu" and precision == "fp32" and pixels >= AUTO_ONNX_PIXELS
        return "onnxruntime" if fast and exportable else "torch"
    if runtime == "onnxruntime" and not exportable:
        raise InputError("--runtime onnxruntime needs a converted PyTorch network to export",
                         hint="give the model spec (or an .onnx file, which runs on onnxruntime)")
    return runtime


def onnx_twin(fcn: nn.Module, metadata) -> nn.Module:
    """``fcn`` exported to ONNX in memory and run by onnxruntime, once onnxruntime agrees with PyTorch.

    Raises:
        ExportError, NotEquivalentError: the export or its equivalence check failed.
    """
    with tempfile.TemporaryDirectory(prefix="fcnify-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(_exportable(fcn, metadata).float().cpu(), metadata, path)
        twin = OnnxNet(path.read_bytes(), device="cpu", metadata=metadata)
    release_freed_memory()  # the exporter's graphs and checks: hundreds of MB for a ResNet-50, now garbage
    return twin


def _exportable(fcn: nn.Module, metadata) -> nn.Module:
    """``fcn`` as a module the ONNX exporter takes: a network loaded from a ``.pt2`` is the program's unlifted
    graph (no ``eval()``, no geometry), so it is rebuilt from its modules and given the file's geometry."""
    if hasattr(fcn, "geometry") and hasattr(fcn, "input_size"):
        return fcn
    rebuilt = rebuild_modules(fcn)
    rebuilt.input_size, rebuilt.in_chans = tuple(metadata.input_size), int(metadata.in_chans)
    rebuilt.geometry = metadata.geometry
    return rebuilt


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc's ``malloc_trim``), so that what a
    phase freed does not stay in the process's resident size for the rest of the run."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # another C library (musl): nothing to trim
        return None


_LIBC = _glibc()


# ------------------------------------------------------------------------------------------------ reading


_DONE = object()


def read_tiles(view, plan: TilePlan, tiles: Iterable[Tile], prefetch: int = 2) -> Iterator[tuple[Tile, np.ndarray]]:
    """(tile, H×W×3 uint8 input region) for each tile, read ahead by a thread into a queue of ``prefetch``.

    The region is clipped to the image; the network input is padded from there (``to_model_input``). An
    error in the reader is raised here, in the caller's thread; closing the generator stops the reader.
    """
    slots: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for tile in tiles:
                y0, x0 = tile.rows.start, tile.cols.start
                y1, x1 = min(tile.rows.stop, plan.image_size[0]), min(tile.cols.stop, plan.image_size[1])
                region = view.read(y0, x0, y1 - y0, x1 - x0)
                if not put((tile, region)):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=reader, name="fcnify-tile-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------ peaks


@dataclass
class PeakTracker:
    """Each class's highest probability over the map and the cell where it is reached (first in row-major
    order on ties, as ``torch.max`` over a whole map gives), and its lowest (``--normalize`` colours each map
    from its own minimum to its peak): both tracked tile by tile, so the map is never read whole for them.

    Attributes:
        values: K highest computed probabilities (-inf: no computed cell).
        cells: K×2 (row, col) of each peak.
        minima: K lowest computed probabilities (+inf: no computed cell).
    """

    classes: int
    values: np.ndarray = field(init=False)
    cells: np.ndarray = field(init=False)
    minima: np.ndarray = field(init=False)

    def __post_init__(self):
        self.values = np.full(self.classes, -np.inf, dtype=np.float64)
        self.cells = np.zeros((self.classes, 2), dtype=np.int64)
        self.minima = np.full(self.classes, np.inf, dtype=np.float64)

    def update(self, scores: np.ndarray, first_row: int, first_col: int) -> None:
        missing = np.isnan(scores)
        flat = np.where(missing, -np.inf, scores).reshape(scores.shape[0], -1)
        if not flat.size:
            return
        lows = np.where(missing, np.inf, scores).reshape(scores.shape[0], -1).min(axis=1)
        self.minima = np.minimum(self.minima, lows)
        best = flat.argmax(axis=1)
        values = flat[np.arange(flat.shape[0]), best]
        rows, cols = np.divmod(best, scores.shape[2])
        for k in np.nonzero(values > self.values)[0]:
            self.values[k] = values[k]
            self.cells[k] = (first_row + rows[k], first_col + cols[k])
        ties = np.nonzero(values == self.values)[0]
        for k in ties:  # keep the row-major first cell among equal maxima
            cell = (first_row + rows[k], first_col + cols[k])
            if tuple(cell) < tuple(self.cells[k]):
                self.cells[k] = cell

    def merge(self, other: PeakTracker) -> None:
        """Take in another part of the map's peaks (a tile computed elsewhere), with ``update``'s tie rule."""
        self.minima = np.minimum(self.minima, other.minima)
        for k in range(self.classes):
            value, cell = other.values[k], tuple(other.cells[k])
            if value > self.values[k] or (value == self.values[k] and cell < tuple(self.cells[k])):
                self.values[k] = value
                self.cells[k] = cell

    def top(self, n: int) -> list[int]:
        """The ``n`` classes with the highest peaks, best first (stable: lower index first on ties)."""
        order = np.argsort(-self.values, kind="stable")
        return [int(k) for k in order[:max(0, n)] if np.isfinite(self.values[k])]


# ------------------------------------------------------------------------------------------------ compute


def _kept(tile: Tile, logits: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """The tile's own cells of its K×h×w network output."""
    r0 = tile.rows.first - tile.rows.start // stride[0]
    c0 = tile.cols.first - tile.cols.start // stride[1]
    h, w = tile.rows.last - tile.rows.first, tile.cols.last - tile.cols.first
    if r0 < 0 or c0 < 0 or logits.shape[-2] < r0 + h or logits.shape[-1] < c0 + w:
        raise InternalError(f"a tile of {tile.input_shape[0]}x{tile.input_shape[1]} px gave a "
                            f"{logits.shape[-2]}x{logits.shape[-1]} map, which lacks its cells "
                          f"[{r0}, {r0 + h}) x [{c0}, {c0 + w})",
                          hint="please report this model: its geometry does not match its output")
    return logits[..., r0:r0 + h, c0:c0 + w]


def compute_tiles(view, plan: TilePlan, network: TileNetwork, bounds: NetworkBounds, tiles: list[Tile],
                  mask: ForegroundMask | None, write: Callable[[Tile, np.ndarray], None],
                  batch_size: int = 1, prefetch: int = 2, labels: int | None = None,
                  done: Callable[[Tile], None] | None = None, grids: dict[str, OutputGrid] | None = None,
                  write_others: Callable[[Tile, dict[str, np.ndarray]], None] | None = None) -> int:
    """Run ``tiles`` of ``view`` through ``network`` and hand each tile's probabilities to ``write``.

    A tile whose cells are partly background runs only on the blocks of it that ``foreground_blocks`` keeps
    (each with its own halo, so its cells keep their one-pass values); its other cells are NaN.

    Args:
        view: the image at the resolution the network sees (``sources.LevelView``).
        plan: the tile plan; ``tiles`` are those to compute (foreground, not yet done).
        mask: the foreground mask (None: every cell); background cells are NaN.
        write: ``write(tile, scores)`` with scores K×h×w float32 (the tile's cells).
        batch_size: tiles of the same input size run together, at most this many.
        labels: the number of class labels, checked against the network's output.
        done: called after ``write`` for each tile (progress, the resume record).
        grids: the network's other outputs (``plan.output_grids``): each tile's cells of them, raw values (not
            softmaxed: a box regression or an embedding is no distribution), go to ``write_others`` before
            ``done``. With other outputs a partly-background tile runs whole (their cells are not cut by the
            selected output's mask); only whole background tiles leave them NaN.

    Returns:
        The input pixels pushed through the network (halos included).
    """
    pushed = 0
    grids = grids or {}
    others: list[dict[str, np.ndarray]] = []  # the last ``run``'s other outputs, per piece

    def run(pieces: list[tuple[Tile, np.ndarray]]) -> list[np.ndarray]:
        nonlocal pushed, others
        inputs = torch.stack([to_model_input(region, network.in_chans, network.mean, network.std, piece.input_shape)
                              for piece, region in pieces])
        pushed += int(inputs.shape[0]) * int(inputs.shape[-2]) * int(inputs.shape[-1])
        if grids:
            maps = network.run_every(inputs)
            logits = maps[network.module.selected]
            others = [{name: np.ascontiguousarray(grid.kept(piece, maps[name][k]).numpy(), dtype=np.float32)
                       for name, grid in grids.items()} for k, (piece, _) in enumerate(pieces)]
        else:
            logits = network.run(inputs)
        if labels is not None:
            check_class_count(logits.shape[1], labels)
        return [torch.softmax(_kept(piece, logits[k], plan.stride), dim=0).numpy() for k, (piece, _) in
                enumerate(pieces)]

    def finish(tile: Tile, scores: np.ndarray, keep: np.ndarray | None, extra: dict | None = None) -> None:
        if keep is not None:
            scores = np.where(keep[None], scores, np.float32(np.nan))
        write(tile, np.ascontiguousarray(scores, dtype=np.float32))
        if extra and write_others is not None:
            write_others(tile, extra)
        if done is not None:
            done(tile)

    def flush(batch: list[tuple[Tile, np.ndarray, np.ndarray | None]]) -> None:
        scores = run([(t, r) for t, r, _ in batch])
        extras = others if grids else [None] * len(batch)
        for (tile, _, keep), tile_scores, extra in zip(batch, scores, extras, strict=True):
            finish(tile, tile_scores, keep, extra)

    def in_parts(tile: Tile, region: np.ndarray, keep: np.ndarray, blocks: list[Tile]) -> None:
        scores = None
        height, width = plan.image_size
        for block in blocks:
            y0, x0 = block.rows.start - tile.rows.start, block.cols.start - tile.cols.start
            y1 = min(block.rows.stop, height) - tile.rows.start
            x1 = min(block.cols.stop, width) - tile.cols.start
            (part,) = run([(block, region[max(0, y0):max(0, y1), max(0, x0):max(0, x1)])])
            if scores is None:
                scores = np.full((part.shape[0], *keep.shape), np.nan, dtype=np.float32)
            scores[:, block.rows.first - tile.rows.first:block.rows.last - tile.rows.first,
                   block.cols.first - tile.cols.first:block.cols.last - tile.cols.first] = part
        if scores is None:  # no foreground at all: nothing to run (such tiles are normally not asked for)
            scores = np.full((labels or 1, *keep.shape), np.nan, dtype=np.float32)
        finish(tile, scores, keep)

    pending: list[tuple[Tile, np.ndarray, np.ndarray | None]] = []
    for tile, region in read_tiles(view, plan, tiles, prefetch):
        keep = None if mask is None else _tile_mask(tile, mask, bounds)
        if keep is not None and not grids:
            blocks = foreground_blocks(tile, keep, plan, bounds)
            if blocks != [tile]:
                in_parts(tile, region, keep, blocks)
                continue
        if pending and (len(pending) >= batch_size or pending[0][0].input_shape != tile.input_shape):
            flush(pending)
            pending = []
        pending.append((tile, region, keep))
    if pending:
        flush(pending)
    return pushed


def _tile_mask(tile: Tile, mask: ForegroundMask, bounds: NetworkBounds) -> np.ndarray:
    return mask.cells((tile.rows.first, tile.rows.last), (tile.cols.first, tile.cols.last), bounds)


def _pixels(tile: Tile) -> int:
    return tile.input_shape[0] * tile.input_shape[1]


def _runs(present: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """[start, stop) runs of True in ``present``, with runs fewer than ``gap`` False apart merged."""
    runs: list[list[int]] = []
    for i in np.flatnonzero(present):
        if runs and i - runs[-1][1] < gap:
            runs[-1][1] = int(i) + 1
        else:
            runs.append([int(i), int(i) + 1])
    return [(a, b) for a, b in runs]


def foreground_blocks(tile: Tile, keep: np.ndarray, plan: TilePlan, bounds: NetworkBounds) -> list[Tile]:
    """The blocks of ``tile`` the network runs on: ``[tile]`` itself, or smaller blocks covering every
    foreground cell of ``keep`` (bool, the tile's cells), whichever pushes fewer input pixels.

    Candidates cut the tile into bands of 1, 2, 4, … rows of cells; in each band, the columns holding
    foreground form runs (runs closer than a halo are merged: a gap that narrow costs less than a second
    halo), each run trimmed to its band's foreground rows. A block is planned exactly as a tile of its cells
    (``plan.tile_span``: stride-aligned start, the receptive field as halo), so its cells keep their one-pass
    values. [] when no cell is foreground.
    """
    if keep.all():
        return [tile]
    if not keep.any():
        return []
    rows, cols = keep.shape
    gap = max(1, -(-bounds.halo(1) // bounds.stride[1]))

    def span(axis: int, first: int, last: int):
        return tile_span(first, last, plan.map_size[axis], plan.canvas[axis], plan.stride[axis], bounds.lo[axis],
                         bounds.hi[axis], plan.min_input[axis])

    best, cost = [tile], _pixels(tile)
    band = rows
    while band >= 1:
        blocks = []
        for r0 in range(0, rows, band):
            part = keep[r0:r0 + band]
            present = part.any(axis=1)
            if not present.any():
                continue
            top = r0 + int(np.argmax(present))
            bottom = r0 + len(present) - int(np.argmax(present[::-1]))
            for c0, c1 in _runs(part.any(axis=0), gap):
                blocks.append(Tile(tile.row, tile.col, span(0, tile.rows.first + top, tile.rows.first + bottom),
                                   span(1, tile.cols.first + c0, tile.cols.first + c1)))
        total = sum(_pixels(b) for b in blocks)
        if total < cost:
            best, cost = blocks, total
        band = band // 2 if band > 1 else 0
    return best


@dataclass(frozen=True)
class ForegroundCensus:
    """What a mask leaves to compute in a plan.

    Attributes:
        computed: per tile (row-major), whether any of its cells' windows holds foreground.
        masked_cells: cells left NaN as background.
        pixels: input pixels the network runs on (the kept blocks, halos included).
        pixels_all: input pixels with every cell computed (``TilePlan.input_pixels``).
    """

    computed: list[bool]
    masked_cells: int
    pixels: int
    pixels_all: int

    @property
    def saved_fraction(self) -> float:
        """The share of input pixels not pushed through the network."""
        return 1.0 - self.pixels / self.pixels_all if self.pixels_all else 0.0


def foreground_census(plan: TilePlan, mask: ForegroundMask | None, bounds: NetworkBounds,
                      whole_tiles: bool = False) -> ForegroundCensus:
    """The tiles, cells and input pixels ``mask`` leaves to compute (the blocks ``compute_tiles`` runs; whole
    tiles with any foreground where ``whole_tiles``: a network whose other outputs are stored too)."""
    everything = plan.input_pixels()
    if mask is None:
        return ForegroundCensus([True] * plan.count, 0, everything, everything)
    computed, masked, pixels = [], 0, 0
    for tile in plan.tiles():
        keep = _tile_mask(tile, mask, bounds)
        computed.append(bool(keep.any()))
        masked += int(keep.size - np.count_nonzero(keep))
        if whole_tiles:
            pixels += _pixels(tile) if keep.any() else 0
        else:
            pixels += sum(_pixels(b) for b in foreground_blocks(tile, keep, plan, bounds))
    return ForegroundCensus(computed, masked, pixels, everything)


def foreground_tiles(plan: TilePlan, mask: ForegroundMask | None, bounds: NetworkBounds) -> list[bool]:
    """Per tile (row-major): whether any of its cells' windows holds foreground."""
    if mask is None:
        return [True] * plan.count
    return [bool(_tile_mask(t, mask, bounds).any()) for t in plan.tiles()]
