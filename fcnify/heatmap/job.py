"""What every image of a job shares: ``ImageJob`` (the network on its device, its geometry, tile sizes and
runtimes, the checked options) and ``ModelInfo`` (what the pipeline needs of the model)."""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fcnify.dense import with_output_stride
from fcnify.errors import FcnifyError, InputError
from fcnify.heatmap import compute, plan
from fcnify.heatmap.memory import DEFAULT_TILE_BUDGET, bytes_per_pixel, tile_side
from fcnify.heatmap.options import HeatmapOptions, validate_options
from fcnify.heatmap.outputs import check_outdir

__all__ = ["ImageJob", "ModelInfo", "network_fingerprint", "resolve_classes"]

_logger = logging.getLogger(__name__)


def resolve_classes(names_or_indices: Sequence, labels: Sequence[str]) -> list[int]:
    """Class indices for names or indices (exact name first, then an index, then a unique case-insensitive
    name); duplicates are dropped, the order is kept.

    Raises:
        InputError: a name that is no label and no valid index; the message lists close and valid names.
    """
    labels = [str(v) for v in labels]
    by_name = {name: i for i, name in enumerate(labels)}
    lower: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        lower.setdefault(name.lower(), []).append(i)
    result: list[int] = []
    for item in names_or_indices:
        text = str(item).strip()
        if text in by_name:
            index = by_name[text]
        elif re.fullmatch(r"[+-]?\d+", text) and 0 <= int(text) < len(labels):
            index = int(text)
        elif len(lower.get(text.lower(), [])) == 1:
            index = lower[text.lower()][0]
        else:
            close = difflib.get_close_matches(text, labels, n=3)
            examples = ", ".join(labels[:5]) + (", …" if len(labels) > 5 else "")
            hint = (f"did you mean {', '.join(close)}? " if close else "") + \
                f"give a class name ({examples}) or an index 0–{len(labels) - 1}"
            raise InputError(f"unknown class {text!r}: the model has no such label", hint=hint)
        if index not in result:
            result.append(index)
    return result


@dataclass
class ModelInfo:
    """What the pipeline needs from a ``LoadedModel`` (small and picklable, for Ray workers)."""

    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    source: str = ""
    preprocessing: dict = field(default_factory=dict)

    @classmethod
    def of(cls, loaded) -> ModelInfo:
        preprocessing = dict(getattr(loaded, "preprocessing", None) or {})
        preprocessing.setdefault("mean", list(loaded.mean))
        preprocessing.setdefault("std", list(loaded.std))
        return cls(int(loaded.in_chans), tuple(float(v) for v in loaded.mean), tuple(float(v) for v in loaded.std),
                   tuple(str(v) for v in loaded.labels), str(getattr(loaded, "source", "")), preprocessing)


class ImageJob:
    """What every image of a job shares: the network on its device, its geometry, the options.

    Args:
        fcn, geometry: the converted network and its geometry (``output_stride`` is applied here).
        model: ``ModelInfo`` (or a ``LoadedModel``).
        options: the heatmap options (checked here unless ``validate_options`` already did).
        metadata: the network's ``ModelMetadata`` (for an in-memory ONNX export), if known.
    """

    def __init__(self, fcn, geometry, model, options: HeatmapOptions, metadata=None):
        self.options = options = validate_options(options)
        self.model = model if isinstance(model, ModelInfo) else ModelInfo.of(model)
        self.classes = resolve_classes(options.classes, self.model.labels)
        # The model output the maps are made of (``--output``; fcnify's converted networks name theirs).
        self.output_names = tuple(str(n) for n in getattr(fcn, "output_names", ()) or ())
        self.output = str(fcn.selected) if getattr(fcn, "selected", None) is not None else None
        fcn, geometry = with_output_stride(fcn, geometry, options.output_stride)
        self.fcn, self.geometry, self.metadata = fcn, geometry, metadata
        self.bounds = plan.bounds_of(geometry)
        self.window = tuple(int(v) for v in geometry.window)
        self.network = compute.TileNetwork.build(fcn, self.model.in_chans, self.model.mean, self.model.std,
                                                 options.device, options.precision)
        self._budget = options.max_memory  # bytes, or None: the default budget
        self._per_pixel: float | None = None
        self._runtimes: dict[str, torch.nn.Module | None] = {}
        check_outdir(Path(options.outdir))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the network's weights, for a zarr store's resume key (hashed only when a store needs it)."""
        return network_fingerprint(self.fcn)

    def per_pixel(self) -> float:
        """Bytes of the network's working set per input pixel (measured once)."""
        if self._per_pixel is None:
            self._per_pixel = bytes_per_pixel(self.fcn, self.model.in_chans, self.window)
        return self._per_pixel

    def tiles_per_batch(self, input_shape: tuple[int, int]) -> int:
        """How many tiles of ``input_shape`` run together: one on the CPU (a tile's convolutions already use
        every core, and a batch would multiply the working set); on a GPU ``batch_size``, but no more than fit
        the memory budget together (a batch's working set is its tiles' sum), and at least one."""
        if self.network.device.type == "cpu":
            return 1
        budget = self._budget or DEFAULT_TILE_BUDGET
        fit = int(budget // max(1.0, self.per_pixel() * input_shape[0] * input_shape[1]))
        return max(1, min(int(self.options.batch_size), fit))

    def tile_cells(self) -> tuple[int, int] | None:
        """Cells per tile for this job's options (None: one tile per image)."""
        tile = self.options.tile  # None, "auto" or (height, width), parsed by validate_options
        if isinstance(tile, tuple):
            return plan.cells_for_tile_size(self.bounds, tile)
        self.per_pixel()
        budget = self._budget
        side = tile_side(self._per_pixel, budget)
        minimum = max(self.bounds.halo(a) + self.bounds.stride[a] for a in range(2))
        if side < minimum:
            if budget is not None:
                raise InputError(f"--max-memory {budget / 1e6:.0f}MB is too small for one tile of this network "
                                 f"(a {minimum}x{minimum} tile needs about "
                                 f"{self._per_pixel * minimum**2 / 1e6:.0f} MB)",
                                 hint="raise --max-memory")
            side = minimum
        return plan.cells_for_tile_size(self.bounds, (side, side))

    def runner(self, pixels: int) -> compute.TileNetwork:
        """The tile network in the runtime ``--runtime`` picks for ``pixels`` input pixels (exported once)."""
        name = compute.choose_runtime(self.fcn, self.metadata, self.options.runtime, self.network.device,
                                      self.options.precision, pixels)
        if name == "torch" or getattr(self.fcn, "runs_outside_torch", False):
            self.network.runtime = name
            return self.network
        if name not in self._runtimes:
            try:
                self._runtimes[name] = compute.onnx_twin(self.fcn, self.metadata)
            except FcnifyError as exc:
                if self.options.runtime != "auto":
                    raise
                _logger.info("--runtime auto: staying with PyTorch (%s)", exc)
                self._runtimes[name] = None
        if self._runtimes[name] is None:
            return self.network
        return compute.TileNetwork(self._runtimes[name], self.network.device, self.network.dtype,
                                   self.network.in_chans, self.network.mean, self.network.std, name)


def network_fingerprint(fcn) -> str:
    """A short hash of the network's weights: a partial store is resumed only by the same network."""
    digest = hashlib.sha1()
    source = getattr(fcn, "_source", None)
    if isinstance(source, (bytes, str)):
        digest.update(source if isinstance(source, bytes) else source.encode())
    for name, tensor in sorted(fcn.state_dict().items()) if hasattr(fcn, "state_dict") else []:
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            # reshape(-1): 0-dim buffers (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly.
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            digest.update(str(tuple(tensor.shape)).encode())
    return digest.hexdigest()[:16]
