"""``ScoreMap``: the dense class scores of one image held in memory, with their geometry in image pixels.

A leaf module (it imports no other fcnify module) so that every module that passes score maps around can
import it without circles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from fcnify.errors import InputError

__all__ = ["ScoreMap", "check_class_count"]


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


def check_class_count(classes: int, labels: int) -> None:
    """Raise ``InputError`` when a network's output has another number of classes than there are labels."""
    if int(classes) != int(labels):
        raise InputError(f"the network gives {classes} classes but there are {labels} labels",
                         hint="the labels do not belong to this model")
