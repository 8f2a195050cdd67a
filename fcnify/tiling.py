"""Exact tiled inference: the one-pass score map, computed tile by tile so that memory follows the tile size.

The network is cut in two at a node every later node depends on only through it (a *cut*), chosen as the
earliest such node that is already at the network's full stride: a *prefix* (the costly high-resolution
layers) and a *suffix* (the rest, at the output's resolution). The prefix runs on overlapping tiles of the
image; the cells of its map that each tile computes exactly are stitched into the prefix's full map, and the
suffix runs once on it. With no usable cut, the whole network is the prefix.

Why it is exact, also for padded networks: a cell of the prefix map depends only on the input pixels of its
receptive field ``[q·J + lo, q·J + hi)`` (``J`` the prefix stride; the field includes the zero padding the
cell reads). Every value a cell reads inside a tile that lies outside the tile's maps (padding) belongs to a
receptive field that crosses the tile edge, so a cell whose whole field lies inside the tile reads only values
the tile computed from real image pixels, the same values as in one pass. Where a tile edge is the image
edge, the padding there is the same padding as in one pass, provided every layer's grid lines up, which holds
when tile origins are multiples of ``J`` (every layer's stride divides it; ceil-mode pools included, since
the last tile ends where the image ends). Each tile keeps only such cells, so the stitched map equals the
one-pass map up to float rounding.

This does not hold for size-dependent ("same") padding, global context (squeeze-excitation: each cell sees
the mean of the whole image) or ops fcnify cannot see into; tiling refuses those networks.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from fcnify.errors import InputError

__all__ = ["TilePlan", "TiledNetwork", "choose_tile", "parse_memory", "parse_tile", "plan_tiles", "split_for_tiling",
           "tiled_logits"]

_logger = logging.getLogger(__name__)

# Peak memory measured on the activations alone misses convolution workspaces and allocator slack.
_WORKSPACE_FACTOR = 1.5


@dataclass(frozen=True)
class Span:
    """One axis of a tile: input pixels ``[start, stop)``, and the prefix cells ``[first, last)`` it keeps."""

    start: int
    stop: int
    first: int
    last: int


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles lie: rows × cols spans; ``map_size`` is the prefix map of the whole image."""

    rows: tuple[Span, ...]
    cols: tuple[Span, ...]
    map_size: tuple[int, int]

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

    def input_pixels(self) -> int:
        """Pixels the tiles push through the prefix (with their halos)."""
        return sum(r.stop - r.start for r in self.rows) * sum(c.stop - c.start for c in self.cols)


@dataclass
class TiledNetwork:
    """A network cut for tiling.

    Attributes:
        prefix: runs on tiles; maps N×C×H×W to an N×C'×h'×w' map of stride ``stride``.
        suffix: runs once on the stitched prefix map (``None``: the prefix is the whole network).
        stride: the prefix's stride (y, x); tile origins are multiples of it.
        lo, hi: cell q of the prefix map reads input pixels ``[q·stride + lo, q·stride + hi)`` per axis.
        cut: the name of the node the network was cut at ("output" for the whole network).
    """

    prefix: nn.Module
    suffix: nn.Module | None
    stride: tuple[int, int]
    lo: tuple[int, int]
    hi: tuple[int, int]
    cut: str

    @property
    def halo(self) -> tuple[int, int]:
        """Input pixels a tile needs beyond the cells it keeps: its size minus the kept cells' span."""
        return tuple(self.hi[a] - (self.lo[a] // self.stride[a]) * self.stride[a] - self.stride[a]
                     for a in range(2))

    def min_tile(self) -> tuple[int, int]:
        """The smallest tile that keeps at least one cell."""
        return tuple(self.halo[a] + self.stride[a] for a in range(2))


# ------------------------------------------------------------------------------------------------ parsing


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value) -> int:
    """Bytes for '2GB', '512MiB', '1.5g', 2000000000.

    Raises:
        InputError: not a size.
    """
    if isinstance(value, (int, float)) and value > 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise InputError(f"--max-memory {value!r} is not a memory size", hint="write it as 2GB, 512MB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_tile(value) -> tuple[int, int] | str | None:
    """None, 'auto', or a tile size (height, width) from 768, '768' or '768x1024'.

    Raises:
        InputError: anything else.
    """
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, int):
        size = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        size = (int(value[0]), int(value[1]))
    else:
        parts = str(value).lower().replace("×", "x").split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) not in (1, 2):
            raise InputError(f"--tile {value!r} is not a size or 'auto'", hint="e.g. --tile 768, 768x1024 or auto")
        size = (nums[0], nums[-1])
    if min(size) < 1:
        raise InputError(f"--tile {value!r} must be positive", hint="e.g. --tile 768")
    return size


# ------------------------------------------------------------------------------------------------ cutting


def _cut_candidates(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes that are the only computed value live after them: the graph can be cut there into two halves."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    result = []
    for i, node in enumerate(nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        live = [m for m in nodes[: i + 1] if m.op != "get_attr" and last_use[m] > i]
        if live == [node]:
            result.append(node)
    return result


def _split(gm: torch.fx.GraphModule, cut: torch.fx.Node) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """(prefix, suffix): the prefix returns ``cut``, the suffix takes it as its input."""
    nodes = list(gm.graph.nodes)
    position = nodes.index(cut)
    head, env = torch.fx.Graph(), {}
    for node in nodes[: position + 1]:
        env[node] = head.node_copy(node, lambda n: env[n])
    head.output(env[cut])
    tail, env2 = torch.fx.Graph(), {}
    env2[cut] = tail.placeholder("features")
    for node in nodes[position + 1:]:
        for dep in node.all_input_nodes:  # constants read before the cut are read again after it
            if dep not in env2 and dep.op == "get_attr":
                env2[dep] = tail.node_copy(dep, lambda n: env2[n])
        env2[node] = tail.node_copy(node, lambda n: env2[n])
    prefix, suffix = torch.fx.GraphModule(gm, head, "TilePrefix"), torch.fx.GraphModule(gm, tail, "TileSuffix")
    for part in (prefix, suffix):
        part.graph.eliminate_dead_code()
        part.recompile()
        part.eval()
    return prefix, suffix


def _bounds(rf_centre, receptive_field) -> tuple[tuple[int, int], tuple[int, int]]:
    lo = tuple(math.floor(c - r / 2) for c, r in zip(rf_centre, receptive_field))
    hi = tuple(math.ceil(c + r / 2) for c, r in zip(rf_centre, receptive_field))
    return lo, hi


def check_tileable(geometry) -> None:
    """Raise ``InputError`` when tiles cannot reproduce the one-pass map exactly."""
    if geometry.size_dependent_padding:
        raise InputError("--tile: the network pads by an amount computed from the input size ('same' padding), "
                         "so a tile's grid does not line up with the whole image's",
                         hint="run without --tile (or with --scale below 1 to save memory)")
    if geometry.global_context:
        raise InputError("--tile: the network pools over the whole image inside its body (squeeze-excitation), "
                         "so every cell depends on every pixel and no tile can reproduce it",
                         hint="run without --tile (or with --scale below 1 to save memory)")
    if geometry.notes:
        raise InputError(f"--tile: the network's geometry is approximate ({geometry.notes[0]}), so the halo a "
                         "tile needs is unknown", hint="run without --tile")


def split_for_tiling(fcn: nn.Module, geometry, in_chans: int | None = None) -> TiledNetwork:
    """Cut ``fcn`` for tiling (see the module docstring); any module works, a converted one cuts best.

    Raises:
        InputError: the network cannot be tiled exactly (``check_tileable``).
    """
    check_tileable(geometry)
    whole_lo, whole_hi = _bounds(geometry.rf_centre, geometry.receptive_field)
    whole = TiledNetwork(fcn, None, tuple(geometry.stride), whole_lo, whole_hi, "output")
    gm = getattr(fcn, "net", fcn)
    if not isinstance(gm, torch.fx.GraphModule):
        return whole
    try:
        best = _best_cut(gm, geometry, in_chans or getattr(fcn, "in_chans", None))
    except Exception as exc:  # a graph the cut search does not understand: tile the whole network
        _logger.info("no cut for tiling (%s: %s); tiling the whole network", type(exc).__name__, exc)
        best = None
    return best or whole


def _best_cut(gm: torch.fx.GraphModule, geometry, in_chans: int | None) -> TiledNetwork | None:
    from fcnify.convert.geometry import compute_geometry
    from fcnify.convert.trace import propagate_shapes

    param = next(gm.parameters(), None)
    if in_chans is None:
        conv = next((m for m in gm.modules() if isinstance(m, nn.Conv2d)), None)
        in_chans = conv.in_channels if conv is not None else 3
    example = torch.zeros(1, in_chans, *geometry.window,
                          dtype=param.dtype if param is not None else torch.float32,
                          device=param.device if param is not None else "cpu")
    candidates = [c for c in _cut_candidates(gm)
                  if len(getattr(c.meta.get("tensor_meta"), "shape", (0, 0, 0, 0))) == 4]

    def geometry_at(cut):
        prefix, suffix = _split(gm, cut)
        propagate_shapes(prefix, example)
        return prefix, suffix, compute_geometry(prefix, tuple(geometry.window), False)

    # Strides only grow along the graph: find the first candidate at the full stride by bisection.
    low, high = 0, len(candidates)
    while low < high:
        mid = (low + high) // 2
        stride = geometry_at(candidates[mid])[2].stride
        if all(a >= b for a, b in zip(stride, geometry.stride)):
            high = mid
        else:
            low = mid + 1
    for cut in candidates[low:]:
        prefix, suffix, g = geometry_at(cut)
        if tuple(g.stride) != tuple(geometry.stride) or g.notes or g.size_dependent_padding:
            continue
        lo, hi = _bounds(g.rf_centre, g.receptive_field)
        _logger.info("tiling cut at node '%s': receptive field %s (whole network %s)", cut.name,
                     g.receptive_field, geometry.receptive_field)
        return TiledNetwork(prefix, suffix, tuple(g.stride), lo, hi, cut.name)
    return None


# ------------------------------------------------------------------------------------------------ planning


def _plan_axis(length: int, tile: int, stride: int, lo: int, hi: int, cells: int) -> list[Span]:
    spans: list[Span] = []
    first = 0
    while first < cells:
        # Aligned to the stride so that every layer's grid in the tile is the whole image's grid, shifted.
        start = max(0, first * stride + (lo // stride) * stride)
        stop = start + tile
        if stop >= length:
            spans.append(Span(start, length, first, cells))
            break
        last = min((stop - hi) // stride, cells - 1)  # the last cell whose receptive field ends in the tile
        if last < first:
            raise InputError(f"--tile {tile} is smaller than the {hi - lo} px receptive field plus a stride",
                             hint=f"use a tile of at least {hi - (lo // stride) * stride} px, or --tile auto")
        spans.append(Span(start, stop, first, last + 1))
        first = last + 1
    return spans


def _map_size(module: nn.Module, in_chans: int, height: int, width: int) -> tuple[tuple[int, ...], torch.dtype]:
    """The output shape of ``module`` for an image, without computing it (fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            out = module(torch.empty(1, in_chans, height, width, dtype=dtype))
    except Exception as exc:
        raise InputError(f"--tile: cannot work out the network's map size at {height}x{width}: "
                         f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}",
                         hint="tiling needs a PyTorch network (not ONNX); run without --tile") from exc
    return tuple(out.shape), out.dtype


def plan_tiles(tiled: TiledNetwork, image_size: tuple[int, int], tile: tuple[int, int],
               in_chans: int = 3) -> TilePlan:
    """The tiles of an image: origins multiples of the stride, each keeping the cells it computes exactly.

    Raises:
        InputError: a tile too small for the receptive field.
    """
    shape, _ = _map_size(tiled.prefix, in_chans, *image_size)
    cells = shape[-2:]
    rows = _plan_axis(image_size[0], tile[0], tiled.stride[0], tiled.lo[0], tiled.hi[0], cells[0])
    cols = _plan_axis(image_size[1], tile[1], tiled.stride[1], tiled.lo[1], tiled.hi[1], cells[1])
    return TilePlan(tuple(rows), tuple(cols), (int(cells[0]), int(cells[1])))


# ------------------------------------------------------------------------------------------------ running


def tiled_logits(tiled: TiledNetwork, image: torch.Tensor, tile: tuple[int, int], run: Callable,
                 batch_size: int = 1, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The network's map of one C×H×W image, computed tile by tile.

    Args:
        tiled: the cut network (``split_for_tiling``).
        image: C×H×W input.
        tile: the tile size (height, width) in input pixels.
        run: ``run(module, batch) -> N×C'×h×w`` float32 on the CPU (device, precision, inference mode).
        batch_size: tiles of the same size run together, at most this many.
        progress: called as ``progress(tiles_done, tiles_total)``.

    Returns:
        1×K×h×w, equal to ``run(fcn, image[None])`` up to float rounding.
    """
    in_chans, height, width = image.shape
    plan = plan_tiles(tiled, (height, width), tile, in_chans)
    _logger.info("%d tiles (%d×%d) for a %dx%d image: %.2f× the pixels of one pass", plan.count, len(plan.rows),
                 len(plan.cols), height, width, plan.input_pixels() / (height * width))
    groups: dict[tuple[int, int], list[tuple[Span, Span]]] = {}
    for r in plan.rows:
        for c in plan.cols:
            groups.setdefault((r.stop - r.start, c.stop - c.start), []).append((r, c))
    stitched = None
    done = 0
    sy, sx = tiled.stride
    for spans in groups.values():
        for begin in range(0, len(spans), max(1, batch_size)):
            chunk = spans[begin:begin + max(1, batch_size)]
            batch = torch.stack([image[:, r.start:r.stop, c.start:c.stop] for r, c in chunk])
            out = run(tiled.prefix, batch)
            if stitched is None:
                stitched = out.new_empty(1, out.shape[1], *plan.map_size)
            for k, (r, c) in enumerate(chunk):
                r0, c0 = r.first - r.start // sy, c.first - c.start // sx
                stitched[0, :, r.first:r.last, c.first:c.last] = \
                    out[k, :, r0:r0 + r.last - r.first, c0:c0 + c.last - c.first]
            del batch, out
            done += len(chunk)
            if progress is not None:
                progress(done, plan.count)
    if tiled.suffix is None:
        return stitched
    return run(tiled.suffix, stitched)


# ------------------------------------------------------------------------------------------------ memory


class _PeakMeter(torch.fx.Interpreter):
    """Runs a graph and records the most bytes its live tensors held at once (values freed after last use)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.peak = 0

    def run_node(self, node):
        result = super().run_node(node)
        storages = {}
        for value in list(self.env.values()) + [result]:
            for t in _tensors(value):
                if node.op != "get_attr":
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        params = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        params |= {b.untyped_storage().data_ptr() for b in self.module.buffers()}
        live = sum(v for k, v in storages.items() if k not in params)
        self.peak = max(self.peak, live)
        return result


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def _peak_bytes(module: nn.Module, x: torch.Tensor) -> int:
    with torch.inference_mode():
        if isinstance(module, torch.fx.GraphModule):
            meter = _PeakMeter(module)
            meter.run(x)
            return meter.peak
        out = module(x)
        return x.nbytes + out.nbytes


@dataclass(frozen=True)
class MemoryModel:
    """Bytes ≈ fixed + per_pixel · pixels for the prefix; the suffix per prefix cell; the weights."""

    fixed: float
    per_pixel: float
    suffix_per_cell: float
    weights: int

    def tile_bytes(self, tile: tuple[int, int], batch: int = 1) -> float:
        return _WORKSPACE_FACTOR * (self.fixed + self.per_pixel * tile[0] * tile[1] * batch)


def memory_model(tiled: TiledNetwork, in_chans: int, window: tuple[int, int]) -> MemoryModel:
    """Measure the activation memory of the prefix at two probe sizes (and of the suffix), to extrapolate."""
    param = next(tiled.prefix.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    base = [max(w, t) for w, t in zip(window, tiled.min_tile())]
    sizes = [tuple(b + k * s for b, s in zip(base, tiled.stride)) for k in (1, 5)]
    peaks, suffix_rate = [], 0.0
    for size in sizes:
        x = torch.zeros(1, in_chans, *size, dtype=dtype, device=device)
        peaks.append(_peak_bytes(tiled.prefix, x))
        if tiled.suffix is not None:
            with torch.inference_mode():
                features = tiled.prefix(x)
            cells = features.shape[-2] * features.shape[-1]
            suffix_rate = max(suffix_rate, (_peak_bytes(tiled.suffix, features) + features.nbytes) / cells)
    pixels = [s[0] * s[1] for s in sizes]
    per_pixel = max((peaks[1] - peaks[0]) / (pixels[1] - pixels[0]), peaks[1] / pixels[1] * 0.5)
    fixed = max(0.0, peaks[1] - per_pixel * pixels[1])
    weights = sum(p.numel() * p.element_size() for p in tiled.prefix.parameters())
    if tiled.suffix is not None:
        weights += sum(p.numel() * p.element_size() for p in tiled.suffix.parameters())
    return MemoryModel(fixed, per_pixel, suffix_rate, weights)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def choose_tile(tiled: TiledNetwork, image_size: tuple[int, int], budget: int, in_chans: int,
                window: tuple[int, int], batch_size: int = 1,
                model: MemoryModel | None = None) -> tuple[int, int] | None:
    """The largest tile whose estimated memory fits ``budget`` bytes, or None when one pass fits.

    The estimate counts the weights, the tile's live activations (measured on a probe run, scaled by pixels,
    ×1.5 for convolution workspaces), and the stitched map and suffix, which grow with the image.

    Raises:
        InputError: not even the smallest tile fits.
    """
    model = model or memory_model(tiled, in_chans, window)
    cells = math.ceil(image_size[0] / tiled.stride[0]) * math.ceil(image_size[1] / tiled.stride[1])
    fixed = model.weights + model.suffix_per_cell * cells
    if fixed + model.tile_bytes(image_size) <= budget:
        _logger.info("--tile auto: one pass fits the %s budget", _mb(budget))
        return None
    smallest = tiled.min_tile()
    best = None
    m = 1
    while True:
        # A tile of halo + m strides keeps exactly m cells per axis in the interior: no wasted pixels.
        size = tuple(min(tiled.halo[a] + m * tiled.stride[a], image_size[a]) for a in range(2))
        if fixed + model.tile_bytes(size, batch_size) > budget:
            break
        best = size
        if size == tuple(image_size):
            break
        m += 1
    if best is None:
        need = fixed + model.tile_bytes(smallest, batch_size)
        raise InputError(f"--max-memory {_mb(budget)} is too small: even a {smallest[0]}x{smallest[1]} tile "
                         f"needs about {_mb(need)}", hint=f"allow at least {_mb(need * 1.1)}")
    _logger.info("--tile auto: %dx%d tiles for a %s budget", best[0], best[1], _mb(budget))
    return best
