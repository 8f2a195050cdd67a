"""Where each output cell looks in the input: stride, offset, window and receptive field, computed from the graph.

Receptive-field arithmetic (Araujo et al., Distill 2019) per op: a k×k op with stride s, padding p and
dilation d on a map with jump j, first-cell centre c and receptive field r gives
``r' = r + (d(k-1))·j``, ``c' = c + (d(k-1)/2 - p)·j``, ``j' = j·s``. Element-wise ops and merges keep the
geometry of their spatial inputs. Every node whose spatial size changes without a known rule makes the
geometry approximate, and the reason is kept.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import torch
import torch.fx
from torch import nn

from fcnify.convert.analysis import Kind, analyse
from fcnify.convert.ops import node_arg, op_name, pair, window_params
from fcnify.convert.trace import shape_of
from fcnify.introspect import placement

__all__ = ["compute_geometry", "Geometry", "SizeStep"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SizeStep:
    """One op on the way from the input to the map that changes its size (per axis y, x).

    ``kind`` is ``"window"`` (a convolution or pool: effective kernel ``extent`` = dilation·(k−1)+1, ``stride``,
    zero padding ``pad_before``/``pad_after``, ``ceil`` mode as PyTorch and ONNX pools count it), ``"same"``
    (TensorFlow-style padding computed from the input size: ⌈size / stride⌉) or ``"refine"`` (the dilation
    rewrite: ``stride`` fine cells per native cell, cropped to the last whole ``extent`` window, see
    ``fcnify.convert.dilate``; ``pad_before`` holds the fine stride).
    """

    kind: str
    extent: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pad_before: tuple[int, int] = (0, 0)
    pad_after: tuple[int, int] = (0, 0)
    ceil: bool = False

    def apply(self, size: int, image: int, axis: int) -> int:
        """Cells along ``axis`` after this op, for ``size`` cells before it and an input image of ``image`` px."""
        e, s, before, after = self.extent[axis], self.stride[axis], self.pad_before[axis], self.pad_after[axis]
        if self.kind == "same":
            return -(-size // s)
        if self.kind == "refine":  # k fine cells per native cell, kept up to the last whole window (≥ (n−1)k+1)
            total = size * s
            return min(total, max(total - s + 1, (image - e) // before + 1))
        span = size + before + after - e
        if span < 0:
            return 0
        if not self.ceil:
            return span // s + 1
        cells = -(-span // s) + 1
        # PyTorch and ONNX: the last window must start inside the input or its leading padding.
        return cells - 1 if (cells - 1) * s >= size + before else cells

    @property
    def keeps_size(self) -> bool:
        """Whether the op leaves every size unchanged (stride 1, padding that makes up for the kernel)."""
        return self.kind == "window" and self.stride == (1, 1) and all(
            b + a == e - 1 for b, a, e in zip(self.pad_before, self.pad_after, self.extent))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "extent": list(self.extent), "stride": list(self.stride),
                "pad_before": list(self.pad_before), "pad_after": list(self.pad_after), "ceil": self.ceil}

    @classmethod
    def from_dict(cls, data: dict) -> SizeStep:
        return cls(str(data["kind"]), tuple(data["extent"]), tuple(data["stride"]), tuple(data["pad_before"]),
                   tuple(data["pad_after"]), bool(data.get("ceil", False)))


@dataclass(frozen=True)
class Geometry:
    """How the cells of a dense score map relate to the input image (all (y, x) in input pixels).

    Cell (i, j) covers the window of size ``window`` whose top-left corner is ``offset + (i, j) * stride``.

    Attributes:
        stride: input pixels between neighbouring cells.
        offset: top-left corner of cell (0, 0)'s window.
        window: the training input size: each cell is the classifier applied to one such window.
        receptive_field: input pixels that can influence one cell (padding included).
        rf_centre: centre of cell (0, 0)'s receptive field, relative to the window's top-left corner. Padded
            networks are not centred on their window (ResNets at 224 px: 96.5, not 112).
        padded: some op pads its input, so cells near the border (and, in general, all cells) see zeros
            where the crop would see image: dense cells approximate crop-by-crop results.
        global_context: the body pools over the whole map (squeeze-excitation): at sizes above the training
            size each cell sees image-wide context, unlike a crop.
        size_dependent_padding: "same" padding computed from the input size (TensorFlow-style models): the
            grid alignment depends on the input size.
        notes: reasons the geometry is approximate.
        size_steps: the size-changing ops from the input to the map, in order (``SizeStep``): the map's size
            for any input follows from them as a one-pass forward gives it (None: not known, e.g. a file
            written before fcnify recorded them).
        partial_windows: ceil-mode pools whose last window hangs over the training-size edge: at the training
            size it holds fewer pixels, in a dense pass it sees image the crop does not have, so dense cells
            approximate crops. Each cell still depends only on its receptive field (tiling stays exact).
    """

    stride: tuple[int, int]
    offset: tuple[int, int]
    window: tuple[int, int]
    receptive_field: tuple[int, int]
    rf_centre: tuple[float, float] = (0.0, 0.0)
    padded: bool = False
    global_context: bool = False
    size_dependent_padding: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    size_steps: tuple[SizeStep, ...] | None = None
    partial_windows: tuple[str, ...] = field(default_factory=tuple)

    @property
    def exact(self) -> bool:
        """Whether every dense cell equals the original classifier on its window (up to rounding)."""
        return not (self.padded or self.global_context or self.size_dependent_padding or self.notes
                    or self.partial_windows)

    def map_size(self, height: int, width: int) -> tuple[int, int]:
        """Cells of the score map a one-pass forward gives for an input of ``height`` × ``width``.

        From ``size_steps`` (every runtime and file format gets the same count, padded cells at the border
        included); without them, the cells whose window lies in the input (``valid_map_size``).
        """
        if self.size_steps is None:
            return self.valid_map_size(height, width)
        sizes = [int(height), int(width)]
        for step in self.size_steps:
            sizes = [max(0, step.apply(sizes[a], (height, width)[a], a)) for a in range(2)]
        return tuple(sizes)

    def valid_map_size(self, height: int, width: int) -> tuple[int, int]:
        """Cells whose receptive field (or window) lies inside a ``height`` × ``width`` input (exact for
        padding-free networks).

        A network may ignore the last rows of its window (floor-mode pooling): cells then need only the
        receptive field inside the image, so the count uses the smaller of the two extents.
        """
        extent = [min(w, r) for w, r in zip(self.window, self.receptive_field)]
        return tuple(max(0, (size - e) // s + 1) for size, e, s in zip((height, width), extent, self.stride))

    def window_origin(self, i: int, j: int) -> tuple[int, int]:
        return (self.offset[0] + i * self.stride[0], self.offset[1] + j * self.stride[1])

    def window_centre(self, i: int, j: int) -> tuple[float, float]:
        y, x = self.window_origin(i, j)
        return (y + self.window[0] / 2, x + self.window[1] / 2)

    def to_dict(self) -> dict:
        return {
            "stride": list(self.stride), "offset": list(self.offset), "window": list(self.window),
            "receptive_field": list(self.receptive_field), "rf_centre": list(self.rf_centre), "padded": self.padded,
            "global_context": self.global_context, "size_dependent_padding": self.size_dependent_padding,
            "exact": self.exact, "notes": list(self.notes), "partial_windows": list(self.partial_windows),
            "size_steps": None if self.size_steps is None else [step.to_dict() for step in self.size_steps],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(
            stride=tuple(data["stride"]), offset=tuple(data["offset"]), window=tuple(data["window"]),
            receptive_field=tuple(data["receptive_field"]), rf_centre=tuple(data.get("rf_centre", (0.0, 0.0))),
            padded=bool(data.get("padded", False)),
            global_context=bool(data.get("global_context", False)),
            size_dependent_padding=bool(data.get("size_dependent_padding", False)),
            notes=tuple(data.get("notes", ())), partial_windows=tuple(data.get("partial_windows", ())),
            size_steps=None if data.get("size_steps") is None
            else tuple(SizeStep.from_dict(step) for step in data["size_steps"]),
        )

    def refined(self, output_stride: int) -> Geometry:
        """The geometry of the dilation rewrite's map (``fcnify.convert.dilate``): stride ``output_stride``,
        ``native stride / output_stride`` cells per native cell."""
        steps = self.size_steps
        if steps is not None:
            factor = tuple(int(s) // int(output_stride) for s in self.stride)
            steps = (*steps, SizeStep("refine", tuple(int(w) for w in self.window), factor,
                                      (int(output_stride),) * 2))
        return replace(self, stride=(int(output_stride),) * 2, size_steps=steps)


@dataclass
class _Cell:
    jump: tuple[float, float]
    centre: tuple[float, float]
    rf: tuple[float, float]
    steps: tuple[SizeStep, ...] | None = ()  # None: a size change on the way that fcnify cannot follow


@dataclass
class _Flags:
    padded: bool = False
    global_context: bool = False
    size_dependent_padding: bool = False
    notes: list[str] = field(default_factory=list)
    partial_windows: list[str] = field(default_factory=list)


def _window_params(node: torch.fx.Node, name: str, module: nn.Module | None, in_hw, flags: _Flags):
    """(kernel, stride, padding (top, left), dilation, size step) of a conv or pool node, or None when unknown."""
    op = window_params(node, name, module)
    if op is None:
        return None
    k, s, d = op.kernel, op.stride, op.dilation
    extent = tuple(dd * (kk - 1) + 1 for kk, dd in zip(k, d))
    if module is not None and type(module).__name__.endswith("Same"):  # timm Conv2dSame / MaxPool2dSame
        flags.size_dependent_padding = True  # they pad from the input size: the top/left share, here
        p = tuple(max((math.ceil(i / st) - 1) * st + (kk - 1) * dd + 1 - i, 0) // 2
                  for i, kk, st, dd in zip(in_hw, k, s, d))
        step = SizeStep("same", extent, tuple(s))
    else:
        p = pair(op.explicit_padding())
        step = SizeStep("window", extent, tuple(s), p, p, op.ceil_mode)
    if any(p):
        flags.padded = True
    if op.ceil_mode and in_hw and all(in_hw):
        # A ceil-mode pool adds a last window that hangs over the edge when the map does not divide evenly.
        # At the training size that window holds fewer pixels; in a dense pass the same window lies inside the
        # larger image and sees pixels the crop does not have.
        overhang = [(-(i + 2 * pp - dd * (kk - 1) - 1)) % st for i, pp, kk, st, dd in zip(in_hw, p, k, s, d)]
        if any(overhang):
            flags.partial_windows.append(
                f"ceil-mode pool '{node.name}' (kernel {k[0]}×{k[1]}, stride {s[0]}×{s[1]}) has a partial window at "
                f"the training-size edge ({overhang[0]}×{overhang[1]} positions of its {in_hw[0]}×{in_hw[1]} input "
                "missing): there a dense cell sees image that the crop does not")
    return k, s, p, d, step


def _then(steps: tuple[SizeStep, ...] | None, step: SizeStep | None) -> tuple[SizeStep, ...] | None:
    """``steps`` followed by ``step`` (ops that keep every size are left out; None stays None)."""
    if steps is None or step is None:
        return None
    return steps if step.keeps_size else (*steps, step)


_WINDOW_OPS = {"conv2d", "max_pool2d", "avg_pool2d"}


def _hw(shape, dims):
    if shape is None or dims is None or len(shape) <= max(dims):
        return None
    return (shape[dims[0]], shape[dims[1]])


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def compute_geometry(gm: torch.fx.GraphModule, input_size: tuple[int, int], global_context: bool,
                     output: torch.fx.Node | None = None) -> Geometry:
    """Geometry of a converted, shape-propagated GraphModule's N×K×h×w map.

    Args:
        output: the node of the output to describe, for a network with several (default: the graph's output,
            a single map). Only the ops it depends on count: heads branching at different depths differ.
    """
    info = analyse(gm).info
    modules = dict(gm.named_modules())
    if output is None:
        output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    used = _ancestors(output) if isinstance(output, torch.fx.Node) else set()
    # Global context counts for this output unless the converted graph shows it elsewhere only.
    context_nodes = {n for n, i in info.items() if i.context}
    flags = _Flags(global_context=global_context and (not context_nodes or bool(context_nodes & used)))
    cells: dict[torch.fx.Node, _Cell] = {}
    output_cell = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            cells[node] = _Cell((1.0, 1.0), (0.5, 0.5), (1.0, 1.0), ())
            continue
        if node not in used:
            continue
        inputs = [cells[n] for n in node.all_input_nodes if n in cells]
        if not inputs or info[node].kind is not Kind.SPATIAL:
            continue
        src_node = next(n for n in node.all_input_nodes if n in cells)
        in_hw, out_hw = _hw(shape_of(src_node), info[src_node].spatial_dims), _hw(shape_of(node), info[node].spatial_dims)
        name = op_name(node, modules)
        module = modules.get(node.target) if node.op == "call_module" else None
        if name in _WINDOW_OPS or (module is not None and isinstance(module, (nn.Conv2d, nn.MaxPool2d,
                                                                               nn.AvgPool2d))):
            params = _window_params(node, name, module, in_hw or (0, 0), flags)
            if params is not None:
                (k, s, p, d, step), c = params, inputs[0]
                eff = [dd * (kk - 1) for kk, dd in zip(k, d)]
                cells[node] = _Cell(
                    tuple(c.jump[i] * s[i] for i in range(2)),
                    tuple(c.centre[i] + (eff[i] / 2 - p[i]) * c.jump[i] for i in range(2)),
                    tuple(c.rf[i] + eff[i] * c.jump[i] for i in range(2)),
                    _then(c.steps, step),
                )
                continue
        if name == "pad":
            pads = node_arg(node, 1, "pad")
            if isinstance(pads, (tuple, list)) and len(pads) >= 4 and all(isinstance(v, int) for v in pads):
                c = inputs[0]
                flags.padded = True
                pad_step = SizeStep("window", pad_before=(pads[2], pads[0]), pad_after=(pads[3], pads[1]))
                cells[node] = _Cell(c.jump, (c.centre[0] - pads[2] * c.jump[0], c.centre[1] - pads[0] * c.jump[1]),
                                    c.rf, _then(c.steps, pad_step))
                continue
        if in_hw is None or out_hw is None or in_hw == out_hw:
            if _is_opaque(node, modules):
                flags.notes.append(f"node '{node.name}' ({name}) is opaque to fcnify; it is assumed to look only "
                                   "at nearby positions")
            cells[node] = _merge(inputs, node, flags)
            continue
        # An opaque op (an untraceable leaf module): measure how its output grows with its input.
        flags.notes.append(f"node '{node.name}' ({name}) is opaque to fcnify; its geometry was measured")
        cells[node] = _probe_opaque(node, modules.get(node.target) if node.op == "call_module" else None,
                                    inputs[0], shape_of(src_node), in_hw, out_hw)
    output_cell = cells.get(output) if isinstance(output, torch.fx.Node) else None
    if output_cell is None:
        output_cell = _Cell((1.0, 1.0), (input_size[0] / 2, input_size[1] / 2), tuple(map(float, input_size)),
                            None)
        flags.notes.append("the output is not a spatial map")
    # At the training size the single cell is the classifier on the whole input, and an input grown by n
    # strides adds n cells whose windows shift by n strides (every stride divides the total stride), so
    # the window of cell (0, 0) starts at the origin; the RF centre says where inside it the net looks.
    offset = (0, 0)
    return Geometry(
        stride=tuple(int(round(v)) for v in output_cell.jump), offset=offset, window=tuple(input_size),
        receptive_field=tuple(int(round(v)) for v in output_cell.rf),
        rf_centre=tuple(float(v) for v in output_cell.centre), padded=flags.padded,
        global_context=flags.global_context, size_dependent_padding=flags.size_dependent_padding,
        notes=tuple(dict.fromkeys(flags.notes)), partial_windows=tuple(dict.fromkeys(flags.partial_windows)),
        size_steps=_checked_steps(output_cell.steps, input_size),
    )


def _checked_steps(steps: tuple[SizeStep, ...] | None, input_size: tuple[int, int]) -> tuple[SizeStep, ...] | None:
    """The size steps, when they give the one cell the classifier is at its training size (else None: the
    map's size is then counted by running the network)."""
    if steps is None:
        return None
    probe = Geometry((1, 1), (0, 0), tuple(input_size), tuple(input_size), size_steps=steps)
    if probe.map_size(*input_size) != (1, 1):
        _logger.info("size steps give %s cells at the training size, not 1×1: not kept", probe.map_size(*input_size))
        return None
    return steps


_TORCH_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def _is_opaque(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An op fcnify cannot see into: a leaf module from outside torch.nn, or a wrapped non-torch function."""
    if node.op == "call_module":  # subclasses of torch.nn layers (timm's BatchNormAct2d) are known
        return not any(cls.__module__.startswith("torch.nn") and cls is not nn.Module
                       for cls in type(modules[node.target]).__mro__)
    if node.op == "call_function":
        return str(getattr(node.target, "__module__", "") or "torch").split(".")[0] not in _TORCH_MODULES
    return False


_PROBE_GROWTH = 32


def _probe_opaque(node, module, cell: _Cell, in_shape, in_hw, out_hw) -> _Cell:
    """Geometry of an opaque module, assuming no padding: stride from growth, kernel from the size lost."""
    stride = [max(1, round(i / o)) if o else 1 for i, o in zip(in_hw, out_hw)]
    if module is not None and in_shape is not None and len(in_shape) == 4:
        device, dtype = placement(module)
        probe = torch.zeros(1, in_shape[1], in_hw[0] + _PROBE_GROWTH, in_hw[1] + _PROBE_GROWTH, dtype=dtype,
                            device=device)
        try:
            with torch.no_grad():
                grown = module(probe).shape[-2:]
            stride = [max(1, round(_PROBE_GROWTH / max(1, g - o))) for g, o in zip(grown, out_hw)]
        except Exception:  # a module that only runs at one size: keep the ratio estimate
            pass
    kernel = [max(1, i - (o - 1) * s) for i, o, s in zip(in_hw, out_hw, stride)]
    return _Cell(tuple(cell.jump[i] * stride[i] for i in range(2)),
                 tuple(cell.centre[i] + (kernel[i] - 1) / 2 * cell.jump[i] for i in range(2)),
                 tuple(cell.rf[i] + (kernel[i] - 1) * cell.jump[i] for i in range(2)),
                 _then(cell.steps, SizeStep("window", tuple(kernel), tuple(stride))))


def _merge(inputs: list[_Cell], node: torch.fx.Node, flags: _Flags) -> _Cell:
    first = inputs[0]
    for other in inputs[1:]:
        if other.jump != first.jump:
            flags.notes.append(f"node '{node.name}' merges maps of different strides")
        elif other.centre != first.centre:
            flags.notes.append(f"node '{node.name}' merges maps whose cells are centred differently")
    return _Cell(first.jump, first.centre, tuple(max(c.rf[i] for c in inputs) for i in range(2)), first.steps)
