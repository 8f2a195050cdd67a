"""Evaluate the embedded ``digits`` model densely on held-out scenes.

``python -m fcnify.zoo.evaluate_digits [--scenes N] [--seed S]`` renders ``N`` scenes (192x256) from the
held-out digits (``load_digits()`` images 1400..1796 only), converts the model with ``fcnify.convert`` into a
fully-convolutional network, runs it once per scene and reports:

(a) digit accuracy: the fraction of digits whose nearest score cell (window centre nearest the glyph
    centre) has the right argmax;
(b) background accuracy: the fraction of cells whose window overlaps no glyph box that say
    ``"background"``.

Exit code 1 if (a) < 0.95 or (b) < 0.99.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fcnify.convert import convert
from fcnify.zoo import DIGITS_LABELS, DIGITS_META, load_digits_model
from fcnify.zoo.scenes import DEFAULT_NOISE_SIGMA, GlyphBox, load_split, random_scene

__all__ = [
    "BACKGROUND_INDEX", "BACKGROUND_TARGET", "DIGIT_TARGET", "dense_model", "EvalResult", "evaluate",
    "evaluate_scenes", "heldout_scenes", "main", "make_scenes", "scene_to_tensor"
]

DIGIT_TARGET = 0.95
BACKGROUND_TARGET = 0.99
BACKGROUND_INDEX = DIGITS_LABELS.index("background")

Scene = tuple[np.ndarray, Sequence[GlyphBox]]


@dataclass(frozen=True)
class EvalResult:
    """Outcome of a dense evaluation over a set of scenes."""

    digit_accuracy: float
    background_accuracy: float
    n_digits: int
    n_background_cells: int

    @property
    def passed(self) -> bool:
        return self.digit_accuracy >= DIGIT_TARGET and self.background_accuracy >= BACKGROUND_TARGET


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def scene_to_tensor(scene: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Grey uint8 ``(h, w)`` scene -> normalised ``1 x 1 x h x w`` float tensor."""
    x = torch.from_numpy(np.ascontiguousarray(scene, dtype=np.float32)) / 255.0
    x = (x - float(mean[0])) / float(std[0])
    return x[None, None]


def evaluate_scenes(
    fcn: nn.Module,
    geometry: Any,
    scenes: Iterable[Scene],
    *,
    mean: Sequence[float] = tuple(DIGITS_META["mean"]),
    std: Sequence[float] = tuple(DIGITS_META["std"]),
) -> EvalResult:
    """Score dense maps of ``scenes`` against their glyph boxes.

    Args:
        fcn: maps a normalised ``N x 1 x H x W`` tensor to ``N x 11 x h x w`` logits.
        geometry: has ``stride``, ``offset`` and ``window`` as ``(y, x)`` ints: cell ``(i, j)`` sees the
            window of size ``window`` whose top-left pixel is ``offset + (i, j) * stride``.
        scenes: ``(uint8 (H, W) image, glyph boxes)`` pairs (see :mod:`fcnify.zoo.scenes`).
        mean, std: input normalisation (``x = (pixel / 255 - mean) / std``).
    """
    sy, sx = _pair(geometry.stride)
    oy, ox = _pair(geometry.offset)
    wy, wx = _pair(geometry.window)
    n_digits = n_digits_ok = 0
    n_bg = n_bg_ok = 0
    fcn.eval()
    for img, boxes in scenes:
        H, W = img.shape[:2]
        with torch.no_grad():
            logits = fcn(scene_to_tensor(img, mean, std))
        if logits.ndim != 4 or logits.shape[0] != 1:
            raise ValueError(f"dense model returned shape {tuple(logits.shape)}, expected 1 x C x h x w")
        pred = logits[0].argmax(0).cpu().numpy()
        h, w = pred.shape

        # (a) nearest cell to each glyph centre (cell centre = offset + index * stride + window / 2)
        for b in boxes:
            i = int(np.clip(np.rint((b.centre_y - oy - wy / 2) / sy), 0, h - 1))
            j = int(np.clip(np.rint((b.centre_x - ox - wx / 2) / sx), 0, w - 1))
            n_digits += 1
            n_digits_ok += int(pred[i, j] == b.label)

        # (b) cells whose window overlaps no glyph box
        occ = np.zeros((H, W), dtype=np.int64)
        for b in boxes:
            occ[max(b.top, 0) : b.bottom, max(b.left, 0) : b.right] = 1
        integral = np.zeros((H + 1, W + 1), dtype=np.int64)
        integral[1:, 1:] = occ.cumsum(0).cumsum(1)
        y0 = np.clip(oy + np.arange(h) * sy, 0, H)
        y1 = np.clip(oy + np.arange(h) * sy + wy, 0, H)
        x0 = np.clip(ox + np.arange(w) * sx, 0, W)
        x1 = np.clip(ox + np.arange(w) * sx + wx, 0, W)
        inked = integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0]
        free = inked == 0
        n_bg += int(free.sum())
        n_bg_ok += int((pred[free] == BACKGROUND_INDEX).sum())
    return EvalResult(
        digit_accuracy=n_digits_ok / n_digits if n_digits else float("nan"),
        background_accuracy=n_bg_ok / n_bg if n_bg else float("nan"),
        n_digits=n_digits,
        n_background_cells=n_bg,
    )


def make_scenes(
    images: np.ndarray,
    labels: np.ndarray,
    n_scenes: int,
    seed: int,
    size: tuple[int, int] = (192, 256),
    n_glyphs: tuple[int, int] = (6, 14),
    noise_sigma: float = DEFAULT_NOISE_SIGMA,
) -> list[Scene]:
    """``n_scenes`` deterministic scenes drawn from the given digit pool."""
    rng = np.random.default_rng(seed)
    return [random_scene(images, labels, rng, size, n_glyphs, noise_sigma) for _ in range(n_scenes)]


def heldout_scenes(n_scenes: int = 40, seed: int = 2024, size: tuple[int, int] = (192, 256)) -> list[Scene]:
    """Scenes rendered from the held-out digits only (``load_digits()`` images 1400..1796)."""
    images, labels = load_split("heldout")
    return make_scenes(images, labels, n_scenes, seed, size)


def dense_model(model: nn.Module) -> tuple[nn.Module, Any]:
    """Convert the classifier with fcnify: returns ``(fcn, fcn.geometry)``."""
    fcn = convert(model, input_size=tuple(DIGITS_META["input_size"]))
    fcn.eval()
    return fcn, fcn.geometry


def evaluate(
    model_fn_dense: Any = dense_model,
    scenes: Iterable[Scene] | None = None,
    model: nn.Module | None = None,
) -> EvalResult:
    """Evaluate ``model`` (default: the packaged weights) on ``scenes`` (default: 40 held-out scenes).

    ``model_fn_dense(model) -> (fcn, geometry)`` builds the dense network (default: ``fcnify.convert``).
    """
    if model is None:
        model = load_digits_model()
    if scenes is None:
        scenes = heldout_scenes()
    fcn, geometry = model_fn_dense(model)
    return evaluate_scenes(fcn, geometry, scenes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fcnify.zoo.evaluate_digits", description=__doc__.split("\n")[0]
    )
    p.add_argument("--scenes", type=int, default=40, help="number of held-out scenes (default 40)")
    p.add_argument("--seed", type=int, default=2024, help="scene seed (default 2024)")
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--weights", default=None, help="safetensors file (default: the packaged weights)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = load_digits_model(args.weights)
    scenes = heldout_scenes(args.scenes, args.seed, (args.height, args.width))
    res = evaluate(dense_model, scenes, model)
    print(
        f"scenes: {args.scenes} x {args.height}x{args.width} (held-out digits 1400..1796, seed {args.seed})"
    )
    print(
        f"digit accuracy (nearest cell):      {res.digit_accuracy:.4f}  on {res.n_digits} digits"
        f"  (target >= {DIGIT_TARGET})"
    )
    print(
        f"background accuracy (glyph-free):   {res.background_accuracy:.4f}  on {res.n_background_cells} cells"
        f"  (target >= {BACKGROUND_TARGET})"
    )
    print("PASS" if res.passed else "FAIL")
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(main())
