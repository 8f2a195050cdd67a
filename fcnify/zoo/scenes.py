"""Synthetic digit scenes for the embedded ``digits`` model.

A scene is a black image with handwritten digits from scikit-learn's ``load_digits()`` placed on it:

* each 8x8 digit (values 0..16) is scaled to white ink (16 -> 255) and upscaled 3x with bilinear
  interpolation (half-pixel centres, edge clamp; the same as ``torch.nn.functional.interpolate(...,
  mode="bilinear", align_corners=False)``) to a 24x24 glyph;
* glyphs are placed anywhere, with at least ``gap`` (8) pixels between glyph boxes and ``margin`` (4)
  pixels from the scene border (so every glyph can be centred in a 32x32 window inside the scene);
* mild Gaussian pixel noise is added and the result is clipped to uint8.

Everything here is a pure function of its inputs; randomness comes only from the ``numpy.random.Generator``
passed in. Scenes are grayscale ``uint8`` arrays; :func:`to_rgb` / :func:`save_png` turn them into the RGB
PNGs the CLI reads.

Data split (fixed by the issue): digit images 0..1399 of ``load_digits()`` are for training, images
1400..1796 are held out for evaluation only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "BORDER_MARGIN", "DEFAULT_NOISE_SIGMA", "GLYPH_SIZE", "HELDOUT_RANGE", "MIN_GAP", "TRAIN_RANGE",
    "add_noise", "box_gap", "boxes_separated", "GlyphBox", "load_split", "make_scene", "place_boxes",
    "random_scene", "render_glyph", "save_png", "to_rgb"
]

GLYPH_SIZE = 24
"""Side of a rendered glyph box, in pixels (8x8 digit upscaled 3x)."""

MIN_GAP = 8
"""Minimum number of pixels between two glyph boxes in a scene."""

BORDER_MARGIN = 4
"""Minimum number of pixels between a glyph box and the scene border."""

DEFAULT_NOISE_SIGMA = 6.0
"""Standard deviation (in 0..255 grey levels) of the Gaussian pixel noise of evaluation scenes."""

TRAIN_RANGE = range(0, 1400)
"""Indices of ``load_digits()`` images that may be used for training."""

HELDOUT_RANGE = range(1400, 1797)
"""Indices of ``load_digits()`` images held out for evaluation (never for training or tuning)."""


@dataclass(frozen=True)
class GlyphBox:
    """Where one glyph lies in a scene.

    ``top``/``left`` are the pixel indices of the box's first row/column; the box covers rows
    ``top .. top + height - 1``. ``centre_y``/``centre_x`` are the box centre in pixel-edge coordinates
    (``top + height / 2``), the same convention as a window centre ``window_top + window_height / 2``.
    """

    label: int
    top: int
    left: int
    height: int = GLYPH_SIZE
    width: int = GLYPH_SIZE
    centre_y: float = field(default=None)  # type: ignore[assignment]
    centre_x: float = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.centre_y is None:
            object.__setattr__(self, "centre_y", self.top + self.height / 2)
        if self.centre_x is None:
            object.__setattr__(self, "centre_x", self.left + self.width / 2)

    @property
    def bottom(self) -> int:
        """One past the last row of the box."""
        return self.top + self.height

    @property
    def right(self) -> int:
        """One past the last column of the box."""
        return self.left + self.width


def _upscale_matrix(n_in: int, factor: int) -> np.ndarray:
    """(n_in * factor) x n_in bilinear interpolation matrix, half-pixel centres, clamped edges."""
    n_out = n_in * factor
    src = (np.arange(n_out, dtype=np.float64) + 0.5) / factor - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    m[np.arange(n_out), i0] += 1.0 - w1
    m[np.arange(n_out), i1] += w1
    return m


_UPSCALE_8_TO_24 = _upscale_matrix(8, 3)


def render_glyph(img8x8: np.ndarray) -> np.ndarray:
    """Render one ``load_digits()`` image (8x8, values 0..16) as a 24x24 white-on-black uint8 glyph.

    Ink value 16 maps to 255; the 3x upscale is bilinear, so a value-16 pixel stays exactly 255 at the
    centre of its 3x3 block and nothing exceeds 255.
    """
    a = np.asarray(img8x8, dtype=np.float64)
    if a.shape != (8, 8):
        raise ValueError(f"expected an 8x8 digit image, got shape {a.shape}")
    a = np.clip(a, 0.0, 16.0) * (255.0 / 16.0)
    up = _UPSCALE_8_TO_24 @ a @ _UPSCALE_8_TO_24.T
    return np.clip(np.rint(up), 0, 255).astype(np.uint8)


def boxes_separated(a: GlyphBox, b: GlyphBox, gap: int = MIN_GAP) -> bool:
    """True if at least ``gap`` pixels lie between the two boxes (along x or along y)."""
    return (
        a.right + gap <= b.left
        or b.right + gap <= a.left
        or a.bottom + gap <= b.top
        or b.bottom + gap <= a.top
    )


def box_gap(a: GlyphBox, b: GlyphBox) -> int:
    """Number of free pixels between two boxes: the larger of the x and y gaps (negative if they overlap)."""
    gx = max(b.left - a.right, a.left - b.right)
    gy = max(b.top - a.bottom, a.top - b.bottom)
    return max(gx, gy)


def place_boxes(
    n: int,
    size: tuple[int, int],
    rng: np.random.Generator,
    *,
    gap: int = MIN_GAP,
    margin: int = BORDER_MARGIN,
    glyph: int = GLYPH_SIZE,
    max_tries: int = 200,
) -> list[tuple[int, int]]:
    """Draw up to ``n`` glyph-box positions (top, left) by rejection sampling.

    Boxes lie ``margin`` pixels inside the scene and at least ``gap`` pixels apart. A glyph that finds no
    room in ``max_tries`` draws is dropped, so fewer than ``n`` positions may come back.
    """
    h, w = size
    hi_y = h - margin - glyph
    hi_x = w - margin - glyph
    if hi_y < margin or hi_x < margin:
        return []
    placed: list[GlyphBox] = []
    out: list[tuple[int, int]] = []
    for _ in range(n):
        for _ in range(max_tries):
            top = int(rng.integers(margin, hi_y + 1))
            left = int(rng.integers(margin, hi_x + 1))
            cand = GlyphBox(-1, top, left, glyph, glyph)
            if all(boxes_separated(cand, p, gap) for p in placed):
                placed.append(cand)
                out.append((top, left))
                break
    return out


def add_noise(img: np.ndarray, rng: np.random.Generator, noise_sigma: float) -> np.ndarray:
    """Add Gaussian pixel noise (sigma in grey levels) to a uint8/float image; returns uint8."""
    a = np.asarray(img, dtype=np.float64)
    if noise_sigma > 0:
        a = a + rng.normal(0.0, noise_sigma, size=a.shape)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def make_scene(
    digit_images: np.ndarray,
    digit_labels: np.ndarray,
    size: tuple[int, int] = (192, 256),
    rng: np.random.Generator | None = None,
    noise_sigma: float = DEFAULT_NOISE_SIGMA,
    *,
    gap: int = MIN_GAP,
    margin: int = BORDER_MARGIN,
    max_tries: int = 200,
) -> tuple[np.ndarray, list[GlyphBox]]:
    """Render a scene with the given digits placed at random, non-crowding positions.

    Args:
        digit_images: ``(n, 8, 8)`` digit images, values 0..16 (``load_digits().images``).
        digit_labels: ``(n,)`` their labels 0..9.
        size: ``(height, width)`` of the scene.
        rng: the only source of randomness (default: ``np.random.default_rng(0)``).
        noise_sigma: std of the Gaussian pixel noise, in grey levels (0 for none).
        gap: minimum number of pixels between glyph boxes.
        margin: minimum number of pixels between a glyph box and the scene border.
        max_tries: placement attempts per glyph; glyphs that do not fit are left out.

    Returns:
        ``(scene, boxes)``: the ``uint8`` ``(height, width)`` image and one :class:`GlyphBox` per glyph
        actually placed, in the order of ``digit_images``.
    """
    if rng is None:
        rng = np.random.default_rng(0)
    digit_images = np.asarray(digit_images)
    digit_labels = np.asarray(digit_labels)
    if len(digit_images) != len(digit_labels):
        raise ValueError("digit_images and digit_labels differ in length")
    h, w = int(size[0]), int(size[1])
    canvas = np.zeros((h, w), dtype=np.float64)
    positions = place_boxes(len(digit_images), (h, w), rng, gap=gap, margin=margin, max_tries=max_tries)
    boxes: list[GlyphBox] = []
    for (top, left), img, lab in zip(positions, digit_images, digit_labels, strict=False):
        g = render_glyph(img)
        region = canvas[top : top + GLYPH_SIZE, left : left + GLYPH_SIZE]
        np.maximum(region, g, out=region)
        boxes.append(GlyphBox(int(lab), top, left))
    return add_noise(canvas, rng, noise_sigma), boxes


def random_scene(
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int] = (192, 256),
    n_glyphs: tuple[int, int] = (6, 14),
    noise_sigma: float = DEFAULT_NOISE_SIGMA,
) -> tuple[np.ndarray, list[GlyphBox]]:
    """Pick ``n_glyphs[0]..n_glyphs[1]`` digits at random from a pool and render a scene with them."""
    n = int(rng.integers(n_glyphs[0], n_glyphs[1] + 1))
    idx = rng.choice(len(images), size=min(n, len(images)), replace=False)
    return make_scene(images[idx], labels[idx], size=size, rng=rng, noise_sigma=noise_sigma)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, 8, 8) float, labels (n,) int)`` of ``load_digits()`` for ``"train"`` or ``"heldout"``.

    Needs scikit-learn (a dev dependency), imported only here.
    """
    from sklearn.datasets import load_digits  # lazy: scikit-learn is a dev dependency

    d = load_digits()
    if split == "train":
        r = TRAIN_RANGE
    elif split == "heldout":
        r = HELDOUT_RANGE
    else:
        raise ValueError(f"unknown split {split!r} (use 'train' or 'heldout')")
    return d.images[r.start : r.stop].astype(np.float64), d.target[r.start : r.stop].astype(np.int64)


def to_rgb(scene: np.ndarray) -> np.ndarray:
    """Grey ``(h, w)`` uint8 -> ``(h, w, 3)`` uint8."""
    return np.repeat(np.asarray(scene, dtype=np.uint8)[:, :, None], 3, axis=2)


def save_png(path: str | Path, scene: np.ndarray) -> None:
    """Save a grey scene as an RGB PNG."""
    Image.fromarray(to_rgb(scene)).save(str(path))
