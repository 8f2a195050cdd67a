"""``LoadedModel``: a classifier (or an already converted network) and what fcnify needs to know about it.

A leaf module: the loaders (``models``, ``onnx_runtime``) make one and every later step reads one, so it
imports nothing of fcnify.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

__all__ = ["LoadedModel"]

# Where mean/std came from (``LoadedModel.normalisation``): fcnify says so when it had to assume them.
FROM_FLAG, FROM_METADATA, FROM_ZOO, ASSUMED = "flag", "metadata", "zoo", "assumed (ImageNet)"


@dataclass
class LoadedModel:
    """A classifier and what fcnify needs to know about it.

    Attributes:
        module: the classifier (eval mode), or the converted network when ``converted`` is set.
        input_size: training size (height, width), or None when unknown.
        in_chans: input channels.
        mean, std: per-channel normalisation of 0–1 pixel values.
        labels: class names (``"0"``, ``"1"``, … when unknown).
        source: the spec it came from.
        converted: the network is already fully convolutional (a ``.pt2``), with ``geometry`` set.
        normalisation: where ``mean``/``std`` came from: ``flag``, ``metadata``, ``zoo`` or
            ``assumed (ImageNet)`` (nothing said how the model was trained).
        extra: facts of the loader (``path``: the file the weights or model came from; ``input_layout``: an ONNX
            original's input layout).
        reference: what a conversion is checked against when it is not ``module`` itself: for an ONNX file,
            onnxruntime running the original file (``module`` is then its import into PyTorch).
        output: the output the user picked (``--output``: an index or a name; None: the first), for a model
            with several; ``labels`` belong to it.
    """

    module: nn.Module
    input_size: tuple[int, int] | None
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    source: str
    converted: bool = False
    geometry: object | None = None
    extra: dict = field(default_factory=dict)
    normalisation: str | None = None
    reference: nn.Module | None = None
    output: str | None = None

    @property
    def original(self) -> nn.Module:
        """The classifier conversions are verified against: ``reference`` when set, else ``module``."""
        return self.reference if self.reference is not None else self.module

    @property
    def name(self) -> str:
        """A safe file name stem: the input file's (``sd.pth`` → ``sd``), else the spec's model name."""
        base = self.extra.get("path") or self.source.split(":", 1)[-1]
        stem = Path(base).name.split(".")[0] if base else ""
        return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "model"

    @property
    def preprocessing(self) -> dict:
        """The normalisation the images get, and where it came from (recorded in every output)."""
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
                "source": self.normalisation}

    @property
    def assumed_normalisation(self) -> bool:
        return self.normalisation == ASSUMED
