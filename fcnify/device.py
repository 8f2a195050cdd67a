"""Where and in what precision a network runs: device choice, precision checks, placing the model, one
guarded forward pass. Below both the in-memory API (``fcnify.dense``) and the tile engine
(``fcnify.heatmap.compute``), which run networks the same way."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from fcnify.convert.outputs import flatten_outputs
from fcnify.errors import FcnifyError, InputError, first_line

__all__ = ["DEVICES", "PRECISIONS", "check_precision", "cpu_bf16_convolutions_are_accurate", "guarded_forward",
           "place_model", "run_network", "select_device"]

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


def run_network(fcn: nn.Module, batch: torch.Tensor, device: torch.device, dtype: torch.dtype,
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


def guarded_forward(run: Callable[[], torch.Tensor], shape, images: int = 1) -> torch.Tensor:
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
