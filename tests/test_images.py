"""fcnify.images: reading every kind of bad input as an InputError, EXIF orientation, preparing tensors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from heatmap_helpers import noise_image, save
from PIL import Image

from fcnify.errors import InputError
from fcnify.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, is_image_path, prepare, read_image


def test_image_extensions_come_from_pillow():
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif"} <= IMAGE_EXTENSIONS
    assert ".txt" not in IMAGE_EXTENSIONS
    assert is_image_path("a/B.PNG") and not is_image_path("notes.txt")


def test_reads_png_completely(tmp_path):
    path = save(noise_image(mode="RGB"), tmp_path / "x.png")
    image = read_image(path)
    assert image.size == (64, 48) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(noise_image(mode="RGB")))


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rotated.jpg"
    noise_image(size=(20, 40), mode="RGB").save(path, exif=exif.tobytes())
    assert read_image(path).size == (20, 40)  # width, height swapped by the transpose


@pytest.mark.parametrize("case", ["empty", "truncated", "corrupt", "text", "missing", "folder"])
def test_bad_inputs_are_input_errors(tmp_path, case):
    path = tmp_path / "bad.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        buffer = io.BytesIO()
        noise_image(size=(64, 64)).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif case == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)))
    elif case == "text":
        path = tmp_path / "notes.txt"
        path.write_text("not an image\n")
    elif case == "folder":
        path = tmp_path / "dir.png"
        path.mkdir()
    with pytest.raises(InputError) as info:
        read_image(path)
    assert str(path) in info.value.message
    assert info.value.hint


def test_truncated_jpeg_is_refused_even_if_globally_allowed(tmp_path, monkeypatch):
    from PIL import ImageFile

    buffer = io.BytesIO()
    noise_image(size=(64, 64), mode="RGB").save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:-200])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(InputError, match="truncated|corrupt"):
        read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_pixel_limit_names_max_pixels_and_restores_pillow(tmp_path):
    path = save(noise_image(size=(40, 50)), tmp_path / "big.png")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InputError) as info:
        read_image(path, max_pixels=1000)
    assert "--max-pixels" in str(info.value)
    assert "2,000 pixels" in info.value.message
    assert Image.MAX_IMAGE_PIXELS == before
    assert read_image(path, max_pixels=2000).size == (50, 40)  # exactly at the limit is allowed
    assert read_image(path, max_pixels=0).size == (50, 40)  # 0: no limit
    assert DEFAULT_MAX_PIXELS == 89478485


def test_prepare_normalises_grayscale_and_rgb():
    image = noise_image(size=(40, 36), mode="RGB")
    gray = prepare(image, 1, (0.5,), (0.25,), min_size=(32, 32))
    expected = (np.asarray(image.convert("L"), dtype=np.float32) / 255 - 0.5) / 0.25
    assert gray.tensor.shape == (1, 40, 36) and gray.tensor.dtype == torch.float32
    assert np.allclose(gray.tensor[0].numpy(), expected, atol=1e-6)
    assert not gray.padded and gray.original_size == (40, 36)
    rgb = prepare(noise_image(size=(40, 36), mode="L"), 3, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    assert rgb.tensor.shape == (3, 40, 36)
    assert torch.allclose(rgb.tensor[0] - 0.2, rgb.tensor[1], atol=1e-6)  # same grey, means 0.1 vs 0.2, std 0.5


def test_prepare_handles_alpha_palette_and_16_bit():
    rgba = Image.new("RGBA", (33, 33), (200, 100, 50, 0))
    expected = [200 / 255, 100 / 255, 50 / 255]
    assert prepare(rgba, 3, (0, 0, 0), (1, 1, 1)).tensor[:, 0, 0].tolist() == pytest.approx(expected)
    palette = noise_image(size=(33, 33), mode="RGB").convert("P")
    assert prepare(palette, 1, (0,), (1,)).tensor.shape == (1, 33, 33)
    deep = Image.fromarray(np.full((33, 33), 65535, dtype=np.uint16))
    assert float(prepare(deep, 1, (0,), (1,)).tensor.max()) == pytest.approx(1.0)


def test_small_image_is_padded_with_the_mean():
    prepared = prepare(noise_image(size=(20, 40)), 1, (0.5,), (0.25,), min_size=(32, 32))
    assert prepared.padded and prepared.tensor.shape == (1, 32, 40)
    assert prepared.resized_size == (20, 40) and prepared.original_size == (20, 40)
    assert torch.count_nonzero(prepared.tensor[:, 20:, :]) == 0  # zero after normalisation = the mean colour


def test_scale_resizes_and_records_the_exact_factor():
    prepared = prepare(noise_image(size=(41, 64)), 1, (0.5,), (0.25,), scale=0.5)
    assert prepared.tensor.shape == (1, 20, 32)  # round(20.5) = 20 (banker's rounding), 32
    assert prepared.effective_scale == (20 / 41, 0.5)


@pytest.mark.parametrize("kwargs", [{"in_chans": 4}, {"scale": 0}, {"scale": float("nan")}, {"mean": (0.1, 0.2)}])
def test_prepare_refuses_bad_arguments(kwargs):
    args = {"in_chans": 1, "mean": (0.5,), "std": (0.25,), **kwargs}
    with pytest.raises(InputError):
        prepare(noise_image(), args.pop("in_chans"), args.pop("mean"), args.pop("std"), **args)


def test_display_rgb_of_16_bit_and_alpha_images():
    from fcnify.images import display_rgb

    deep = Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16))
    assert display_rgb(deep).shape == (4, 5, 3) and display_rgb(deep).max() == 255
    assert display_rgb(Image.new("LA", (5, 4), (80, 0))).tolist() == [[[80, 80, 80]] * 5] * 4
