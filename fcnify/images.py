"""Reading images from disk and preparing them as model inputs.

``read_image`` opens any file Pillow reads, refuses what it cannot read completely (empty, truncated,
corrupt, non-image files, decompression bombs) with an ``InputError``, and applies the EXIF orientation.
``prepare`` turns the image into the normalised C×H×W float tensor a network expects.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fcnify.errors import InputError, describe, first_line

__all__ = [
    "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "PIL_LOCK", "PreparedImage", "display_rgb", "fetch_uri",
    "is_image_path", "prepare", "read_any", "read_image"
]

_logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS: int = int(1024 * 1024 * 1024 // 4 // 3)
"""Pillow's default ``Image.MAX_IMAGE_PIXELS`` (about 89.5 megapixels): larger images are refused."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
)
"""Lower-case file suffixes (with the dot) of every format Pillow can open, e.g. ``.png``, ``.jpg``."""

# Pillow's limits are module globals: they are only changed while this lock is held, and restored after.
PIL_LOCK = threading.RLock()

_MODES = {1: "L", 3: "RGB"}


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether ``path``'s suffix is one Pillow can open (used to pick images out of a folder)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _bomb_error(path: Path, pixels: int | None, limit: int) -> InputError:
    size = f"{pixels:,} pixels" if pixels else "too many pixels"
    return InputError(
        f"{path} has {size}, over the limit of {limit:,} (a possible decompression bomb)",
        hint=f"if you trust the image, pass --max-pixels {max(pixels or 0, limit * 2)} (or 0 for no limit)",
    )


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Read an image completely and apply its EXIF orientation.

    Args:
        path: any file Pillow can read (PNG, JPEG, TIFF, WebP, BMP, GIF's first frame, …).
        max_pixels: refuse images with more pixels than this (None: Pillow's default ``DEFAULT_MAX_PIXELS``;
            0: no limit). Pillow's global limit is changed only under a lock, and restored afterwards.

    Returns:
        The decoded image (all pixel data loaded, file closed), in its own mode.

    Raises:
        InputError: a missing path, a folder, an empty, truncated, corrupt or non-image file, or an image over
            the pixel limit (the message names ``--max-pixels``).
    """
    path = Path(path)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if limit < 0:
        raise InputError(f"--max-pixels {max_pixels} is negative", hint="pass a positive number, or 0 for no limit")
    if not path.exists():
        raise InputError(f"no such image: {path}", hint="check the path")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image", hint="give image files, or the folder's images")
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path} is empty (0 bytes)", hint="the file was not written completely")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", hint="check the file's permissions") from exc

    return _decode(path, path, limit)


def read_image_bytes(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """``read_image`` for an image already in memory (e.g. fetched from ``s3://``); ``name`` labels errors."""
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if not data:
        raise InputError(f"{name} is empty (0 bytes)", hint="the file was not written completely")
    return _decode(io.BytesIO(data), name, limit)


def _decode(source, name, limit: int) -> Image.Image:
    """Decode fully under the pixel limit with truncated images refused, then apply EXIF orientation."""
    with PIL_LOCK:  # Pillow's limits are globals: change them only under the lock, and restore them
        old_limit, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS = limit or None
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = _open_and_load(source, name, limit)
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_limit, old_truncated
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block must not lose the image
        _logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, exc)
    return image


def _open_and_load(source, path, limit: int) -> Image.Image:
    pixels = None
    try:
        with Image.open(source) as image:
            pixels = image.width * image.height
            if limit and pixels > limit:
                raise _bomb_error(path, pixels, limit)
            image.load()
            if image.mode == "P" and "transparency" in image.info:
                return image.convert("RGBA")
            return image
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _bomb_error(path, int(found.group(1)) if found else pixels, limit) from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{path} is not an image Pillow can read",
                         hint="give a PNG, JPEG, TIFF, WebP, BMP or another format Pillow reads") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        detail = first_line(exc, 160)
        kind = "truncated" if "truncat" in detail.lower() or isinstance(exc, EOFError) else "corrupt"
        raise InputError(f"{path} is a {kind} image ({type(exc).__name__}: {detail})",
                         hint="the file is damaged or incomplete; re-export or re-download it") from exc
    except MemoryError as exc:
        raise InputError(f"{path} is too large to decode in memory", hint="pass --scale or a smaller image") from exc


def open_uri(uri: str):
    """A random-access file (pyarrow ``NativeFile``) for a URI any pyarrow filesystem reads (``s3://``,
    ``gs://``, ``hdfs://``, ``file://``…); one-line ``InputError`` for a missing file, a folder or a failure."""
    import pyarrow.fs  # lazy: heavy, and only URIs need it

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
        info = fs.get_file_info(inner)
        if info.type == pyarrow.fs.FileType.NotFound:
            raise InputError(f"no such image: {uri}", hint="check the URI")
        if info.type == pyarrow.fs.FileType.Directory:
            raise InputError(f"{uri} is a folder, not an image", hint="list its images in a --manifest")
        return fs.open_input_file(inner)
    except InputError:
        raise
    except Exception as exc:  # pyarrow raises OSError, ArrowInvalid (ValueError), ArrowNotImplementedError…
        raise InputError(f"cannot read {uri}: {describe(exc, 200)}",
                         hint="check the URI and the credentials pyarrow uses for its filesystem") from exc


def fetch_uri(uri: str) -> bytes:
    """The bytes of a file any pyarrow filesystem reads (``s3://``, ``gs://``, ``hdfs://``, ``file://``…)."""
    with open_uri(uri) as f:
        try:
            return f.read()
        except OSError as exc:
            raise InputError(f"cannot read {uri}: {describe(exc, 200)}",
                             hint="check the URI and the credentials pyarrow uses for its filesystem") from exc


def read_any(source: str | os.PathLike, max_pixels: int | None = None):
    """``images.read_image`` for a local path; for a URI, its bytes read with pyarrow and decoded in memory
    with the same checks (pixel limit, truncated or corrupt files, EXIF orientation). Nothing is written."""
    source = str(source)
    if "://" not in source:
        return read_image(source, max_pixels)
    return read_image_bytes(fetch_uri(source), source, max_pixels)


@dataclass(frozen=True)
class PreparedImage:
    """An image as a model input.

    Attributes:
        tensor: C×H×W float32, normalised, resized by ``scale`` and padded up to the window if needed.
        original_size: the image's (height, width) in pixels, after EXIF orientation, before any resize.
        scale: the requested resize factor (1.0: none).
        resized_size: (height, width) after resizing, before padding.
        padded: the resized image was smaller than the window and was padded at the bottom/right.
    """

    tensor: torch.Tensor
    original_size: tuple[int, int]
    scale: float
    resized_size: tuple[int, int]
    padded: bool

    @property
    def effective_scale(self) -> tuple[float, float]:
        """The exact (y, x) resize factors (sizes are rounded to whole pixels)."""
        return (self.resized_size[0] / self.original_size[0], self.resized_size[1] / self.original_size[1])


def prepare(image: Image.Image, in_chans: int, mean, std, scale: float = 1.0,
            min_size: tuple[int, int] | None = None) -> PreparedImage:
    """Convert ``image`` to a normalised float tensor for a model with ``in_chans`` channels.

    The image is converted to "L" (1 channel) or "RGB" (3 channels; alpha is dropped), optionally resized by
    ``scale`` (bilinear, with Pillow's antialiasing when shrinking), scaled to 0–1 and normalised per channel
    as ``(x - mean) / std``. There is no resize by default.

    An image smaller than ``min_size`` (the model's window) is padded at the bottom and right with zeros
    *after* normalisation, i.e. with the mean colour, so that the network has at least one full window;
    ``padded`` is then set. Cells whose windows reach into the padding see the mean colour there.

    Raises:
        InputError: an unsupported channel count, a non-positive scale, or mean/std of the wrong length.
    """
    if in_chans not in _MODES:
        raise InputError(f"models with {in_chans} input channels cannot read images",
                         hint="fcnify heatmaps support 1-channel (grayscale) and 3-channel (RGB) models")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InputError(f"--scale {scale} is not a positive number", hint="e.g. --scale 0.5 halves the image")
    mean_t = torch.as_tensor(tuple(mean), dtype=torch.float32)
    std_t = torch.as_tensor(tuple(std), dtype=torch.float32)
    if mean_t.numel() != in_chans or std_t.numel() != in_chans:
        raise InputError(f"mean/std have {mean_t.numel()}/{std_t.numel()} values for {in_chans} channels",
                         hint="give one mean and one std per input channel")
    original_size = (image.height, image.width)
    mode = _MODES[in_chans]
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F") and mode in ("L", "RGB"):
        image = _to_8bit(image)
    if image.mode in ("LA", "PA", "RGBA", "La") and mode == "L":
        image = image.convert("RGBA")
    converted = image.convert(mode)
    if scale != 1.0:
        new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        converted = converted.resize((new_w, new_h), Image.Resampling.BILINEAR)
    array = np.asarray(converted, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    tensor = (tensor - mean_t[:, None, None]) / std_t[:, None, None]
    resized = (tensor.shape[1], tensor.shape[2])
    padded = False
    if min_size is not None:
        pad_h, pad_w = max(0, min_size[0] - resized[0]), max(0, min_size[1] - resized[1])
        if pad_h or pad_w:
            tensor = torch.nn.functional.pad(tensor, (0, pad_w, 0, pad_h), value=0.0)
            padded = True
    return PreparedImage(tensor.contiguous(), original_size, float(scale), resized, padded)


def display_rgb(image: Image.Image) -> np.ndarray:
    """The image as H×W×3 uint8 for drawing (16-bit and float images mapped onto 0–255, alpha dropped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _to_8bit(image)
    elif image.mode in ("LA", "PA", "La", "P"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float images: map their full range linearly onto 0–255 (an "L" image)."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (array.size and array.max() > 255 and array.min() >= 0
                                         and image.mode == "I"):
        array = array / 65535.0 * 255.0
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")


def fit_to_window(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to cover ``size`` (height, width) keeping its aspect, then centre-crop to it.

    This is the usual evaluation transform (torchvision's resize-then-centre-crop), used to check a conversion
    on real images at the training size.
    """
    height, width = size
    factor = max(height / image.height, width / image.width)
    resized = image.resize((max(width, round(image.width * factor)), max(height, round(image.height * factor))),
                           Image.Resampling.BILINEAR)
    top, left = (resized.height - height) // 2, (resized.width - width) // 2
    return resized.crop((left, top, left + width, top + height))


def centre_region(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, bool]:
    """The centre ``size`` (height, width) of ``image`` at its own resolution, as a heatmap would see it.

    An image smaller than ``size`` on a side is resized to cover it first (``fit_to_window``).

    Returns:
        The region, and whether the image had to be resized.
    """
    height, width = size
    if image.height < height or image.width < width:
        return fit_to_window(image, size), True
    top, left = (image.height - height) // 2, (image.width - width) // 2
    return image.crop((left, top, left + width, top + height)), False
