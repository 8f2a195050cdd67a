"""Dense evaluation: run a fully-convolutional network over whole images and keep its class score maps.

``score_maps`` takes prepared images (or plain C×H×W tensors), batches those of the same size, runs the
network once per batch (``device.run_network``, the one place that touches the device and precision) and returns one
``ScoreMap`` per image, with the map's geometry expressed in the original image's pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict

import torch
from torch import nn

from fcnify.convert import FullyConvolutionalNet
from fcnify.convert.dilate import dilate
from fcnify.convert.from_export import exported_input_shape, rebuild_modules
from fcnify.device import check_precision, guarded_forward, place_model, run_network, select_device
from fcnify.errors import InputError
from fcnify.export import ExportedNet
from fcnify.heatmap.mapgeometry import MapGeometry
from fcnify.heatmap.scoremap import ScoreMap, check_class_count
from fcnify.images import PreparedImage

__all__ = ["ScoreMap", "score_map", "score_maps", "with_output_stride"]

_logger = logging.getLogger(__name__)

def _as_prepared(item):

    if isinstance(item, PreparedImage):
        return item
    if not isinstance(item, torch.Tensor) or item.dim() != 3:
        raise InputError(f"expected a C×H×W tensor or a PreparedImage, got {type(item).__name__}",
                         hint="prepare images with fcnify.images.prepare")
    size = (int(item.shape[1]), int(item.shape[2]))
    return PreparedImage(item, size, 1.0, size, False)


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
            logits = guarded_forward(lambda batch=batch: run_network(fcn, batch, device, dtype), batch.shape,
                                     len(chunk))
            _logger.debug("ran %d image(s) of %s -> %s", len(chunk), shape, tuple(logits.shape))
            check_class_count(logits.shape[1], len(labels))
            for row, i in enumerate(chunk):
                results[i] = ScoreMap(
                    logits=logits[row].contiguous(), labels=tuple(str(v) for v in labels),
                    image_size=prepared[i].original_size, padded=prepared[i].padded,
                    **asdict(MapGeometry.of(geometry).at_scale(prepared[i].effective_scale)),
                )
    return results  # type: ignore[return-value]


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
