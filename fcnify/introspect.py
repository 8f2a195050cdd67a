"""What a module's own layers say about it: where it lives, its float dtype, its input channels.

Leaf helpers shared by conversion, export and the heatmap pipeline (they import nothing else of fcnify).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["input_channels", "placement"]


def placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device of the module's first parameter and its dtype when floating (CPU / float32 without any):
    the device and dtype its example inputs must have."""
    param = next(module.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype if param.is_floating_point() else torch.float32


def input_channels(module: nn.Module, default: int = 3) -> int:
    """The input channels of the first 2-D convolution (TorchScript keeps the layer's name and weight), else
    ``default``."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            return layer.in_channels
        if getattr(layer, "original_name", None) == "Conv2d":
            weight = getattr(layer, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 4:
                return int(weight.shape[1])
    return default
