"""Synthetic whole-slide images for tests and benchmarks, written tile by tile.

The pixels are a pure function of their level-0 coordinates (and ``seed``, ``background``, ``density``), so any
region can be generated on its own and agrees with every other region generated anywhere: ``tissue_tile`` is what
a writer streams, ``full_image`` what a test compares a read region to. Pyramid levels are integer box means of
the level above (``box_downsample``), computed while the level above is written, so writing never holds more than
the next level (in memory, or in a temporary memory-mapped file next to the output for large slides).

Layouts (``write_slide(kind=...)``):

* ``"svs"``: Aperio-like. Level 0 with an Aperio description, a stripped thumbnail page, the reduced levels as
  further tiled pages (each /4), then a label and a macro page; ``tifffile`` recognises it as SVS.
* ``"ome"``: OME-TIFF with ``PhysicalSizeX/Y`` and the levels as SubIFDs (each /2), a thumbnail as a second
  series.
* ``"generic"``: a plain tiled TIFF with resolution tags (pixels per centimetre), levels as SubIFDs (or, with
  ``pyramid="pages"``, as successive reduced pages, the layout OpenSlide's generic-TIFF reader understands).
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["box_downsample", "corrupt_tile", "full_image", "level_images", "tissue_tile", "truncate_file",
           "write_slide"]

# Feature sizes in level-0 pixels. The tissue mask is a sum of value-noise octaves, thresholded: large octaves
# give clusters with empty gaps between them, small ones ragged edges. Texture and nuclei are finer noise.
_MASK_OCTAVES = ((2048.0, 0.12), (384.0, 0.42), (160.0, 0.30), (56.0, 0.16))
_TEXTURE_SCALE = 14.0
_NUCLEUS_SCALE = 5.0
_EDGE = 0.03  # width of the soft tissue edge, in noise units
_NOISE_PERIOD = (509, 521)  # per-pixel grain: a table tiled with prime periods, so no visible repeat

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _hash01(iy: np.ndarray, ix: np.ndarray, salt: int) -> np.ndarray:
    """Uniform floats in [0, 1) from integer lattice coordinates (splitmix64 finaliser; pure, vectorised)."""
    with np.errstate(over="ignore"):
        h = (iy.astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ ix.astype(np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
             ^ np.uint64((salt * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF))
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _axis(start: int, n: int, scale: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Lattice cell index (relative to the first), smoothstep weight and first cell of pixels start..start+n."""
    g = (np.arange(start, start + n, dtype=np.float64) + 0.5) / scale
    cell = np.floor(g)
    t = g - cell
    first = int(cell[0])
    return (cell - first).astype(np.intp), t * t * (3.0 - 2.0 * t), first


def _value_noise(y: int, x: int, h: int, w: int, scale: float, salt: int) -> np.ndarray:
    """Smooth value noise in [0, 1] over the region, a function of each pixel's global position only.

    Separable: lattice values are interpolated along y for the lattice columns the region needs, then along x.
    Only + and * are used, so a pixel's value is bit-identical whichever region it is computed in.
    """
    iy, wy, y0 = _axis(y, h, scale)
    ix, wx, x0 = _axis(x, w, scale)
    ny, nx = int(iy[-1]) + 2, int(ix[-1]) + 2
    lattice = _hash01(np.arange(y0, y0 + ny)[:, None], np.arange(x0, x0 + nx)[None, :], salt)
    rows = lattice[iy] * (1.0 - wy)[:, None] + lattice[iy + 1] * wy[:, None]
    return rows[:, ix] * (1.0 - wx) + rows[:, ix + 1] * wx


def _mask_field(y: int, x: int, h: int, w: int, seed: int) -> np.ndarray:
    field = np.zeros((h, w))
    for k, (scale, weight) in enumerate(_MASK_OCTAVES):
        field += weight * _value_noise(y, x, h, w, scale, seed * 131 + k)
    return field


@functools.lru_cache(maxsize=64)
def _threshold(seed: int, density: float) -> float:
    """The mask-field level above which a ``density`` fraction of the plane is tissue (sampled once, cached)."""
    if density <= 0:
        return np.inf
    if density >= 1:
        return -np.inf
    samples = [_mask_field(9973 * i, 7919 * j, 48, 48, seed).ravel()[::3] for i in range(16) for j in range(16)]
    return float(np.quantile(np.concatenate(samples), 1.0 - density))


@functools.lru_cache(maxsize=8)
def _grain(seed: int) -> np.ndarray:
    """Per-pixel noise table, uniform in [-1, 1), 3 channels."""
    return np.random.default_rng(seed + 7).uniform(-1.0, 1.0, (*_NOISE_PERIOD, 3)).astype(np.float32)


_HE_BACKGROUND = np.array([243.0, 240.0, 244.0], np.float32)
_HE_STROMA_LIGHT = np.array([238.0, 178.0, 208.0], np.float32)
_HE_STROMA_DARK = np.array([208.0, 112.0, 168.0], np.float32)
_HE_NUCLEUS = np.array([92.0, 58.0, 148.0], np.float32)
_FL_BACKGROUND = np.array([6.0, 7.0, 6.0], np.float32)
_FL_SIGNAL = np.array([40.0, 205.0, 70.0], np.float32)
_FL_NUCLEUS = np.array([215.0, 250.0, 220.0], np.float32)


def tissue_tile(y: int, x: int, h: int, w: int, background: str = "white", seed: int = 0,
                density: float = 0.3) -> np.ndarray:
    """Level-0 pixels [y, y+h) × [x, x+w) of the synthetic slide, uint8 h×w×3.

    Args:
        y, x: top-left corner in level-0 pixels.
        h, w: region size.
        background: "white" (brightfield H&E: pink stroma with purple nuclei on a near-white 235–250 glass) or
            "black" (fluorescence: green signal with bright nuclei on a near-black 0–15 background).
        seed: which slide.
        density: about the fraction of the plane covered by tissue.

    Cost is O(h·w): every feature is value noise on a fixed lattice, so no pixel depends on anything but its
    own position; a pixel has the same value whichever region it is generated in.
    """
    if background not in ("white", "black"):
        raise ValueError(f"background must be 'white' or 'black', not {background!r}")
    grain_table = _grain(seed)
    rows, cols = np.arange(y, y + h)[:, None] % _NOISE_PERIOD[0], np.arange(x, x + w)[None, :] % _NOISE_PERIOD[1]
    grain = grain_table[rows, cols]
    field = _mask_field(y, x, h, w, seed)
    alpha = np.clip((field - _threshold(seed, density)) / _EDGE, 0.0, 1.0).astype(np.float32)[..., None]
    if background == "white":
        out = np.broadcast_to(_HE_BACKGROUND, (h, w, 3)) + 5.0 * grain
        if alpha.any():  # tissue-free tiles (most of a slide's area) skip the texture
            texture = _value_noise(y, x, h, w, _TEXTURE_SCALE, seed * 131 + 101).astype(np.float32)[..., None]
            nuclei = _value_noise(y, x, h, w, _NUCLEUS_SCALE, seed * 131 + 102).astype(np.float32)[..., None]
            tissue = _HE_STROMA_LIGHT + (_HE_STROMA_DARK - _HE_STROMA_LIGHT) * texture
            nucleus = np.clip((nuclei - 0.62) / 0.1, 0.0, 1.0) * alpha
            tissue = tissue + (_HE_NUCLEUS - tissue) * nucleus + 9.0 * grain
            out = out + (tissue - out) * alpha
    else:
        out = np.broadcast_to(_FL_BACKGROUND, (h, w, 3)) + 5.0 * grain
        if alpha.any():
            texture = _value_noise(y, x, h, w, _TEXTURE_SCALE, seed * 131 + 101).astype(np.float32)[..., None]
            nuclei = _value_noise(y, x, h, w, _NUCLEUS_SCALE, seed * 131 + 102).astype(np.float32)[..., None]
            signal = _FL_SIGNAL * (0.45 + 0.55 * texture)
            nucleus = np.clip((nuclei - 0.62) / 0.1, 0.0, 1.0) * alpha
            signal = signal + (_FL_NUCLEUS - signal) * nucleus + 6.0 * grain
            out = out + (signal - out) * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def full_image(size: tuple[int, int], background: str = "white", seed: int = 0, density: float = 0.3) -> np.ndarray:
    """Level 0 of a slide as one array (small sizes only): the same pixels ``write_slide`` writes."""
    return tissue_tile(0, 0, size[0], size[1], background, seed, density)


def box_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Integer box mean of ``factor``×``factor`` blocks (rounded half up); a partial last row/column is dropped."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[:h * factor, :w * factor].reshape(h, factor, w, factor, -1).astype(np.uint32)
    n = factor * factor
    return ((blocks.sum(axis=(1, 3)) + n // 2) // n).astype(np.uint8)


def level_images(image: np.ndarray, levels: int, factor: int) -> list[np.ndarray]:
    """The pyramid ``write_slide`` writes for a level-0 ``image`` (for comparisons in tests)."""
    out = [image]
    for _ in range(levels - 1):
        out.append(box_downsample(out[-1], factor))
    return out


def _level_sizes(size: tuple[int, int], levels: int, factor: int) -> list[tuple[int, int]]:
    sizes = [tuple(size)]
    for _ in range(levels - 1):
        h, w = sizes[-1][0] // factor, sizes[-1][1] // factor
        if h < 1 or w < 1:
            break
        sizes.append((h, w))
    return sizes


class _Buffer:
    """The next level, filled while the current one is written: in memory when small, else a temporary memmap."""

    def __init__(self, shape: tuple[int, int], folder: Path, in_memory_limit: int = 256 << 20):
        self.file = None
        if shape[0] * shape[1] * 3 <= in_memory_limit:
            self.array = np.zeros((*shape, 3), np.uint8)
        else:
            fd, name = tempfile.mkstemp(suffix=".level.tmp", dir=folder)
            os.close(fd)
            self.file = name
            self.array = np.memmap(name, dtype=np.uint8, mode="w+", shape=(*shape, 3))

    def close(self) -> None:
        if self.file is not None:
            del self.array
            os.unlink(self.file)
            self.file = None


def _tiles(read, size: tuple[int, int], tile: int, factor: int, below: _Buffer | None) -> Iterator[np.ndarray]:
    """Yield the tiles of a level in TIFF order, box-downsampling each into the level below as it goes.

    ``tile`` is a multiple of ``factor``, so each tile's downsample is exactly its block of the level below.
    """
    h, w = size
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = read(y, x, min(tile, h - y), min(tile, w - x))
            if below is not None:
                small = box_downsample(block, factor)
                by, bx = y // factor, x // factor
                bh = min(small.shape[0], below.array.shape[0] - by)
                bw = min(small.shape[1], below.array.shape[1] - bx)
                below.array[by:by + bh, bx:bx + bw] = small[:bh, :bw]
            yield block


def _thumbnail(read, size: tuple[int, int], longest: int = 512) -> np.ndarray:
    """A box-downsampled small copy of a level (``read(y, h)`` gives rows), computed in bands of rows."""
    factor = max(1, -(-max(size) // longest))
    band = factor * max(1, 2048 // factor)
    parts = [box_downsample(read(y, min(band, size[0] - y)), factor) for y in range(0, size[0], band)]
    parts = [p for p in parts if p.shape[0]]
    return np.concatenate(parts) if parts else np.zeros((1, 1, 3), np.uint8)


def _label_image(seed: int) -> np.ndarray:
    label = np.full((240, 320, 3), 250, np.uint8)
    rng = np.random.default_rng(seed)
    for row in range(40, 200, 40):  # a few "barcode" bars
        label[row:row + 20, 30:30 + int(rng.integers(80, 260))] = 20
    return label


def write_slide(path: str | os.PathLike, size: tuple[int, int] = (1024, 1536), kind: str = "svs",
                background: str = "white", tile: int = 256, levels: int = 3, mpp: float = 0.5,
                bigtiff: bool = False, compression: str | None = "jpeg", seed: int = 0, density: float = 0.3,
                thumbnail: bool = True, label_macro: bool = True, pyramid: str = "subifds",
                quality: int = 85, tissue_width: float = 1.0) -> Path:
    """Write a synthetic pyramidal slide, streaming tiles; returns the path.

    Args:
        path: the file to write.
        size: level-0 (height, width).
        kind: "svs" (Aperio-like, levels /4), "ome" (OME-TIFF, SubIFD levels /2) or "generic" (tiled TIFF with
            resolution tags, levels /2).
        background: "white" (H&E-like) or "black" (fluorescence-like).
        tile: tile size (a multiple of 16).
        levels: pyramid levels including level 0 (fewer when a level would be empty).
        mpp: micrometres per level-0 pixel, written as the format records it.
        bigtiff: write BigTIFF.
        compression: "jpeg" (as real slides; lossy), "zlib" or None (lossless: reads equal ``full_image``).
        seed, density: the tissue (see ``tissue_tile``).
        thumbnail: add a small thumbnail image (svs: the second page; ome/generic: a separate reduced image).
        label_macro: svs only: add label and macro pages after the pyramid.
        pyramid: generic only: "subifds" or "pages" (levels as successive reduced top-level pages).
        quality: JPEG quality.
        tissue_width: the share of the width, from the left, where tissue may lie; glass only to its right (a
            section mounted on one side of the slide, its glass one contiguous region).
    """
    import tifffile

    if kind not in ("svs", "ome", "generic"):
        raise ValueError(f"kind must be 'svs', 'ome' or 'generic', not {kind!r}")
    if tile % 16:
        raise ValueError("TIFF tiles must be multiples of 16")
    path = Path(path)
    factor = 4 if kind == "svs" else 2
    sizes = _level_sizes(size, levels, factor)
    h0, w0 = sizes[0]
    compressionargs = {"level": quality} if compression == "jpeg" else None
    options = dict(dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression=compression,
                   compressionargs=compressionargs)

    def level0(y, x, h, w):
        pixels = tissue_tile(y, x, h, w, background, seed, density)
        edge = max(0, round(tissue_width * w0) - x)  # glass from here on, in this tile's columns
        if edge < w:
            pixels[:, edge:] = tissue_tile(y, x + edge, h, w - edge, background, seed, 0.0)
        return pixels

    buffers: list[_Buffer] = []
    try:
        def level_data(index: int):
            """Tiles of level ``index``; the level below is filled as a side effect."""
            below = _Buffer(sizes[index + 1], path.parent) if index + 1 < len(sizes) else None
            if below is not None:
                buffers.append(below)
            if index == 0:
                read = level0
            else:
                source = buffers[index - 1].array
                read = lambda y, x, h, w: np.asarray(source[y:y + h, x:x + w])  # noqa: E731
            return _tiles(read, sizes[index], tile, factor, below)

        def done_with(index: int) -> None:
            if index >= 1:
                buffers[index - 1].close()

        def thumb_image() -> np.ndarray:
            """Called right after level 0 is written, while the level below it is complete."""
            if buffers:
                below = buffers[0].array
                return _thumbnail(lambda y, h: np.asarray(below[y:y + h]), below.shape[:2])
            return _thumbnail(lambda y, h: level0(y, 0, h, w0), (h0, w0))

        with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=(kind == "ome")) as tif:
            if kind == "svs":
                header = "Aperio Image Library v12.0.0\r\n"
                tif.write(level_data(0), shape=(h0, w0, 3), metadata=None, **options,
                          description=(f"{header}{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) JPEG/RGB Q=70"
                                       f"|AppMag = 20|MPP = {mpp}"))
                thumb = thumb_image()
                if thumbnail:
                    tif.write(thumb, photometric="rgb", metadata=None, compression=compression,
                              description=f"{header}{w0}x{h0} -> {thumb.shape[1]}x{thumb.shape[0]} - |AppMag = 20")
                for index in range(1, len(sizes)):
                    h, w = sizes[index]
                    tif.write(level_data(index), shape=(h, w, 3), metadata=None, **options,
                              description=f"{header}{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) -> {w}x{h} JPEG/RGB Q=70")
                    done_with(index)
                if label_macro:
                    tif.write(_label_image(seed), photometric="rgb", metadata=None, subfiletype=1,
                              description=f"{header}label 320x240")
                    macro = np.concatenate([np.full((thumb.shape[0], 64, 3), 200, np.uint8), thumb], axis=1)
                    tif.write(macro, photometric="rgb", metadata=None, subfiletype=9,
                              description=f"{header}macro {macro.shape[1]}x{macro.shape[0]}")
            else:
                resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
                subifds = len(sizes) - 1 if (kind == "ome" or pyramid == "subifds") else None
                metadata = ({"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                             "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"} if kind == "ome" else None)
                tif.write(level_data(0), shape=(h0, w0, 3), subifds=subifds, metadata=metadata, **options,
                          **resolution)
                thumb = thumb_image()
                for index in range(1, len(sizes)):
                    h, w = sizes[index]
                    ds = factor ** index
                    tif.write(level_data(index), shape=(h, w, 3), subfiletype=1, metadata=None, **options,
                              resolution=(1e4 / mpp / ds, 1e4 / mpp / ds), resolutionunit="CENTIMETER")
                    done_with(index)
                if thumbnail:
                    if kind == "ome":
                        tif.write(thumb, photometric="rgb", metadata={"Name": "thumbnail"})
                    else:
                        tif.write(thumb, photometric="rgb", metadata=None, subfiletype=1,
                                  description="thumbnail")
    finally:
        for buffer in buffers:
            buffer.close()
    return path


def truncate_file(path: str | os.PathLike, keep_fraction: float) -> Path:
    """Cut a file to ``keep_fraction`` of its bytes (an interrupted copy or download)."""
    path = Path(path)
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep_fraction))
    return path


def corrupt_tile(path: str | os.PathLike, level: int = 0, tile_index: int = 0) -> Path:
    """Overwrite the bytes of one stored tile of the main series' ``level`` with garbage, in place."""
    import tifffile

    path = Path(path)
    with tifffile.TiffFile(path) as tif:
        main = [s for s in tif.series if s.name.lower() not in ("thumbnail", "label", "macro")]
        series = max(main or tif.series, key=lambda s: int(np.prod(s.shape)))
        page = series.levels[level].keyframe
        offset, count = int(page.dataoffsets[tile_index]), int(page.databytecounts[tile_index])
    garbage = np.random.default_rng(tile_index).integers(0, 256, count, dtype=np.uint8).tobytes()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(garbage)
    return path
