"""Standalone files of a converted network: ``.pt2`` (torch.export, dynamic H×W) with fcnify metadata.

A ``.pt2`` is not a safe format: ``torch.export.load`` unpickles entries marked ``use_pickle`` with
``weights_only=False``, retries the sample inputs unsafely after a failed safe load, and runs compiled
AOTInductor code. ``inspect_pt2`` finds every such entry in the file's bytes, and ``load_pt2`` loads those
same bytes only when there is none, or when the user trusts the file.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fcnify._version import __version__
from fcnify.atomic import atomic_output
from fcnify.convert.geometry import Geometry
from fcnify.convert.network import FullyConvolutionalNet
from fcnify.convert.outputs import SINGLE, MultiOutputNet, OutputInfo
from fcnify.errors import ExportError, ModelLoadError, UnsafeModelError, first_line
from fcnify.introspect import placement

__all__ = [
    "METADATA_NAME", "export_program", "ExportedNet", "inspect_pt2", "load_pt2", "ModelMetadata",
    "Pt2Inspection", "save_pt2"
]

_logger = logging.getLogger(__name__)

METADATA_NAME = "fcnify.json"


@dataclass
class ModelMetadata:
    """What a converted network needs beside its weights to be used on images."""

    input_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    geometry: Geometry
    source: str
    fcnify_version: str = ""
    normalisation: str = ""  # where mean/std came from (flag, metadata, zoo, assumed): said again on use
    outputs: tuple[OutputInfo, ...] = ()  # every output, in order (empty: one output with ``geometry``)
    selected_output: str = SINGLE  # the output ``labels`` and ``geometry`` belong to
    # The original's input layout when it was an ONNX file (NCHW or NHWC); the converted network always
    # takes N×C×H×W.
    input_layout: str = ""

    def output_infos(self) -> list[OutputInfo]:
        """Every output (a file of one output: that one, named ``"0"``, with ``geometry`` and ``labels``)."""
        return list(self.outputs) or [OutputInfo(SINGLE, len(self.labels), self.geometry)]

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size), "in_chans": self.in_chans, "mean": list(self.mean),
            "std": list(self.std), "labels": list(self.labels), "geometry": self.geometry.to_dict(),
            "source": self.source, "fcnify_version": self.fcnify_version or __version__,
            "normalisation": self.normalisation, "outputs": [o.to_dict() for o in self.output_infos()],
            "selected_output": self.selected_output,
            **({"input_layout": self.input_layout} if self.input_layout else {}),
        }

    @classmethod
    def of(cls, loaded, fcn) -> ModelMetadata:
        """The metadata of ``fcn``, converted from ``loaded`` (a ``LoadedModel``): every output, the selected one's
        geometry and labels."""
        outputs = tuple(fcn.outputs_summary()) if hasattr(fcn, "outputs_summary") else ()
        return cls(tuple(fcn.input_size), int(fcn.in_chans), tuple(loaded.mean), tuple(loaded.std),
                   tuple(str(v) for v in loaded.labels), fcn.geometry, loaded.source,
                   normalisation=getattr(loaded, "normalisation", None) or "", outputs=outputs,
                   selected_output=getattr(fcn, "selected", SINGLE),
                   input_layout=str(getattr(loaded, "extra", {}).get("input_layout", "")))

    @classmethod
    def parse(cls, raw: str | bytes, where: str) -> ModelMetadata:
        """The metadata in JSON text ``raw`` found in ``where``, checked field by field.

        Raises:
            ModelLoadError: text that is not JSON, or a missing field or one of the wrong type or range.
        """
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"the fcnify metadata in {where} is not JSON ({exc})",
                                 hint="re-create the file with 'fcnify convert'") from None
        problem = _metadata_problem(data)
        if problem:
            raise ModelLoadError(f"the fcnify metadata in {where} is malformed: {problem}",
                                 hint="re-create the file with 'fcnify convert'")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:  # the geometry's own fields
            raise ModelLoadError(f"the fcnify metadata in {where} is malformed: geometry: {type(exc).__name__}: "
                                 f"{exc}", hint="re-create the file with 'fcnify convert'") from None

    @classmethod
    def from_dict(cls, data: dict) -> ModelMetadata:
        return cls(
            input_size=tuple(data["input_size"]), in_chans=int(data["in_chans"]), mean=tuple(data["mean"]),
            std=tuple(data["std"]), labels=tuple(data["labels"]), geometry=Geometry.from_dict(data["geometry"]),
            source=str(data.get("source", "")), fcnify_version=str(data.get("fcnify_version", "")),
            normalisation=str(data.get("normalisation") or ""),
            outputs=tuple(OutputInfo(str(o["name"]), int(o["channels"]), Geometry.from_dict(o["geometry"]))
                          for o in data.get("outputs") or ()),
            selected_output=str(data.get("selected_output") or SINGLE), input_layout=str(data.get("input_layout") or ""),
        )


#: Sides above this are not a training size but a damaged or hostile file.
_MAX_SIDE = 1 << 16


def _metadata_problem(data) -> str | None:
    """What is wrong with decoded metadata, in a few words, or None."""
    def count(value, low=1, high=_MAX_SIDE):
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    def numbers(value):
        return isinstance(value, list) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)

    if not isinstance(data, dict):
        return f"a {type(data).__name__}, not an object"
    missing = [k for k in ("input_size", "in_chans", "mean", "std", "labels", "geometry") if k not in data]
    if missing:
        return "no " + ", ".join(missing)
    size, chans = data["input_size"], data["in_chans"]
    if not (isinstance(size, list) and len(size) == 2 and all(count(v) for v in size)):
        return f"input_size {size!r} is not two sides of 1–{_MAX_SIDE} px"
    if not count(chans, 1, 1024):
        return f"in_chans {chans!r} is not a channel count"
    for key in ("mean", "std"):
        if not numbers(data[key]) or len(data[key]) != chans:
            return f"{key} {data[key]!r} is not {chans} numbers"
    if any(v <= 0 for v in data["std"]):
        return "std has a value ≤ 0"
    labels = data["labels"]
    if not (isinstance(labels, list) and all(isinstance(v, str) for v in labels)):  # [] when unknown
        return "labels is not a list of names"
    geometry = data["geometry"]
    if not isinstance(geometry, dict):
        return "geometry is not an object"
    for key in ("stride", "offset", "window", "receptive_field"):
        value = geometry.get(key)
        if not numbers(value) or len(value) != 2 or any(abs(v) > _MAX_SIDE * 64 for v in value):
            return f"geometry.{key} {value!r} is not two numbers"
    if any(v <= 0 for v in geometry["stride"] + geometry["window"]):
        return "geometry has a stride or window ≤ 0"
    outputs = data.get("outputs") or []
    if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) and count(o.get("channels"), 0, 1 << 24)
            and isinstance(o.get("geometry"), dict) for o in outputs):
        return "outputs is not a list of {name, channels, geometry}"
    names = [o["name"] for o in outputs]
    if outputs and data.get("selected_output", SINGLE) not in names:
        return f"selected_output {data.get('selected_output')!r} is not one of the outputs {names}"
    return None


def export_program(fcn: FullyConvolutionalNet) -> torch.export.ExportedProgram:
    """``torch.export`` the network with dynamic batch, height and width (height, width ≥ the training size).

    Dims are first declared with the training size as minimum. Where the shape solver cannot prove its
    guards for every such size (ceil-mode pools, as in SqueezeNet), they are declared ``Dim.DYNAMIC`` and the
    guards become run-time checks.
    """
    (h, w), (sy, sx) = fcn.input_size, fcn.geometry.stride
    device, dtype = placement(fcn)
    # An example two strides above the training size: a 1×1 output would be specialised to the constant 1.
    example = torch.zeros(2, fcn.in_chans, h + 2 * sy + 1, w + 2 * sx + 1, dtype=dtype, device=device)
    named = {0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim("height", min=h),
             3: torch.export.Dim("width", min=w)}
    dynamic = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    failure: Exception | None = None
    for dims in (named, dynamic):
        try:
            # Size-oblivious reasoning keeps ops that check "is this dim 1?" (broadcasting, contiguity) from
            # guarding the map size away from 1, which is exactly the size at the training resolution.
            with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
                return torch.export.export(fcn.eval(), (example,), dynamic_shapes={"x": dims}, strict=False)
        except Exception as exc:
            _logger.info("torch.export with %s dims failed: %s", "named" if dims is named else "DYNAMIC", exc)
            failure = exc
    raise ExportError(
        f"torch.export cannot capture the converted network with dynamic size: {type(failure).__name__}: "
        f"{first_line(failure, 300)}",
        hint="the body has size-dependent code; the in-memory network still works with 'fcnify heatmap'",
    ) from failure


def save_pt2(fcn: FullyConvolutionalNet, metadata: ModelMetadata, path: str | os.PathLike,
             force: bool = False) -> Path:
    """Write ``fcn`` as a ``.pt2`` loadable with ``torch.export.load(path).module()`` alone, atomically."""
    program = export_program(fcn)
    path = Path(path)
    with atomic_output(path, force) as tmp, open(tmp, "wb") as file:
        # Through a file object: the archive's folder is then "archive", not the hidden temp file's name
        # (which messages about the archive's entries would show).
        torch.export.save(program, file, extra_files={METADATA_NAME: json.dumps(metadata.to_dict())})
    return path


class ExportedNet(MultiOutputNet, nn.Module):
    """A loaded fcnify ``.pt2``: the ``torch.export`` module (``net``) with the output interface of
    ``FullyConvolutionalNet`` (``output_names``, ``geometries``, ``selected``, ``maps``, ``select``) from its
    metadata. ``forward`` returns what the converted network returned (one map, or a tuple/dict of maps)."""

    def __init__(self, net: nn.Module, metadata: ModelMetadata):
        super().__init__()
        self.net = net
        self.input_size = tuple(metadata.input_size)
        self.in_chans = int(metadata.in_chans)
        self._set_outputs(metadata.output_infos(), metadata.selected_output)

    def forward(self, x: torch.Tensor):
        return self.net(x)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The selected score map's size for an input of ``height`` × ``width`` (``Geometry.map_size``)."""
        return self.geometry.map_size(height, width)

    def eval(self) -> ExportedNet:  # a torch.export module refuses ``eval()``: it is always in eval mode
        return self

    def train(self, mode: bool = True) -> ExportedNet:
        return self


@dataclass
class Pt2Inspection:
    """What in a ``.pt2`` would run code when loaded."""

    unsafe_entries: list[str]

    @property
    def safe(self) -> bool:
        return not self.unsafe_entries


def _tensor_configs(archive: zipfile.ZipFile, name: str) -> list[tuple[str, dict]]:
    """The (key, entry) pairs of a weights/constants config in a ``.pt2``; a damaged one is a ModelLoadError."""
    try:
        config = json.loads(archive.read(name))
        entries = config.get("config", {})
        if isinstance(entries, dict) and all(isinstance(v, dict) for v in entries.values()):
            return list(entries.items())
    except (ValueError, AttributeError, zipfile.BadZipFile, OSError):
        pass
    raise ModelLoadError(f"the .pt2 file is damaged: its entry {name} is not a valid tensor index",
                         hint="re-create it with 'fcnify convert' (or torch.export.save)")


def inspect_pt2(data: bytes) -> Pt2Inspection:
    """Find the entries of a ``.pt2`` that ``torch.export.load`` would unpickle unsafely or run as code."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise ModelLoadError("the .pt2 file is not a zip archive", hint="re-create it with 'fcnify convert'") from exc
    unsafe: list[str] = []
    for name in names:
        rel = name.split("/", 1)[1] if "/" in name else name
        if name.endswith((".so", ".dll", ".dylib", ".cpp", ".cubin")) or rel.startswith("data/aotinductor/"):
            unsafe.append(f"{name} (compiled code)")
        elif rel.startswith("data/constants/") and rel.endswith(".pt") and "/" not in rel[len("data/constants/"):]:
            unsafe.append(f"{name} (legacy pickled constants)")
        elif rel.startswith(("data/constants/custom_obj", "data/constants/opaque_obj")):
            unsafe.append(f"{name} (pickled object)")
        elif rel.endswith("_config.json") and rel.startswith(("data/weights/", "data/constants/")):
            for key, meta in _tensor_configs(archive, name):
                if meta.get("use_pickle"):
                    unsafe.append(f"{name}: {key} (pickled with use_pickle)")
        elif rel.startswith("data/sample_inputs/"):
            try:
                torch.load(io.BytesIO(archive.read(name)), weights_only=True)
            except Exception:
                unsafe.append(f"{name} (sample inputs that only load with pickle)")
    return Pt2Inspection(unsafe)


def load_pt2(path: str | os.PathLike, trust_model: bool = False) -> tuple[nn.Module, ModelMetadata | None]:
    """Load a ``.pt2`` (read once; checked unless trusted) and its fcnify metadata.

    Raises:
        UnsafeModelError: the file contains pickles or compiled code and ``trust_model`` is False.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}", hint="check the path") from exc
    if not trust_model:
        report = inspect_pt2(data)
        if not report.safe:
            raise UnsafeModelError(
                f"{path} holds entries that would run code when loaded: {', '.join(report.unsafe_entries[:3])}",
                hint="pass --trust-model only if you trust where the file came from",
            )
    extra = {METADATA_NAME: ""}
    try:
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {path} as a torch.export program: {type(exc).__name__}: "
                             f"{first_line(exc, 200)}",
                             hint="re-create it with 'fcnify convert'") from exc
    meta = ModelMetadata.parse(extra[METADATA_NAME], str(path)) if extra.get(METADATA_NAME) else None
    return program.module(), meta
