"""A corpus of ONNX classifiers fcnify did not make, as other frameworks' exporters write them.

Each builder returns the serialized model (bytes). Graphs are written with onnx's helper API (numpy initializers,
fixed seeds) where that is how the pattern reaches users (Paddle's computed reshapes, TensorFlow's NHWC input),
and exported from small torch models with the TorchScript exporter (``dynamo=False``) at an old opset where
that is the realistic path (a Keras-style port).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

CLASSES = 5


def _init(name: str, shape, rng: np.random.Generator, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _model(nodes, inputs, outputs, initializers, opset: int) -> bytes:
    graph = helper.make_graph(nodes, "wild", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="wild")
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _classifier(nodes, input_shape: list, initializers, opset: int) -> bytes:
    """A one-input classifier graph: float input ``x`` of ``input_shape``, output ``logits`` (batch × CLASSES)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])
    return _model(nodes, [x], [y], initializers, opset)


def _bn(prefix: str, channels: int, rng: np.random.Generator) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), f"{prefix}_g"),
            numpy_helper.from_array(rng.uniform(-0.5, 0.5, channels).astype(np.float32), f"{prefix}_b"),
            numpy_helper.from_array(rng.uniform(-0.5, 0.5, channels).astype(np.float32), f"{prefix}_m"),
            numpy_helper.from_array(rng.uniform(0.5, 2.0, channels).astype(np.float32), f"{prefix}_v")]


def paddle_style(opset: int = 11) -> bytes:
    """Conv-BN-ReLU, pools, arithmetic with constants; a flatten as Reshape to ``Concat(Slice(Shape(x)), [-1])``,
    then ``MatMul`` + ``Add`` (Paddle's fully-connected layer). Padding-free: dense cells equal crops. 20×20."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "bn1_g", "bn1_b", "bn1_m", "bn1_v"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Mul", ["p1", "scale"], ["s1"], name="scale1"),
        helper.make_node("Div", ["s1", "two"], ["d1"], name="halve"),
        helper.make_node("Conv", ["d1", "w2"], ["c2"], kernel_shape=[3, 3], name="conv2"),
        helper.make_node("Add", ["c2", "shift"], ["a2"], name="shift2"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("AveragePool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], name="pool2"),
        helper.make_node("Shape", ["p2"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"], name="batch"),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0, name="target"),
        helper.make_node("Reshape", ["p2", "target"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc_w"], ["mm"], name="fc_matmul"),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="fc_add"),
    ]
    inits = [_init("w1", (8, 3, 3, 3), rng), _init("b1", (8,), rng), *_bn("bn1", 8, rng),
             _init("scale", (1, 8, 1, 1), rng), numpy_helper.from_array(np.float32(2.0), "two"),
             _init("w2", (6, 8, 3, 3), rng), _init("shift", (1, 6, 1, 1), rng),
             _ints("zero", [0]), _ints("one", [1]), _ints("minus_one", [-1]),
             _init("fc_w", (6 * 3 * 3, CLASSES), rng), _init("fc_b", (CLASSES,), rng)]
    return _classifier(nodes, ["batch", 3, 20, 20], inits, opset)


def tf_nhwc_input(opset: int = 13) -> bytes:
    """A TensorFlow export: input ``[1, 16, 16, 3]`` (NHWC, batch fixed at 1) and a Transpose to NCHW; Clip with
    bounds as inputs (ReLU6); Keras's NHWC flatten (Transpose back, then Flatten); Gemm with transB=0, alpha and
    beta, its weights from Constant nodes and its bias 1×K. Padding-free. 16×16."""
    rng = np.random.default_rng(2)
    weight = (rng.standard_normal((4 * 6 * 6, CLASSES)) * 0.3).astype(np.float32)
    bias = (rng.standard_normal((1, CLASSES)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], kernel_shape=[3, 3], name="conv1"),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[2, 2], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Transpose", ["r2"], ["nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
        helper.make_node("Flatten", ["nhwc"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Constant", [], ["fc_w"], value=numpy_helper.from_array(weight, "fc_w_value"), name="fc_w"),
        helper.make_node("Constant", [], ["fc_b"], value=numpy_helper.from_array(bias, "fc_b_value"), name="fc_b"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], alpha=0.5, beta=2.0, transB=0, name="dense"),
    ]
    inits = [_init("w1", (6, 3, 3, 3), rng), _init("b1", (6,), rng), _init("w2", (4, 6, 2, 2), rng),
             _init("b2", (4,), rng), numpy_helper.from_array(np.float32(0.0), "lo"),
             numpy_helper.from_array(np.float32(6.0), "hi")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])
    return _model(nodes, [x], [y], inits, opset)


def se_reduce_mean(opset: int = 13) -> bytes:
    """Squeeze-excitation (GlobalAveragePool in the body, HardSigmoid gate) and a ReduceMean head (axes an
    attribute below opset 18, an input from 18); Gemm weights behind an Identity; HardSwish. Symbolic H×W:
    the training size must be given (24×24)."""
    rng = np.random.default_rng(3)
    axes_in_input = opset >= 18
    reduce = helper.make_node("ReduceMean", ["h", "axes"] if axes_in_input else ["h"], ["pooled"], keepdims=0,
                              name="head_mean", **({} if axes_in_input else {"axes": [2, 3]}))
    act = (helper.make_node("HardSwish", ["c1"], ["a1"], name="hswish") if opset >= 14
           else helper.make_node("Relu", ["c1"], ["a1"], name="relu1"))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2],
                         name="stem"),
        act,
        helper.make_node("GlobalAveragePool", ["a1"], ["squeeze"], name="se_pool"),
        helper.make_node("Conv", ["squeeze", "se_w1", "se_b1"], ["se1"], kernel_shape=[1, 1], name="se_reduce"),
        helper.make_node("Relu", ["se1"], ["se2"], name="se_relu"),
        helper.make_node("Conv", ["se2", "se_w2", "se_b2"], ["se3"], kernel_shape=[1, 1], name="se_expand"),
        helper.make_node("HardSigmoid", ["se3"], ["gate"], alpha=1 / 6, beta=0.5, name="se_gate"),
        helper.make_node("Mul", ["a1", "gate"], ["excited"], name="se_scale"),
        helper.make_node("Conv", ["excited", "w2"], ["c2"], kernel_shape=[3, 3], name="conv2"),
        helper.make_node("HardSigmoid", ["c2"], ["h"], alpha=0.2, beta=0.5, name="hsig"),
        reduce,
        helper.make_node("Identity", ["fc_w_raw"], ["fc_w"], name="fc_w_identity"),
        helper.make_node("Gemm", ["pooled", "fc_w", "fc_b"], ["logits"], transB=1, name="classifier"),
    ]
    inits = [_init("w1", (8, 3, 3, 3), rng), _init("b1", (8,), rng), _init("se_w1", (4, 8, 1, 1), rng),
             _init("se_b1", (4,), rng), _init("se_w2", (8, 4, 1, 1), rng), _init("se_b2", (8,), rng),
             _init("w2", (12, 8, 3, 3), rng), _init("fc_w_raw", (CLASSES, 12), rng), _init("fc_b", (CLASSES,), rng)]
    if axes_in_input:
        inits.append(_ints("axes", [2, 3]))
    return _classifier(nodes, ["batch", 3, "height", "width"], inits, opset)


def ceil_pools(opset: int = 9) -> bytes:
    """Old-opset pools: MaxPool and AveragePool with pads, AveragePool with ceil_mode (opset ≥ 10), Clip with
    min/max attributes (opset < 11), a Flatten + Gemm head. 18×18."""
    rng = np.random.default_rng(4)
    clip = (helper.make_node("Clip", ["c1"], ["r1"], min=0.0, max=4.0, name="clip") if opset < 11
            else helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="clip"))
    ceil = {"ceil_mode": 1} if opset >= 10 else {}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], name="conv1"),
        clip,
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         name="maxpool"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], name="conv2"),
        helper.make_node("AveragePool", ["c2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], name="avgpool", **ceil),
        helper.make_node("Flatten", ["p2"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
    ]
    inits = [_init("w1", (6, 3, 3, 3), rng), _init("b1", (6,), rng), _init("w2", (5, 6, 3, 3), rng),
             _init("b2", (5,), rng), _init("fc_w", (CLASSES, 5 * 3 * 3), rng), _init("fc_b", (CLASSES,), rng)]
    if opset >= 11:
        inits += [numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(4.0), "hi")]
    return _classifier(nodes, ["batch", 3, 18, 18], inits, opset)


def lstm_head() -> bytes:
    """Unsupported: an LSTM over the flattened features (no converter, no position-wise twin)."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], name="conv1"),
        helper.make_node("Reshape", ["c1", "seq_shape"], ["seq"], name="to_sequence"),
        helper.make_node("LSTM", ["seq", "W", "R"], ["out"], hidden_size=4, name="recurrent_head"),
        helper.make_node("Flatten", ["out"], ["logits"], axis=1, name="flatten"),
    ]
    inits = [_init("w1", (2, 3, 3, 3), rng), _ints("seq_shape", [-1, 1, 2 * 6 * 6]),
             _init("W", (1, 16, 2 * 6 * 6), rng), _init("R", (1, 16, 4), rng)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    return _model(nodes, [x], [y], inits, 13)


def position_mixing_head() -> bytes:
    """Unsupported: after the flatten, the features are reshaped into 4 rows and a softmax runs across them,
    mixing what come from different positions."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], name="conv1"),
        helper.make_node("Flatten", ["c1"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Reshape", ["flat", "rows"], ["grid"], name="rows_reshape"),
        helper.make_node("Softmax", ["grid"], ["mixed"], axis=1, name="mix_positions"),
        helper.make_node("Flatten", ["mixed"], ["flat2"], axis=1, name="flatten2"),
        helper.make_node("Gemm", ["flat2", "fc_w"], ["logits"], transB=1, name="fc"),
    ]
    inits = [_init("w1", (4, 3, 3, 3), rng), _ints("rows", [-1, 4, 36]), _init("fc_w", (CLASSES, 144), rng)]
    return _classifier(nodes, ["batch", 3, 8, 8], inits, 13)


class KerasPort(nn.Module):
    """A Keras-style classifier ported to PyTorch: NHWC input, ReLU6, a ceil-mode max pool, HardSwish, a NHWC
    flatten (``permute(0, 2, 3, 1).reshape(n, -1)``) and a Dense layer. Padding-free."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(),
                                  nn.MaxPool2d(3, 2, ceil_mode=True), nn.Conv2d(8, 8, 3), nn.Hardswish())
        self.dense = nn.Linear(8 * 5 * 5, CLASSES)

    def forward(self, x):
        x = self.body(x.permute(0, 3, 1, 2))
        return self.dense(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))


def keras_export(opset: int = 11, size: int = 16) -> bytes:
    """``KerasPort`` exported with the TorchScript exporter at ``opset``: NHWC input [N, 16, 16, 3], Transpose,
    a computed Reshape (``Shape``→``Gather``→``Concat``) and Gemm."""
    torch.manual_seed(7)
    model = KerasPort().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, size, size, 3),), buffer, dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
    return buffer.getvalue()


def two_heads(opset: int = 13) -> bytes:
    """Two heads on one trunk (a cascade detector's stage): ``bbox`` (Gemm, 4 values) and ``prob`` (Gemm then
    Softmax over 2 classes), each its own graph output. Padding-free. 12×12."""
    rng = np.random.default_rng(8)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], name="conv1"),
        helper.make_node("PRelu", ["c1", "slope"], ["a1"], name="prelu1"),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "box_w", "box_b"], ["bbox"], transB=1, name="bbox_fc"),
        helper.make_node("Gemm", ["flat", "cls_w", "cls_b"], ["cls"], transB=1, name="cls_fc"),
        helper.make_node("Softmax", ["cls"], ["prob"], axis=1, name="cls_softmax"),
    ]
    inits = [_init("w1", (6, 3, 3, 3), rng), _init("b1", (6,), rng),
             numpy_helper.from_array(rng.uniform(0.05, 0.3, (6, 1, 1)).astype(np.float32), "slope"),
             _init("w2", (8, 6, 3, 3), rng), _init("b2", (8,), rng), _init("box_w", (4, 8 * 3 * 3), rng),
             _init("box_b", (4,), rng), _init("cls_w", (2, 8 * 3 * 3), rng), _init("cls_b", (2,), rng)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 12, 12])
    outputs = [helper.make_tensor_value_info("bbox", TensorProto.FLOAT, ["batch", 4]),
               helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 2])]
    return _model(nodes, [x], outputs, inits, opset)


def tf_same_padding(opset: int = 13) -> bytes:
    """TensorFlow's "same" padding: a strided Conv with asymmetric pads [0, 0, 1, 1] and a MaxPool with
    ``auto_pad=SAME_UPPER`` (onnx2torch reads neither form by itself). 16×16."""
    rng = np.random.default_rng(9)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1],
                         name="conv_same"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER",
                         name="pool_same"),
        helper.make_node("Flatten", ["p1"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
    ]
    inits = [_init("w1", (4, 3, 3, 3), rng), _init("fc_w", (CLASSES, 4 * 4 * 4), rng), _init("fc_b", (CLASSES,), rng)]
    return _classifier(nodes, ["batch", 3, 16, 16], inits, opset)


def nhwc_preprocessing() -> bytes:
    """Unsupported: an NHWC input rescaled in NHWC before its Transpose to NCHW (no N×C×H×W input fits it)."""
    rng = np.random.default_rng(10)
    nodes = [
        helper.make_node("Mul", ["x", "rescale"], ["scaled"], name="keras_rescaling"),
        helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["nchw", "w1"], ["c1"], kernel_shape=[3, 3], name="conv1"),
        helper.make_node("GlobalAveragePool", ["c1"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["logits"], axis=1, name="flatten"),
    ]
    inits = [numpy_helper.from_array(np.full(3, 1 / 255, np.float32), "rescale"), _init("w1", (CLASSES, 3, 3, 3), rng)]
    return _classifier(nodes, ["batch", 12, 12, 3], inits, 13)
