"""Small real models and images shared by the heatmap tests (images, dense, render, pipeline outputs, plan)."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch import nn

from fcnify.convert import convert
from fcnify.heatmap.job import ImageJob
from fcnify.heatmap.legend import legend_height
from fcnify.heatmap.local import run_paths
from fcnify.heatmap.options import HeatmapOptions
from fcnify.heatmap.outputs import output_stems

LABELS = tuple(f"class{i}" for i in range(10)) + ("background",)
MEAN, STD = (0.5,), (0.25,)
SMALL_META = SimpleNamespace(in_chans=1, mean=MEAN, std=STD, labels=LABELS)
BLOB_META = SimpleNamespace(in_chans=1, mean=(0.0,), std=(1.0,), labels=("none", "blob"))


def small_cnn(seed: int = 0) -> nn.Module:
    """A padding-free CNN on 32x32 grayscale with 11 classes: conv5-relu-pool2-conv3-relu-flatten-linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 12 * 12, 11),
    ).eval()


@functools.cache
def converted_small():
    """The converted small CNN (stride 2, window 32). Shared: tests must not modify it."""
    return convert(small_cnn(), (32, 32), in_chans=1)


def blob_detector() -> nn.Module:
    """Class 1 ("blob") scores high when a bright blob sits at the centre of the 32x32 window.

    conv3 (identity on the centre tap) -> relu -> maxpool2 gives a 15x15 map whose cell (7, 7) covers input
    pixels 14..17 (the window centre is at 16); the linear layer weights that map with a narrow Gaussian bump
    around (7, 7) for class 1 and nothing for class 0 (a constant bias).
    """
    conv = nn.Conv2d(1, 1, 3, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
    linear = nn.Linear(15 * 15, 2)
    yy, xx = np.mgrid[0:15, 0:15]
    bump = np.exp(-((yy - 7) ** 2 + (xx - 7) ** 2) / 2.0)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[1] = torch.from_numpy(bump.ravel()).float() * 2.0
        linear.bias.copy_(torch.tensor([0.0, -2.0]))
    return nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), linear).eval()


@functools.cache
def converted_blob():
    return convert(blob_detector(), (32, 32), in_chans=1)


def blob_scene(size=(80, 96), centre=(45, 30), radius=3.0) -> np.ndarray:
    """A black uint8 grayscale scene with one bright disc at ``centre`` (pixel-edge coordinates)."""
    yy, xx = np.mgrid[0:size[0], 0:size[1]] + 0.5
    disc = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius ** 2
    return (disc * 255).astype(np.uint8)


def noise_image(size=(48, 64), mode="L", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = size if mode == "L" else (*size, 3)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def split_heatmap(path: Path, mode: str = "RGB") -> tuple[np.ndarray, np.ndarray]:
    """A ``<stem>.heatmap.png`` as (overlay, legend strip): the strip is the bottom ``legend_height(width)`` rows."""
    with Image.open(path) as png:
        pixels = np.asarray(png.convert(mode))
    strip = legend_height(pixels.shape[1])
    assert pixels.shape[0] > strip, pixels.shape
    return pixels[:-strip], pixels[-strip:]


def run_images(paths, outdir, meta=SMALL_META, fcn=None, progress=None, finished=None, **options):
    """``pipeline.run_image`` over ``paths`` (the local engine's loop, without ``summary.parquet``): one
    ``SummaryRow`` each. ``options`` are ``HeatmapOptions`` fields (device defaults to cpu)."""
    fcn = fcn or converted_small()
    options.setdefault("device", "cpu")
    job = ImageJob(fcn, fcn.geometry, meta, HeatmapOptions(outdir=Path(outdir), **options))
    paths = [str(p) for p in paths]
    return run_paths(paths, output_stems(paths), job, progress=progress, finished=finished)


class ArrayView:
    """An in-memory image with the ``LevelView`` interface ``compute.compute_tiles`` reads: ``size``,
    ``downsample`` and ``read(y, x, h, w)`` (h×w×3 uint8). Records the regions read."""

    def __init__(self, rgb: np.ndarray):
        rgb = np.asarray(rgb, dtype=np.uint8)
        self.rgb = np.repeat(rgb[..., None], 3, axis=2) if rgb.ndim == 2 else rgb
        self.size = (int(self.rgb.shape[0]), int(self.rgb.shape[1]))
        self.downsample = (1.0, 1.0)
        self.level = 0
        self.mpp = None
        self.reads: list[tuple[int, int, int, int]] = []

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        assert 0 <= y and 0 <= x and y + h <= self.size[0] and x + w <= self.size[1], (y, x, h, w, self.size)
        self.reads.append((y, x, h, w))
        return self.rgb[y:y + h, x:x + w].copy()
