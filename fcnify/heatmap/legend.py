"""The legend strip of a heatmap preview: the class, the colour scale and what its ends stand for.

The strip is drawn with Pillow and appended below the overlay, whose pixels stay exactly as rendered: previews
can be 4096 px wide, and a matplotlib figure of that size would cost more than the overlay itself. It has two
rows across the preview's full width: ``legend_text`` (class name, range and how it was chosen), then the
colormap as a gradient from the same lookup table as the overlay, between its end values.

Its height grows with the width (``legend_height``: 28 px up to 64 px at 4096 px wide), so it stays readable
when a large preview is viewed scaled down. Narrow previews keep their width: the text shrinks with the strip
and is cut with "…" where it does not fit, and below about 40 px the end values are left off the bar.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["ColourRange", "add_legend", "colour_range", "legend_height", "legend_text", "range_ticks"]

LEGEND_MIN_HEIGHT = 28
LEGEND_MAX_HEIGHT = 64
#: The colour range's modes (0–1; --vmin/--vmax; --normalize) and how the legend says them.
_MODE_WORDS = {"probability": "", "fixed": "fixed range", "per-map": "per-map min–max"}


@dataclass(frozen=True)
class ColourRange:
    """The probabilities the colormap's two ends stand for; values outside take the end colours.

    Attributes:
        vmin, vmax: the values at the first and last colour (equal for a constant per-map range).
        mode: ``probability`` (0–1, the default), ``fixed`` (``--vmin``/``--vmax``) or ``per-map``.
    """

    vmin: float = 0.0
    vmax: float = 1.0
    mode: str = "probability"

    @property
    def words(self) -> str:
        """How the range was chosen, in words ("" for the default 0–1)."""
        return _MODE_WORDS[self.mode]

    def fraction(self, values: np.ndarray) -> np.ndarray:
        """``(values - vmin) / (vmax - vmin)`` clipped to 0–1 (a constant map: 0, the colormap's first colour)."""
        span = self.vmax - self.vmin
        return np.clip((values - self.vmin) / (span if span > 0 else 1.0), 0.0, 1.0)


def colour_range(vmin: float | None = None, vmax: float | None = None, normalize: bool = False,
                 low: float | None = None, high: float | None = None) -> ColourRange:
    """The colour range of one map from the options and, for ``normalize``, the map's computed min and max.

    Args:
        vmin, vmax: a fixed range (either may be given; the other end stays 0 or 1).
        normalize: stretch the colormap over ``low``..``high``; a map with no computed cell keeps 0–1.
        low, high: the map's lowest and highest computed probability (NaN or infinite: none computed).
    """
    if normalize:
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            return ColourRange()  # nothing computed: nothing is coloured, and 0–1 says no more than it knows
        return ColourRange(float(low), float(high), "per-map")
    if vmin is None and vmax is None:
        return ColourRange()
    return ColourRange(0.0 if vmin is None else float(vmin), 1.0 if vmax is None else float(vmax), "fixed")


def range_ticks(colours: ColourRange) -> tuple[str, str]:
    """The two end values as text, with the fewest decimals that place both within 1% of the range's span
    (0 and 1 stay "0" and "1"; 0.0213 and 0.3087 become "0.02" and "0.31")."""
    span = colours.vmax - colours.vmin
    if span <= 0:
        text = f"{colours.vmin:.3g}"
        return text, text
    for decimals in range(7):
        low, high = (_decimal(v, decimals) for v in (colours.vmin, colours.vmax))
        if abs(float(low) - colours.vmin) <= span / 100 and abs(float(high) - colours.vmax) <= span / 100:
            return low, high
    return f"{colours.vmin:.6g}", f"{colours.vmax:.6g}"


def _decimal(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def legend_text(label: str, colours: ColourRange) -> str:
    """The legend's first row: the class name, the range and how it was chosen, e.g. ``"cat — probability
    0.02–0.31 (per-map min–max)"`` or ``"cat — probability 0–1"``."""
    low, high = range_ticks(colours)
    words = f" ({colours.words})" if colours.words else ""
    if colours.vmax <= colours.vmin:  # a constant map under --normalize
        return f"{label} — probability {low} everywhere{words}"
    return f"{label} — probability {low}–{high}{words}"


def legend_height(width: int) -> int:
    """The strip's height in pixels for a preview ``width`` pixels wide."""
    return int(min(LEGEND_MAX_HEIGHT, max(LEGEND_MIN_HEIGHT, round(width / 64))))


@functools.lru_cache(maxsize=16)
def _font(size: int):
    # matplotlib's DejaVu Sans (always installed with it) has the dashes, "…" and most scripts' letters that
    # class names use; Pillow's bundled font lacks even "–". Without FreeType: Pillow's fixed bitmap font.
    import matplotlib  # lazy: heavy, only legends need it

    try:
        return ImageFont.truetype(f"{matplotlib.get_data_path()}/fonts/ttf/DejaVuSans.ttf", max(6, size))
    except OSError:
        return ImageFont.load_default(size=max(6, size))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """``text``, cut with "…" to fit ``width`` pixels (empty when not even "…" fits)."""
    if draw.textlength(text, font=font) <= width:
        return text
    low, high = 0, len(text)  # the longest prefix that fits with the ellipsis
    while low < high:
        middle = (low + high + 1) // 2
        if draw.textlength(text[:middle].rstrip() + "…", font=font) <= width:
            low = middle
        else:
            high = middle - 1
    cut = text[:low].rstrip() + "…"
    return cut if draw.textlength(cut, font=font) <= width else ""


def add_legend(overlay: np.ndarray, label: str, colours: ColourRange, lut: np.ndarray) -> np.ndarray:
    """The overlay with the legend strip appended below it: (H + ``legend_height(W)``)×W×3 uint8.

    Args:
        overlay: H×W×3 uint8, returned unchanged in the top H rows.
        label: the class name.
        colours: the range the overlay was coloured with.
        lut: the 256×3 uint8 colormap table the overlay was coloured with (``colour_lut``).
    """
    width = int(overlay.shape[1])
    height = legend_height(width)
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    pad = max(2, height // 10)
    row = (height - 3 * pad) // 2
    font = _font(row)
    ink = (20, 20, 20)
    text = _fit(draw, legend_text(label, colours), font, width - 2 * pad)
    if text:
        draw.text((pad, pad + row / 2), text, fill=ink, font=font, anchor="lm")
    top = 2 * pad + row
    left, right = pad, width - pad
    low, high = range_ticks(colours)
    low_w, high_w = draw.textlength(low, font=font), draw.textlength(high, font=font)
    if right - left - low_w - high_w - 2 * pad >= 16:  # room for both end values and a bar between them
        draw.text((left, top + row / 2), low, fill=ink, font=font, anchor="lm")
        draw.text((right, top + row / 2), high, fill=ink, font=font, anchor="rm")
        left, right = left + math.ceil(low_w) + pad, right - math.ceil(high_w) - pad
    left, right = max(1, left), min(width - 1, right)
    if right > left:
        steps = np.round(np.linspace(0, 255, right - left)).astype(np.intp)
        bar = np.repeat(lut[steps][None], row, axis=0)
        strip.paste(Image.fromarray(np.ascontiguousarray(bar)), (left, top))
        # The frame lies just outside the bar: every bar pixel is a table colour, the ends exactly lut[0], lut[255].
        draw.rectangle((left - 1, top - 1, right, top + row), outline=ink)
    return np.concatenate([np.asarray(overlay, dtype=np.uint8), np.asarray(strip)], axis=0)
