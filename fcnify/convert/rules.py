"""The registered rewrite rules: each turns one head operation into its position-wise twin.

In the original network the head works on N×F vectors; in the converted one the same values are N×F×h×w
maps, one vector per output cell. Each head value carries a layout saying how its map stands for the
original value:

- ``Unflattened(C, H, W, order)``: the original was ``flatten`` of a C×H×W map; the converted value is that
  map itself, unflattened, so the next Linear can become a C→K convolution with an H×W kernel.
- ``Positionwise(form)``: one original vector per cell. ``vector`` stands for N×F (physically N×F×h×w),
  ``nchw`` for N×C×1×1 (physically N×C×h×w), ``nhwc`` for N×1×1×C (physically N×h×w×C).

A rule takes the node and returns the new node and its layout, or raises ``ConversionError`` naming the node.
Rules are registered by canonical op name (see ``ops.op_name``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fcnify.convert.analysis import Analysis, Kind
from fcnify.convert.layers import ChannelLayerNorm, batchnorm1d_to_2d, linear_to_conv
from fcnify.convert.ops import (
    ARITHMETIC_NAMES,
    ELEMENTWISE_MODULES,
    ELEMENTWISE_NAMES,
    REDUCTION_NAMES,
    RESHAPE_NAMES,
    SHAPE_QUERY_NAMES,
    keepdim,
    node_arg,
    op_name,
    pair,
    reduction_dims,
)
from fcnify.convert.trace import shape_of
from fcnify.errors import ConversionError

__all__ = [
    "BOUNDARY_RULES", "HEAD_RULES", "Positionwise", "Rewrite", "RewriteContext", "Unflattened",
    "boundary_rule", "head_rule", "head_rule_for"
]


@dataclass(frozen=True)
class Unflattened:
    channels: int
    height: int
    width: int
    order: str  # the order the original flatten read the map's axes in: "chw", "hwc", "whc", … (any of six)


@dataclass(frozen=True)
class Positionwise:
    form: str  # "vector", "nchw" or "nhwc"

    @property
    def channels_last(self) -> bool:
        return self.form == "nhwc"


Layout = Unflattened | Positionwise | None


@dataclass
class Rewrite:
    """One layer the conversion changed, for the summary table."""

    node: str
    old: str
    new: str
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None


@dataclass
class RewriteContext:
    """State shared by the rules while a new graph is built from the old one."""

    old: torch.fx.GraphModule
    root: nn.Module
    analysis: Analysis
    graph: torch.fx.Graph = field(default_factory=torch.fx.Graph)
    env: dict[torch.fx.Node, torch.fx.Node] = field(default_factory=dict)
    layouts: dict[torch.fx.Node, Layout] = field(default_factory=dict)
    rewrites: list[Rewrite] = field(default_factory=list)

    def __post_init__(self):
        self.modules = dict(self.old.named_modules())

    # -- reading the old graph
    def module(self, node: torch.fx.Node) -> nn.Module:
        return self.modules[node.target]

    def layout(self, value) -> Layout:
        return self.layouts.get(value) if isinstance(value, torch.fx.Node) else None

    def head_inputs(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [n for n in node.all_input_nodes if self.layout(n) is not None]

    def constant(self, value) -> torch.Tensor | None:
        """The tensor behind a get_attr node (parameters used functionally, e.g. ``F.linear(x, self.w)``)."""
        if value is None:
            return None
        if isinstance(value, torch.fx.Node) and value.op == "get_attr":
            obj = self.old
            for part in value.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise refuse(value, "a weight that is computed rather than stored as a parameter")

    # -- writing the new graph
    def value(self, arg):
        return torch.fx.map_arg(arg, lambda n: self.env[n])

    def copy(self, node: torch.fx.Node) -> torch.fx.Node:
        return self.graph.node_copy(node, lambda n: self.env[n])

    def add_module(self, node: torch.fx.Node, module: nn.Module) -> str:
        base = "fcn_" + node.name
        name, i = base, 1
        while hasattr(self.root, name):
            name, i = f"{base}_{i}", i + 1
        self.root.add_module(name, module)
        return name

    def call_module(self, node: torch.fx.Node, module: nn.Module, *args) -> torch.fx.Node:
        return self.graph.call_module(self.add_module(node, module), args)

    def call_method(self, name: str, *args) -> torch.fx.Node:
        return self.graph.call_method(name, args)

    def record(self, node: torch.fx.Node, old: str, new: str) -> None:
        src = node.all_input_nodes[0] if node.all_input_nodes else None
        self.rewrites.append(Rewrite(node.name, old, new, shape_of(src) if src else None, shape_of(node)))

    def to_physical(self, value: torch.fx.Node, src: Positionwise, dst_form: str) -> torch.fx.Node:
        """Move the feature dim where ``dst_form`` keeps it (vector and nchw share the N×F×h×w layout)."""
        if src.channels_last == (dst_form == "nhwc"):
            return value
        return self.call_method("permute", value, (0, 3, 1, 2) if src.channels_last else (0, 2, 3, 1))


def refuse(node, why: str, hint: str | None = None) -> ConversionError:
    where = node.name if isinstance(node, torch.fx.Node) else str(node)
    target = ""
    if isinstance(node, torch.fx.Node):
        target = f" ({node.op} {getattr(node.target, '__name__', node.target)})"
    imported = node.meta.get("onnx_node") if isinstance(node, torch.fx.Node) else None
    return ConversionError(
        f"cannot convert ONNX node {imported}: {why}" if imported else f"cannot convert node '{where}'{target}: {why}",
        hint=hint or "only position-wise operations may follow the flatten or global pool; "
        "move other operations before it, or report the model so a rule can be added",
    )


Rule = Callable[[RewriteContext, torch.fx.Node, str], tuple[torch.fx.Node, Layout]]
HEAD_RULES: dict[str, Rule] = {}
BOUNDARY_RULES: dict[str, Rule] = {}


def head_rule(*names: str):
    """Register a rule for head nodes whose op has one of ``names``."""

    def register(fn: Rule) -> Rule:
        for name in names:
            HEAD_RULES[name] = fn
        return fn

    return register


def boundary_rule(*names: str):
    """Register a rule for the op that turns a spatial map into a vector (flatten, global pool)."""

    def register(fn: Rule) -> Rule:
        for name in names:
            BOUNDARY_RULES[name] = fn
        return fn

    return register


# ---------------------------------------------------------------------------------------------- boundary


def _nchw_value(ctx: RewriteContext, src: torch.fx.Node) -> tuple[torch.fx.Node, tuple[int, int, int], str]:
    """The spatial input as an N×C×H×W value, its (C, H, W) at the training size, and the order its three
    feature axes are laid out in (``"chw"``, ``"hwc"``, ``"whc"``, … : any permutation of the map's axes).

    A flatten of a permuted map (``x.permute(0, 3, 2, 1)`` before ``view``, as Caffe ports do) reads the
    features in another order: the following Linear's weights are reordered to match (``linear_to_conv``).
    """
    shape = shape_of(src)
    dims = ctx.analysis.info[src].spatial_dims
    if shape is None or len(shape) != 4 or dims is None or 0 in dims or dims[0] == dims[1]:
        raise refuse(src, f"expected an N×C×H×W map (its axes in any order) before the head, got shape {shape}")
    channel = ({1, 2, 3} - set(dims)).pop()
    letters = {channel: "c", dims[0]: "h", dims[1]: "w"}
    order = "".join(letters[d] for d in (1, 2, 3))
    value = ctx.env[src]
    if order != "chw":
        value = ctx.call_method("permute", value, (0, channel, dims[0], dims[1]))
    return value, (shape[channel], shape[dims[0]], shape[dims[1]]), order


def _spatial_input(ctx: RewriteContext, node: torch.fx.Node) -> torch.fx.Node:
    return next(n for n in node.all_input_nodes if ctx.analysis.kind(n) is Kind.SPATIAL)


@boundary_rule("flatten", "view", "reshape")
def flatten_boundary(ctx, node, name):
    src = _spatial_input(ctx, node)
    out = shape_of(node)
    value, (c, h, w), order = _nchw_value(ctx, src)
    if out is None or len(out) != 2 or out[1] != c * h * w:
        raise refuse(
            node,
            f"it reshapes the {c}×{h}×{w} map into {out}, which is not a flatten into one vector per image "
            "(a token sequence, as in vision transformers, mixes positions)",
            hint="transformer classifiers attend across the whole image and have no fully-convolutional twin",
        )
    ctx.record(node, f"{name} {c}×{h}×{w} ({order})", "kept as a map (next Linear becomes a convolution)")
    return value, Unflattened(c, h, w, order)


@boundary_rule("adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "mean", "sum", "amax",
               "nanmean")
def global_pool_boundary(ctx, node, name):
    src = _spatial_input(ctx, node)
    in_shape, out_shape = shape_of(src), shape_of(node)
    dims = ctx.analysis.info[src].spatial_dims
    if name in REDUCTION_NAMES - {"mean", "sum", "amax", "nanmean"}:
        if out_shape is None or tuple(out_shape[-2:]) != (1, 1) or dims != (2, 3):
            raise refuse(node, f"an adaptive pool from {in_shape} to {out_shape} that is neither the identity, "
                               "a whole-number downscale, nor a global pool")
        keep = True
    else:
        reduced = reduction_dims(node, name, len(in_shape), ctx.modules)
        if reduced is None or set(reduced) != set(dims):
            raise refuse(node, f"it reduces dims {reduced} of a map whose spatial dims are {dims}")
        keep = keepdim(node)
    value, (c, h, w), order = _nchw_value(ctx, src)
    if keep and order not in ("chw", "hwc"):
        raise refuse(node, f"a pool keeping the dims of a map laid out {order.upper()} (channels between the "
                           "spatial axes)")
    is_max = "max" in name
    pool = (nn.MaxPool2d if is_max else nn.AvgPool2d)((h, w), stride=1)
    new = ctx.call_module(node, pool, value)
    if name == "sum":
        new = ctx.graph.call_function(operator.mul, (new, float(h * w)))
    kind = "max" if is_max else "average"
    ctx.record(node, f"global {kind} pool over {h}×{w}", f"{type(pool).__name__}({h}×{w}, stride 1)")
    if not keep:
        return new, Positionwise("vector")
    if order == "hwc":
        return ctx.call_method("permute", new, (0, 2, 3, 1)), Positionwise("nhwc")
    return new, Positionwise("nchw")


# ---------------------------------------------------------------------------------------------- head


def _form_of_shape(shape) -> str | None:
    """The layout form an original value of this shape takes: (N,F)→vector, (N,C,1,1)→nchw, (N,1,1,C)→nhwc."""
    if shape is None:
        return None
    if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):
        return "vector"
    if len(shape) == 4 and shape[2] == 1 and shape[3] == 1:
        return "nchw"
    if len(shape) == 4 and shape[1] == 1 and shape[2] == 1:
        return "nhwc"
    return None


def _single_head_input(ctx, node) -> tuple[torch.fx.Node, Layout]:
    heads = ctx.head_inputs(node)
    if len(heads) != 1:
        raise refuse(node, "it combines several head values in a way fcnify cannot map to positions")
    return heads[0], ctx.layouts[heads[0]]


@head_rule(*RESHAPE_NAMES, "reshape_like")
def reshape(ctx, node, name):
    """Reshapes between (N,F), (N,F,1,1) and (N,1,1,F): the same vector per cell, so at most a permute."""
    src, layout = _single_head_input(ctx, node)
    in_shape, out_shape = shape_of(src), shape_of(node)
    if isinstance(layout, Unflattened):
        if in_shape == out_shape:
            return ctx.env[src], layout
        raise refuse(node, f"it reshapes the flattened map {in_shape} into {out_shape}")
    form = _form_of_shape(out_shape)
    if form is None or out_shape[0] != in_shape[0] or math.prod(out_shape[1:]) != math.prod(in_shape[1:]):
        raise refuse(node, f"it reshapes a per-image vector {in_shape} into {out_shape}, mixing features")
    return ctx.to_physical(ctx.env[src], layout, form), Positionwise(form)


@head_rule("getitem")
def getitem(ctx, node, name):
    src, layout = _single_head_input(ctx, node)
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(i is None or i is Ellipsis for i in index):
        return reshape(ctx, node, name)
    feature_dim = 3 if isinstance(layout, Positionwise) and layout.channels_last else 1
    for dim, item in enumerate(index):
        full = isinstance(item, slice) and item == slice(None)
        if dim not in (0, feature_dim) and not full or dim == 0 and not full or isinstance(layout, Unflattened):
            raise refuse(node, f"indexing {node.args[1]} selects positions, not features")
    return ctx.copy(node), layout


@head_rule(*SHAPE_QUERY_NAMES)
def shape_query(ctx, node, name):
    if name in ("size", "dim") and node_arg(node, 1, "dim") in (0, None) and name == "size":
        # x.size() is only used to reshape; x.size(0) is the batch size in both networks.
        return ctx.copy(node), None
    if name == "getattr" and node.args[1] in ("shape", "device", "dtype"):
        return ctx.copy(node), None
    if name == "size" and node_arg(node, 1, "dim") in (1, -1):
        return ctx.copy(node), None
    if name == "dim":
        raise refuse(node, "it branches on the rank of a head value")
    return ctx.copy(node), None


def elementwise(ctx, node, name):
    src, layout = _single_head_input(ctx, node)
    return ctx.copy(node), layout


for _name in ELEMENTWISE_NAMES:
    HEAD_RULES[_name] = elementwise


@head_rule("prelu")
def prelu(ctx, node, name):
    src, layout = _single_head_input(ctx, node)
    module = ctx.module(node) if node.op == "call_module" else None
    if module is not None and module.num_parameters > 1 and not (isinstance(layout, Positionwise)
                                                                  and layout.form in ("vector", "nchw")):
        raise refuse(node, "a per-feature PReLU on a flattened map acts per position")
    return ctx.copy(node), layout


@head_rule(*ARITHMETIC_NAMES)
def arithmetic(ctx, node, name):
    heads = ctx.head_inputs(node)
    layouts = {ctx.layouts[h] for h in heads}
    if len(layouts) != 1:
        raise refuse(node, "it combines head values of different layouts")
    layout = layouts.pop()
    replaced = {}
    for arg in node.all_input_nodes:
        if arg in heads or ctx.analysis.kind(arg) is not Kind.STATIC:
            continue
        shape = shape_of(arg)
        if shape is None or math.prod(shape) == 1:
            continue
        if isinstance(layout, Positionwise) and layout.form == "vector" and len(shape) <= 2 and shape[-1] > 1:
            # A per-feature constant (F,) or (1, F) broadcasts over the last dim; move it onto dim 1.
            replaced[arg] = ctx.call_method("reshape", ctx.env[arg], (1, -1, 1, 1))
        elif isinstance(layout, Positionwise) and layout.form != "vector":
            continue
        else:
            raise refuse(node, f"it combines a flattened map with a constant of shape {shape} (per position)")
    new = ctx.graph.node_copy(node, lambda n: replaced.get(n, ctx.env[n]))
    return new, layout


def _feature_dim(layout: Layout, dim: int, rank: int, node) -> int:
    """Map a dim of the original vector to the dim of the converted map; only the feature dim is allowed."""
    if isinstance(layout, Positionwise) and layout.form == "vector":
        if dim % rank == 1:
            return 1
    elif isinstance(layout, Positionwise) and dim % 4 == (3 if layout.channels_last else 1):
        return dim % 4
    raise refuse(node, f"it works along dim {dim}, which is not the feature dim")


@head_rule("softmax", "log_softmax")
def softmax(ctx, node, name):
    src, layout = _single_head_input(ctx, node)
    rank = len(shape_of(src))
    if node.op == "call_module":
        module = ctx.module(node)
        dim = _feature_dim(layout, module.dim if module.dim is not None else 1, rank, node)
        return ctx.call_module(node, type(module)(dim=dim), ctx.env[src]), layout
    dim = _feature_dim(layout, node_arg(node, 1, "dim"), rank, node)
    fn = F.softmax if name == "softmax" else F.log_softmax
    return ctx.graph.call_function(fn, (ctx.env[src],), {"dim": dim}), layout


@head_rule("normalize")
def normalize(ctx, node, name):
    """``F.normalize`` over the feature dim (an L2-normalised embedding): per vector, so per cell."""
    src, layout = _single_head_input(ctx, node)
    dim = _feature_dim(layout, node_arg(node, 2, "dim", 1), len(shape_of(src)), node)
    kwargs = {"p": node_arg(node, 1, "p", 2.0), "dim": dim, "eps": node_arg(node, 3, "eps", 1e-12)}
    return ctx.graph.call_function(F.normalize, (ctx.env[src],), kwargs), layout


@head_rule("cat")
def cat(ctx, node, name):
    tensors = node_arg(node, 0, "tensors")
    layouts = {ctx.layout(t) for t in tensors}
    if len(layouts) != 1 or None in layouts:
        raise refuse(node, "it concatenates head values with other values")
    layout = layouts.pop()
    if not isinstance(layout, Positionwise):
        raise refuse(node, "it concatenates flattened maps")
    dim = _feature_dim(layout, node_arg(node, 1, "dim", 0), len(shape_of(tensors[0])), node)
    return ctx.graph.call_function(torch.cat, ([ctx.env[t] for t in tensors],), {"dim": dim}), layout


@head_rule("linear")
def linear(ctx, node, name):
    src, layout = _single_head_input(ctx, node)
    if node.op == "call_module":
        weight, bias = ctx.module(node).weight, ctx.module(node).bias
    else:
        weight = ctx.constant(node_arg(node, 1, "weight"))
        bias = ctx.constant(node_arg(node, 2, "bias"))
    k, f = weight.shape
    if isinstance(layout, Unflattened):
        c, h, w = layout.channels, layout.height, layout.width
        conv = linear_to_conv(weight.detach(), None if bias is None else bias.detach(), c, h, w, layout.order)
        ctx.record(node, f"Linear({f}→{k}) after flatten of {c}×{h}×{w}", f"Conv2d({c}→{k}, kernel {h}×{w})")
        return ctx.call_module(node, conv, ctx.env[src]), Positionwise("vector")
    if layout.form == "vector":
        conv = linear_to_conv(weight.detach(), None if bias is None else bias.detach(), f, 1, 1)
        ctx.record(node, f"Linear({f}→{k})", f"Conv2d({f}→{k}, kernel 1×1)")
        return ctx.call_module(node, conv, ctx.env[src]), layout
    if layout.channels_last:
        return ctx.copy(node), layout  # a Linear over the last dim of N×h×w×C is already position-wise
    raise refuse(node, "a Linear over the width of an N×C×1×1 map")


@head_rule("conv2d")
def conv2d(ctx, node, name):
    src, layout = _single_head_input(ctx, node)
    module = ctx.module(node) if node.op == "call_module" else None
    if module is None or not (isinstance(layout, Positionwise) and layout.form == "nchw"):
        raise refuse(node, "a convolution on a per-image vector that is not an N×C×1×1 map")
    if pair(module.kernel_size) != (1, 1) or pair(module.stride) != (1, 1) or pair(module.padding) != (0, 0):
        raise refuse(node, "a convolution other than 1×1, stride 1, no padding on a pooled 1×1 map")
    return ctx.copy(node), layout


@head_rule("batch_norm1d")
def batch_norm1d(ctx, node, name):
    src, layout = _single_head_input(ctx, node)
    if not (isinstance(layout, Positionwise) and layout.form == "vector"):
        raise refuse(node, "BatchNorm1d over a flattened map normalises each position separately",
                     hint="fold the BatchNorm1d into the Linear that follows it, then convert")
    bn = batchnorm1d_to_2d(ctx.module(node))
    ctx.record(node, f"BatchNorm1d({bn.num_features})", f"BatchNorm2d({bn.num_features})")
    return ctx.call_module(node, bn, ctx.env[src]), layout


@head_rule("batch_norm2d", "batch_norm")
def batch_norm(ctx, node, name):
    src, layout = _single_head_input(ctx, node)
    if not (isinstance(layout, Positionwise) and layout.form in ("vector", "nchw")):
        raise refuse(node, "batch norm on a flattened map normalises each position separately")
    return ctx.copy(node), layout


@head_rule("layer_norm")
def layer_norm(ctx, node, name):
    src, layout = _single_head_input(ctx, node)
    feature_count = shape_of(src)[-1]
    if node.op == "call_module":
        shape = tuple(ctx.module(node).normalized_shape)
    else:
        shape = tuple(pair(node_arg(node, 1, "normalized_shape"))[-1:])
    if shape != (feature_count,) or not isinstance(layout, Positionwise):
        raise refuse(node, f"a LayerNorm over {shape} of a value shaped {shape_of(src)}")
    if layout.channels_last:
        return ctx.copy(node), layout
    if layout.form != "vector":
        raise refuse(node, "a LayerNorm over the last dim of an N×C×1×1 map")
    if node.op == "call_module":
        ctx.record(node, f"LayerNorm({feature_count})", f"ChannelLayerNorm({feature_count})")
        return ctx.call_module(node, ChannelLayerNorm(ctx.module(node)), ctx.env[src]), layout
    nhwc = ctx.call_method("permute", ctx.env[src], (0, 2, 3, 1))
    normed = ctx.graph.node_copy(node, lambda n: nhwc if n is src else ctx.env[n])
    return ctx.call_method("permute", normed, (0, 3, 1, 2)), layout


@head_rule("permute", "transpose")
def permute(ctx, node, name):
    src, layout = _single_head_input(ctx, node)
    form = _form_of_shape(shape_of(node))
    if not isinstance(layout, Positionwise) or layout.form == "vector" or form not in ("nchw", "nhwc"):
        raise refuse(node, "it transposes a per-image vector")
    return ctx.copy(node), Positionwise(form)


def head_rule_for(ctx: RewriteContext, node: torch.fx.Node) -> tuple[str, Rule | None]:
    """The rule for a head node: by op name, with reductions over the 1×1 dims of a pooled map as reshapes."""
    name = op_name(node, ctx.modules)
    if node.op == "call_module" and isinstance(ctx.module(node), ELEMENTWISE_MODULES):
        return name, elementwise
    if name in REDUCTION_NAMES:
        src = node.all_input_nodes[0]
        in_shape, out_shape = shape_of(src), shape_of(node)
        reduced = reduction_dims(node, name, len(in_shape), ctx.modules) if in_shape else None
        singleton = reduced is not None and all(in_shape[d] == 1 for d in reduced)
        if singleton or (in_shape and out_shape and math.prod(in_shape) == math.prod(out_shape)):
            return name, reshape
    return name, HEAD_RULES.get(name)
