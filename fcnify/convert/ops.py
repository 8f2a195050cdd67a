"""Recognising what an FX node does, independent of how the model's author wrote it.

The same operation reaches the graph as a module call (``nn.Flatten``), a function (``torch.flatten``) or
a method (``x.flatten``). These helpers give each node a canonical op name and read its arguments.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ARITHMETIC_NAMES", "ELEMENTWISE_MODULES", "ELEMENTWISE_NAMES", "REDUCTION_NAMES", "RESHAPE_NAMES",
    "SHAPE_QUERY_NAMES", "explicit_padding", "keepdim", "node_arg", "op_name", "pair", "reduction_dims",
    "window_params", "WindowParams"
]

_FUNCTION_NAMES: dict[object, str] = {
    torch.flatten: "flatten", torch.reshape: "reshape", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
    torch.permute: "permute", torch.transpose: "transpose", torch.mean: "mean", torch.sum: "sum",
    torch.amax: "amax", torch.cat: "cat", torch.concat: "cat", torch.softmax: "softmax",
    torch.log_softmax: "log_softmax", F.softmax: "softmax", F.log_softmax: "log_softmax",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d", F.adaptive_max_pool2d: "adaptive_max_pool2d",
    F.avg_pool2d: "avg_pool2d", F.max_pool2d: "max_pool2d", F.linear: "linear", F.layer_norm: "layer_norm",
    F.batch_norm: "batch_norm", F.pad: "pad", F.conv2d: "conv2d",
    operator.getitem: "getitem", getattr: "getattr",
    operator.add: "add", operator.mul: "mul", operator.sub: "sub", operator.truediv: "div",
    operator.iadd: "add", operator.imul: "mul", operator.isub: "sub", operator.itruediv: "div",
    torch.add: "add", torch.mul: "mul", torch.sub: "sub", torch.div: "div", operator.neg: "neg",
}

_METHOD_ALIASES = {
    "add_": "add", "mul_": "mul", "sub_": "sub", "div_": "div", "truediv": "div", "relu_": "relu",
    "clamp_": "clamp", "sigmoid_": "sigmoid", "tanh_": "tanh", "concat": "cat", "size": "size", "dim": "dim",
}

# Element-wise maps: they act on each value alone, so they commute with any rearrangement of positions.
ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold,
    nn.LogSigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
)
ELEMENTWISE_NAMES = {
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
    "hardtanh", "sigmoid", "tanh", "softplus", "softsign", "dropout", "alpha_dropout", "feature_alpha_dropout",
    "clamp", "clip", "exp", "abs", "neg", "sqrt", "contiguous", "clone", "detach", "float", "half", "bfloat16",
    "double", "to", "type", "type_as", "identity", "logsigmoid", "gelu_tanh", "hard_sigmoid", "hard_swish",
    "swish", "quick_gelu",
}
ARITHMETIC_NAMES = {"add", "mul", "sub", "div", "pow"}
RESHAPE_NAMES = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten"}
REDUCTION_NAMES = {"mean", "sum", "amax", "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d",
                   "max_pool2d", "nanmean"}
SHAPE_QUERY_NAMES = {"size", "dim", "numel", "getattr"}


def op_name(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    """A canonical name for what ``node`` computes: 'flatten', 'linear', 'mean', 'relu', ..."""
    if node.op == "call_module":
        module = modules[node.target]
        for cls, name in _MODULE_NAMES:
            if isinstance(module, cls):
                return name
        if isinstance(module, ELEMENTWISE_MODULES):
            return "identity" if isinstance(module, nn.Identity) else type(module).__name__.lower()
        return "module:" + type(module).__name__
    if node.op == "call_method":
        return _METHOD_ALIASES.get(node.target, node.target)
    if node.op == "call_function":
        if node.target in _FUNCTION_NAMES:
            return _FUNCTION_NAMES[node.target]
        name = getattr(node.target, "__name__", str(node.target)).lstrip("_")
        if "adaptive_max_pool2d" in name:
            return "adaptive_max_pool2d"
        if name.startswith("max_pool2d"):
            return "max_pool2d"
        return name.removesuffix("_")
    return node.op


_MODULE_NAMES: tuple[tuple[type, str], ...] = (
    (nn.Flatten, "flatten"), (nn.Unflatten, "unflatten"), (nn.Linear, "linear"), (nn.Conv2d, "conv2d"),
    (nn.AdaptiveAvgPool2d, "adaptive_avg_pool2d"), (nn.AdaptiveMaxPool2d, "adaptive_max_pool2d"),
    (nn.AvgPool2d, "avg_pool2d"), (nn.MaxPool2d, "max_pool2d"), (nn.BatchNorm1d, "batch_norm1d"),
    (nn.BatchNorm2d, "batch_norm2d"), (nn.LayerNorm, "layer_norm"), (nn.Softmax, "softmax"),
    (nn.LogSoftmax, "log_softmax"), (nn.PReLU, "prelu"),
)


def node_arg(node: torch.fx.Node, index: int, name: str, default=None):
    """The argument at ``index`` or keyword ``name`` of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def reduction_dims(node: torch.fx.Node, name: str, rank: int, modules: dict[str, nn.Module]) -> tuple[int, ...] | None:
    """Dims a mean/sum/amax node reduces over, normalised to be non-negative (None when not a plain reduction)."""
    if name not in {"mean", "sum", "amax", "nanmean"}:
        return None
    dims = node_arg(node, 1, "dim")
    if dims is None:
        return tuple(range(rank))
    if isinstance(dims, int):
        dims = (dims,)
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(sorted(d % rank for d in dims))


def keepdim(node: torch.fx.Node) -> bool:
    return bool(node_arg(node, 2, "keepdim", False))


def pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


@dataclass(frozen=True)
class WindowParams:
    """A convolution's or pool's window, read from its module or its call's arguments."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str  # a convolution's 'same' / 'valid' as given
    dilation: tuple[int, int]
    extra: dict = field(default_factory=dict, compare=False)  # ceil_mode, padding_mode, count_include_pad, …

    @property
    def ceil_mode(self) -> bool:
        return bool(self.extra.get("ceil_mode"))

    def explicit_padding(self) -> tuple[int, int]:
        return explicit_padding(self.padding, self.kernel, self.dilation)


def explicit_padding(padding, kernel, dilation) -> tuple[int, int]:
    """A convolution's padding in pixels ('same': dilation × (kernel − 1) / 2 each side, rounded down; 'valid': 0)."""
    if isinstance(padding, str):
        if padding != "same":
            return (0, 0)
        return tuple(dd * (kk - 1) // 2 for kk, dd in zip(kernel, dilation))
    return padding


def window_params(node: torch.fx.Node, name: str, module: nn.Module | None) -> WindowParams | None:
    """The window of a conv or pool node (``name`` from ``op_name``), or None when it is only known at run time
    (a functional convolution whose weight shape was not propagated, a pool whose size is computed)."""
    if module is not None:
        k = pair(module.kernel_size)
        st = pair(module.stride if getattr(module, "stride", None) is not None else module.kernel_size)
        d = pair(getattr(module, "dilation", 1))
        p = getattr(module, "padding", 0)
        extra = {"module": True}
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            extra["padding_mode"] = module.padding_mode
        if isinstance(module, nn.AvgPool2d):
            extra.update(ceil_mode=module.ceil_mode, count_include_pad=module.count_include_pad,
                         divisor_override=module.divisor_override)
        if isinstance(module, nn.MaxPool2d):
            extra.update(ceil_mode=module.ceil_mode)
        return WindowParams(k, st, p if isinstance(p, str) else pair(p), d, extra)
    if name == "conv2d":
        weight = node_arg(node, 1, "weight")
        meta = weight.meta.get("tensor_meta") if isinstance(weight, torch.fx.Node) else None
        if meta is None:
            return None
        p = node_arg(node, 4, "padding", 0)
        return WindowParams(tuple(meta.shape[2:4]), pair(node_arg(node, 3, "stride", 1)),
                            p if isinstance(p, str) else pair(p), pair(node_arg(node, 5, "dilation", 1)), {})
    args = [node_arg(node, i, n) for i, n in ((1, "kernel_size"), (2, "stride"), (3, "padding"))]
    if any(isinstance(a, torch.fx.Node) for a in args):
        return None
    k = pair(args[0])
    st = pair(args[1] if args[1] not in (None, []) else args[0])
    p = pair(args[2] or 0)
    if name == "max_pool2d":
        return WindowParams(k, st, p, pair(node_arg(node, 4, "dilation", 1)),
                            {"ceil_mode": bool(node_arg(node, 5, "ceil_mode"))})
    return WindowParams(k, st, p, (1, 1), {"ceil_mode": bool(node_arg(node, 4, "ceil_mode")),
                                           "count_include_pad": node_arg(node, 5, "count_include_pad", True),
                                           "divisor_override": node_arg(node, 6, "divisor_override")})
