"""Rewrite a classifier into the equivalent fully-convolutional network.

``convert`` traces the model (``trace``), finds its spatial body, global context and head (``analysis``),
rewrites each head op by its registered position-wise rule (``rules``), and computes where each output
cell looks (``geometry``).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx
from torch import nn

from fcnify.convert.analysis import Analysis, Kind, analyse
from fcnify.convert.from_export import from_torchscript
from fcnify.convert.geometry import Geometry, compute_geometry
from fcnify.convert.network import FullyConvolutionalNet
from fcnify.convert.ops import op_name
from fcnify.convert.optimize import commute_pool_and_classifier
from fcnify.convert.outputs import (
    OutputInfo,
    describe_outputs,
    flatten_outputs,
    is_namedtuple_type,
    named_leaves,
)
from fcnify.convert.rules import (
    BOUNDARY_RULES,
    Positionwise,
    Rewrite,
    RewriteContext,
    Unflattened,
    head_rule_for,
    refuse,
)
from fcnify.convert.trace import capture, propagate_shapes, shape_of
from fcnify.errors import ConversionError, InputError, describe
from fcnify.introspect import input_channels, placement

__all__ = ["FullyConvolutionalNet", "Geometry", "OutputInfo", "Rewrite", "convert", "parse_input_size"]

_logger = logging.getLogger(__name__)


def parse_input_size(value) -> tuple[int, int]:
    """Accept 224, '224', '224x192', (224, 192) and return (height, width)."""
    if isinstance(value, int):
        size = (value, value)
    elif isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise InputError(f"input size {value!r} is not a number or HxW",
                             hint="write it as 224 or 224x192 (height x width)") from None
        if len(nums) not in (1, 2):
            raise InputError(f"input size {value!r} has {len(nums)} parts", hint="write it as 224 or 224x192")
        size = (nums[0], nums[-1])
    else:
        size = tuple(int(v) for v in value)
        if len(size) != 2:
            raise InputError(f"input size {value!r} is not (height, width)", hint="pass (height, width)")
    if min(size) < 1:
        raise InputError(f"input size {value!r} must be positive", hint="write it as 224 or 224x192")
    return size


def convert(model: nn.Module, input_size=(224, 224), in_chans: int | None = None,
            optimize: bool = True) -> FullyConvolutionalNet:
    """Rewrite ``model`` into the fully-convolutional network that computes the same function.

    The input model is not modified. The result is in eval mode on the model's device and dtype.

    Args:
        model: a classifier mapping N×C×H×W at the training size to N×K logits.
        input_size: the training size, an int or (height, width).
        in_chans: input channels (default: those of the first Conv2d).
        optimize: apply exact speed-ups (a 1×1 classifier before its windowed average pool when it shrinks
            channels).

    Raises:
        ConversionError: a node that has no correct position-wise twin, named with the reason.
        InputError: an input size the model cannot run at.
    """
    height, width = parse_input_size(input_size)
    in_chans = in_chans or input_channels(model)
    if isinstance(model, torch.jit.ScriptModule):  # no Python forward to trace: its graph, rebuilt
        model = from_torchscript(model, (height, width), in_chans)
    # No catch-all here: what a model cannot do is refused by the gates below with a ConversionError naming
    # the node; any other exception is a bug in fcnify, which the CLI reports as one.
    return _convert(model, (height, width), in_chans, optimize)


def _convert(model: nn.Module, size: tuple[int, int], in_chans: int, optimize: bool) -> FullyConvolutionalNet:
    height, width = size
    source = copy.deepcopy(model).eval()
    device, dtype = placement(source)
    example = torch.randn(2, in_chans, height, width, device=device, dtype=dtype)

    traced = capture(source)
    try:
        propagate_shapes(traced, example)
    except Exception as exc:
        raise InputError(
            f"the model does not run at input size {height}x{width} with {in_chans} channels: "
            f"{describe(exc)}",
            hint="pass the size it was trained at with --input-size (e.g. 224 or 224x192)",
        ) from exc
    _check_outputs(_graph_outputs(traced))

    analysis = analyse(traced)
    ctx = RewriteContext(traced, traced, analysis)
    _rewrite_nodes(ctx)
    new_gm = torch.fx.GraphModule(ctx.root, ctx.graph, type(model).__name__ + "FCN")
    new_gm.graph.eliminate_dead_code()
    new_gm.graph.lint()
    new_gm.recompile()
    if optimize:
        commute_pool_and_classifier(new_gm)
    new_gm.eval()
    try:
        propagate_shapes(new_gm, example)
    except Exception as exc:
        raise ConversionError(
            f"the rewritten network does not run at the training size: {describe(exc)}",
            hint="please report this model; the rewrite is refused rather than returned broken",
        ) from exc
    outputs = []
    for name, leaf in _graph_outputs(new_gm):
        geometry = compute_geometry(new_gm, (height, width), analysis.has_global_context, output=leaf)
        shape = shape_of(leaf)
        outputs.append(OutputInfo(name, int(shape[1]) if shape and len(shape) > 1 else 0, geometry))
    _check_grid(new_gm, outputs, example)
    _logger.info("converted %s: %d rewrites, outputs %s", type(model).__name__, len(ctx.rewrites),
                 describe_outputs(outputs))
    fcn = FullyConvolutionalNet(new_gm, None, (height, width), in_chans, ctx.rewrites, outputs=outputs)
    return fcn.eval()


def _graph_children(value) -> list[tuple[str, object]] | None:
    """Containers of a graph's output: Python containers, and FX nodes that build a namedtuple."""
    if isinstance(value, torch.fx.Node) and value.op == "call_function" and is_namedtuple_type(value.target):
        fields = value.target._fields
        args = list(value.args) + [value.kwargs[f] for f in fields[len(value.args):] if f in value.kwargs]
        return list(zip(fields, args))
    if isinstance(value, torch.fx.Node):
        return None
    if isinstance(value, dict):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(value)]
    return None


def _graph_outputs(gm: torch.fx.GraphModule) -> list[tuple[str, object]]:
    """The named leaves of ``gm``'s output (FX nodes, or constants for a model that returns some)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return named_leaves(output.args[0], _graph_children)


def _check_outputs(leaves: list[tuple[str, object]]) -> None:
    """Every output must be a tensor: a model that also returns None, numbers or strings is refused."""
    for name, leaf in leaves:
        if not isinstance(leaf, torch.fx.Node) or shape_of(leaf) is None:
            what = type(leaf).__name__ if not isinstance(leaf, torch.fx.Node) else "a value that is not a tensor"
            raise ConversionError(
                f"the model's output {name} is {what}, not a tensor of scores",
                hint="wrap the model so forward() returns only tensors (one, or a tuple/dict of them)")


def _check_grid(net: nn.Module, outputs: list[OutputInfo], example: torch.Tensor) -> None:
    """Gate: for every output, one stride more input must give exactly one more cell each way, else the
    network is refused."""
    for info in outputs:
        geometry = info.geometry
        (h, w), (sy, sx) = geometry.window, geometry.stride
        bigger = example.new_zeros(1, example.shape[1], h + sy, w + sx)
        try:
            with torch.no_grad():
                at_training = flatten_outputs(net(example[:1]))[info.name]
                grown = flatten_outputs(net(bigger))[info.name]
        except Exception as exc:
            raise ConversionError(
                f"the rewritten network does not run above the training size ({h + sy}x{w + sx}): "
                f"{describe(exc, 200)}",
                hint="some block of the body only works at the training size (window attention, fixed reshapes)",
            ) from exc
        if at_training.dim() != 4 or tuple(at_training.shape[-2:]) != (1, 1) or tuple(grown.shape[-2:]) != (2, 2):
            which = f"output {info.name} of " if len(outputs) > 1 else ""
            raise ConversionError(
                f"{which}the rewritten network gives maps of {tuple(at_training.shape[2:])} at {h}x{w} and "
                f"{tuple(grown.shape[2:])} at {h + sy}x{w + sx}, not 1×1 and 2×2 for the computed stride "
                f"{geometry.stride}",
                hint="the body contains blocks whose output grid fcnify cannot follow; please report the model",
            )


def _rewrite_nodes(ctx: RewriteContext) -> None:
    analysis: Analysis = ctx.analysis
    for node in ctx.old.graph.nodes:
        info = analysis.info[node]
        if node.op == "output":
            ctx.graph.output(torch.fx.node.map_aggregate(node.args[0], lambda v: _output_value(ctx, v)))
            continue
        if _builds_output_namedtuple(node):
            # The output's namedtuple: rebuilt from the converted maps.
            ctx.env[node] = ctx.graph.node_copy(node, lambda n: _output_value(ctx, n))
            continue
        if analysis.is_head(node):
            new, layout = _rewrite_head(ctx, node)
            ctx.env[node] = new
            ctx.layouts[node] = layout
            continue
        if info.kind is Kind.STATIC or info.kind is Kind.FIXED:
            if any(analysis.is_head(n) for n in node.all_input_nodes):
                raise refuse(node, "the classifier's pooled features also feed the body")
            ctx.env[node] = ctx.copy(node)
            continue
        ctx.env[node] = _rewrite_spatial(ctx, node, info)


def _rewrite_spatial(ctx: RewriteContext, node: torch.fx.Node, info) -> torch.fx.Node:
    """Body nodes are copied, except adaptive pools that are a plain op at the training size."""
    if info.body_rewrite is None:
        return ctx.copy(node)
    src = node.all_input_nodes[0]
    value = ctx.env[src]
    in_hw, out_hw = shape_of(src)[-2:], shape_of(node)[-2:]
    if info.body_rewrite == "identity":
        ctx.record(node, f"{info.name} to {tuple(out_hw)} (the identity at the training size)", "removed")
        return value
    kernel = tuple(i // o for i, o in zip(in_hw, out_hw))
    pool = (nn.MaxPool2d if "max" in info.name else nn.AvgPool2d)(kernel, stride=kernel)
    ctx.record(node, f"{info.name} {tuple(in_hw)}→{tuple(out_hw)}", f"{type(pool).__name__}({kernel})")
    return ctx.call_module(node, pool, value)


def _rewrite_head(ctx: RewriteContext, node: torch.fx.Node):
    analysis = ctx.analysis
    inputs = node.all_input_nodes
    if any(analysis.kind(n) is Kind.SPATIAL for n in inputs):
        name = op_name(node, ctx.modules)
        rule = BOUNDARY_RULES.get(name)
        if rule is None:
            raise refuse(node, f"'{name}' turns the spatial map into a vector in a way that is neither a "
                               "flatten nor a global pool")
        return rule(ctx, node, name)
    for n in inputs:
        if analysis.info[n].kind is Kind.FIXED and analysis.info[n].context:
            boundary = _boundary_of(analysis, n)
            raise refuse(
                node,
                f"the map becomes a fixed-size value at node '{boundary.name}' and is then mixed with the map "
                "again, so no output cell can stand for one window",
                hint="transformer classifiers (ViT, Swin) turn the image into a token sequence that attends "
                "across the whole image; they have no fully-convolutional twin",
            )
    name, rule = head_rule_for(ctx, node)
    if rule is None:
        raise refuse(node, f"no position-wise rule for '{name}'")
    return rule(ctx, node, name)


def _boundary_of(analysis: Analysis, node: torch.fx.Node) -> torch.fx.Node:
    """The earliest FIXED ancestor made directly from a spatial map (for error messages)."""
    seen, stack, best = set(), [node], node
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if analysis.kind(current) is Kind.FIXED:
            best = current
            stack.extend(current.all_input_nodes)
    return best


def _builds_output_namedtuple(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and is_namedtuple_type(node.target)
            and all(user.op == "output" for user in node.users))


def _output_value(ctx: RewriteContext, value):
    """The converted counterpart of one leaf of the model's output (a map for each per-window vector)."""
    if not isinstance(value, torch.fx.Node):
        return value  # refused before the rewrite (``_check_outputs``)
    if _builds_output_namedtuple(value):
        return ctx.env[value]
    layout = ctx.layouts.get(value)
    new = ctx.env[value]
    if layout is None and ctx.analysis.kind(value) is Kind.SPATIAL:
        return new  # already fully convolutional
    if isinstance(layout, Unflattened) or layout is None:
        raise refuse(value, "the model returns flattened features, not class scores")
    if isinstance(layout, Positionwise) and layout.channels_last:
        return ctx.call_method("permute", new, (0, 3, 1, 2))
    return new
