"""Small real networks for tests (importable as ``nets`` for ``--arch nets:FACTORY``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FlattenStyleNet(nn.Module):
    """A padding-free CNN whose head flattens in a chosen style (the ways people write it)."""

    def __init__(self, style: str = "torch.flatten", in_chans: int = 3, size=(20, 24), classes: int = 5):
        super().__init__()
        self.style = style
        self.features = nn.Sequential(nn.Conv2d(in_chans, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3))
        with torch.no_grad():
            c, h, w = self.features(torch.zeros(1, in_chans, *size)).shape[1:]
        self.chw = (c, h, w)
        self.fc1 = nn.Linear(c * h * w, 16)
        self.fc2 = nn.Linear(16, classes)
        self.flatten = nn.Flatten()

    def forward(self, x):
        x = self.features(x)
        c, h, w = self.chw
        if self.style == "nn.Flatten":
            x = self.flatten(x)
        elif self.style == "torch.flatten":
            x = torch.flatten(x, 1)
        elif self.style == "method":
            x = x.flatten(1)
        elif self.style == "view-size":
            x = x.view(x.size(0), -1)
        elif self.style == "view-const":
            x = x.view(-1, c * h * w)
        elif self.style == "reshape":
            x = x.reshape(x.shape[0], -1)
        elif self.style == "channels-last":
            x = x.permute(0, 2, 3, 1).contiguous().view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class RichHead(nn.Module):
    """Global pool then BatchNorm1d, Dropout, LayerNorm, several Linears and a LogSoftmax."""

    def __init__(self, pool: str = "avg"):
        super().__init__()
        self.pool_kind = pool
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        features = 24 if pool == "catavgmax" else 12
        self.bn = nn.BatchNorm1d(features)
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(features, 20)
        self.norm = nn.LayerNorm(20)
        self.fc2 = nn.Linear(20, 7)
        self.out = nn.LogSoftmax(dim=1)

    def forward(self, x):
        x = self.body(x)
        if self.pool_kind == "avg":
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        elif self.pool_kind == "max":
            x = nn.functional.adaptive_max_pool2d(x, (1, 1)).squeeze(-1).squeeze(-1)
        elif self.pool_kind == "mean":
            x = x.mean((2, 3))
        elif self.pool_kind == "amax":
            x = x.amax(dim=(-2, -1))
        elif self.pool_kind == "catavgmax":
            x = torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], dim=1).flatten(1)
        x = self.drop(F.gelu(self.bn(x)))
        x = self.norm(self.fc1(x))
        return self.out(self.fc2(F.silu(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 2, 1)
        self.fc2 = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class SENet(nn.Module):
    """Global context inside the body: converts, exact at the training size, approximate when dense."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.se = SqueezeExcite(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(self.se(F.relu(self.conv(x)))).flatten(1))


class TokenMixer(nn.Module):
    """Flattens positions into a sequence and mixes them: no fully-convolutional twin."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Linear(16, 16)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv(x).flatten(2)  # N×8×16 tokens
        x = self.mix(x).mean(-1)
        return self.fc(x)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return FlattenStyleNet("torch.flatten")


def small_cnn_other_seed() -> nn.Module:
    torch.manual_seed(1)
    return FlattenStyleNet("torch.flatten")


def slide_net(classes: int = 3) -> nn.Module:
    """A small padded RGB classifier on 32×32 windows (stride 4): padding makes tile borders matter."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, classes),
    ).eval()


class PaddedNet(nn.Module):
    """Padding everywhere, a ceil-mode pool, a residual block: the hard case for tiling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.tail = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = F.relu(x + self.block(x))
        x = F.relu(self.tail(F.relu(self.down(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class StridedSENet(nn.Module):
    """Squeeze-excitation after a stride-4 stem: dilating to stride 2 puts it on a finer map."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU())
        self.se = SqueezeExcite(8)
        self.tail = nn.Conv2d(8, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.tail(self.se(self.stem(x))))).flatten(1))
