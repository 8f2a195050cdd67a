"""A finer output stride: the dilation ("à trous") rewrite of a converted network, and shift-and-stitch.

A converted network of stride ``s`` gives one cell every ``s`` input pixels. For an output stride ``S`` that
divides ``s``, ``dilate`` rewrites its graph (a torch.fx pass on a deep copy): once the cumulative stride
reaches ``S``, every later strided convolution or pool runs with stride 1, and every later kernel is dilated
by the factor ``D`` by which its input is finer than in the original (Yu & Koltun 2016; Chen et al.,
DeepLab). Paddings scale by ``D`` too, so that at the original grid positions every tap reads exactly the
value (or the padding) the original read: the fine map sampled every ``s / S`` cells is the original map.
The converted head is rewritten the same way: the k×k convolution from a Linear and the windowed pools are
dilated; an ``AvgPool2d`` has no dilation, so a dilated one becomes ``DilatedAvgPool2d`` (an average pool
over the space-to-batch view: one ordinary pool per phase of the dilation). Global reductions in the body
(squeeze-excitation) average over the original grid positions only, so they see the values they saw before.

The rewrite refuses (``ConversionError``) what it cannot keep exact: size-dependent ("same") padding, opaque
modules with windows or resolution changes after the cut point, non-zero padding modes on dilated maps, and
any rewritten network whose fine map, sampled on the original grid, does not equal the original's map on a
check input.

``shift_and_stitch`` is the classic alternative: ``(s / S)²`` passes of the original network on the image
shifted by multiples of ``S``, interleaved. It needs no rewrite, but equals the dilated map only on
padding-free networks (shifting moves where the padding falls).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fcnify.convert.analysis import analyse
from fcnify.convert.geometry import is_opaque
from fcnify.convert.network import FullyConvolutionalNet
from fcnify.convert.ops import WindowParams, explicit_padding, node_arg, op_name, pair, window_params
from fcnify.convert.outputs import OutputInfo
from fcnify.convert.rules import Rewrite
from fcnify.convert.trace import propagate_shapes, shape_of
from fcnify.errors import ConversionError, first_line
from fcnify.introspect import placement

__all__ = ["DilatedAvgPool2d", "dilate", "shift_and_stitch"]

_logger = logging.getLogger(__name__)

_TOLERANCE = 1e-4


class DilatedAvgPool2d(nn.Module):
    """``AvgPool2d`` with stride 1 and a dilation (zero padding counted, as ``count_include_pad=True``).

    The map is split into its ``dilation`` phases (space-to-batch), each phase is average-pooled with the
    plain kernel, and the phases are interleaved back: the same windows as a dilated pool, at the cost of an
    ordinary pool.
    """

    def __init__(self, kernel_size, dilation, padding=0, divisor_override: int | None = None):
        super().__init__()
        self.kernel_size, self.dilation, self.padding = pair(kernel_size), pair(dilation), pair(padding)
        self.divisor_override = divisor_override

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (dy, dx), (py, px) = self.kernel_size, self.dilation, self.padding
        if py or px:
            x = F.pad(x, (px, px, py, py))
        n, c, h, w = x.shape
        hp, wp = -(-h // dy) * dy, -(-w // dx) * dx
        if (hp, wp) != (h, w):  # rows past the map only reach outputs that are cropped below
            x = F.pad(x, (0, wp - w, 0, hp - h))
        phases = x.reshape(n, c, hp // dy, dy, wp // dx, dx).permute(0, 1, 3, 5, 2, 4)
        phases = phases.reshape(n, c * dy * dx, hp // dy, wp // dx)
        pooled = F.avg_pool2d(phases, (kh, kw), stride=1, divisor_override=self.divisor_override)
        ph, pw = pooled.shape[-2:]
        out = pooled.reshape(n, c, dy, dx, ph, pw).permute(0, 1, 4, 2, 5, 3).reshape(n, c, ph * dy, pw * dx)
        return out[:, :, : h - (kh - 1) * dy, : w - (kw - 1) * dx]

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, dilation={self.dilation}, padding={self.padding}"


def _refuse(node: torch.fx.Node, why: str, hint: str | None = None) -> ConversionError:
    return ConversionError(f"--output-stride: cannot dilate node '{node.name}': {why}",
                           hint=hint or "use the native stride, or shift_and_stitch for a finer grid")


_WINDOWED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
             nn.AdaptiveMaxPool2d, nn.Upsample)
_GLOBAL_REDUCTIONS = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "mean", "amax", "sum", "max", "nanmean"}


def _has_window(module: nn.Module) -> bool:
    for sub in module.modules():
        if isinstance(sub, _WINDOWED) and not (
                isinstance(sub, nn.Conv2d) and sub.kernel_size == (1, 1) and sub.stride == (1, 1)):
            return True
    return False


class NativeWindow(NamedTuple):
    """The original window op's parameters, passed to ``_fit_length``/``_ceil_pad`` in the graph (a tuple)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool


@dataclass
class _Grid:
    """Where a spatial value of the graph lies: ``jump`` is its original cumulative stride, ``fine`` how many
    times finer than the original it is after the rewrite (1: unchanged)."""

    jump: tuple[int, int]
    fine: tuple[int, int]


def dilate(fcn, output_stride: int):
    """A new ``FullyConvolutionalNet`` whose map has stride ``output_stride`` (the input is not modified).

    Its geometry is the original's with ``stride`` = ``output_stride`` (window, offset and receptive field
    unchanged); ``fine[..., ::k, ::k]`` (``k`` = native stride / ``output_stride``) equals the original map.

    Raises:
        ConversionError: a stride that does not divide the native one, size-dependent padding, or a node the
            rewrite cannot keep exact (named, with the reason).
    """
    geometry = fcn.geometry
    native = tuple(int(v) for v in geometry.stride)
    target = int(output_stride)
    _check_output_stride(output_stride, native)
    if all(s == target for s in native):
        return fcn
    names = getattr(fcn, "output_names", ())
    if len(names) > 1:  # each output's crop and stride check would differ: one output only, for now
        raise ConversionError(f"--output-stride works on networks with one output; this one has {len(names)} "
                              f"({', '.join(names)})",
                              hint="leave --output-stride out, or wrap the model so forward() returns one output")
    if geometry.size_dependent_padding:
        raise ConversionError("--output-stride: the network pads by an amount computed from the input size "
                              "('same' padding), which has no dilated equivalent",
                              hint="use the native stride, or shift_and_stitch")
    rewrite = _DilationPass(fcn, target)
    gm = rewrite.run()
    _crop_output(gm, tuple(n // target for n in native), tuple(int(v) for v in geometry.window), target)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.eval()
    geo = geometry.refined(target)
    outputs = [OutputInfo(fcn.selected, fcn.channels[fcn.selected], geo)] if hasattr(fcn, "selected") else None
    result = FullyConvolutionalNet(gm, geo, fcn.input_size, fcn.in_chans, list(fcn.rewrites) + rewrite.rewrites,
                                   outputs=outputs)
    result = result.eval()
    _check(fcn, result, rewrite.example)
    _logger.info("output stride %d: %d layers rewritten", target, len(rewrite.rewrites))
    return result


def _check_output_stride(output_stride, native: tuple[int, int]) -> None:
    if int(output_stride) < 1 or any(s % int(output_stride) for s in native):
        raise ConversionError(f"--output-stride {output_stride} does not divide the network's stride "
                              f"{native[0]}×{native[1]}",
                              hint="choose a divisor, e.g. " + ", ".join(
                                  str(d) for d in range(1, native[0]) if native[0] % d == 0 and native[1] % d == 0))


class _DilationPass:
    """One walk over a deep copy of the converted graph, in order: each node either keeps its grid (before the
    cut point), becomes a stride-1 dilated window op (``_window_op``), or follows a finer map (``_after_cut``)."""

    def __init__(self, fcn, target: int):
        self.target = target
        self.gm: torch.fx.GraphModule = copy.deepcopy(fcn.net)
        device, dtype = placement(self.gm)
        self.example = torch.zeros(1, fcn.in_chans, *fcn.input_size, dtype=dtype, device=device)
        propagate_shapes(self.gm, self.example)
        self.info = analyse(self.gm).info
        self.modules = dict(self.gm.named_modules())
        self.uses: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                self.uses[node.target] = self.uses.get(node.target, 0) + 1
        self.grid: dict[torch.fx.Node, _Grid] = {}
        self.rewrites: list = []

    def record(self, node, old: str, new: str) -> None:
        src = node.all_input_nodes[0] if node.all_input_nodes else None
        self.rewrites.append(Rewrite(node.name, old, new, shape_of(src) if src is not None else None,
                                     shape_of(node)))

    def run(self) -> torch.fx.GraphModule:
        for node in list(self.gm.graph.nodes):
            if node.op == "placeholder":
                self.grid[node] = _Grid((1, 1), (1, 1))
                continue
            spatial = [n for n in node.all_input_nodes if n in self.grid]
            if not spatial or node.op == "output":
                continue
            src = spatial[0]
            name = op_name(node, self.modules)
            module = self.modules.get(node.target) if node.op == "call_module" else None
            in_dims = self.info[src].spatial_dims
            out_dims = self.info[node].spatial_dims if node in self.info else None
            shapes = (shape_of(src), shape_of(node))
            if name in ("conv2d", "max_pool2d", "avg_pool2d") and (
                    module is None or isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))):
                if in_dims not in (None, (2, 3)):
                    raise _refuse(node, "a window op on a map that is not N×C×H×W")
                self._window_op(node, name, module, self.grid[src])
            elif self.grid[src].fine == (1, 1) and all(self.grid[n].fine == (1, 1) for n in spatial):
                self._before_cut(node, name, self.grid[src], in_dims, out_dims, shapes)
            else:
                if any(self.grid[n].fine != self.grid[src].fine for n in spatial):
                    raise _refuse(node, "it merges maps that are not equally fine")
                self._after_cut(node, name, module, src, in_dims, out_dims, shapes, is_opaque)
        return self.gm

    def _window_op(self, node, name: str, module, grid_in: _Grid) -> None:
        """A convolution or pool: past the output stride it runs with stride 1, dilated by how much finer its
        input is; ``_fit_node`` keeps its map D positions per original position."""
        op = _window_params(node, name, module)
        j_in, d_in, target = grid_in.jump, grid_in.fine, self.target
        j_out = tuple(j * s for j, s in zip(j_in, op.stride))
        new_jump = tuple(min(j, target) for j in j_out)
        j_new_in = tuple(j // dd for j, dd in zip(j_in, d_in))
        if any(nj % jn for nj, jn in zip(new_jump, j_new_in)) or any(j % nj for j, nj in zip(j_out, new_jump)):
            raise _refuse(node, f"its stride {op.stride} does not split at output stride {target} (input stride "
                                f"{j_in})", hint="choose an output stride that is a product of the strides "
                                                 "of the first layers")
        new_stride = tuple(nj // jn for nj, jn in zip(new_jump, j_new_in))
        d_out = tuple(j // nj for j, nj in zip(j_out, new_jump))
        self.grid[node] = _Grid(j_out, d_out)
        if new_stride == op.stride and d_in == (1, 1):
            return
        if op.kernel == (1, 1) and op.padding in ((0, 0), "valid", "same") and new_stride == op.stride:
            return  # a 1×1 window reads one position whatever its dilation
        new_dil = tuple(dd * f for dd, f in zip(op.dilation, d_in))
        new_pad = _scaled_padding(node, op.padding, d_in, op.kernel)
        self.record(node, f"{name} k{op.kernel} s{op.stride} p{op.padding} d{op.dilation}",
                    f"s{new_stride} p{new_pad} d{new_dil}")
        x_in = node.args[0]
        new = _edit_window_op(self.gm, node, name, module, self.uses, op.kernel, new_stride, new_pad, new_dil,
                              op.extra)
        new = _fit_node(self.gm, new, x_in, _native(op), d_in, d_out, new_stride, new_pad, new_dil)
        if new is not node:
            self.grid[new] = self.grid[node]
            self.info[new] = self.info[node]
        self.modules = dict(self.gm.named_modules())

    def _before_cut(self, node, name: str, grid_in: _Grid, in_dims, out_dims, shapes) -> None:
        """Before the cut point nothing changes; follow the original strides to find it."""
        in_shape, out_shape = shapes
        if out_dims is not None and in_shape is not None and out_shape is not None and \
                tuple(in_shape[i] for i in in_dims) != tuple(out_shape[i] for i in out_dims):
            j_probe = _resolution_factor(in_shape, in_dims, out_shape, out_dims)
            if j_probe is None:
                raise _refuse(node, f"'{name}' changes the resolution ({in_shape} → {out_shape}) in a way "
                                    "fcnify cannot follow")
            self.grid[node] = _Grid(tuple(j * f for j, f in zip(grid_in.jump, j_probe)), (1, 1))
            if any(j > self.target for j in self.grid[node].jump):
                raise _refuse(node, f"'{name}' changes the resolution past the output stride and is not a "
                                    "convolution or pool that can be dilated")
            return
        if out_dims is not None:
            self.grid[node] = _Grid(grid_in.jump, (1, 1))

    def _after_cut(self, node, name: str, module, src, in_dims, out_dims, shapes, is_opaque) -> None:
        """A node on a finer map: global reductions read the original grid only, pads scale, and anything
        that could look at neighbouring positions or change the resolution is refused."""
        grid_in = self.grid[src]
        in_shape, out_shape = shapes
        if name in _GLOBAL_REDUCTIONS and out_dims is None:
            # Squeeze-excitation: reduce over the original grid positions only, as the original did.
            _subsample_input(self.gm, node, src, grid_in.fine)
            self.record(node, f"global {name}", f"{name} over every {grid_in.fine[0]}×{grid_in.fine[1]}th "
                                                "position (original grid)")
            return
        if name == "pad":
            _scale_pad(node, grid_in.fine)
            self.record(node, "pad", f"pad ×{grid_in.fine}")
            self.grid[node] = _Grid(grid_in.jump, grid_in.fine)
            return
        if module is not None and is_opaque(node, self.modules) and _has_window(module):
            raise _refuse(node, f"the opaque module {type(module).__name__} contains windowed layers that fcnify "
                                "cannot dilate", hint="make the module traceable, or use shift_and_stitch")
        if out_dims is None:
            if out_shape is not None and len(out_shape) == 4 and in_shape is not None:
                raise _refuse(node, f"'{name}' turns the map into a value fcnify cannot follow")
            return
        if in_shape is not None and out_shape is not None and \
                tuple(in_shape[i] for i in in_dims) != tuple(out_shape[i] for i in out_dims):
            raise _refuse(node, f"'{name}' changes the resolution ({tuple(in_shape)} → {tuple(out_shape)}) after "
                                "the cut point and is not a convolution or pool")
        if node.op == "call_function" and is_opaque(node, self.modules):
            raise _refuse(node, f"the opaque function '{name}' may look at neighbouring positions")
        self.grid[node] = _Grid(grid_in.jump, grid_in.fine)


def _resolution_factor(in_shape, in_dims, out_shape, out_dims):
    factors = []
    for i, o in zip((in_shape[d] for d in in_dims), (out_shape[d] for d in out_dims)):
        if o == 0 or i % o and i // o == 0:
            return None
        factors.append(max(1, round(i / o)))
    return tuple(factors)


def _window_params(node, name, module) -> WindowParams:
    op = window_params(node, name, module)
    if op is None:
        raise _refuse(node, "a convolution whose weight shape is unknown" if name == "conv2d" else
                      "a pool whose size is computed at run time")
    return op


def _native(op: WindowParams) -> NativeWindow:
    """The original window with explicit padding, as the graph's fitting functions need it."""
    return NativeWindow(op.kernel, op.stride, op.explicit_padding(), op.dilation, op.ceil_mode)


def _scaled_padding(node, p, d_in, k):
    if isinstance(p, str):
        if p == "same" and any(kk % 2 == 0 for kk in k) and d_in != (1, 1):
            raise _refuse(node, "'same' padding of an even kernel is asymmetric")
        return p  # 'same' pads by dilation × (k - 1) / 2, 'valid' by nothing: both stay aligned
    return tuple(pp * f for pp, f in zip(p, d_in))


def _edit_window_op(gm, node, name, module, uses, k, stride, padding, dilation, extra):
    padded = padding != (0, 0) and not isinstance(padding, str)
    if extra.get("padding_mode") and padded and dilation != (1, 1):
        raise _refuse(node, f"{extra['padding_mode']} padding on a dilated map reads other positions than "
                            "the original")
    if name == "avg_pool2d" and extra.get("ceil_mode"):
        raise _refuse(node, "a ceil-mode average pool (its last windows average fewer values)")
    if name == "avg_pool2d" and dilation != (1, 1):
        if stride != (1, 1):
            raise _refuse(node, "a dilated average pool with a stride")
        if padded and not extra.get("count_include_pad", True):
            raise _refuse(node, "a padded average pool that does not count the padding")
        pool = DilatedAvgPool2d(k, dilation, padding, extra.get("divisor_override"))
        target = _fresh_name(gm, f"dilated_{node.name}")
        gm.add_submodule(target, pool)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return new
    if module is not None:
        if uses.get(node.target, 0) > 1:  # a module shared by several nodes: give this node its own
            module = copy.deepcopy(module)
            new_target = _fresh_name(gm, f"dilated_{node.name}")
            gm.add_submodule(new_target, module)
            node.target = new_target
        module.stride = stride
        module.padding = padding
        module.dilation = dilation
        return node
    # Functional conv2d / max_pool2d / avg_pool2d (with dilation (1, 1) here: only the stride changed).
    args = list(node.args)
    kwargs = dict(node.kwargs)
    if name == "conv2d":
        positions = {"stride": 3, "padding": 4, "dilation": 5}
        values = {"stride": stride, "padding": padding, "dilation": dilation}
    elif name == "max_pool2d":
        positions = {"stride": 2, "padding": 3, "dilation": 4}
        values = {"stride": stride, "padding": padding, "dilation": dilation}
    else:
        positions = {"stride": 2, "padding": 3}
        values = {"stride": stride, "padding": padding}
    for key, index in positions.items():
        if len(args) > index:
            args[index] = values[key]
        else:
            kwargs[key] = values[key]
    node.args, node.kwargs = tuple(args), kwargs
    return node


def _native_length(length: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """PyTorch's output length of a conv/pool (ceil mode: the last window must start inside the input)."""
    span = length + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= length + p:
        out -= 1
    return max(out, 0)


def _fit_length(y: torch.Tensor, x: torch.Tensor, native, d_in, d_out, fine_pad) -> torch.Tensor:
    """Crop or zero-extend a fine map to ``D`` positions per original position.

    Every fine map keeps exactly ``D`` positions per position of the original map (the original length is
    then its length / D): positions past the last original one are read only by fine cells between
    original ones, and a read past the end of the original map falls past the end of the fine map, into
    its padding, as it did in the original. Without this, a fine map can be one original position longer
    or shorter (odd sizes, ceil-mode pools) and the padding would read real values.
    """
    k, s, p, dil, ceil = NativeWindow(*native)
    target = []
    for axis in range(2):
        length = x.shape[axis - 2] // d_in[axis]
        target.append(_native_length(length, k[axis], s[axis], p[axis], dil[axis], ceil) * d_out[axis])
    h, w = y.shape[-2:]
    if (h, w) == tuple(target):
        return y
    if h > target[0] or w > target[1]:
        y = y[:, :, : target[0], : target[1]]
    if y.shape[-2] < target[0] or y.shape[-1] < target[1]:
        y = F.pad(y, (0, target[1] - y.shape[-1], 0, target[0] - y.shape[-2]))
    return y


def _ceil_pad(x: torch.Tensor, native, d_in, d_out, stride, padding, dilation) -> torch.Tensor:
    """-inf on the right/bottom so that a max pool without ceil mode reaches the last ceil-mode window."""
    k, s, p, dil, _ = NativeWindow(*native)
    extra = []
    for axis in range(2):
        length = x.shape[axis - 2] // d_in[axis]
        last = (_native_length(length, k[axis], s[axis], p[axis], dil[axis], True) - 1) * d_out[axis]
        need = last * stride[axis] + dilation[axis] * (k[axis] - 1) + 1 - (x.shape[axis - 2] + 2 * padding[axis])
        extra.append(max(0, need))
    if not any(extra):
        return x
    return F.pad(x, (0, extra[1], 0, extra[0]), value=float("-inf"))


torch.fx.wrap("_fit_length")
torch.fx.wrap("_ceil_pad")


def _fit_node(gm, node, x_in, native: NativeWindow, d_in, d_out, stride, padding, dilation):
    """Insert ``_fit_length`` after ``node`` (and ``_ceil_pad`` before a ceil-mode max pool)."""
    padding = explicit_padding(padding, native.kernel, dilation)
    ceil_mode, native = native.ceil_mode, tuple(native)  # a plain tuple in the graph's arguments
    if ceil_mode:  # run without it on an input extended by -inf (max pools only; avg refused)
        modules = dict(gm.named_modules())
        if node.op == "call_module":
            modules[node.target].ceil_mode = False
        else:
            args = list(node.args)
            if len(args) > 5:
                args[5] = False
                node.args = tuple(args)
            else:
                node.kwargs = {**node.kwargs, "ceil_mode": False}
        with gm.graph.inserting_before(node):
            padded = gm.graph.call_function(_ceil_pad, (x_in, native, d_in, d_out, stride, padding, dilation))
        node.replace_input_with(x_in, padded)
    with gm.graph.inserting_after(node):
        fitted = gm.graph.call_function(_fit_length, (node, x_in, native, d_in, d_out, padding))
    node.replace_all_uses_with(fitted, delete_user_cb=lambda user: user is not fitted)
    return fitted


def _final_cells(y: torch.Tensor, x: torch.Tensor, k, window, stride: int) -> torch.Tensor:
    """Keep the fine cells up to the last whole window in the image, but at least those on the original grid.

    The fine map has ``k`` cells per original cell (``n·k``); it keeps ``max((n-1)·k + 1, (H - window) // S
    + 1)`` of them (at most ``n·k``): for a padding-free network, ``(H - window) // S + 1``, one per window.
    """
    keep = []
    for axis in range(2):
        total = y.shape[axis - 2]
        keep.append(min(total, max(total - k[axis] + 1, (x.shape[axis - 2] - window[axis]) // stride + 1)))
    if tuple(keep) == tuple(y.shape[-2:]):
        return y
    return y[:, :, : keep[0], : keep[1]]


torch.fx.wrap("_final_cells")


def _crop_output(gm, k, window, stride) -> None:
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    with gm.graph.inserting_before(output):
        cropped = gm.graph.call_function(_final_cells, (value, placeholder, k, window, stride))
    output.args = (cropped,)


def _fresh_name(gm, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _subsample_input(gm, node, src, d):
    with gm.graph.inserting_before(node):
        sub = gm.graph.call_function(
            _every_nth, (src, d[0], d[1]))
    node.replace_input_with(src, sub)


def _every_nth(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The original grid positions of a map that is ``(dy, dx)`` times finer."""
    return x[:, :, ::dy, ::dx]


torch.fx.wrap("_every_nth")


def _scale_pad(node, d):
    pads = node_arg(node, 1, "pad")
    mode = node_arg(node, 2, "mode", "constant")
    if mode != "constant" or not isinstance(pads, (tuple, list)) or not all(isinstance(v, int) for v in pads):
        raise _refuse(node, f"a {mode} pad on a dilated map")
    scaled = list(pads)
    for i in range(min(4, len(scaled))):
        scaled[i] = scaled[i] * (d[1] if i < 2 else d[0])
    args = list(node.args)
    if len(args) > 1:
        args[1] = type(pads)(scaled)
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "pad": type(pads)(scaled)}


def _check(original, fine, example: torch.Tensor) -> None:
    """Gate: on a random input a few strides above the window (not a whole number of strides), the fine map
    sampled on the original grid must equal the original map."""
    native = original.geometry.stride
    k = tuple(n // s for n, s in zip(native, fine.geometry.stride))
    # Two residues of the size modulo the stride (odd sizes are where grids and ceil modes go wrong).
    size = (original.input_size[0] + 2 * native[0] + native[0] // 2 + 1, original.input_size[1] + 3 * native[1] - 1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, example.shape[1], *size, generator=generator).to(example)
    with torch.no_grad():
        reference = original(x)
        try:
            dense = fine(x)
        except Exception as exc:
            raise ConversionError(f"--output-stride: the dilated network does not run: {type(exc).__name__}: "
                                  f"{first_line(exc, 200)}",
                                  hint="please report the model; use shift_and_stitch meanwhile") from exc
    h, w = reference.shape[-2:]
    sampled = dense[:, :, ::k[0], ::k[1]][:, :, :h, :w]
    if sampled.shape != reference.shape:
        raise ConversionError(f"--output-stride: the fine map {tuple(dense.shape[-2:])} does not cover the "
                              f"original grid {tuple(reference.shape[-2:])}",
                              hint="please report the model; use shift_and_stitch meanwhile")
    error = float((sampled.double() - reference.double()).abs().max() / reference.double().abs().max().clamp_min(
        1e-12))
    if not math.isfinite(error) or error > _TOLERANCE:
        raise ConversionError(f"--output-stride: the dilated map differs from the original on its grid by "
                              f"{error:.2e} (relative)", hint="please report the model; use shift_and_stitch")


def shift_and_stitch(fcn, images: torch.Tensor, native_stride, output_stride: int, window=None,
                     run=None) -> torch.Tensor:
    """A map of stride ``output_stride`` from ``(s / S)²`` passes of the original network, interleaved.

    Pass (a, b) runs on the images shifted by (a·S, b·S) pixels; its cell (i, j) becomes fine cell
    (i·k + a, j·k + b), ``k = s / S``. On a padding-free network this equals ``dilate(fcn, S)``'s map.

    Args:
        fcn: the converted network.
        images: N×C×H×W.
        native_stride: the network's stride (int or (y, x)).
        output_stride: S, dividing the stride.
        window: the training window (crops smaller than it are skipped); default ``fcn.input_size``.
        run: ``run(module, batch)`` → N×K×h×w (default: ``fcn(batch)`` under ``torch.inference_mode``).

    Returns:
        N×K×h×w with h = the largest count such that every fine row below it was computed.
    """
    native = pair(native_stride)
    if any(s % output_stride for s in native):
        raise ConversionError(f"output stride {output_stride} does not divide the stride {native}",
                              hint="choose a divisor of the network's stride")
    ky, kx = (s // output_stride for s in native)
    window = pair(window or getattr(fcn, "input_size", (1, 1)))
    if run is None:
        def run(module, batch):
            with torch.inference_mode():
                return module(batch)
    maps = {}
    for a in range(ky):
        for b in range(kx):
            crop = images[:, :, a * output_stride:, b * output_stride:]
            if crop.shape[-2] < window[0] or crop.shape[-1] < window[1]:
                continue
            maps[a, b] = run(fcn, crop)
    if (0, 0) not in maps:
        raise ConversionError("shift_and_stitch: the images are smaller than the window",
                              hint="give images at least the training size")
    rows = min(maps[a, 0].shape[-2] * ky + a if (a, 0) in maps else a for a in range(ky))
    cols = min(maps[0, b].shape[-1] * kx + b if (0, b) in maps else b for b in range(kx))
    first = maps[0, 0]
    out = first.new_zeros(first.shape[0], first.shape[1], -(-rows // ky) * ky, -(-cols // kx) * kx)
    for (a, b), m in maps.items():
        target = out[:, :, a::ky, b::kx]
        h, w = min(target.shape[-2], m.shape[-2]), min(target.shape[-1], m.shape[-1])
        target[:, :, :h, :w] = m[:, :, :h, :w]
    return out[:, :, :rows, :cols]
