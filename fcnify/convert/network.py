"""``FullyConvolutionalNet``: what ``convert`` returns, a rewritten graph and the geometry of its maps.

Its own module: what only uses a converted network (``dilate``, ``export``) need not import the conversion
that makes one.
"""

from __future__ import annotations

import torch
from torch import nn

from fcnify.convert.geometry import Geometry
from fcnify.convert.outputs import SINGLE, MultiOutputNet, OutputInfo
from fcnify.convert.rules import Rewrite

__all__ = ["FullyConvolutionalNet"]


class FullyConvolutionalNet(MultiOutputNet, nn.Module):
    """A converted classifier: maps N×C×H×W images (H, W ≥ the training size) to N×K×h×w logits.

    A model returning several outputs (a tuple, list, dict or namedtuple) gives the same structure, each
    per-window vector an N×K×h×w map with its own geometry; ``selected`` names the one heatmaps use
    (see ``fcnify.convert.outputs.MultiOutputNet``).

    Attributes:
        net: the rewritten ``torch.fx.GraphModule``.
        geometry: how the selected output's cells map to input windows.
        geometries: each output's geometry by name; ``output_names``: the outputs in order;
            ``channels``: each output's channels (classes).
        input_size: the training size (H, W) the model was converted at.
        in_chans: input channels.
        rewrites: the layers that changed, old → new.
    """

    def __init__(self, net: nn.Module, geometry: Geometry | None, input_size: tuple[int, int], in_chans: int,
                 rewrites: list[Rewrite] | None = None, outputs: list[OutputInfo] | None = None,
                 selected: str | int | None = None):
        super().__init__()
        self.net = net
        self.input_size = tuple(input_size)
        self.in_chans = in_chans
        self.rewrites = list(rewrites or [])
        if outputs is None:  # a single-output network built by hand: its channels are read when known
            outputs = [OutputInfo(SINGLE, _channels_of(net), geometry)]
        self._set_outputs(outputs, selected)

    def forward(self, x: torch.Tensor):
        return self.net(x)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The selected score map's size a one-pass forward gives for an input of ``height`` × ``width`` (``Geometry.map_size``)."""
        return self.geometry.map_size(height, width)


def _channels_of(net: nn.Module) -> int:
    """The out-channels of the last convolution of ``net`` (0 when it has none): a hand-built network's classes."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else 0
