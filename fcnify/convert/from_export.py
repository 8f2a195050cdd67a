"""Rebuilding a ``torch.export`` graph (ATen ops) as the module graph the conversion rules read.

``torch.export.load(path).module()`` gives a graph of ATen calls (``aten.conv2d(x, weight, bias, …)``)
with the weights as attributes, a guard that pins the example's shape, and pytree plumbing. The conversion
and the dilation rewrite reason about ``nn.Conv2d``, ``nn.Linear``, pools and plain tensor methods, so
each parametrised ATen op becomes its module again (same tensors) and every other op the ``Tensor``
method or ``torch`` function it stands for. Ops with no such twin stay as they are: they still run.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fcnify.errors import ConversionError, first_line

_logger = logging.getLogger(__name__)


def exported_input_shape(gm: torch.fx.GraphModule) -> tuple[int | None, int | None, int | None] | None:
    """(channels, height, width) of the example the graph was exported with; None for a dynamic dim."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    value = inputs[0].meta.get("val") if len(inputs) == 1 else None
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) != 4:
        return None
    return tuple(int(d) if isinstance(d, int) else None for d in shape[1:])


def exported_classes(gm: torch.fx.GraphModule) -> int | None:
    """The number of logits the exported classifier returns (N×K), when static."""
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    output = output[0] if isinstance(output, (tuple, list)) and len(output) == 1 else output
    shape = getattr(output.meta.get("val"), "shape", None) if isinstance(output, torch.fx.Node) else None
    return int(shape[1]) if shape is not None and len(shape) == 2 and isinstance(shape[1], int) else None


def _pair(value, default) -> tuple[int, int]:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        value = default
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _rank(node: torch.fx.Node) -> int | None:
    value = node.meta.get("val")
    return value.dim() if isinstance(value, torch.Tensor) else None


class _Rebuilder:
    """Copies the graph node by node into a new graph whose parameters live in modules."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.graph = torch.fx.Graph()
        self.root: dict[str, object] = {}
        self.env: dict[torch.fx.Node, object] = {}
        self.first_only: set[torch.fx.Node] = set()  # ops returning (value, indices) rebuilt as modules: value only

    def tensor(self, arg) -> torch.Tensor | None:
        """The weight behind a ``get_attr`` argument (None for no argument)."""
        if arg is None:
            return None
        if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
            raise ConversionError(f"the exported graph computes a weight ({arg}) instead of storing it",
                                  hint="export the classifier in eval mode, with its parameters as attributes")
        value = self.gm
        for part in arg.target.split("."):
            value = getattr(value, part)
        return value

    def module_name(self, node: torch.fx.Node, weight_arg) -> str:
        """The module's name in the original model (``features.0`` from ``features.0.weight``)."""
        base = weight_arg.target.rsplit(".", 1)[0] if isinstance(weight_arg, torch.fx.Node) and "." in str(
            weight_arg.target) else node.name
        name, i = base, 1
        while name in self.root:
            name, i = f"{base}_{i}", i + 1
        return name

    def call_module(self, node: torch.fx.Node, module: nn.Module, weight_arg) -> torch.fx.Node:
        name = self.module_name(node, weight_arg)
        self.root[name] = module.eval()
        return self.graph.call_module(name, (self.env[node.args[0]],))

    def value(self, arg):
        return torch.fx.node.map_arg(arg, lambda n: self.env[n])

    def rebuild(self) -> torch.fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self.graph.placeholder(node.name)
            elif node.op == "get_attr":
                target = node.target.replace(".", "_")
                self.root[target] = self.tensor(node)
                self.env[node] = self.graph.get_attr(target)
            elif node.op == "call_module":  # the shape guard of torch.export: the FCN runs at any size
                if node.users:
                    raise ConversionError(f"the exported graph calls submodule {node.target}",
                                          hint="export the classifier without submodule calls")
            elif node.op == "output":
                outputs = node.args[0]
                if isinstance(outputs, (tuple, list)) and len(outputs) == 1:
                    outputs = outputs[0]
                self.graph.output(self.value(outputs))
            else:
                self.env[node] = self.op(node)
        gm = torch.fx.GraphModule(self.root, self.graph, "ExportedClassifier")
        gm.graph.eliminate_dead_code()  # get_attr nodes whose tensors moved into modules
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name, value in self.root.items():
            if isinstance(value, torch.Tensor) and name not in used:
                delattr(gm, name)
        gm.graph.lint()
        gm.recompile()
        return gm.eval()

    def op(self, node: torch.fx.Node):
        target = node.target
        packet = getattr(target, "overloadpacket", None)
        name = getattr(packet, "__name__", None)
        if name in _MODULE_BUILDERS:
            module, weight_arg = _MODULE_BUILDERS[name](self, node)
            if module is not None:
                if name in _TUPLE_OPS:
                    self.first_only.add(node)
                return self.call_module(node, module, weight_arg)
        if target is operator.getitem and node.args[0] in self.first_only:
            if node.args[1] == 0:
                return self.env[node.args[0]]
            if node.users:
                raise ConversionError(f"the exported graph uses the indices of {node.args[0].name}",
                                      hint="fcnify converts classifiers that use pooled values only")
            return None
        if name in _DROPOUTS:  # an archive exported in training mode keeps dropout active: inference drops it
            return self.env[node.args[0]]
        if packet is None:  # operator.getitem and other Python callables
            return self.graph.call_function(target, self.value(node.args), self.value(node.kwargs))
        args, kwargs = self.value(node.args), self.value(node.kwargs)
        name = _RENAMED.get(name, name)
        if name in ("view", "reshape", "_unsafe_view") and len(args) == 2:
            args = (args[0], _any_batch(node))
        if args and isinstance(args[0], torch.fx.Node) and hasattr(torch.Tensor, name):
            return self.graph.call_method(name, args, kwargs)
        for namespace in (torch, F):
            if hasattr(namespace, name):
                return self.graph.call_function(getattr(namespace, name), args, kwargs)
        _logger.info("keeping %s as an ATen call", target)
        return self.graph.call_function(target, args, kwargs)


_DROPOUTS = {"dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout", "alpha_dropout_",
             "feature_alpha_dropout"}


def _any_batch(node: torch.fx.Node):
    """A reshape's target size with the batch as -1: an example of batch 1 bakes ``view(1, -1)`` in."""
    size = node.args[1]
    before, after = node.args[0].meta.get("val"), node.meta.get("val")
    shapes = [getattr(v, "shape", None) for v in (before, after)]
    if None in shapes or not all(isinstance(d, int) for d in (*shapes[0][:1], *shapes[1])) \
            or not shapes[1] or shapes[0][0] != shapes[1][0]:
        return size
    return [-1, *(int(d) for d in shapes[1][1:])]


_RENAMED = {"sym_size": "size", "_softmax": "softmax", "_log_softmax": "log_softmax", "_unsafe_view": "reshape"}


def _conv2d(r: _Rebuilder, node: torch.fx.Node, given: dict | None = None):
    """``conv2d(x, w, b, stride, padding, dilation, groups)``; ``given`` holds them for other signatures."""
    given = given or {key: _arg(node, i, key, default) for key, i, default in (
        ("stride", 3, 1), ("padding", 4, 0), ("dilation", 5, 1), ("groups", 6, 1))}
    weight = r.tensor(node.args[1])
    bias = r.tensor(_arg(node, 2, "bias"))
    padding, groups = given["padding"], int(given["groups"])
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                     stride=_pair(given["stride"], 1),
                     padding=padding if isinstance(padding, str) else _pair(padding, 0),
                     dilation=_pair(given["dilation"], 1), groups=groups,
                     bias=bias is not None, device=weight.device, dtype=weight.dtype)
    conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return conv, node.args[1]


def _convolution(r: _Rebuilder, node: torch.fx.Node):
    """``convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)`` (traced TorchScript)."""
    if node.args[6] or len(node.args[1].meta.get("val", torch.empty(0, 0, 0, 0)).shape) != 4:
        return None, None  # transposed or not 2-D: kept as the call it is
    twin = {"stride": node.args[3], "padding": node.args[4], "dilation": node.args[5], "groups": node.args[8]}
    return _conv2d(r, node, twin)


def _linear(r: _Rebuilder, node: torch.fx.Node):
    weight = r.tensor(node.args[1])
    bias = r.tensor(_arg(node, 2, "bias"))
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear, node.args[1]


def _batch_norm(r: _Rebuilder, node: torch.fx.Node):
    """``batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn)``: inference uses the running statistics,
    also when the classifier was exported in training mode."""
    if _arg(node, 5, "training", False):
        _logger.info("%s: exported in training mode; the running statistics are used", node.name)
    return _eval_batch_norm(r, node, _arg(node, 7, "eps", 1e-5))


def _batch_norm_no_training(r: _Rebuilder, node: torch.fx.Node):
    """``_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)`` (after decompositions)."""
    return _eval_batch_norm(r, node, _arg(node, 6, "eps", 1e-5))


def _eval_batch_norm(r: _Rebuilder, node: torch.fx.Node, eps: float):
    weight, bias = r.tensor(_arg(node, 1, "weight")), r.tensor(_arg(node, 2, "bias"))
    mean, var = r.tensor(_arg(node, 3, "running_mean")), r.tensor(_arg(node, 4, "running_var"))
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}.get(_rank(node.args[0]) or 4)
    if mean is None or var is None or cls is None:
        return None, None
    norm = cls(mean.shape[0], eps=float(eps), affine=weight is not None, device=mean.device, dtype=mean.dtype)
    if weight is not None:
        norm.weight = nn.Parameter(weight.detach(), requires_grad=False)
        norm.bias = nn.Parameter(bias.detach(), requires_grad=False)
    norm.running_mean.copy_(mean)
    norm.running_var.copy_(var)
    return norm, _arg(node, 3, "running_mean")


def _layer_norm(r: _Rebuilder, node: torch.fx.Node):
    shape = tuple(int(v) for v in node.args[1])
    weight, bias = r.tensor(_arg(node, 2, "weight")), r.tensor(_arg(node, 3, "bias"))
    norm = nn.LayerNorm(shape, eps=float(_arg(node, 4, "eps", 1e-5)), elementwise_affine=weight is not None,
                        bias=bias is not None)
    if weight is not None:
        norm.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        norm.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return norm, _arg(node, 2, "weight")


def _max_pool2d(r: _Rebuilder, node: torch.fx.Node):
    kernel = _pair(node.args[1], 1)
    return nn.MaxPool2d(kernel, _pair(_arg(node, 2, "stride"), kernel), _pair(_arg(node, 3, "padding", 0), 0),
                        _pair(_arg(node, 4, "dilation", 1), 1), ceil_mode=bool(_arg(node, 5, "ceil_mode", False))), None


def _avg_pool2d(r: _Rebuilder, node: torch.fx.Node):
    kernel = _pair(node.args[1], 1)
    return nn.AvgPool2d(kernel, _pair(_arg(node, 2, "stride"), kernel), _pair(_arg(node, 3, "padding", 0), 0),
                        ceil_mode=bool(_arg(node, 4, "ceil_mode", False)),
                        count_include_pad=bool(_arg(node, 5, "count_include_pad", True)),
                        divisor_override=_arg(node, 6, "divisor_override")), None


def _adaptive_pool2d(r: _Rebuilder, node: torch.fx.Node):
    size = tuple(node.args[1]) if isinstance(node.args[1], (list, tuple)) else node.args[1]
    is_max = "max" in node.target.overloadpacket.__name__
    return (nn.AdaptiveMaxPool2d(size) if is_max else nn.AdaptiveAvgPool2d(size)), None


_MODULE_BUILDERS = {
    "conv2d": _conv2d, "convolution": _convolution, "linear": _linear, "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "max_pool2d": _max_pool2d, "max_pool2d_with_indices": _max_pool2d, "avg_pool2d": _avg_pool2d,
    "adaptive_avg_pool2d": _adaptive_pool2d, "adaptive_max_pool2d": _adaptive_pool2d,
    "_native_batch_norm_legit_no_training": _batch_norm_no_training,
}
_TUPLE_OPS = {"max_pool2d_with_indices", "adaptive_max_pool2d", "_native_batch_norm_legit_no_training"}


def rebuild_modules(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A module-level GraphModule computing what the exported ``gm`` computes, at any input size.

    Raises:
        ConversionError: a graph with several inputs, computed weights or submodule calls.
    """
    if sum(1 for n in gm.graph.nodes if n.op == "placeholder") != 1:
        raise ConversionError("the exported program takes several inputs; fcnify needs one image batch",
                              hint="export the classifier with one N×C×H×W example input")
    return _Rebuilder(gm).rebuild()


def from_torchscript(script: torch.jit.ScriptModule, input_size: tuple[int, int],
                     in_chans: int) -> torch.fx.GraphModule:
    """A TorchScript classifier as a module graph: torch's TorchScript-to-export converter, then ``rebuild_modules``.

    Raises:
        ConversionError: the TorchScript graph has ops the converter cannot express (named by torch).
    """
    # Lazy: a private torch module (the one bridge torch offers) that may move between versions; only
    # TorchScript input needs it, so a torch without it must still import fcnify.
    from torch._export.converter import TS2EPConverter

    example = (torch.zeros(1, in_chans, *input_size),)
    try:
        with warnings.catch_warnings(), _torch_logs_silenced():
            warnings.simplefilter("ignore")
            program = TS2EPConverter(script, example).convert()
    except Exception as exc:
        raise ConversionError(
            f"the TorchScript graph cannot be turned into a Python graph fcnify can rewrite: {type(exc).__name__}: "
            f"{first_line(exc, 300)}",
            hint="check --input-size and --in-chans; else convert the Python model: save model.state_dict() and "
            "pass --arch module:factory") from None
    return rebuild_modules(program.module())


@contextlib.contextmanager
def _torch_logs_silenced():
    """Quiet torch's export machinery for a moment: it logs notes ("dimension specialized") and, for a graph it
    cannot run, whole tracebacks at ERROR, before raising the error that fcnify reports in one line."""
    prefixes = ("torch._export", "torch.export", "torch._subclasses", "torch.fx.experimental", "torch._dynamo")
    names = [name for name in logging.root.manager.loggerDict if name.startswith(prefixes)] + list(prefixes)
    loggers = [logging.getLogger(name) for name in dict.fromkeys(names)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


__all__ = ["exported_classes", "from_torchscript", "exported_input_shape", "rebuild_modules"]
