"""Architecture of the embedded ``digits`` model: a small, padding-free CNN classifier.

It classifies a 32x32 grayscale window into 11 classes, ``"0"`` .. ``"9"`` and ``"background"``::

    conv5x5(1->16)  ReLU  maxpool2     32 -> 28 -> 14
    conv3x3(16->32) ReLU  maxpool2     14 -> 12 ->  6
    conv3x3(32->64) ReLU                6 ->  4
    flatten (64*4*4 = 1024)
    Linear(1024, 128) ReLU Dropout(0.3)
    Linear(128, 11)

No convolution or pool pads, so after fcnify rewrites the first Linear into a 4x4 convolution, every cell
of the dense score map is exactly the classifier applied to one 32x32 crop: cell ``(i, j)`` sees the
window whose top-left pixel is ``(4 * i, 4 * j)`` (network stride 4, offset 0).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DIGITS_LABELS", "STRIDE", "WINDOW", "DigitsNet"]

DIGITS_LABELS: tuple[str, ...] = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "background")
"""Class names, in output order (index 10 is ``"background"``)."""

WINDOW = 32
"""Side of the square input window, in pixels."""

STRIDE = 4
"""Stride of the dense score map, in pixels (two 2x2 max pools)."""


class DigitsNet(nn.Module):
    """Padding-free CNN: 1x32x32 window -> 11 logits (digits 0-9, background)."""

    def __init__(self, num_classes: int = len(DIGITS_LABELS), in_chans: int = 1, dropout: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
