"""Dense evaluation: run a fully-convolutional network over whole images and keep its class score maps.

``score_maps`` takes prepared images (or plain C×H×W tensors), batches those of the same size, runs the
network once per batch (``_forward``, the one place that touches the device and precision) and returns one
``ScoreMap`` per image, with the map's geometry expressed in the original image's pixels.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fcnify.convert import FullyConvolutionalNet
from fcnify.convert.dilate import dilate
from fcnify.convert.from_export import exported_input_shape, rebuild_modules
from fcnify.convert.outputs import flatten_outputs
from fcnify.errors import FcnifyError, InputError, first_line
from fcnify.export import ExportedNet
from fcnify.heatmap.scoremap import ScoreMap, check_class_count
from fcnify.images import PreparedImage

__all__ = ["PRECISIONS", "ScoreMap", "check_precision", "place_model", "score_map", "score_maps", "select_device",
           "with_output_stride"]

_logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda", "mps")


def select_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        InputError: an unknown name, or a device this machine does not have.
    """
    name = (name or "auto").strip().lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for, but CUDA is not available here",
                             hint="use --device cpu (or auto), or install a CUDA build of PyTorch")
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise InputError(f"--device {name} is not a device name", hint="e.g. cuda or cuda:0") from exc
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)",
                             hint=f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
        return device
    if name == "mps":
        if not mps_ok:
            raise InputError("--device mps was asked for, but Apple MPS is not available here",
                             hint="use --device cpu (or auto)")
        return torch.device("mps")
    raise InputError(f"unknown --device {name!r}", hint=f"choose one of {', '.join(DEVICES)}")


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype for ``precision`` on ``device``: fp16 needs a GPU; bf16 and fp32 run anywhere.

    Raises:
        InputError: an unknown precision, or fp16 on the CPU.
    """
    precision = (precision or "fp32").lower()
    if precision not in PRECISIONS:
        raise InputError(f"unknown --precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise InputError("--precision fp16 needs a GPU (CUDA or MPS)",
                         hint="use --precision bf16 or fp32 on the CPU")
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_convolutions_are_accurate():
        raise InputError(f"--precision bf16: PyTorch {torch.__version__}'s bf16 convolutions on this CPU are "
                         "wrong by more than bf16 rounding (a known oneDNN defect with large kernels)",
                         hint="use --precision fp32 on this machine")
    return PRECISIONS[precision]


@functools.lru_cache(maxsize=1)
def cpu_bf16_convolutions_are_accurate() -> bool:
    """Whether a bf16 convolution with a large kernel (a converted head's, 12×12) stays within bf16 rounding of
    float32 on this CPU. On some CPUs and PyTorch builds (seen: torch 2.14–2.15 with oneDNN on Xeons with
    AMX-BF16) it returns values off by their whole magnitude, so bf16 would give wrong maps, not rougher ones."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 20, 28, generator=generator)
    weight, bias = torch.randn(11, 8, 12, 12, generator=generator) / 30, torch.zeros(11)
    with torch.no_grad():
        full = torch.nn.functional.conv2d(x, weight, bias)
        half = torch.nn.functional.conv2d(x.bfloat16(), weight.bfloat16(), bias.bfloat16()).float()
    return float((full - half).abs().max()) <= 0.05 * float(full.max() - full.min())


def place_model(fcn: nn.Module, device: torch.device) -> nn.Module:
    """Put ``fcn`` in eval mode on ``device`` (in place, like ``Module.to``), channels-last on a GPU."""
    try:
        fcn.eval()
    except NotImplementedError:  # torch.export modules (a loaded .pt2) are always in eval mode
        pass
    params = list(fcn.parameters()) + list(fcn.buffers())
    if any(p.device != device for p in params):
        fcn.to(device)
    if device.type in ("cuda", "mps") and params:
        fcn.to(memory_format=torch.channels_last)
    return fcn


def _forward(fcn: nn.Module, batch: torch.Tensor, device: torch.device, dtype: torch.dtype,
             every: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """One forward pass of an N×C×H×W batch; returns N×K×h×w float32 logits on the CPU.

    Reduced precision uses ``torch.autocast`` (the weights stay as they are; convolutions and matrix
    products run in fp16/bf16, the rest in fp32).

    Args:
        every: return every output's map by name (``output_names`` order) instead of the selected one.
    """
    batch = batch.to(device, non_blocking=True)
    if device.type in ("cuda", "mps"):
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        if dtype is torch.float32:
            out = fcn(batch)
        else:
            with torch.autocast(device_type=device.type, dtype=dtype):
                out = fcn(batch)
    if every:
        return _every_output(fcn, out)
    if not isinstance(out, torch.Tensor) and getattr(fcn, "selected", None) is not None:
        out = flatten_outputs(out).get(fcn.selected, out)  # a network with several outputs: the selected map
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"the network returned {shape}, not an N×K×h×w score map",
                         hint="give a converted (fully-convolutional) network")
    return out.float().cpu()


def _every_output(fcn: nn.Module, out) -> dict[str, torch.Tensor]:
    """Every output map of one forward's result by the network's output names, float32 on the CPU."""
    maps = flatten_outputs(out)
    names = tuple(getattr(fcn, "output_names", ()) or ())
    if names and tuple(maps) != names and len(maps) == len(names):  # a runtime that names outputs by position
        maps = dict(zip(names, maps.values(), strict=True))
    return {name: value.float().cpu() for name, value in maps.items()}


def _as_prepared(item):

    if isinstance(item, PreparedImage):
        return item
    if not isinstance(item, torch.Tensor) or item.dim() != 3:
        raise InputError(f"expected a C×H×W tensor or a PreparedImage, got {type(item).__name__}",
                         hint="prepare images with fcnify.images.prepare")
    size = (int(item.shape[1]), int(item.shape[2]))
    return PreparedImage(item, size, 1.0, size, False)


def _image_geometry(geometry, prepared) -> dict:
    """The geometry in original-image pixels: ints when the image was not resized, floats otherwise."""
    sy, sx = prepared.effective_scale
    if (sy, sx) == (1.0, 1.0):
        conv = (int, int)
        factors = (1, 1)
    else:
        conv = (float, float)
        factors = (sy, sx)
    return {name: tuple(conv[a](getattr(geometry, name)[a] / factors[a]) for a in range(2))
            for name in ("stride", "offset", "window")}


def score_maps(fcn: nn.Module, images: Sequence, geometry, labels: Sequence[str],
               device: torch.device | str = "cpu", precision: str = "fp32", batch_size: int = 8) -> list[ScoreMap]:
    """Dense class scores of several images held in memory, one pass each; images of the same size are batched.

    This is the library's in-memory primitive (tensors in, score maps out). Images on disk, slides and
    anything larger than memory go through ``fcnify.heatmap.pipeline``, tile by tile.

    Args:
        fcn: any module mapping N×C×H×W to N×K×h×w (a converted network, a loaded ``.pt2`` module). It is
            moved to ``device`` in place.
        images: ``PreparedImage`` objects (their scale and original size set the map's geometry) or C×H×W
            tensors (already normalised; geometry in their own pixels).
        geometry: the network's ``Geometry`` (stride, offset, window in network-input pixels).
        labels: the K class names.
        device: a ``torch.device`` or a name for ``select_device``.
        precision: fp32, fp16 (GPU only) or bf16.
        batch_size: the most images per forward pass.

    Raises:
        InputError: a bad device/precision, a label count that does not match K, a network that fails.
    """
    device = device if isinstance(device, torch.device) else select_device(device)
    dtype = check_precision(precision, device)
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be at least 1", hint="e.g. --batch-size 8")
    prepared = [_as_prepared(item) for item in images]
    place_model(fcn, device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, item in enumerate(prepared):
        groups.setdefault(tuple(item.tensor.shape), []).append(index)
    results: list[ScoreMap | None] = [None] * len(prepared)
    for shape, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = torch.stack([prepared[i].tensor for i in chunk])
            logits = _guarded(lambda batch=batch: _forward(fcn, batch, device, dtype), batch.shape, len(chunk))
            _logger.debug("ran %d image(s) of %s -> %s", len(chunk), shape, tuple(logits.shape))
            check_class_count(logits.shape[1], len(labels))
            for row, i in enumerate(chunk):
                results[i] = ScoreMap(
                    logits=logits[row].contiguous(), labels=tuple(str(v) for v in labels),
                    image_size=prepared[i].original_size, padded=prepared[i].padded,
                    **_image_geometry(geometry, prepared[i]),
                )
    return results  # type: ignore[return-value]


def _guarded(run: Callable[[], torch.Tensor], shape, images: int = 1) -> torch.Tensor:
    """Run a forward pass, turning out-of-memory and network failures into one-line ``InputError``s."""

    try:
        return run()
    except FcnifyError:
        raise
    except torch.OutOfMemoryError as exc:
        raise InputError(f"out of memory running {images} image(s) of {shape[-2]}x{shape[-1]} px",
                         hint="pass --batch-size 1, a smaller --max-memory (smaller tiles), --scale below 1 or "
                         "--device cpu") from exc
    except Exception as exc:
        raise InputError(
            f"the network failed on a {shape[-2]}x{shape[-1]} image: {type(exc).__name__}: "
            f"{first_line(exc, 200)}",
            hint="check that the model's channels and input size match the images") from exc


def score_map(fcn: nn.Module, image, geometry, labels: Sequence[str], device: torch.device | str = "cpu",
              precision: str = "fp32") -> ScoreMap:
    """Dense class scores of one image (a ``PreparedImage`` or a C×H×W tensor); see ``score_maps``."""
    return score_maps(fcn, [image], geometry, labels, device, precision, batch_size=1)[0]


# ------------------------------------------------------------------------------------------ output stride


def with_output_stride(fcn: nn.Module, geometry, output_stride: int | None):
    """(network, geometry) whose map has ``output_stride`` (dilation rewrite, ``fcnify.convert.dilate``).

    None or the native stride returns the inputs unchanged.

    Raises:
        InputError: a network without a graph (a loaded .pt2 or .onnx), or a stride that does not divide.
        ConversionError: a network the dilation rewrite cannot handle.
    """
    if output_stride is None or all(int(output_stride) == s for s in geometry.stride):
        return fcn, geometry
    if len(getattr(fcn, "output_names", ())) > 1:
        raise InputError(f"--output-stride works on networks with one output; this one has {len(fcn.output_names)} "
                         f"({', '.join(fcn.output_names)})",
                         hint="leave --output-stride out, or wrap the model so forward() returns the one output")
    if isinstance(fcn, ExportedNet):
        fcn = fcn.net
    if isinstance(fcn, torch.fx.GraphModule) and not isinstance(fcn, FullyConvolutionalNet):
        fcn = _exported_fcn(fcn, geometry)
    if not isinstance(fcn, FullyConvolutionalNet):
        raise InputError(f"--output-stride needs the model's graph, and {type(fcn).__name__} has none",
                         hint="give the original model (torchvision:NAME, timm:NAME, a state_dict) or the "
                         ".pt2, not an .onnx")
    cache = fcn.__dict__.setdefault("_fcnify_output_strides", {})  # one rewrite per network and stride
    if int(output_stride) not in cache:
        cache[int(output_stride)] = dilate(fcn, int(output_stride))
    fine = cache[int(output_stride)]
    return fine, fine.geometry


def _exported_fcn(gm: torch.fx.GraphModule, geometry):
    """A loaded ``.pt2`` (torch.export's ATen graph) as a ``FullyConvolutionalNet`` the dilation can rewrite.

    The rebuilt network is cached on ``gm``, so one loaded file is rebuilt (and dilated) once.
    """

    if "_fcnify_rebuilt" not in gm.__dict__:
        in_chans = (exported_input_shape(gm) or (None,))[0]
        if in_chans is None:
            raise InputError("--output-stride: the .pt2's input has no fixed channel count",
                             hint="give the original model instead of the .pt2")
        gm.__dict__["_fcnify_rebuilt"] = FullyConvolutionalNet(rebuild_modules(gm), geometry, tuple(geometry.window),
                                                                in_chans).eval()
    return gm.__dict__["_fcnify_rebuilt"]
