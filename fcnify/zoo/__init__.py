"""Embedded default models shipped inside the package.

``digits``: a small CNN that reads handwritten digits (scikit-learn ``load_digits()``, rendered white on
black, 24x24 px per glyph) in a 32x32 grayscale window and says ``"0"`` .. ``"9"`` or ``"background"``.
Weights: ``fcnify/zoo/digits.safetensors`` (trained by ``python -m fcnify.zoo.train_digits``), metadata also in
``fcnify/zoo/digits.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from fcnify.zoo.digits import DIGITS_LABELS, STRIDE, WINDOW, DigitsNet

ZOO_DIR = Path(__file__).resolve().parent
DIGITS_WEIGHTS = ZOO_DIR / "digits.safetensors"
DIGITS_JSON = ZOO_DIR / "digits.json"

DIGITS_META: dict[str, Any] = {
    "name": "digits",
    "input_size": [WINDOW, WINDOW],
    "in_chans": 1,
    "mean": [0.1],
    "std": [0.3],
    "labels": list(DIGITS_LABELS),
}
"""Preprocessing and labels of the ``digits`` model: input ``x = (pixel / 255 - mean) / std``, [h, w] size."""


def load_digits_model(weights: str | Path | None = None) -> DigitsNet:
    """Build :class:`DigitsNet` and load the packaged safetensors weights (no pickle); eval mode."""
    path = Path(weights) if weights is not None else DIGITS_WEIGHTS
    model = DigitsNet(num_classes=len(DIGITS_LABELS), in_chans=DIGITS_META["in_chans"])
    state = load_file(str(path), device="cpu")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


__all__ = [
    "DIGITS_JSON",
    "DIGITS_LABELS",
    "DIGITS_META",
    "DIGITS_WEIGHTS",
    "STRIDE",
    "WINDOW",
    "DigitsNet",
    "load_digits_model",
]
