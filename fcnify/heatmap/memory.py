"""Memory: parsing sizes and budgets, and how many bytes a network's activations take per input pixel.

The tile size follows from the budget: ``tile_side`` measures the network's live activations on a probe
(an FX interpreter that frees each value after its last use, as eager PyTorch does) and scales by pixels.
"""

from __future__ import annotations

import logging
import math
import re

import torch
import torch.fx
from torch import nn

from fcnify.errors import InputError
from fcnify.introspect import placement

__all__ = ["available_memory", "bytes_per_pixel", "parse_memory", "parse_tile", "tile_side"]

_logger = logging.getLogger(__name__)

# Activations alone miss convolution workspaces and allocator slack: measured RSS per tile pixel over the
# meter's figure is 1.5–1.8 for the digits model and ResNet-50 on the CPU.
_WORKSPACE_FACTOR = 1.8
#: Tile sides never exceed this (larger tiles save little halo and make foreground skipping coarse).
MAX_TILE_SIDE = 2048
#: The default budget for a tile's working set (the rest of the process: weights, runtime, buffers). With the
#: ~1.2 GB a ResNet-50 process holds before its first tile, 1 GB tiles peaked at 2.57 GB on a 24000² slide and
#: 768 MB tiles at 2.43 GB (its working set is ~1.6× what the meter predicts); 640 MB keeps it near 2.2 GB.
DEFAULT_TILE_BUDGET = 640 * 10**6


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value) -> int:
    """Bytes for '2GB', '512MiB', '1.5g', 2000000000.

    Raises:
        InputError: not a size.
    """
    if isinstance(value, (int, float)) and value > 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise InputError(f"--max-memory {value!r} is not a memory size", hint="write it as 2GB, 512MB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_tile(value) -> tuple[int, int] | str | None:
    """None, 'auto', or a tile size (height, width) from 768, '768' or '768x1024'.

    Raises:
        InputError: anything else.
    """
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, int):
        size = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        size = (int(value[0]), int(value[1]))
    else:
        parts = str(value).lower().replace("×", "x").split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) not in (1, 2):
            raise InputError(f"--tile {value!r} is not a size or 'auto'", hint="e.g. --tile 768, 768x1024 or auto")
        size = (nums[0], nums[-1])
    if min(size) < 1:
        raise InputError(f"--tile {value!r} must be positive", hint="e.g. --tile 768")
    return size


class _PeakMeter(torch.fx.Interpreter):
    """Runs a graph and records the most bytes its live tensors held at once (values freed after last use)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.peak = 0

    def run_node(self, node):
        result = super().run_node(node)
        storages = {}
        for value in list(self.env.values()) + [result]:
            for t in _tensors(value):
                if node.op != "get_attr":
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        params = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        params |= {b.untyped_storage().data_ptr() for b in self.module.buffers()}
        live = sum(v for k, v in storages.items() if k not in params)
        self.peak = max(self.peak, live)
        return result


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def _peak_bytes(module: nn.Module, x: torch.Tensor) -> int:
    with torch.inference_mode():
        if isinstance(module, torch.fx.GraphModule):
            meter = _PeakMeter(module)
            meter.run(x)
            return meter.peak
        out = module(x)
        return x.nbytes + out.nbytes


def bytes_per_pixel(fcn: nn.Module, in_chans: int, window: tuple[int, int]) -> float:
    """Activation bytes per input pixel, measured on a probe of twice the window (×1.8 for workspaces).

    Networks without a PyTorch graph (onnxruntime) get a conservative 400 bytes.
    """
    graph = getattr(fcn, "net", fcn)
    if not isinstance(graph, torch.fx.GraphModule):
        return 400.0
    device, dtype = placement(graph)
    size = tuple(2 * int(w) for w in window)
    probe = torch.zeros(1, in_chans, *size, dtype=dtype, device=device)
    try:
        peak = _peak_bytes(graph, probe)
    except Exception as exc:  # a graph the interpreter cannot run stand-alone: stay conservative
        _logger.info("memory probe failed (%s): assuming 400 B/px", type(exc).__name__)
        return 400.0
    return _WORKSPACE_FACTOR * peak / (size[0] * size[1])


def tile_side(per_pixel: float, budget: int | None, batch: int = 1) -> int:
    """The largest square tile side whose working set fits ``budget`` bytes (default 640 MB), ≤ 2048 px."""
    budget = DEFAULT_TILE_BUDGET if budget is None else budget
    side = int(math.sqrt(max(budget, 1) / max(per_pixel * batch, 1e-9)))
    return max(1, min(MAX_TILE_SIDE, side))


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable on Linux), 4 GB when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 10**9
