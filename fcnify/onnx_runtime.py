"""Running fcnify's ``.onnx`` files with onnxruntime: ``OnnxNet`` in place of the PyTorch network.

``OnnxNet`` runs a file (or its bytes) on the CUDA execution provider when onnxruntime has it, else on the
CPU; ``load_onnx_model`` turns an fcnify file into a ``LoadedModel`` by the fcnify metadata in its
``metadata_props`` (``read_metadata``). Writing and checking such files is ``onnx_export``'s.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
from torch import nn

from fcnify.convert.outputs import MultiOutputNet
from fcnify.errors import ModelLoadError
from fcnify.export import ModelMetadata
from fcnify.loaded import LoadedModel
from fcnify.optional import require

#: The ``metadata_props`` key holding the whole ``ModelMetadata`` as JSON.
METADATA_KEY = "fcnify"


def one_line_cause(exc: BaseException, limit: int = 300) -> str:
    """The innermost cause of an exception chain, as ``Type: first line``."""
    seen, inner = set(), exc
    while (inner.__cause__ is not None or inner.__context__ is not None) and id(inner) not in seen:
        seen.add(id(inner))
        nxt = inner.__cause__ or inner.__context__
        if nxt is None:
            break
        inner = nxt
    text = str(inner)
    summary = re.search(r"DispatchError'>: (.+)", text) or re.search(r"Exception summary\s+<class '[^']+'>: (.+)", text)
    line = summary.group(1) if summary else (text.strip().splitlines() or [""])[0]
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    return f"{type(inner).__name__}: {line[:limit]}"


def read_metadata(props: dict[str, str], where: str = "the ONNX file") -> ModelMetadata | None:
    """The ``ModelMetadata`` in a model's ``metadata_props`` (as a dict), or None when there is none.

    Raises:
        ModelLoadError: metadata that is not JSON or has missing or wrong fields.
    """
    raw = props.get(METADATA_KEY)
    if not raw:
        return None
    return ModelMetadata.parse(raw, where)


def _providers(device: str | None = None) -> list[str]:
    import onnxruntime as ort  # lazy: heavy, and only ONNX files need it

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and (device is None or str(device).startswith("cuda")):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(source: str | os.PathLike | bytes, providers: list[str]):
    import onnxruntime as ort  # lazy: heavy, and only ONNX files need it

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The CPU arena keeps every buffer it ever grew to: with tiles of several sizes it held ~1.3 GB more than
    # the network needs (measured: 8000² slide, digits model, peak RSS 3.3 GB with it, 1.8 GB without, same
    # speed). Without it, buffers go back to the allocator after each run.
    options.enable_cpu_mem_arena = False
    # As many threads as PyTorch uses: onnxruntime's default is every physical core, which oversubscribes the
    # CPUs when Ray runs several actors on a machine (Ray caps each actor's threads through OMP_NUM_THREADS,
    # which PyTorch follows and onnxruntime does not).
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    data = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(data, sess_options=options, providers=providers)


class OnnxNet(MultiOutputNet, nn.Module):
    """An ``.onnx`` network run by onnxruntime, usable in place of the PyTorch ``FullyConvolutionalNet``.

    ``net(x)`` maps an N×C×H×W tensor to N×K×h×w logits, returned on ``x``'s device and in its dtype (the
    graph runs in float32); a network with several outputs returns a dict of maps by output name (the
    names, geometries and selection of ``fcnify.convert.outputs.MultiOutputNet``, from the metadata). CUDA is
    used when onnxruntime has the CUDAExecutionProvider, else the CPU.
    ``.to()``, ``.cuda()``, ``.double()`` and ``.eval()`` do nothing: the runtime owns device and dtype.

    Attributes:
        metadata: the fcnify ``ModelMetadata`` in the file (None for a foreign file).
        geometry, input_size, in_chans, labels: from the metadata.
        providers: the execution providers of the session.
    """

    #: Shapes cannot be worked out with fake tensors: they come from the geometry.
    runs_outside_torch = True

    def __init__(self, source: str | os.PathLike | bytes, device: str | None = None,
                 metadata: ModelMetadata | None = None, session=None):
        super().__init__()
        self._source = source if isinstance(source, bytes) else str(source)
        self._device = device
        self.session = session if session is not None else _session(self._source, _providers(device))
        if metadata is None:
            metadata = read_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = metadata
        self.input_size = tuple(metadata.input_size) if metadata else None
        self.in_chans = metadata.in_chans if metadata else self.session.get_inputs()[0].shape[1]
        self.labels = tuple(metadata.labels) if metadata else ()
        self.input_name = self.session.get_inputs()[0].name
        self.graph_outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = self.graph_outputs[0]
        if metadata is not None:
            self._set_outputs(metadata.output_infos(), metadata.selected_output)
        else:  # a foreign file: its outputs by position, geometry unknown
            object.__setattr__(self, "output_names", tuple(str(i) for i in range(len(self.graph_outputs))))
            object.__setattr__(self, "geometries", dict.fromkeys(self.output_names))
            object.__setattr__(self, "channels", dict.fromkeys(self.output_names, 0))
            object.__setattr__(self, "selected", self.output_names[0])

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        outs = self.session.run(self.graph_outputs, {self.input_name: array})
        dtype = x.dtype if x.is_floating_point() else torch.float32
        maps = [torch.from_numpy(out).to(device=x.device, dtype=dtype) for out in outs]
        if len(maps) == 1:
            return maps[0]
        return dict(zip(self.output_names, maps, strict=True))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The score map's size a one-pass forward gives for ``height`` × ``width`` (``Geometry.map_size``)."""
        return self.geometry.map_size(height, width)

    def to(self, *args, **kwargs) -> OnnxNet:  # noqa: D102 - device and dtype belong to the runtime
        return self

    def _apply(self, fn, recurse=True):
        return self

    def __deepcopy__(self, memo) -> OnnxNet:
        # An InferenceSession cannot be copied; the network is immutable, so a copy may share it.
        clone = type(self).__new__(type(self))
        nn.Module.__init__(clone)
        for key, value in self.__dict__.items():
            if key not in ("_parameters", "_buffers", "_modules", "training"):
                object.__setattr__(clone, key, value if key == "session" else copy.deepcopy(value, memo))
        clone.training = self.training
        return clone

    def extra_repr(self) -> str:
        source = "<bytes>" if isinstance(self._source, bytes) else self._source
        return f"{source}, providers={self.providers}"


class OnnxClassifier(OnnxNet):
    """An ONNX classifier fcnify did not make, run by onnxruntime on the original file: the reference that
    ``verify`` checks its conversion against.

    ``net(x)`` takes fcnify's N×C×H×W images whatever the file's layout (an NHWC graph gets them transposed)
    and returns what the graph returns: one tensor, or a dict by output name for several outputs (as the graph's
    import does). A graph whose batch is fixed at 1 runs image by image.
    """

    def __init__(self, source: str | os.PathLike | bytes, input_layout: str = "NCHW", device: str | None = None):
        super().__init__(source, device=device, metadata=None)
        self.input_layout = input_layout
        shape = self.session.get_inputs()[0].shape
        self.in_chans = shape[3] if input_layout == "NHWC" else shape[1]
        self.one_image_a_run = shape[0] == 1
        names = tuple(self.graph_outputs) if len(self.graph_outputs) > 1 else self.output_names
        for key, value in (("output_names", names), ("geometries", dict.fromkeys(names)),
                           ("channels", dict.fromkeys(names, 0)), ("selected", names[0])):
            object.__setattr__(self, key, value)

    def forward(self, x: torch.Tensor):
        images = x.detach().to("cpu", torch.float32)
        if self.input_layout == "NHWC":
            images = images.permute(0, 2, 3, 1)
        batches = images.split(1) if self.one_image_a_run else [images]
        runs = [self.session.run(self.graph_outputs, {self.input_name: b.contiguous().numpy()}) for b in batches]
        dtype = x.dtype if x.is_floating_point() else torch.float32
        outputs = [torch.cat([torch.from_numpy(run[i]) for run in runs]).to(device=x.device, dtype=dtype)
                   for i in range(len(self.graph_outputs))]
        return outputs[0] if len(outputs) == 1 else dict(zip(self.output_names, outputs, strict=True))


def has_fcnify_metadata(path: str | os.PathLike) -> bool:
    """Whether an ``.onnx`` file carries fcnify's metadata (read without its weights)."""
    onnx = require("onnx", None, "read ONNX files")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file: the loader says so
        return False
    return any(p.key == METADATA_KEY for p in model.metadata_props)


def load_onnx_model(path: str | os.PathLike, device: str | None = None) -> LoadedModel:
    """A ``LoadedModel`` (``converted=True``) that runs an fcnify ``.onnx`` with onnxruntime.

    Raises:
        ModelLoadError: the file is missing, not an ONNX model, or has no fcnify metadata.
    """
    path = Path(path)
    require("onnxruntime", None, "run ONNX files")
    if not path.is_file():
        raise ModelLoadError(f"no such ONNX file: {path}", hint="check the path")
    try:
        session = _session(path, _providers(device))
    except Exception as exc:
        raise ModelLoadError(f"{path} is not an ONNX model onnxruntime can load: {one_line_cause(exc, 200)}",
                             hint="export the classifier it came from with "
                                  "'fcnify convert MODEL -o model.onnx'") from exc
    props = session.get_modelmeta().custom_metadata_map
    metadata = read_metadata(props, str(path))
    if metadata is None:
        raise ModelLoadError(f"{path} is an ONNX model without fcnify metadata (no '{METADATA_KEY}' in metadata_props)",
                             hint="fcnify needs its geometry and labels: export the classifier it came from with "
                                  "'fcnify convert MODEL -o model.onnx' (MODEL: a spec or PyTorch file)")
    net = OnnxNet(path, device=device, metadata=metadata, session=session)
    return LoadedModel(net, tuple(metadata.input_size), metadata.in_chans, tuple(metadata.mean), tuple(metadata.std),
                       tuple(metadata.labels), metadata.source or str(path), converted=True,
                       geometry=metadata.geometry, normalisation=metadata.normalisation or "metadata",
                       extra={"format": "onnx", "path": str(path), "providers": net.providers})


__all__ = [
    "METADATA_KEY", "OnnxClassifier", "OnnxNet", "has_fcnify_metadata", "load_onnx_model", "one_line_cause",
    "read_metadata"
]
