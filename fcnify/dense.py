"""Dense evaluation: run a fully-convolutional network over whole images and keep its class score maps.

``score_maps`` takes prepared images (or plain C×H×W tensors), batches those of the same size, runs the
network once per batch (``_forward``, the one place that touches the device and precision) and returns one
``ScoreMap`` per image, with the map's geometry expressed in the original image's pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from fcnify.errors import InputError

__all__ = ["PRECISIONS", "DenseEngine", "ScoreMap", "check_dense_options", "place_model", "score_map", "score_maps",
           "dense_kwargs", "select_device", "with_output_stride"]

_logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class ScoreMap:
    """The dense class scores of one image.

    Cell (i, j) is the classifier applied to the window of size ``window`` whose top-left corner is
    ``offset + (i, j) * stride``, all (y, x) in the original image's pixels (floats when the image was
    resized by a scale other than 1, ints otherwise).

    Attributes:
        logits: K×h×w float32 tensor on the CPU.
        labels: the K class names.
        stride, offset, window: the map's geometry in image pixels.
        image_size: the original image's (height, width).
        padded: the image was padded up to the window before evaluation.
    """

    logits: torch.Tensor
    labels: tuple[str, ...]
    stride: tuple[float, float]
    offset: tuple[float, float]
    window: tuple[float, float]
    image_size: tuple[int, int]
    padded: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def map_size(self) -> tuple[int, int]:
        return (int(self.logits.shape[-2]), int(self.logits.shape[-1]))

    @cached_property
    def scores(self) -> torch.Tensor:
        """Softmax probabilities over the K classes, K×h×w float32."""
        return torch.softmax(self.logits.float(), dim=0)

    @cached_property
    def _peaks(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.scores.flatten(1)
        return flat.max(dim=1)

    def window_centre(self, i: int, j: int) -> tuple[float, float]:
        """Centre of cell (i, j)'s window in image pixels (pixel-edge coordinates: pixel p spans [p, p+1))."""
        return (self.offset[0] + i * self.stride[0] + self.window[0] / 2,
                self.offset[1] + j * self.stride[1] + self.window[1] / 2)

    def peak(self, k: int) -> tuple[float, tuple[float, float]]:
        """Class ``k``'s highest probability and where: the window centre of its best cell, in image pixels."""
        values, indices = self._peaks
        index = int(indices[k])
        i, j = divmod(index, self.map_size[1])
        return float(values[k]), self.window_centre(i, j)

    def top_classes(self, n: int) -> list[int]:
        """The ``n`` class indices with the highest peak probability, best first."""
        values, _ = self._peaks
        order = torch.argsort(values, descending=True, stable=True)
        return [int(k) for k in order[: max(0, n)]]

    def argmax_map(self) -> torch.Tensor:
        """h×w int64: the most probable class of each cell."""
        return self.logits.argmax(dim=0)


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
    return PRECISIONS[precision]


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


def _forward(fcn: nn.Module, batch: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One forward pass of an N×C×H×W batch; returns N×K×h×w float32 logits on the CPU.

    Reduced precision uses ``torch.autocast`` (the weights stay as they are; convolutions and matrix
    products run in fp16/bf16, the rest in fp32).
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
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"the network returned {shape}, not an N×K×h×w score map",
                         hint="give a converted (fully-convolutional) network")
    return out.float().cpu()


def _as_prepared(item):
    from fcnify.images import PreparedImage

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
               device: torch.device | str = "cpu", precision: str = "fp32", batch_size: int = 8, *,
               tile=None, max_memory=None, scales: Sequence[float] | None = None, combine: str = "mean",
               progress: Callable[[int, int], None] | None = None) -> list[ScoreMap]:
    """Dense class scores of several images, in order; images of the same size are batched together.

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
        tile: None (one pass), a tile size (768, "768x1024") or "auto": compute each map tile by tile,
            exactly (``fcnify.tiling``); images then run one at a time.
        max_memory: a memory budget ("2GB") for ``tile="auto"`` (default: half the available memory); given
            without ``tile`` it implies ``tile="auto"``.
        scales: an image pyramid (``fcnify.multiscale``): one map per scale, combined on the grid of scale 1
            (of the first scale when 1 is not listed).
        combine: "mean" or "max" of the scales' probabilities.
        progress: called as ``progress(tiles_done, tiles_total)`` for each tiled image.

    Raises:
        InputError: a bad device/precision, a label count that does not match K, a network that fails.
    """
    device = device if isinstance(device, torch.device) else select_device(device)
    dtype = check_precision(precision, device)
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be at least 1", hint="e.g. --batch-size 8")
    prepared = [_as_prepared(item) for item in images]
    place_model(fcn, device)
    check_dense_options(tile, max_memory, scales, combine)
    if tile is not None or max_memory is not None or scales:
        engine = DenseEngine(fcn, geometry, device, dtype, tile, max_memory, progress=progress)
        return [engine.score_map(item, labels, scales, combine) for item in prepared]
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
            if logits.shape[1] != len(labels):
                raise InputError(f"the network gives {logits.shape[1]} classes but there are {len(labels)} labels",
                                 hint="the labels do not belong to this model")
            for row, i in enumerate(chunk):
                results[i] = ScoreMap(
                    logits=logits[row].contiguous(), labels=tuple(str(v) for v in labels),
                    image_size=prepared[i].original_size, padded=prepared[i].padded,
                    **_image_geometry(geometry, prepared[i]),
                )
    return results  # type: ignore[return-value]


def _guarded(run: Callable[[], torch.Tensor], shape, images: int = 1) -> torch.Tensor:
    """Run a forward pass, turning out-of-memory and network failures into one-line ``InputError``s."""
    from fcnify.errors import FcnifyError

    try:
        return run()
    except FcnifyError:
        raise
    except torch.OutOfMemoryError as exc:
        raise InputError(f"out of memory running {images} image(s) of {shape[-2]}x{shape[-1]} px",
                         hint="pass --batch-size 1, --tile auto --max-memory SIZE, --scale below 1 or "
                         "--device cpu") from exc
    except Exception as exc:
        raise InputError(
            f"the network failed on a {shape[-2]}x{shape[-1]} image: {type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]}",
            hint="check that the model's channels and input size match the images") from exc


def score_map(fcn: nn.Module, image, geometry, labels: Sequence[str], device: torch.device | str = "cpu",
              precision: str = "fp32", **options) -> ScoreMap:
    """Dense class scores of one image (a ``PreparedImage`` or a C×H×W tensor); see ``score_maps``."""
    return score_maps(fcn, [image], geometry, labels, device, precision, batch_size=1, **options)[0]


# ------------------------------------------------------------------------------ tiles, scales, output stride


COMBINES = ("mean", "max")


def check_dense_options(tile=None, max_memory=None, scales=None, combine: str = "mean",
                        output_stride: int | None = None) -> None:
    """Raise ``InputError`` for tiling, multi-scale and output-stride options that can never work."""
    from fcnify.tiling import parse_memory, parse_tile

    parse_tile(tile)
    if max_memory is not None:
        parse_memory(max_memory)
    if scales is not None:
        from fcnify.multiscale import parse_scales

        parse_scales(scales)
    if combine not in COMBINES:
        raise InputError(f"--combine {combine!r} is not one of {', '.join(COMBINES)}", hint="e.g. --combine mean")
    if output_stride is not None and int(output_stride) < 1:
        raise InputError(f"--output-stride {output_stride} must be a positive integer",
                         hint="e.g. --output-stride 8 for a stride-32 network")


def with_output_stride(fcn: nn.Module, geometry, output_stride: int | None):
    """(network, geometry) whose map has ``output_stride`` (dilation rewrite, ``fcnify.convert.dilate``).

    None or the native stride returns the inputs unchanged.

    Raises:
        InputError: a network without a graph (a loaded .pt2 or .onnx), or a stride that does not divide.
        ConversionError: a network the dilation rewrite cannot handle.
    """
    if output_stride is None or all(int(output_stride) == s for s in geometry.stride):
        return fcn, geometry
    from fcnify.convert import FullyConvolutionalNet
    from fcnify.convert.dilate import dilate

    if not isinstance(fcn, FullyConvolutionalNet):
        raise InputError(f"--output-stride needs the model's graph, and {type(fcn).__name__} has none",
                         hint="give the original model (torchvision:NAME, timm:NAME, a state_dict), not a "
                         "converted .pt2/.onnx")
    cache = fcn.__dict__.setdefault("_fcnify_output_strides", {})  # one rewrite per network and stride
    if int(output_stride) not in cache:
        cache[int(output_stride)] = dilate(fcn, int(output_stride))
    fine = cache[int(output_stride)]
    return fine, fine.geometry


def dense_kwargs(options) -> dict:
    """The tiling and multi-scale keyword arguments of ``score_maps`` from ``HeatmapOptions``-like options."""
    return {"tile": getattr(options, "tile", None), "max_memory": getattr(options, "max_memory", None),
            "scales": tuple(getattr(options, "scales", ()) or ()) or None,
            "combine": getattr(options, "combine", "mean")}


def _available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable on Linux), 4 GB when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 10**9


class DenseEngine:
    """Logits of one image at a time, one pass or tiled; the multi-scale pyramid runs through it.

    Args:
        fcn, geometry: the network and its geometry.
        device, dtype: where and in which precision it runs.
        tile: None, "auto" or a size (see ``score_maps``); ``max_memory`` alone implies "auto".
        max_memory: the budget for "auto" (bytes or "2GB").
        tile_batch: tiles of the same size run together (None: as many as the budget allows for "auto"; 1
            for a fixed tile size, so that memory follows the tile).
        progress: ``progress(tiles_done, tiles_total)``.
    """

    def __init__(self, fcn: nn.Module, geometry, device: torch.device, dtype: torch.dtype, tile=None,
                 max_memory=None, tile_batch: int | None = None,
                 progress: Callable[[int, int], None] | None = None):
        from fcnify.tiling import parse_memory, parse_tile

        self.fcn, self.geometry, self.device, self.dtype = fcn, geometry, device, dtype
        self.tile = parse_tile(tile)
        if self.tile is None and max_memory is not None:
            self.tile = "auto"
        self.budget = parse_memory(max_memory) if max_memory is not None else None
        self.tile_batch = tile_batch
        self.progress = progress
        self._tiled = None
        self._memory = None
        self.in_chans = getattr(fcn, "in_chans", None)

    def _run(self, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return _forward(module, batch, self.device, self.dtype)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """K×h×w float32 logits of one C×H×W image (tiled when asked to; then equal to one pass)."""
        return _guarded(lambda: self._logits(image), image.shape)

    def _logits(self, image: torch.Tensor) -> torch.Tensor:
        from fcnify.tiling import choose_tile, split_for_tiling, tiled_logits

        if self.tile is None:
            return self._run(self.fcn, image[None])[0]
        if self._tiled is None:
            self._tiled = split_for_tiling(self.fcn, self.geometry, self.in_chans or image.shape[0])
        size = (int(image.shape[1]), int(image.shape[2]))
        batch = self.tile_batch or 1
        if self.tile == "auto":
            from fcnify.tiling import memory_model

            budget = self.budget if self.budget is not None else _available_memory() // 2
            if self._memory is None:  # one probe per network
                self._memory = memory_model(self._tiled, image.shape[0], tuple(self.geometry.window))
            model = self._memory
            tile = choose_tile(self._tiled, size, budget, image.shape[0], tuple(self.geometry.window), model=model)
            if tile is None:
                return self._run(self.fcn, image[None])[0]
            if self.tile_batch is None:  # spend what is left of the budget on running tiles together
                while batch < 16 and model.tile_bytes(tile, batch + 1) <= budget * 0.8:
                    batch += 1
        else:
            tile = self.tile
        return tiled_logits(self._tiled, image, tile, self._run, batch, self.progress)[0]

    def score_map(self, item, labels: Sequence[str], scales=None, combine: str = "mean") -> ScoreMap:
        """The ``ScoreMap`` of one ``PreparedImage`` (or C×H×W tensor), over a pyramid when ``scales``."""
        prepared = _as_prepared(item)
        labels = tuple(str(v) for v in labels)
        if scales:
            from fcnify.multiscale import multiscale_map

            return multiscale_map(self.logits, prepared, self.geometry, labels, scales, combine)
        logits = self.logits(prepared.tensor)
        if logits.shape[0] != len(labels):
            raise InputError(f"the network gives {logits.shape[0]} classes but there are {len(labels)} labels",
                             hint="the labels do not belong to this model")
        return ScoreMap(logits=logits.contiguous(), labels=labels, image_size=prepared.original_size,
                        padded=prepared.padded, **_image_geometry(self.geometry, prepared))
