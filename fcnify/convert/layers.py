"""Small modules the rewrite inserts: position-wise twins of head layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["batchnorm1d_to_2d", "ChannelLayerNorm", "linear_to_conv"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of an N×C×H×W map: the position-wise twin of LayerNorm(C)."""

    def __init__(self, source: nn.LayerNorm):
        super().__init__()
        self.normalized_shape = tuple(source.normalized_shape)
        self.eps = source.eps
        self.weight = None if source.weight is None else nn.Parameter(source.weight.detach().clone())
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def linear_to_conv(linear_weight: torch.Tensor, bias: torch.Tensor | None, channels: int, height: int,
                   width: int, order: str = "chw") -> nn.Conv2d:
    """The C→K convolution with an H×W kernel that equals ``Linear`` applied to a flattened C×H×W map.

    Args:
        linear_weight: K×(C·H·W) weight of the Linear.
        bias: K bias or None.
        channels, height, width: the map that was flattened.
        order: the order the flatten read the axes in: "chw" for ``flatten`` of an NCHW map, "hwc" for one
            permuted to channels-last first, or any other permutation of the three letters.
    """
    out_features = linear_weight.shape[0]
    sizes = {"c": channels, "h": height, "w": width}
    if sorted(order) != ["c", "h", "w"]:
        raise ValueError(f"order {order!r} is not a permutation of 'chw'")
    kernel = linear_weight.reshape(out_features, *(sizes[axis] for axis in order))
    kernel = kernel.permute(0, *(1 + order.index(axis) for axis in "chw"))
    conv = nn.Conv2d(channels, out_features, (height, width), bias=bias is not None)
    conv = conv.to(device=linear_weight.device, dtype=linear_weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel.contiguous())
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def batchnorm1d_to_2d(source: nn.BatchNorm1d) -> nn.BatchNorm2d:
    """A BatchNorm2d with the same statistics and affine parameters (per channel instead of per feature)."""
    bn = nn.BatchNorm2d(source.num_features, eps=source.eps, momentum=source.momentum, affine=source.affine,
                        track_running_stats=source.track_running_stats)
    reference = source.running_mean if source.running_mean is not None else source.weight
    if reference is not None:
        bn = bn.to(device=reference.device, dtype=reference.dtype)
    bn.load_state_dict(source.state_dict())
    return bn.eval()
