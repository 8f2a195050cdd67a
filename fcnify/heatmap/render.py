"""Pure rendering helpers: a cell map → an image-sized heatmap, colour overlays, colormaps and label colours.

Nothing here reads or writes files. Coordinates follow ``Geometry``: pixel p spans [p, p + 1), cell (i, j)'s
window starts at ``offset + (i, j) * stride`` and is centred at that plus ``window / 2``.
"""

from __future__ import annotations

import difflib

import numpy as np

from fcnify.errors import InputError

__all__ = ["colormap", "label_colours", "overlay", "upsample_to_image"]


def _axis_coords(n_cells: int, n_pixels: int, stride: float, offset: float, window: float) -> np.ndarray:
    """Cell coordinate u of each pixel centre on one axis: u = (p + 0.5 - centre(0)) / stride, clamped."""
    centre0 = offset + window / 2
    u = (np.arange(n_pixels, dtype=np.float64) + 0.5 - centre0) / float(stride)
    return np.clip(u, 0.0, max(n_cells - 1, 0))


def upsample_to_image(prob_map, geometry, image_size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """An h×w cell map resampled to the image's H×W pixels, each cell centred on its window centre.

    Between cell centres values are interpolated bilinearly (``mode="nearest"``: the nearest cell); pixels
    before the first or after the last cell centre take the value of the nearest cell (edge clamp).

    Args:
        prob_map: h×w array (numpy or torch).
        geometry: anything with ``stride``, ``offset`` and ``window`` (y, x) attributes in image pixels (a
            ``Geometry`` or a ``ScoreMap``).
        image_size: the output (height, width).

    Returns:
        H×W float32 array.
    """
    values = np.asarray(prob_map.detach().cpu() if hasattr(prob_map, "detach") else prob_map, dtype=np.float32)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"expected a non-empty h×w map, got shape {values.shape}")
    height, width = int(image_size[0]), int(image_size[1])
    uy = _axis_coords(values.shape[0], height, geometry.stride[0], geometry.offset[0], geometry.window[0])
    ux = _axis_coords(values.shape[1], width, geometry.stride[1], geometry.offset[1], geometry.window[1])
    if mode == "nearest":
        iy = np.clip(np.floor(uy + 0.5).astype(np.int64), 0, values.shape[0] - 1)
        ix = np.clip(np.floor(ux + 0.5).astype(np.int64), 0, values.shape[1] - 1)
        return values[iy[:, None], ix[None, :]]
    if mode != "bilinear":
        raise ValueError(f"unknown mode {mode!r}")
    y0 = np.floor(uy).astype(np.int64)
    x0 = np.floor(ux).astype(np.int64)
    y1 = np.minimum(y0 + 1, values.shape[0] - 1)
    x1 = np.minimum(x0 + 1, values.shape[1] - 1)
    ty = (uy - y0).astype(np.float32)[:, None]
    tx = (ux - x0).astype(np.float32)[None, :]
    rows = values[y0] * (1 - ty) + values[y1] * ty  # H×w
    return (rows[:, x0] * (1 - tx) + rows[:, x1] * tx).astype(np.float32)


def colormap(name: str):
    """A matplotlib colormap by name (``matplotlib.colormaps[name]``).

    Raises:
        InputError: an unknown name.
    """
    import matplotlib  # lazy: heavy, only drawing needs it

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(matplotlib.colormaps), n=3)
        raise InputError(f"unknown colormap {name!r}",
                         hint=f"did you mean {', '.join(close)}?" if close else
                         "use a matplotlib colormap such as inferno, viridis, magma or cividis") from None


def overlay(image_rgb: np.ndarray, heat: np.ndarray, cmap: str = "inferno", alpha: float = 0.5,
            vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Colour ``heat`` with ``cmap`` and blend it over the image: ``(1 - alpha) * image + alpha * colour``.

    Args:
        image_rgb: H×W×3 (or H×W grayscale) uint8.
        heat: H×W values; ``vmin``..``vmax`` maps onto the colormap's ends (values outside are clipped).
        alpha: the heatmap's opacity, 0 (image only) to 1 (heatmap only).

    Returns:
        H×W×3 uint8.
    """
    image = np.asarray(image_rgb)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an H×W×3 image, got shape {image.shape}")
    image = image[:, :, :3]
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heat {heat.shape} and image {image.shape[:2]} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"--alpha {alpha} is not between 0 and 1", hint="e.g. --alpha 0.5")
    span = (vmax - vmin) or 1.0
    normed = np.clip((heat - vmin) / span, 0.0, 1.0)
    colours = colormap(cmap)(normed)[:, :, :3].astype(np.float32) * 255.0
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def label_colours(count: int) -> np.ndarray:
    """``count`` distinct RGB colours (0–1) for a label map: tab10/tab20, then a hue wheel."""
    import matplotlib  # lazy: heavy, only drawing needs it

    if count <= 10:
        base = matplotlib.colormaps["tab10"].colors
    elif count <= 20:
        base = matplotlib.colormaps["tab20"].colors
    else:
        base = matplotlib.colormaps["hsv"](np.linspace(0, 1, count, endpoint=False))[:, :3]
    return np.asarray(base, dtype=np.float64)[:count, :3]
