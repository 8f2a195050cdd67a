"""Multi-scale dense maps: an image pyramid, one map per scale, resampled onto one grid and combined.

A classifier sees objects at the size it was trained on. Running it on the image resized by 0.5 finds
objects twice as large as the training window; by 2, objects half as large. Each scale's map has its own grid
(its stride and window, in original-image pixels, are the network's divided by the scale). The maps are
resampled onto the grid of scale 1 (of the first scale listed when 1 is not among them): each reference cell
takes, from every scale, the bilinear interpolation of that scale's probabilities at the reference cell's
window centre (edge cells extended). They are combined on probabilities (softmax over the classes), by mean or
max. A scale whose resized image would be smaller than the window is skipped (logged); if none fits, the
image is refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fcnify.errors import InputError
from fcnify.heatmap.scoremap import ScoreMap, check_class_count

__all__ = ["multiscale_map", "parse_scales", "reference_scale", "resample_to"]

_logger = logging.getLogger(__name__)


def parse_scales(value) -> tuple[float, ...]:
    """Scales from '0.5,1,2' or a sequence of numbers; each positive and finite, no duplicates.

    Raises:
        InputError: anything else.
    """
    if value is None:
        return ()
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        scales = tuple(float(v) for v in items if str(v) != "")
    except ValueError:
        raise InputError(f"--scales {value!r} is not a list of numbers", hint="e.g. --scales 0.5,1,2") from None
    if not scales or any(not (math.isfinite(s) and s > 0) for s in scales):
        raise InputError(f"--scales {value!r}: every scale must be a positive number", hint="e.g. --scales 0.5,1,2")
    if len(set(scales)) != len(scales):
        raise InputError(f"--scales {value!r} lists a scale twice", hint="e.g. --scales 0.5,1,2")
    return scales


def reference_scale(scales: Sequence[float]) -> float:
    """The scale whose grid the combined map uses: 1 when listed, else the first."""
    return 1.0 if 1.0 in scales else scales[0]


def _key(scale: float) -> str:
    return f"{scale:g}"


def resample_to(values: torch.Tensor, source, target) -> torch.Tensor:
    """Bilinear resampling of a K×h×w map with ``source`` geometry at the window centres of ``target``'s cells.

    ``source`` and ``target`` are ``ScoreMap``-like (stride, offset, window in the same image pixels);
    ``target`` also gives the grid size (``map_size``). Outside the source grid the edge cells are extended.
    """
    h, w = target.map_size
    sh, sw = int(values.shape[-2]), int(values.shape[-1])
    coords = []
    for axis, n, sn in ((0, h, sh), (1, w, sw)):
        centres = target.offset[axis] + torch.arange(n, dtype=torch.float64) * target.stride[axis] \
            + target.window[axis] / 2
        cell = (centres - source.offset[axis] - source.window[axis] / 2) / source.stride[axis]
        # align_corners=True: -1 and 1 are the centres of the first and last source cells.
        coords.append((2 * cell / (sn - 1) - 1) if sn > 1 else torch.zeros_like(cell))
    gy, gx = torch.meshgrid(coords[0], coords[1], indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).float()[None]
    out = F.grid_sample(values[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0]


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    # Bilinear (antialiased when shrinking), like Pillow's resize; it commutes with the per-channel
    # normalisation, so the normalised tensor can be resized directly.
    shrink = size[0] < tensor.shape[-2] or size[1] < tensor.shape[-1]
    return F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]


def multiscale_map(logits_fn: Callable[[torch.Tensor], torch.Tensor], prepared, geometry, labels: Sequence[str],
                   scales: Sequence[float], combine: str = "mean"):
    """The combined ``ScoreMap`` of one ``PreparedImage`` over an image pyramid.

    Args:
        logits_fn: C×H×W → K×h×w logits (one pass or tiled).
        prepared: the image as prepared at the base scale (``--scale``); the pyramid resizes it further.
        geometry: the network's geometry.
        labels: the K class names.
        scales: the pyramid's scales (relative to ``prepared``).
        combine: "mean" or "max" of the probabilities.

    Returns:
        A ``ScoreMap`` on the reference grid whose ``scores`` are the combined probabilities (``logits`` are
        their logarithms) and whose ``extra`` holds ``scales``, ``scores_by_scale`` (S×K×h×w, resampled) and,
        per scale, ``scores_scale_<s>``, ``stride_scale_<s>``, ``offset_scale_<s>``, ``window_scale_<s>``
        (the scale's own map and geometry in original-image pixels).

    Raises:
        InputError: no scale gives an image at least the size of the window.
    """
    scales = parse_scales(scales)
    if combine not in ("mean", "max"):
        raise InputError(f"--combine {combine!r} is not mean or max", hint="e.g. --combine mean")
    base = prepared.tensor
    height, width = int(base.shape[-2]), int(base.shape[-1])
    window = tuple(int(v) for v in geometry.window)
    base_factor = prepared.effective_scale
    maps: dict[float, ScoreMap] = {}
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        if size[0] < window[0] or size[1] < window[1]:
            _logger.info("scale %g skipped: the image would be %dx%d, smaller than the %dx%d window", scale,
                         size[0], size[1], *window)
            continue
        logits = logits_fn(_resize(base, size))
        check_class_count(logits.shape[0], len(labels))
        # Network-input pixels → original pixels: divide by this scale and by the base resize.
        factor = tuple(size[a] / (height, width)[a] * base_factor[a] for a in range(2))
        whole = factor == (1.0, 1.0)  # not resized: keep whole-pixel geometry as ints, like one pass
        geo = {name: tuple(int(getattr(geometry, name)[a]) if whole else float(getattr(geometry, name)[a] / factor[a])
                           for a in range(2)) for name in ("stride", "offset", "window")}
        maps[scale] = ScoreMap(logits=logits.contiguous(), labels=tuple(labels), image_size=prepared.original_size,
                               padded=prepared.padded, **geo)
    if not maps:
        raise InputError(f"no scale of {', '.join(map(_key, scales))} makes the {height}x{width} image at least "
                         f"the {window[0]}x{window[1]} window", hint="add a larger scale, e.g. --scales 1,2")
    used = [s for s in scales if s in maps]
    ref = maps[reference_scale(used)]
    stacked = torch.stack([resample_to(maps[s].scores, maps[s], ref) for s in used])
    combined = stacked.mean(0) if combine == "mean" else stacked.amax(0)
    extra: dict[str, np.ndarray] = {"scales": np.asarray(used, dtype=np.float64),
                                    "scores_by_scale": stacked.numpy().astype(np.float32)}
    for s in used:
        m = maps[s]
        extra[f"scores_scale_{_key(s)}"] = m.scores.numpy().astype(np.float32)
        for name in ("stride", "offset", "window"):
            extra[f"{name}_scale_{_key(s)}"] = np.asarray(getattr(m, name), dtype=np.float64)
    result = ScoreMap(logits=combined.clamp_min(1e-12).log(), labels=tuple(labels), stride=ref.stride,
                      offset=ref.offset, window=ref.window, image_size=prepared.original_size,
                      padded=prepared.padded, extra=extra)
    # The combined probabilities are the scores (a max over scales does not sum to 1 over the classes).
    result.__dict__["scores"] = combined
    return result
