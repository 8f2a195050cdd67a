"""``FullyConvolutionalNet``: what ``convert`` returns, a rewritten graph and the geometry of its map.

Its own module: what only uses a converted network (``dilate``, ``export``) need not import the conversion
that makes one.
"""

from __future__ import annotations

import torch
from torch import nn

from fcnify.convert.geometry import Geometry
from fcnify.convert.rules import Rewrite


class FullyConvolutionalNet(nn.Module):
    """A converted classifier: maps N×C×H×W images (H, W ≥ the training size) to N×K×h×w logits.

    Attributes:
        net: the rewritten ``torch.fx.GraphModule``.
        geometry: how output cells map to input windows.
        input_size: the training size (H, W) the model was converted at.
        in_chans: input channels.
        rewrites: the layers that changed, old → new.
    """

    def __init__(self, net: nn.Module, geometry: Geometry, input_size: tuple[int, int], in_chans: int,
                 rewrites: list[Rewrite] | None = None):
        super().__init__()
        self.net = net
        self.geometry = geometry
        self.input_size = tuple(input_size)
        self.in_chans = in_chans
        self.rewrites = list(rewrites or [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The score map's size a one-pass forward gives for ``height`` × ``width`` (``Geometry.map_size``)."""
        return self.geometry.map_size(height, width)
