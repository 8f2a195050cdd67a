"""A kept corpus of "wild" classifiers: small real modules written the way third-party code is.

Each class builds with fixed-seed weights (``build(name)``), and each has a training size (``TRAINING_SIZES``).
They are written as their authors write them (Caffe ports, multi-head detectors, embedding models), not as
fcnify would like: several outputs (tuple, dict, namedtuple), permuted flattens, ceil-mode pools, PReLU,
softmax in one head, squeeze-excitation in the body. Other tests (heatmaps, ONNX import) reuse them; the
file also serves ``--arch tests/wild_models.py:NAME``.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0

Embedded = collections.namedtuple("Embedded", ["logits", "embedding"])


class CascadeRNet(nn.Module):
    """MTCNN's refinement net as ported from Caffe: 24×24 input, PReLU, ceil-mode max pools, a (0, 3, 2, 1)
    permute + ``contiguous`` + ``view`` flatten, and two heads: bounding-box regression (4) and face
    probability (2, softmax). Returns ``(bbox, probability)``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        probability = self.softmax5_1(self.dense5_1(x))
        bbox = self.dense5_2(x)
        return bbox, probability


def _body(channels: int = 8) -> nn.Sequential:
    """A padding-free body (every dense cell equals its crop): 3→channels, stride 2."""
    return nn.Sequential(nn.Conv2d(3, channels, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(channels, channels, 3),
                         nn.PReLU())


class DictHeads(nn.Module):
    """A dict of outputs: class logits and an embedding, after one shared Linear and a single-slope PReLU."""

    def __init__(self):
        super().__init__()
        self.body = _body()
        self.shared = nn.Linear(8 * 5 * 5, 32)
        self.act = nn.PReLU()
        self.logits = nn.Linear(32, 3)
        self.embedding = nn.Linear(32, 6)

    def forward(self, x):
        x = self.act(self.shared(torch.flatten(self.body(x), 1)))
        return {"logits": self.logits(x), "embedding": self.embedding(x)}


class NamedTupleHeads(nn.Module):
    """A namedtuple of outputs (``Embedded(logits, embedding)``), the embedding L2-normalised."""

    def __init__(self):
        super().__init__()
        self.body = _body()
        self.flatten = nn.Flatten()
        self.logits = nn.Linear(8 * 5 * 5, 5)
        self.embedding = nn.Linear(8 * 5 * 5, 7)

    def forward(self, x):
        x = self.flatten(self.body(x))
        return Embedded(self.logits(x), F.normalize(self.embedding(x), dim=1))


class LogitsAndEmbedding(nn.Module):
    """``(logits, embedding)`` whose heads branch at different depths: the embedding pools a stride-2 map, the
    logits come from a stride-4 map, so the two outputs have different geometries."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.deeper = nn.Sequential(nn.Conv2d(8, 12, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.project = nn.Linear(8, 4)
        self.classifier = nn.Linear(12 * 2 * 2, 3)

    def forward(self, x):
        early = self.stem(x)
        embedding = self.project(early.mean((2, 3)))
        logits = self.classifier(self.deeper(early).flatten(1))
        return logits, embedding


class FourAndTwo(nn.Module):
    """A model with a 2-class head and, defined after it, a 4-class head: its last-defined Linear has 4 outputs."""

    def __init__(self):
        super().__init__()
        self.body = _body()
        self.two = nn.Linear(8 * 5 * 5, 2)
        self.four = nn.Linear(8 * 5 * 5, 4)

    def forward(self, x):
        x = self.body(x).flatten(1)
        return self.two(x), self.four(x)


class TwoClassWrapper(nn.Module):
    """Returns only the 2-class head of ``FourAndTwo``: a model of 2 classes whose last Linear has 4 outputs."""

    def __init__(self):
        super().__init__()
        self.inner = FourAndTwo()

    def forward(self, x):
        return self.inner(x)[0]


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class SEBody(nn.Module):
    """Squeeze-excitation blocks in a padding-free body, then a flatten head: exact at the training size,
    image-wide context in a dense pass."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.se1 = SqueezeExcite(8, 4)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.se2 = SqueezeExcite(8, 2)
        self.fc = nn.Linear(8 * 5 * 5, 4)

    def forward(self, x):
        x = self.pool(F.relu(self.se1(self.conv1(x))))
        x = F.relu(self.se2(self.conv2(x)))
        return self.fc(x.view(x.size(0), -1))


PERMUTATIONS = ((0, 1, 2, 3), (0, 1, 3, 2), (0, 2, 1, 3), (0, 2, 3, 1), (0, 3, 1, 2), (0, 3, 2, 1))
FLATTENS = ("contiguous_view_shape", "clone_view_size", "reshape_n", "torch_flatten", "nn_flatten",
            "contiguous_clone_reshape")


class PermutedFlatten(nn.Module):
    """A padding-free body whose C×H×W map (6×4×3, all sides different) is permuted into any order of its three
    axes and flattened in one of several spellings before the Linear."""

    def __init__(self, permutation: tuple[int, ...] = (0, 3, 2, 1), flatten: str = "contiguous_view_shape"):
        super().__init__()
        self.permutation = tuple(permutation)
        self.spelling = flatten
        self.body = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 6, 3), nn.ReLU())
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6 * 4 * 3, 5)

    def forward(self, x):
        x = self.body(x).permute(*self.permutation)
        if self.spelling == "contiguous_view_shape":
            x = x.contiguous().view(x.shape[0], -1)
        elif self.spelling == "clone_view_size":
            x = x.clone().contiguous().view(x.size(0), -1)
        elif self.spelling == "reshape_n":
            n = x.shape[0]
            x = x.reshape(n, -1)
        elif self.spelling == "torch_flatten":
            x = torch.flatten(x, 1)
        elif self.spelling == "nn_flatten":
            x = self.flatten(x.contiguous())
        else:
            x = x.contiguous().clone().reshape(x.size(0), -1).contiguous()
        return self.fc(x)


TRAINING_SIZES = {
    "CascadeRNet": (24, 24), "DictHeads": (16, 16), "NamedTupleHeads": (16, 16), "LogitsAndEmbedding": (16, 16),
    "FourAndTwo": (16, 16), "TwoClassWrapper": (16, 16), "SEBody": (16, 16), "PermutedFlatten": (14, 12),
}


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial PReLU slopes (their default 0.25 everywhere would hide a per-channel mix-up)."""
    for module in model.modules():
        if isinstance(module, nn.PReLU):
            with torch.no_grad():
                module.weight.uniform_(0.05, 0.6)
    return model


def build(name: str, *args, seed: int = SEED) -> nn.Module:
    """The wild model ``name`` (a class of this module) with fixed-seed weights, in eval mode."""
    torch.manual_seed(seed)
    return _randomise(globals()[name](*args)).eval()


def cascade_rnet() -> nn.Module:
    """Factories for ``--arch tests/wild_models.py:NAME`` (no arguments)."""
    return build("CascadeRNet")


def dict_heads() -> nn.Module:
    return build("DictHeads")


def two_class_wrapper() -> nn.Module:
    return build("TwoClassWrapper")
