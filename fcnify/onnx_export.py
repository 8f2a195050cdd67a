"""ONNX files of a converted network: dynamic batch, height and width, fcnify metadata, checked before success.

``export_onnx`` writes the fully-convolutional network with the ``torch.export``-based exporter
(``torch.onnx.export(..., dynamo=True)``; the TorchScript exporter only when that one fails), then refuses
the file unless

1. the graph keeps batch, height and width symbolic and no op hard-codes the export-time size (a fixed
   map size downstream of the input, global pooling that the geometry does not know of, non-ONNX ops),
2. ``onnx.checker.check_model(full_check=True)`` passes, and
3. onnxruntime agrees with PyTorch at the training size and at larger sizes, one non-square and one that is
   not a whole number of strides above it (relative error ≤ 1e-4 in float32).

The metadata travels in the model's ``metadata_props`` as JSON strings (``input_size``, ``in_chans``,
``geometry``, ``mean``, ``std``, ``labels``, ``source``, and ``fcnify``: the whole ``ModelMetadata``), so
the file can be used with onnxruntime alone. Running such a file (``OnnxNet``, ``load_onnx_model``) is
``onnx_runtime``'s.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fcnify.convert import FullyConvolutionalNet, convert
from fcnify.convert.geometry import Geometry
from fcnify.convert.outputs import flatten_outputs
from fcnify.errors import ExportError, ModelLoadError, NotEquivalentError
from fcnify.export import ModelMetadata, atomic_output, export_program
from fcnify.introspect import placement
from fcnify.onnx_runtime import METADATA_KEY, OnnxNet, one_line_cause
from fcnify.optional import require

_logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
ONNX_RTOL = 1e-4
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_DIM_NAMES = ("batch", "height", "width")
_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_REDUCES = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSum",
            "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare"}


# ------------------------------------------------------------------------------------------------ reports


@dataclass
class OnnxAgreement:
    """onnxruntime against PyTorch at one input size. ``max_rel_error`` is relative to the largest reference."""

    input_size: tuple[int, int]
    output_size: tuple[int, int]
    max_abs_error: float
    max_rel_error: float
    tolerance: float = ONNX_RTOL
    batch: int = 2
    output: str = ""  # the output compared, for a network with several

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


@dataclass
class OnnxReport:
    """What ``export_onnx`` wrote and checked.

    Attributes:
        path: the file written.
        opset: the default-domain opset of the graph.
        exporter: ``"dynamo"`` (``torch.onnx.export(dynamo=True)`` from a ``torch.export`` program) or
            ``"torchscript"`` (the legacy exporter with ``dynamic_axes``, used only when the first failed).
        checks: onnxruntime against PyTorch, one per input size.
        export_seconds: time spent in the exporter (capture and translation).
        check_seconds: time spent in the checker and the runtime comparison.
        size_bytes: the file's size.
        providers: the onnxruntime execution providers used for the checks.
        notes: how the export went (fallbacks and their causes).
    """

    path: Path
    opset: int
    exporter: str
    checks: list[OnnxAgreement]
    export_seconds: float
    check_seconds: float
    size_bytes: int
    providers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "opset": self.opset, "exporter": self.exporter, "passed": self.passed,
            "checks": [c.to_dict() for c in self.checks], "export_seconds": self.export_seconds,
            "check_seconds": self.check_seconds, "size_bytes": self.size_bytes, "providers": self.providers,
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------------------ helpers


def check_sizes(input_size: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int]]:
    """The sizes an export is checked at: the training size, a larger non-square one, and one larger by a
    number of pixels that is not a whole number of strides (so the map's last cell does not reach the border)."""
    (h, w), (sy, sx) = input_size, (max(1, int(stride[0])), max(1, int(stride[1])))
    sizes = [(h, w), (h + 2 * sy, w + 4 * sx), (h + sy + 1 + (sy - 1) // 2, w + 2 * sx + 1)]
    return list(dict.fromkeys(sizes))


def _metadata_props(metadata: ModelMetadata) -> dict[str, str]:
    data = metadata.to_dict()
    props = {key: json.dumps(data[key]) for key in ("input_size", "in_chans", "geometry", "mean", "std", "labels")}
    props["source"] = json.dumps(data["source"])
    props["fcnify_version"] = json.dumps(data["fcnify_version"])
    props[METADATA_KEY] = json.dumps(data)
    return props


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _rename_dims(model) -> None:
    """Name the input's symbolic dims batch/height/width and rewrite every shape expression that uses them."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    mapping = {}
    for index, name in zip((0, 2, 3), _DIM_NAMES, strict=True):
        if index < len(dims) and dims[index].dim_param and dims[index].dim_param not in _DIM_NAMES:
            mapping[dims[index].dim_param] = name
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in mapping) + r")\b")
    for info in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if not info.type.HasField("tensor_type"):
            continue
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: mapping[m.group(1)], dim.dim_param)


# ----------------------------------------------------------------------------------------------- exporting


def onnx_output_names(names: tuple[str, ...]) -> list[str]:
    """The graph's output names: ``logits`` for a network with one output, ``output_<name>`` for each of several."""
    if len(names) <= 1:
        return [OUTPUT_NAME]
    return [f"output_{re.sub(r'[^A-Za-z0-9_]+', '_', n)}" for n in names]


def _output_names_of(fcn: FullyConvolutionalNet) -> list[str]:
    return onnx_output_names(tuple(getattr(fcn, "output_names", ())))


def _export_dynamo(fcn: FullyConvolutionalNet, opset: int, notes: list[str]):
    program = export_program(fcn)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset, verbose=False,
                                         input_names=[INPUT_NAME], output_names=_output_names_of(fcn),
                                         optimize=True)
    return onnx_program.model_proto


@contextlib.contextmanager
def _quiet_fds():
    """Silence file descriptors 1 and 2: the TorchScript exporter's C++ log prints the graph on failure."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for fd, copy_fd in saved:
            os.dup2(copy_fd, fd)
            os.close(copy_fd)
        os.close(devnull)


def _export_torchscript(fcn: FullyConvolutionalNet, opset: int):
    import onnx  # lazy: heavy (about half a second), and only ONNX files need it

    (h, w), (sy, sx) = fcn.input_size, fcn.geometry.stride
    example = torch.zeros(2, fcn.in_chans, h + 2 * sy + 1, w + 2 * sx + 1, device=placement(fcn)[0])
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    outputs = _output_names_of(fcn)
    with warnings.catch_warnings(), _quiet_fds(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(fcn.eval(), (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=outputs,
                          dynamic_axes={INPUT_NAME: axes} | {
                              name: {0: "batch", 2: "map_height", 3: "map_width"} for name in outputs})
    return onnx.load_from_string(buffer.getvalue())


def _export(fcn: FullyConvolutionalNet, opset: int | None) -> tuple[object, str, list[str]]:
    """The ONNX ModelProto, the exporter used and notes; ExportError naming the cause in one line."""
    require("onnx", None, "write ONNX files")
    try:
        import onnxscript  # noqa: F401  (probed: the dynamo exporter's op library; without it, TorchScript's)
    except ImportError:
        onnxscript_missing = True
    else:
        onnxscript_missing = False
    notes: list[str] = []
    opset = opset or DEFAULT_OPSET
    dynamo_error = None
    if onnxscript_missing:
        dynamo_error = "onnxscript is not installed"
    else:
        try:
            return _export_dynamo(fcn, opset, notes), "dynamo", notes
        except ExportError as exc:
            dynamo_error = exc.message
        except Exception as exc:  # the exporter's own errors (an op without an ONNX function, …)
            dynamo_error = one_line_cause(exc)
    notes.append(f"the dynamo exporter failed ({dynamo_error}); used the TorchScript exporter")
    try:
        return _export_torchscript(fcn, opset), "torchscript", notes
    except Exception as exc:
        hint = ("pip install onnxscript" if onnxscript_missing else
                "replace the op with ones ONNX has, or use the .pt2 export (fcnify convert -o model.pt2)")
        raise ExportError(f"cannot export to ONNX: {dynamo_error}; the TorchScript exporter also failed: "
                          f"{one_line_cause(exc, 200)}", hint=hint) from exc


# ------------------------------------------------------------------------------------------- graph checks


def _shape(info) -> list | None:
    if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in info.type.tensor_type.shape.dim]


def _constants(model) -> dict[str, list[int]]:
    from onnx import numpy_helper  # lazy: heavy, only ONNX files need it

    values = {}
    for init in model.graph.initializer:
        if init.data_type == 7 and len(init.dims) <= 1:  # INT64 vectors: axes, shapes
            values[init.name] = [int(v) for v in numpy_helper.to_array(init).reshape(-1)]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value" and attr.t.data_type == 7 and len(attr.t.dims) <= 1:
                values[node.output[0]] = [int(v) for v in numpy_helper.to_array(attr.t).reshape(-1)]
            elif attr.name in ("value_ints", "value_int"):
                values[node.output[0]] = list(attr.ints) if attr.name == "value_ints" else [attr.i]
    return values


def size_problems(model, geometry: Geometry | None = None) -> list[str]:
    """What in an exported graph would make it wrong at sizes other than the export-time size.

    Checks: the input's batch/height/width and the output's map size are symbolic; no map computed from the
    input has a fixed size above 1 (an adaptive pool or resize to a constant size, a reshape to constant
    spatial dims); no global pooling unless the geometry records global context (squeeze-excitation); every
    op is a standard ONNX op.
    """
    import onnx  # lazy: heavy, only ONNX files need it

    problems: list[str] = []
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) < 1:
        return [f"the graph has {len(inputs)} inputs and {len(graph.output)} outputs, not one input and outputs"]
    in_shape = _shape(inputs[0])
    if in_shape is None or len(in_shape) != 4:
        return ["the graph's input is not N×C×H×W"]
    for index, name in zip((0, 2, 3), _DIM_NAMES, strict=True):
        if not isinstance(in_shape[index], str):
            problems.append(f"the input's {name} is fixed to {in_shape[index]}")
    for output in graph.output:
        out_shape = _shape(output)
        which = f"output {output.name}" if len(graph.output) > 1 else "output"
        if out_shape is None or len(out_shape) != 4:
            problems.append(f"the graph's {which} is not N×K×h×w")
            continue
        for index, name in zip((2, 3), ("height", "width"), strict=True):
            if isinstance(out_shape[index], int):
                problems.append(f"the {which}'s map {name} is fixed to {out_shape[index]}: it does not follow the "
                                "input")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is a help here; the runtime comparison still runs
        inferred = model
    shapes = {v.name: _shape(v) for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    constants = _constants(model)
    reachable = {inputs[0].name}
    global_context = bool(geometry is not None and geometry.global_context)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name or node.op_type} is {node.domain}::{node.op_type}, "
                            "not a standard ONNX op")
        if not any(i in reachable for i in node.input):
            continue
        reachable.update(o for o in node.output if o)
        label = f"{node.op_type} node {node.name or node.output[0]}"
        if node.op_type in _GLOBAL_POOLS and not global_context:
            problems.append(f"{label} pools over the whole map, which the converted geometry does not expect")
        if node.op_type in _REDUCES and not global_context:
            rank = len(shapes.get(node.input[0]) or []) if node.input[0] in shapes else 4
            axes = None
            if len(node.input) > 1 and node.input[1]:
                axes = constants.get(node.input[1])
            else:
                attr = next((a for a in node.attribute if a.name == "axes"), None)
                axes = list(attr.ints) if attr is not None else []
            if axes is not None and rank == 4 and (not axes or {a % 4 for a in axes} & {2, 3}):
                problems.append(f"{label} reduces over height/width, which the converted geometry does not expect")
        for out in node.output:
            shape = shapes.get(out)
            if shape and len(shape) == 4 and any(isinstance(d, int) and d > 1 for d in shape[2:]):
                problems.append(f"{label} makes a map of fixed size {shape[2]}×{shape[3]}: the export-time "
                                "size is hard-coded")
                break
    return list(dict.fromkeys(problems))


# -------------------------------------------------------------------------------------------- verification


def _reference(fcn_or_module: nn.Module, metadata: ModelMetadata | None) -> nn.Module:
    """A network giving N×K×h×w maps: the module itself, or the conversion of a classifier."""
    if isinstance(fcn_or_module, (FullyConvolutionalNet, OnnxNet)):
        return fcn_or_module
    if metadata is None:
        raise ModelLoadError("cannot compare an ONNX file without fcnify metadata against a classifier",
                             hint="give the converted network instead")
    module = fcn_or_module.eval()
    probe = torch.zeros(1, metadata.in_chans, *metadata.input_size, device=placement(module)[0])
    with torch.no_grad():
        out = next(iter(flatten_outputs(module(probe)).values()))
    if out.dim() == 4:
        return module
    return convert(module, metadata.input_size, metadata.in_chans)


@torch.no_grad()
def verify_onnx(onnx_path: str | os.PathLike | bytes, fcn_or_module: nn.Module,
                sizes: list[tuple[int, int]] | None = None, batch: int = 2, seed: int = 0,
                tolerance: float = ONNX_RTOL, device: str | None = "cpu") -> list[OnnxAgreement]:
    """onnxruntime against PyTorch at each size, in float32 (relative error: max |diff| / max |reference|).

    Args:
        onnx_path: the ``.onnx`` file (or its bytes).
        fcn_or_module: the converted network, or the original classifier (converted here at the training size
            the file records).
        sizes: (height, width) pairs; default: the training size, a non-square one and one that is not a
            whole number of strides above it.
        device: onnxruntime device ("cpu" by default, the reproducible reference; None picks CUDA if present).
    """
    net = OnnxNet(onnx_path, device=device)
    reference = _reference(fcn_or_module, net.metadata)
    if sizes is None:
        if net.metadata is None:
            raise ModelLoadError("the ONNX file has no fcnify metadata to choose check sizes from",
                                 hint="pass the sizes to check")
        sizes = check_sizes(net.metadata.input_size, net.metadata.geometry.stride)
    in_chans = net.in_chans if isinstance(net.in_chans, int) else getattr(reference, "in_chans", 3)
    ref_device, ref_dtype = placement(reference)
    generator = torch.Generator().manual_seed(seed)
    results = []
    for size in sizes:
        size = (int(size[0]), int(size[1]))
        x = torch.randn(batch, in_chans, *size, generator=generator)
        expected_all = flatten_outputs(reference.eval()(x.to(ref_device, ref_dtype)))
        got_all = flatten_outputs(net(x))
        for name, expected in expected_all.items():
            expected = expected.double().cpu()
            output = name if len(expected_all) > 1 else ""
            got = got_all.get(name)
            if got is None or got.shape != expected.shape:
                got_size = tuple(got.shape[2:]) if got is not None else ()
                results.append(OnnxAgreement(size, got_size, float("inf"), float("inf"), tolerance, batch, output))
                continue
            got = got.double()
            diff = (expected - got).abs().max().item()
            rel = diff / max(expected.abs().max().item(), 1e-12)
            results.append(OnnxAgreement(size, tuple(got.shape[2:]), diff, rel, tolerance, batch, output))
    return results


# ---------------------------------------------------------------------------------------------- export_onnx


def export_onnx(fcn: FullyConvolutionalNet, metadata: ModelMetadata, path: str | os.PathLike, force: bool = False,
                opset: int | None = None, sizes: list[tuple[int, int]] | None = None) -> OnnxReport:
    """Write ``fcn`` as an ``.onnx`` with dynamic batch, height and width and fcnify metadata, checked.

    The file appears only when every check passes (written beside ``path`` and renamed into place).

    Args:
        fcn: the converted network.
        metadata: what to record in ``metadata_props``.
        path: the ``.onnx`` file to write.
        force: overwrite an existing file.
        opset: the default-domain opset (default 18).
        sizes: input sizes to compare at (default: ``check_sizes``).

    Raises:
        OutputError: ``path`` exists (without ``force``) or cannot be written.
        ExportError: an op ONNX cannot express, a missing exporter, a graph that hard-codes the export size, or a
            model the ONNX checker rejects.
        NotEquivalentError: onnxruntime disagrees with PyTorch at a size (the size and error are named).
    """
    onnx = require("onnx", None, "write ONNX files")
    require("onnxruntime", None, "check the exported file")
    path = Path(path)
    if placement(fcn)[1] != torch.float32:
        fcn = copy.deepcopy(fcn).float()  # the file is float32; the caller's network is left as it is
    with atomic_output(path, force) as tmp:
        started = time.perf_counter()
        model, exporter, notes = _export(fcn, opset)
        export_seconds = time.perf_counter() - started
        _rename_dims(model)
        problems = size_problems(model, fcn.geometry)
        if problems:
            raise ExportError(f"the ONNX graph would be wrong at other input sizes: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                              hint="an op's output size does not follow the input (adaptive pooling to a fixed "
                                   "size, a resize or reshape to constant sizes): the network is not fully "
                                   "convolutional there")
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, _metadata_props(metadata))
        model.doc_string = f"fcnify fully-convolutional network of {metadata.source or 'a classifier'}"
        try:
            onnx.save_model(model, str(tmp))
        except (ValueError, OSError) as exc:
            raise ExportError(f"cannot write the ONNX model: {one_line_cause(exc)}",
                              hint="models over 2 GB need external data, which fcnify does not write") from exc
        started = time.perf_counter()
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:
            raise ExportError(f"the exported model fails the ONNX checker: {one_line_cause(exc)}",
                              hint="please report it with the model") from exc
        try:
            checks = verify_onnx(tmp, fcn, sizes or check_sizes(fcn.input_size, fcn.geometry.stride))
        except ModelLoadError as exc:
            raise ExportError(f"onnxruntime cannot run the exported model: {exc.message}",
                              hint="please report it with the model") from exc
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot run the exported model: {one_line_cause(exc)}",
                              hint="the graph uses an op onnxruntime does not implement on this machine") from exc
        for check in checks:
            if not check.passed:
                which = f" on output {check.output}" if check.output else ""
                raise NotEquivalentError(
                    f"onnxruntime disagrees with PyTorch{which} at {check.input_size[0]}x{check.input_size[1]}: "
                    f"relative error {check.max_rel_error:.3g} > {check.tolerance:g} "
                    f"(exported with the {exporter} exporter)",
                    hint="the .pt2 export keeps the PyTorch numerics; please report the model")
        check_seconds = time.perf_counter() - started
        size_bytes = tmp.stat().st_size
    return OnnxReport(path, _opset(model), exporter, checks, export_seconds, check_seconds, size_bytes,
                      ["CPUExecutionProvider"], notes)


__all__ = ["OnnxAgreement", "OnnxReport", "check_sizes", "export_onnx", "size_problems", "verify_onnx"]
