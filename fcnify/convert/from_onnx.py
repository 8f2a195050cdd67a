"""Importing an ONNX image classifier that fcnify did not make: an ordinary torch graph for the conversion.

onnx2torch turns each ONNX node into a module (``OnnxReshape``, ``OnnxGemm``, ``OnnxTranspose`` …) and keeps
every initializer as a buffer. The conversion rules reason about ``nn.Linear``, ``nn.Conv2d``, pools and plain
tensor calls, so the import has three steps:

1. *Prepare the ONNX graph* where onnx2torch would fail or leave what the rules cannot read: one opset
   (``onnx.version_converter``: Clip/Upsample/Reshape attributes of opsets 9–12, ReduceMean's ``axes`` input of
   opset 18+), ``Constant`` nodes as initializers, a symbolic batch and the training H×W on the input,
   reshapes whose target shape is computed (``Shape``→``Gather``/``Slice``→``Concat``) given the constant shape
   shape inference finds for them, and an NHWC input's leading NHWC→NCHW ``Transpose`` dropped.
2. *onnx2torch* builds the module graph.
3. *Plain ops*: each onnx2torch module becomes the nn module or torch call it stands for, constant
   sub-graphs are folded, and every node keeps the ONNX node's name and op type for error messages.

The result takes fcnify's standard N×C×H×W input whatever the original's layout; ``ImportedOnnx.input_layout``
says what the original took.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fcnify.errors import ConversionError, InputError, ModelLoadError, first_line
from fcnify.optional import require

_logger = logging.getLogger(__name__)

#: The opset every graph is brought to before onnx2torch: the newest one its converters cover throughout.
IMPORT_OPSET = 17
#: ``node.meta`` key holding "'name' (OpType)" of the ONNX node an FX node came from.
ONNX_NODE = "onnx_node"
NCHW, NHWC = "NCHW", "NHWC"
_BATCH = "fcnify_batch"  # the symbolic batch dim the input gets (a name no exporter uses)


@dataclass
class ImportedOnnx:
    """An ONNX classifier as a torch graph, and what its file says about it.

    Attributes:
        module: the classifier as a ``torch.fx.GraphModule`` taking N×C×H×W images; a graph with several outputs
            returns a dict of them by the ONNX output names.
        input_size: the training size (H, W): fixed in the graph, or given.
        in_chans: input channels, from the input's shape.
        input_layout: the original graph's input layout, ``NCHW`` or ``NHWC``.
        output_names: the graph's outputs, in order.
        classes: per output, the values each image gets at the training size (the class count of a classifier).
    """

    module: torch.fx.GraphModule
    input_size: tuple[int, int]
    in_chans: int
    input_layout: str
    output_names: tuple[str, ...]
    classes: tuple[int, ...]


def _onnx():
    return require("onnx", None, "read ONNX models")


def read_onnx(path) -> object:
    """The ``onnx.ModelProto`` in ``path`` (external data beside it loaded too).

    Raises:
        ModelLoadError: a file that is not an ONNX model.
    """
    onnx = _onnx()
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path} is not an ONNX model onnx can read: {type(exc).__name__}: "
                             f"{first_line(exc, 200)}", hint="check the file; it may be truncated") from None


def _describe(node) -> str:
    return f"'{node.name or node.output[0]}' ({node.op_type})"


def _refuse(node, why: str, hint: str | None = None) -> ConversionError:
    return ConversionError(f"cannot convert ONNX node {_describe(node)}: {why}",
                           hint=hint or "fcnify converts image classifiers whose layers act on the image "
                           "position by position up to the flatten or global pool")


# ------------------------------------------------------------------------------------------- the ONNX graph


def _dims(value_info) -> list[int | str | None]:
    """The dims of a graph value: ints where fixed, the symbol's name where symbolic, None where unknown."""
    shape = value_info.type.tensor_type.shape
    if not value_info.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def _image_input(model):
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise ConversionError(f"the ONNX graph takes {len(inputs)} inputs ({names}); fcnify needs one image batch",
                              hint="export the classifier with a single N×C×H×W (or N×H×W×C) input")
    value = inputs[0]
    if len(_dims(value)) != 4:
        raise ConversionError(f"the ONNX graph's input '{value.name}' has shape {_dims(value)}, not an image batch "
                              "N×C×H×W or N×H×W×C", hint="fcnify converts 2-D image classifiers")
    return value


def _consumers(model, name: str) -> list:
    return [n for n in model.graph.node if name in n.input]


def _perm(node) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return None


def _input_layout(model, image) -> str:
    """NHWC when every consumer of the input is a ``Transpose`` to NCHW (as TensorFlow exporters write it)."""
    users = _consumers(model, image.name)
    if users and all(n.op_type == "Transpose" and _perm(n) == [0, 3, 1, 2] for n in users):
        return NHWC
    dims = _dims(image)
    if dims[3] in (1, 3, 4) and isinstance(dims[1], int) and dims[1] > 4 and users:
        # N×H×W×C worked on before any transpose to NCHW (preprocessing in NHWC): no plain NCHW input fits it
        raise _refuse(users[0], f"the graph takes N×H×W×C images {dims} and computes on them in that layout "
                      "before transposing them to N×C×H×W", hint="export the classifier with its preprocessing "
                      "removed, so that the image goes straight to a Transpose (or take N×C×H×W input)")
    return NCHW


def _drop_input_transposes(model, image) -> None:
    """Feed the NCHW input straight to what the NHWC→NCHW transposes fed."""
    for node in _consumers(model, image.name):
        for other in model.graph.node:
            for i, name in enumerate(other.input):
                if name == node.output[0]:
                    other.input[i] = image.name
        for output in model.graph.output:
            if output.name == node.output[0]:
                raise _refuse(node, "the graph returns its own input")
        model.graph.node.remove(node)


def _size_of(image, layout: str, input_size) -> tuple[tuple[int, int], int]:
    dims = _dims(image)
    channels, height, width = (dims[1], dims[2], dims[3]) if layout == NCHW else (dims[3], dims[1], dims[2])
    if not isinstance(channels, int) or channels < 1:
        raise ConversionError(f"the ONNX graph's input '{image.name}' has no fixed channel count ({dims})",
                              hint="export the classifier with a fixed number of input channels")
    fixed = (height, width) if isinstance(height, int) and isinstance(width, int) and height and width else None
    if input_size is None:
        if fixed is None:
            raise InputError(f"the ONNX graph's input '{image.name}' has symbolic height and width ({dims})",
                             hint="pass the size it was trained at with --input-size, e.g. --input-size 224")
        return fixed, channels
    size = tuple(int(v) for v in input_size)
    if fixed is not None and fixed != size:
        raise InputError(f"the ONNX graph fixes its input at {fixed[0]}x{fixed[1]}, not the "
                         f"--input-size {size[0]}x{size[1]}", hint="leave --input-size out for this model")
    return size, channels


def _set_shape(value_info, dims) -> None:
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        else:
            dim.dim_param = d


def _constants_as_initializers(model) -> None:
    """``Constant`` nodes (and ``Identity`` of a constant) as initializers: onnx2torch reads weights, Clip bounds
    and reshape shapes only from initializers."""
    onnx = _onnx()
    from onnx import numpy_helper  # lazy: onnx is imported only for ONNX files

    known = {i.name for i in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
        elif node.op_type == "Identity" and node.input[0] in known:
            source = next(i for i in model.graph.initializer if i.name == node.input[0])
            tensor = numpy_helper.from_array(numpy_helper.to_array(source), node.output[0])
        else:
            continue
        model.graph.initializer.append(tensor)
        known.add(tensor.name)
        model.graph.node.remove(node)


def _upgrade(model, where: str):
    onnx = _onnx()
    from onnx import version_converter  # lazy: onnx is imported only for ONNX files

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    others = [o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    used = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
    if used:
        node = next(n for n in model.graph.node if n.domain in used)
        raise _refuse(node, f"an operator of the custom domain '{node.domain}'",
                      hint="export the classifier with standard ONNX operators only")
    if others:
        _logger.info("%s: unused opset domains %s dropped", where, others)
    if opset == IMPORT_OPSET:
        return model
    try:
        upgraded = version_converter.convert_version(model, IMPORT_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        raise ConversionError(f"onnx cannot bring {where} from opset {opset} to {IMPORT_OPSET}: "
                              f"{type(exc).__name__}: {first_line(exc, 200)}",
                              hint="export the classifier again at opset 13 to 17") from None
    _logger.info("%s: opset %s brought to %d (onnx.version_converter)", where, opset, IMPORT_OPSET)
    return upgraded


def _inferred(model):
    onnx = _onnx()
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise ConversionError(f"onnx shape inference fails on the graph at the training size: {type(exc).__name__}: "
                              f"{first_line(exc, 200)}", hint="check --input-size") from None


def _value_dims(model) -> dict[str, list]:
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    return {v.name: _dims(v) for v in values}


def _pin_reshapes(model) -> None:
    """Give every ``Reshape`` the constant target shape shape inference found, with the batch as -1.

    Computed shapes (``Shape``→``Gather``/``Slice``→``Concat``, as Paddle and Keras exporters write a flatten) and
    shapes baked at batch 1 (``[1, -1]``) both become ``[-1, F]``: onnx2torch and the rules read a constant.
    """
    from onnx import numpy_helper  # lazy: onnx is imported only for ONNX files

    dims = _value_dims(model)
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        source, target = dims.get(node.input[0]) or [], list(dims.get(node.output[0]) or [])
        if not source or source[0] != _BATCH:
            continue
        unknown = [i for i, d in enumerate(target[1:], 1) if not isinstance(d, int)]
        known = math.prod(d for d in target[1:] if isinstance(d, int))
        if len(unknown) == 1 and target[0] == _BATCH and all(isinstance(d, int) for d in source[1:]) and known:
            # data propagation leaves the -1 of [batch, -1] open: it is what the image's other dims make
            target[unknown[0]] = math.prod(source[1:]) // known
        if target and target[0] == _BATCH and all(isinstance(d, int) and d > 0 for d in target[1:]):
            shape = [-1, *target[1:]]
        elif target and target[0] == 1 and all(isinstance(d, int) and d > 0 for d in target[1:]) and \
                all(isinstance(d, int) for d in source[1:]) and math.prod(target) == math.prod(source[1:]):
            shape = [-1, *target[1:]]  # a shape baked at batch 1 by the exporter
        elif not target or any(not isinstance(d, int) for d in target[1:]):
            raise _refuse(node, f"a reshape of {source} to a shape onnx cannot work out ({target or 'unknown'})",
                          hint="export the classifier with a constant reshape (a flatten) before its head")
        else:
            continue
        name = f"{node.output[0]}__fcnify_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(shape, dtype=np.int64), name))
        node.input[1] = name


def _explicit_auto_pads(model) -> None:
    """``auto_pad`` SAME_UPPER/SAME_LOWER/VALID (TensorFlow's "same" and "valid") as the explicit pads they give at
    the training size: onnx2torch does not read ``auto_pad``. Above the training size a strided "same" op then
    keeps the training size's padding, as a convolution with fixed padding does."""
    from onnx import helper, numpy_helper  # lazy: onnx is imported only for ONNX files

    dims = _value_dims(model)
    weights = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if node.op_type not in ("Conv", "MaxPool", "AveragePool") or mode in ("NOTSET", ""):
            continue
        size = (dims.get(node.input[0]) or [])[2:]
        kernel = list(attrs.get("kernel_shape") or [])
        if not kernel and node.op_type == "Conv" and node.input[1] in weights:
            kernel = list(numpy_helper.to_array(weights[node.input[1]]).shape[2:])
        if len(size) != 2 or not all(isinstance(v, int) for v in size) or len(kernel) != 2:
            raise _refuse(node, f"auto_pad {mode} on a map whose size onnx cannot work out ({size})")
        strides = list(attrs.get("strides") or [1, 1])
        dilations = list(attrs.get("dilations") or [1, 1])
        begin, end = [0, 0], [0, 0]
        if mode != "VALID":
            for axis in range(2):
                i, k, st, d = size[axis], kernel[axis], strides[axis], dilations[axis]
                total = max((-(-i // st) - 1) * st + (k - 1) * d + 1 - i, 0)
                small, large = total // 2, total - total // 2
                begin[axis], end[axis] = (small, large) if mode == "SAME_UPPER" else (large, small)
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("pads", begin + end)])


def _drop_dead_nodes(model) -> None:
    """Remove nodes nothing reads any more (the shape computations of reshapes given a constant shape)."""
    needed = {o.name for o in model.graph.output}
    for node in reversed(list(model.graph.node)):
        if any(o in needed for o in node.output):
            needed.update(node.input)
        else:
            model.graph.node.remove(node)


def _check_converters(model) -> None:
    """Name the first node onnx2torch has no converter for (it would say only the op type)."""
    from onnx2torch.node_converters import get_converter  # lazy: only ONNX imports need onnx2torch

    for node in model.graph.node:
        try:
            get_converter(operation_type=node.op_type, version=IMPORT_OPSET, domain=node.domain or "")
        except NotImplementedError:
            raise _refuse(node, f"onnx2torch has no converter for {node.op_type} (opset {IMPORT_OPSET})",
                          hint="fcnify converts feed-forward image classifiers (convolutions, pools, "
                          "activations, a flatten or global pool, fully-connected layers)") from None


def prepare_onnx(model, input_size=None, where: str = "the ONNX model"):
    """The ONNX graph onnx2torch and the rules can read (see the module docstring), with its facts.

    Returns:
        (prepared model, (H, W), channels, input layout).
    """
    onnx = _onnx()
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    del prepared.metadata_props[:]
    prepared = _upgrade(prepared, where)
    _constants_as_initializers(prepared)
    image = _image_input(prepared)
    layout = _input_layout(prepared, image)
    size, channels = _size_of(image, layout, input_size)
    if layout == NHWC:
        _drop_input_transposes(prepared, image)
        _logger.info("%s takes NHWC images: its leading NHWC→NCHW transpose is dropped", where)
    _set_shape(image, [_BATCH, channels, *size])
    del prepared.graph.value_info[:]
    for output in prepared.graph.output:
        output.type.tensor_type.ClearField("shape")
    prepared = _inferred(prepared)
    _pin_reshapes(prepared)
    _explicit_auto_pads(prepared)
    _drop_dead_nodes(prepared)
    prepared = _inferred(prepared)
    _check_converters(prepared)
    return prepared, size, channels, layout


# ------------------------------------------------------------------------------------------- plain ops


class ImportedGraph(torch.fx.GraphModule):
    """An imported classifier's graph, already plain ops: the conversion uses it as it is instead of tracing it
    again, so its nodes keep the ONNX nodes' names (``meta[ONNX_NODE]``) for error messages."""

    captured = True


def _identifier(text: str) -> str:
    name = re.sub(r"\W+", "_", text).strip("_")
    return name if name and not name[0].isdigit() else f"n_{name}"


class _Plain:
    """Rebuilds onnx2torch's module graph with nn modules and plain torch calls, constants folded."""

    def __init__(self, gm: torch.fx.GraphModule, onnx_nodes: dict[str, object], output_names: tuple[str, ...]):
        self.gm = gm
        self.output_names = output_names
        self.onnx_nodes = onnx_nodes  # onnx2torch's module name → the ONNX node
        self.modules = dict(gm.named_modules())
        self.graph = torch.fx.Graph()
        self.root = nn.Module()
        self.env: dict[torch.fx.Node, object] = {}
        self.constants: dict[torch.fx.Node, torch.Tensor] = {}  # old nodes whose value is known
        self.count = 0

    # -- values
    def constant(self, arg) -> torch.Tensor | None:
        return self.constants.get(arg) if isinstance(arg, torch.fx.Node) else None

    def is_constant(self, arg) -> bool:
        return not isinstance(arg, torch.fx.Node) or arg in self.constants

    def new_value(self, arg):
        """The new graph's value for an old argument: constants become buffers read with ``get_attr``."""
        if isinstance(arg, torch.fx.Node) and arg not in self.env and arg in self.constants:
            name = f"const_{self.count}"
            self.count += 1
            self.root.register_buffer(name, self.constants[arg])
            self.env[arg] = self.graph.get_attr(name)
        return torch.fx.map_arg(arg, lambda n: self.env[n])

    def emit(self, old: torch.fx.Node, op: str, target, args, kwargs=None) -> torch.fx.Node:
        node = self.graph.create_node(op, target, tuple(args), kwargs or {}, name=_identifier(old.name))
        onnx_node = self.onnx_nodes.get(old.target) if old.op == "call_module" else None
        if onnx_node is not None:
            node.meta[ONNX_NODE] = _describe(onnx_node)
        return node

    def module(self, old: torch.fx.Node, module: nn.Module, *args, **kwargs) -> torch.fx.Node:
        name, i = _identifier(old.target), 1
        while hasattr(self.root, name):
            name, i = f"{_identifier(old.target)}_{i}", i + 1
        self.root.add_module(name, module)
        return self.emit(old, "call_module", name, [self.new_value(a) for a in args],
                         {k: self.new_value(v) for k, v in kwargs.items()})

    def call(self, old: torch.fx.Node, fn, *args, **kwargs) -> torch.fx.Node:
        return self.emit(old, "call_function", fn, [self.new_value(a) for a in args],
                         {k: self.new_value(v) for k, v in kwargs.items()})

    # -- the rebuild
    def rebuild(self) -> torch.fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self.graph.placeholder("image")
            elif node.op == "get_attr":
                value = self.gm
                for part in node.target.split("."):
                    value = getattr(value, part)
                self.constants[node] = value
            elif node.op == "output":
                self.graph.output(self.outputs(node.args[0]))
            elif all(self.is_constant(a) for a in node.all_input_nodes):
                self.fold(node)
            else:
                self.env[node] = self.plain(node)
        gm = ImportedGraph(self.root, self.graph, "OnnxClassifier")
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return gm.eval()

    def outputs(self, value):
        """One output as it is; several as a dict by the ONNX graph's output names (the names ``--output`` takes)."""
        if len(self.output_names) == 1:
            return self.new_value(value)
        values = list(value) if isinstance(value, (tuple, list)) else [value]
        if len(values) != len(self.output_names):
            raise ConversionError(f"the ONNX graph returns {len(self.output_names)} outputs from {len(values)} values "
                                  "(an output repeated)", hint="export each output once")
        return {name: self.new_value(v) for name, v in zip(self.output_names, values, strict=True)}

    def fold(self, node: torch.fx.Node) -> None:
        """Evaluate a node whose inputs are all constant (weights transposed or scaled in the graph, shapes)."""
        args = torch.fx.map_arg(node.args, lambda n: self.constants[n])
        kwargs = torch.fx.map_arg(node.kwargs, lambda n: self.constants[n])
        with torch.no_grad():
            if node.op == "call_module":
                value = self.modules[node.target](*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                value = node.target(*args, **kwargs)
        self.constants[node] = value

    def plain(self, node: torch.fx.Node):
        if node.op == "call_function":  # getitem of a multi-output node
            return self.call(node, node.target, *node.args)
        module = self.modules[node.target]
        kind = type(module).__name__
        builder = _PLAIN.get(kind)
        if builder is not None:
            return builder(self, node, module)
        if isinstance(module, nn.Sequential):  # onnx2torch's padding + pool: one call each
            value = self.new_value(node.args[0])
            for i, inner in enumerate(module):
                if type(inner).__name__ == "OnnxPadStatic":
                    value = self.emit(node, "call_function", F.pad, [value, *_pad_args(inner)])
                else:
                    name = f"{_identifier(node.target)}_{i}"
                    self.root.add_module(name, inner)
                    value = self.emit(node, "call_module", name, [value])
            return value
        return self.module(node, module, *node.args, **node.kwargs)

    def refuse(self, node: torch.fx.Node, why: str, hint: str) -> ConversionError:
        onnx_node = self.onnx_nodes.get(node.target)
        where = _describe(onnx_node) if onnx_node is not None else f"'{node.name}'"
        return ConversionError(f"cannot convert ONNX node {where}: {why}", hint=hint)

def _binary(p: _Plain, node, module):
    fn = {torch.add: operator.add, torch.sub: operator.sub, torch.mul: operator.mul}.get(module.math_op_function,
                                                                                       operator.truediv)
    first, second = node.args
    if getattr(module, "broadcast", None) == 1 and module.axis is not None:
        raise p.refuse(node, "an opset-1 broadcast", hint="export the classifier again at opset 13 to 17")
    if fn is operator.add:
        fused = _bias_into_linear(p, first, second) or _bias_into_linear(p, second, first)
        if fused is not None:
            return fused

    def scalar(arg):  # a one-value constant is a number: the rules treat it as a scalar
        value = p.constant(arg)
        return value.reshape(()).item() if value is not None and value.numel() == 1 and value.dim() <= 1 else arg

    return p.call(node, fn, scalar(first), scalar(second))


def _bias_into_linear(p: _Plain, product, bias_arg):
    """``MatMul`` + ``Add`` of a per-output constant (Paddle's and TensorFlow's fully-connected layer) as one
    ``nn.Linear`` with a bias, when the product is a bias-less Linear read by that Add only."""
    bias = p.constant(bias_arg)
    linear_node = p.env.get(product) if isinstance(product, torch.fx.Node) else None
    if bias is None or linear_node is None or linear_node.op != "call_module" or len(product.users) != 1:
        return None
    linear = getattr(p.root, linear_node.target)
    if not isinstance(linear, nn.Linear) or linear.bias is not None or bias.numel() != linear.out_features \
            or bias.dim() > 2:
        return None
    linear.bias = nn.Parameter(bias.reshape(-1).to(linear.weight.dtype).clone(), requires_grad=False)
    return linear_node


def _matmul(p: _Plain, node, module):
    weight = p.constant(node.args[1])
    if weight is not None and weight.dim() == 2 and p.constant(node.args[0]) is None:
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
        return p.module(node, linear, node.args[0])
    return p.call(node, torch.matmul, *node.args)


def _gemm(p: _Plain, node, module):
    a, b = node.args[0], node.args[1]
    c = node.args[2] if len(node.args) > 2 else node.kwargs.get("input_c")
    weight, bias = p.constant(b), p.constant(c)
    if module.trans_a or weight is None or (c is not None and bias is None):
        raise p.refuse(node, "transA=1 transposes the batch" if module.trans_a else
                       "its weights are computed from the image",
                       hint="export the classifier with constant fully-connected weights")
    weight = (weight.T if not module.trans_b else weight) * module.alpha
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=c is not None, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if c is not None:
        linear.bias = nn.Parameter((bias * module.beta).reshape(-1).expand(weight.shape[0]).contiguous(),
                                   requires_grad=False)
    return p.module(node, linear, a)


def _reshape(p: _Plain, node, module):
    shape = p.constant(node.args[1])
    if shape is None:
        raise p.refuse(node, "its target shape is computed from the image",
                       hint="export the classifier with a constant reshape (a flatten)")
    return p.call(node, torch.reshape, node.args[0], tuple(int(v) for v in shape.tolist()))


def _flatten(p: _Plain, node, module):
    if module.axis == 1:
        return p.call(node, torch.flatten, node.args[0], 1)
    raise p.refuse(node, f"axis {module.axis} also flattens the batch",
                   hint="export the classifier with Flatten(axis=1)")


def _transpose(p: _Plain, node, module):
    return p.emit(node, "call_method", "permute", [p.new_value(node.args[0]), tuple(module.perm)])


def _global_average(p: _Plain, node, module):
    return p.call(node, torch.mean, node.args[0], (2, 3), keepdim=True)


def _reduce(p: _Plain, node, module):
    fn = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax}.get(module.operation_type)
    if fn is None or module.axes is None:
        return p.module(node, module, node.args[0])
    return p.call(node, fn, node.args[0], tuple(module.axes), keepdim=bool(module.keepdims))


def _reduce_sum(p: _Plain, node, module):
    if module._axes is None:  # noqa: SLF001 - onnx2torch keeps ReduceSum's static axes privately
        return p.module(node, module, node.args[0])
    return p.call(node, torch.sum, node.args[0], tuple(module._axes), keepdim=bool(module._keepdims))  # noqa: SLF001


def _clip(p: _Plain, node, module):
    return p.call(node, torch.clamp, node.args[0], module.min_val, module.max_val)


def _hard_sigmoid(p: _Plain, node, module):
    if math.isclose(module.alpha, 1 / 6, rel_tol=1e-6) and module.beta == 0.5:
        return p.module(node, nn.Hardsigmoid(), node.args[0])
    scaled = p.call(node, operator.mul, node.args[0], float(module.alpha))
    shifted = p.emit(node, "call_function", operator.add, [scaled, float(module.beta)])
    return p.emit(node, "call_function", torch.clamp, [shifted, 0.0, 1.0])


def _softmax(p: _Plain, node, module):
    fn = torch.log_softmax if module.is_log else torch.softmax
    return p.call(node, fn, node.args[0], module.axis)


def _squeeze(p: _Plain, node, module):
    axes = getattr(module, "axes", None)
    if axes is None:
        return p.module(node, module, node.args[0])
    value = node.args[0]
    result = p.new_value(value)
    for axis in sorted(axes, reverse=True):
        result = p.emit(node, "call_function", torch.squeeze, [result, axis])
    return result


def _unsqueeze(p: _Plain, node, module):
    result = p.new_value(node.args[0])
    for axis in module._axes:  # noqa: SLF001 - onnx2torch keeps Unsqueeze's static axes privately
        result = p.emit(node, "call_function", torch.unsqueeze, [result, axis])
    return result


def _pad_args(module) -> tuple:
    return tuple(module.pads), "constant", float(module.constant_value or 0.0)


def _pad(p: _Plain, node, module):
    if getattr(module, "pads", None) is None or module.mode != "constant":
        return p.module(node, module, *node.args)
    return p.call(node, F.pad, node.args[0], *_pad_args(module))


def _prelu(p: _Plain, node, module):
    slope = p.constant(node.args[1])
    if slope is None or not (slope.numel() == 1 or all(s == 1 for s in slope.shape[1:])):
        return p.module(node, module, *node.args)  # a slope per position, or computed: onnx2torch's module
    prelu = nn.PReLU(slope.numel(), dtype=slope.dtype)
    prelu.weight = nn.Parameter(slope.reshape(-1).clone(), requires_grad=False)
    return p.module(node, prelu, node.args[0])


def _identity(p: _Plain, node, module):
    return p.new_value(node.args[0])


_PLAIN = {
    "OnnxBinaryMathOperation": _binary, "OnnxMatMul": _matmul, "OnnxGemm": _gemm, "OnnxReshape": _reshape,
    "OnnxFlatten": _flatten, "OnnxTranspose": _transpose, "OnnxGlobalAveragePool": _global_average,
    "OnnxGlobalAveragePoolWithKnownInputShape": _global_average, "OnnxReduceStaticAxes": _reduce,
    "OnnxReduceSumStaticAxes": _reduce_sum, "OnnxClip": _clip, "OnnxHardSigmoid": _hard_sigmoid,
    "OnnxSoftmaxV1V11": _softmax, "OnnxSqueezeStaticAxes": _squeeze, "OnnxUnsqueezeStaticAxes": _unsqueeze,
    "OnnxPadStatic": _pad, "OnnxPReLU": _prelu, "Identity": _identity, "OnnxCast": _identity,
}


def _onnx2torch(prepared):
    from onnx2torch import convert as onnx_to_torch  # lazy: only ONNX imports need onnx2torch
    from onnx2torch.onnx_graph import OnnxGraph

    try:
        gm = onnx_to_torch(prepared)
    except Exception as exc:
        raise ConversionError(f"onnx2torch cannot import the graph: {type(exc).__name__}: {first_line(exc, 200)}",
                              hint="export the classifier again at opset 13 to 17 with standard operators") from None
    graph = OnnxGraph(prepared.graph)
    return gm, {name: node.proto for name, node in graph.nodes.items()}


def _output_counts(prepared) -> tuple[tuple[str, ...], tuple[int, ...]]:
    dims = _value_dims(prepared)
    names, counts = [], []
    for output in prepared.graph.output:
        shape = dims.get(output.name) or []
        rest = shape[1:]
        names.append(output.name)
        counts.append(math.prod(rest) if rest and all(isinstance(d, int) for d in rest) else 0)
    return tuple(names), tuple(counts)


def import_onnx(model, input_size=None, where: str = "the ONNX model") -> ImportedOnnx:
    """An ONNX classifier (``onnx.ModelProto``) as a torch graph taking N×C×H×W images.

    Args:
        model: the ONNX model; it is not modified.
        input_size: the training size (H, W); needed when the graph's height and width are symbolic.
        where: how messages name the model (its path).

    Raises:
        InputError: a symbolic size without ``input_size``, or an ``input_size`` the graph does not take.
        ConversionError: a graph fcnify cannot import, naming the ONNX node and why.
    """
    prepared, size, channels, layout = prepare_onnx(model, input_size, where)
    gm, onnx_nodes = _onnx2torch(prepared)
    names, classes = _output_counts(prepared)
    plain = _Plain(gm, onnx_nodes, names).rebuild()
    return ImportedOnnx(plain, size, channels, layout, names, classes)


__all__ = [
    "IMPORT_OPSET", "ImportedGraph", "NCHW", "NHWC", "ONNX_NODE", "ImportedOnnx", "import_onnx", "prepare_onnx",
    "read_onnx"
]
