"""Image sources on real files: synthetic pyramidal slides (SVS, OME-TIFF, generic tiled TIFF, BigTIFF), plain
images, damaged files. Lossless slides are compared to the generated pixels exactly."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import slides
import tifffile
from PIL import Image

from fcnify.errors import InputError, MissingDependencyError
from fcnify.heatmap.sources import (
    Level,
    LevelView,
    OpenSlideSource,
    PillowSource,
    TiffSource,
    open_source,
    open_view,
    read_thumbnail,
)

SIZE = (1000, 1300)  # not a multiple of the tile: edge tiles are partial


@pytest.fixture(scope="module")
def full():
    return slides.full_image(SIZE)


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory):
    """One lossless slide of each layout, written once for the module."""
    folder = tmp_path_factory.mktemp("slides")
    return {
        "svs": slides.write_slide(folder / "a.svs", SIZE, kind="svs", compression="zlib", mpp=0.25),
        "ome": slides.write_slide(folder / "a.ome.tif", SIZE, kind="ome", compression=None, mpp=0.5),
        "generic": slides.write_slide(folder / "a.tif", SIZE, kind="generic", compression="zlib", mpp=0.4),
        "bigtiff": slides.write_slide(folder / "big.tif", SIZE, kind="generic", compression="zlib", bigtiff=True,
                                      pyramid="pages"),
    }


FACTOR = {"svs": 4, "ome": 2, "generic": 2, "bigtiff": 2}


# ------------------------------------------------------------------------------------------------ slides helper


def test_tissue_tiles_agree_with_the_whole_image(full):
    assert np.array_equal(slides.tissue_tile(300, 517, 200, 333), full[300:500, 517:850])
    assert np.array_equal(slides.tissue_tile(999, 0, 1, 1300), full[999:])
    white_share = (full.min(axis=2) >= 225).mean()
    assert 0.3 < white_share < 0.995  # tissue and glass both present
    black = slides.tissue_tile(0, 0, 512, 512, background="black", seed=1, density=0.5)
    assert np.median(black) <= 15 and black.max() >= 200


# ------------------------------------------------------------------------------------------------ tifffile


@pytest.mark.parametrize("kind", ["svs", "ome", "generic", "bigtiff"])
def test_regions_equal_the_written_pixels(slide_files, full, kind):
    with open_source(str(slide_files[kind])) as source:
        assert isinstance(source, TiffSource) and source.kind == "tifffile" and not source.whole
        assert source.size == SIZE
        expected = slides.level_images(full, 3, FACTOR[kind])
        assert [lv.size for lv in source.levels] == [e.shape[:2] for e in expected]
        assert source.levels[0] == Level(SIZE, (1.0, 1.0))
        f = FACTOR[kind]
        assert source.levels[1].downsample == (1000 / (1000 // f), 1300 / (1300 // f))
        for index, level in enumerate(expected):
            height, width = level.shape[:2]
            assert np.array_equal(source.read_region(index, 0, 0, height, width), level)
        # a region spanning tile borders, and one in the partial corner tile
        assert np.array_equal(source.read_region(0, 250, 250, 300, 270), full[250:550, 250:520])
        assert np.array_equal(source.read_region(0, 990, 1290, 10, 10), full[990:, 1290:])
        assert source.read_region(0, 5, 7, 3, 4).dtype == np.uint8


def test_svs_thumbnail_label_and_macro_are_ignored(slide_files):
    with tifffile.TiffFile(slide_files["svs"]) as tif:
        assert tif.is_svs
        assert [s.name for s in tif.series] == ["Baseline", "Thumbnail", "Label", "Macro"]
    with open_source(str(slide_files["svs"])) as source:
        assert [lv.size for lv in source.levels] == [(1000, 1300), (250, 325), (62, 81)]
        assert source.mpp == (0.25, 0.25)


def test_pixel_size_from_ome_and_resolution_tags(slide_files, tmp_path):
    with open_source(str(slide_files["ome"])) as source:
        assert source.mpp == pytest.approx((0.5, 0.5))
    with open_source(str(slide_files["generic"])) as source:
        assert source.mpp == pytest.approx((0.4, 0.4))
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, np.zeros((32, 48, 3), np.uint8), photometric="rgb", resolution=(50800, 25400),
                     resolutionunit="INCH")
    with open_source(str(inch)) as source:
        assert source.mpp == pytest.approx((1.0, 0.5))  # (y, x)
    nm = tmp_path / "nm.ome.tif"
    tifffile.imwrite(nm, np.zeros((32, 48), np.uint8), metadata={"axes": "YX", "PhysicalSizeX": 250,
                                                                "PhysicalSizeY": 250, "PhysicalSizeXUnit": "nm",
                                                                "PhysicalSizeYUnit": "nm"})
    with open_source(str(nm)) as source:
        assert source.mpp == pytest.approx((0.25, 0.25))
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((32, 48, 3), np.uint8), photometric="rgb")
    with open_source(str(plain)) as source:
        assert source.mpp is None


def test_grey_uint16_planar_and_ome_axes(tmp_path):
    grey = np.arange(64 * 80, dtype=np.uint8).reshape(64, 80)
    tifffile.imwrite(tmp_path / "grey.tif", grey, tile=(32, 32))
    with open_source(str(tmp_path / "grey.tif")) as source:
        assert np.array_equal(source.read_region(0, 10, 20, 30, 40), np.repeat(grey[10:40, 20:60, None], 3, 2))

    deep = (np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 3)
    tifffile.imwrite(tmp_path / "deep.tif", deep)
    with open_source(str(tmp_path / "deep.tif")) as source:
        region = source.read_region(0, 0, 0, 64, 80)
        expected = np.clip(np.rint(deep.astype(np.float32) * np.float32(255.0 / deep.max())), 0, 255)
        assert np.array_equal(region[..., 1], expected.astype(np.uint8))
        assert region.max() == 255

    planar = np.random.default_rng(0).integers(0, 256, (3, 48, 64), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    with open_source(str(tmp_path / "planar.tif")) as source:
        assert np.array_equal(source.read_region(0, 0, 0, 48, 64), planar.transpose(1, 2, 0))

    rgba = np.random.default_rng(1).integers(0, 256, (40, 50, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    with open_source(str(tmp_path / "rgba.tif")) as source:
        assert np.array_equal(source.read_region(0, 0, 0, 40, 50), rgba[..., :3])

    tczyx = np.random.default_rng(2).integers(0, 256, (1, 3, 1, 40, 50), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "tczyx.ome.tif", tczyx, metadata={"axes": "TCZYX"})
    with open_source(str(tmp_path / "tczyx.ome.tif")) as source:
        assert source.size == (40, 50)
        assert np.array_equal(source.read_region(0, 0, 0, 40, 50), tczyx[0, :, 0].transpose(1, 2, 0))

    five = np.zeros((5, 40, 50), np.uint8)
    tifffile.imwrite(tmp_path / "five.ome.tif", five, metadata={"axes": "CYX"})
    with pytest.raises(InputError, match="5 channels"):
        open_source(str(tmp_path / "five.ome.tif"))


def test_jpeg_slide_within_jpeg_tolerance(tmp_path, full):
    path = slides.write_slide(tmp_path / "j.svs", SIZE, kind="svs", compression="jpeg")
    with open_source(str(path)) as source:
        diff = np.abs(source.read_region(0, 0, 0, *SIZE).astype(np.int16) - full)
        assert diff.mean() < 5 and np.percentile(diff, 99) < 30


def test_black_background_slide(tmp_path):
    path = slides.write_slide(tmp_path / "dark.ome.tif", (512, 768), kind="ome", background="black",
                              compression="zlib", seed=3, density=0.4)
    expected = slides.full_image((512, 768), "black", seed=3, density=0.4)
    with open_source(str(path)) as source:
        region = source.read_region(0, 0, 0, 512, 768)
        assert np.array_equal(region, expected)
        assert np.median(region) <= 15
        thumb, _ = read_thumbnail(source, max_pixels=10_000)
        assert np.median(thumb) <= 15


def test_file_uri_reads_through_pyarrow(slide_files, full):
    uri = slide_files["generic"].resolve().as_uri()
    with open_source(uri) as source:
        assert isinstance(source, TiffSource)
        assert np.array_equal(source.read_region(0, 100, 200, 50, 60), full[100:150, 200:260])


# ------------------------------------------------------------------------------------------------ errors


def _one_line(exc: InputError, path) -> str:
    text = str(exc)
    assert "\n" not in text and str(path) in text and exc.hint
    return text


def test_truncated_tiff_fails_when_the_missing_tile_is_read(tmp_path, full):
    path = slides.write_slide(tmp_path / "cut.tif", SIZE, kind="generic", compression="zlib", thumbnail=False)
    slides.truncate_file(path, 0.6)
    with open_source(str(path)) as source:
        assert np.array_equal(source.read_region(0, 0, 0, 100, 100), full[:100, :100])  # its bytes are there
        with pytest.raises(InputError) as caught:
            source.read_region(0, 900, 1000, 100, 300)
    text = _one_line(caught.value, path)
    assert "truncated or corrupt" in text and "level 0" in text


def test_corrupt_tile_is_an_input_error(tmp_path, full):
    path = slides.write_slide(tmp_path / "bad.svs", SIZE, kind="svs", compression="jpeg")
    slides.corrupt_tile(path, level=0, tile_index=1)
    with open_source(str(path)) as source:
        source.read_region(0, 0, 0, 256, 256)  # tile 0 is intact
        with pytest.raises(InputError) as caught:
            source.read_region(0, 200, 100, 100, 300)
    text = _one_line(caught.value, path)
    assert "y 0, x 256" in text  # the failing tile is named


def test_not_a_tiff_missing_file_and_region_outside(tmp_path, slide_files):
    fake = tmp_path / "fake.tif"
    fake.write_bytes(b"this is not an image at all")
    with pytest.raises(InputError) as caught:
        open_source(str(fake))
    _one_line(caught.value, fake)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00\xff\xff\xff\x7f" + b"\x00" * 16)
    with pytest.raises(InputError) as caught:
        open_source(str(broken))
    _one_line(caught.value, broken)
    with pytest.raises(InputError, match="no such image"):
        open_source(str(tmp_path / "nothing.svs"))
    with open_source(str(slide_files["ome"])) as source:
        with pytest.raises(InputError, match="not inside level 1"):
            source.read_region(1, 400, 0, 200, 10)
        with pytest.raises(InputError, match="no level 3"):
            source.read_region(3, 0, 0, 1, 1)


def test_bomb_guard_applies_to_pillow_only(tmp_path):
    png = tmp_path / "big.png"
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(png)
    with pytest.raises(InputError, match="max-pixels"):
        open_source(str(png), max_pixels=10_000)
    with open_source(str(png), max_pixels=0) as source:
        assert isinstance(source, PillowSource) and source.size == (200, 300)
    tif = slides.write_slide(tmp_path / "big.tif", (512, 512), kind="generic", compression="zlib", levels=1)
    with open_source(str(tif), max_pixels=10_000) as source:
        assert source.size == (512, 512)


def test_unknown_format_without_openslide_names_the_extra(tmp_path, monkeypatch):
    odd = tmp_path / "slide.xyz"
    odd.write_bytes(b"\x00\x01 not an image format anyone knows" * 4)
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(InputError) as caught:
        open_source(str(odd))
    assert "fcnify[openslide]" in caught.value.hint
    mrxs = tmp_path / "slide.mrxs"
    mrxs.write_bytes(b"[GENERAL]\n")
    with pytest.raises(MissingDependencyError) as caught:
        open_source(str(mrxs))
    assert "fcnify[openslide]" in caught.value.hint


# ------------------------------------------------------------------------------------------------ pillow


def test_pillow_source_rgb_and_dpi(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with open_source(str(tmp_path / "a.png")) as source:
        assert source.kind == "pillow" and source.whole and source.mpp is None
        assert np.array_equal(source.read_region(0, 5, 6, 10, 12), rgba[5:15, 6:18, :3])
    Image.fromarray(rgba[..., :3]).save(tmp_path / "dpi.png", dpi=(254, 127))
    with open_source(str(tmp_path / "dpi.png")) as source:
        assert source.mpp == pytest.approx((200.0, 100.0), rel=1e-3)


def test_scale_view_of_an_ordinary_image(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    with open_source(str(tmp_path / "a.png")) as source:
        view = open_view(source, scale=0.5)
        assert view.size == (45, 60) and view.downsample == (2.0, 2.0) and view.mpp is None
        whole = np.asarray(Image.fromarray(image).resize((60, 45), Image.Resampling.BILINEAR))
        assert np.abs(view.read(0, 0, 45, 60).astype(int) - whole).max() == 0
        assert np.abs(view.read(10, 20, 35, 40).astype(int) - whole[10:, 20:]).max() <= 1
        with pytest.raises(InputError, match="pixel size"):
            open_view(source, mpp=0.5)


# ------------------------------------------------------------------------------------------------ views


def test_level_view(slide_files, full):
    with open_source(str(slide_files["generic"])) as source:
        view = open_view(source, level=1)
        assert isinstance(view, LevelView)
        assert (view.level, view.size, view.downsample) == (1, (500, 650), (2.0, 2.0))
        assert view.mpp == pytest.approx((0.8, 0.8))
        assert np.array_equal(view.read(10, 20, 30, 40), slides.box_downsample(full, 2)[10:40, 20:60])
        with pytest.raises(InputError) as caught:
            open_view(source, level=3)
        assert "0 (1000×1300), 1 (500×650), 2 (250×325)" in str(caught.value)
        with pytest.raises(InputError):
            open_view(source, level=1, mpp=1.0)
        with pytest.raises(InputError, match="not inside the view"):
            view.read(490, 0, 20, 10)


@pytest.mark.parametrize("mpp, level, size", [(0.8, 0, (625, 812)), (1.0, 1, (500, 650)), (2.0, 2, (250, 325)),
                                              (2.6, 2, (192, 250))])
def test_mpp_view_picks_the_nearest_finer_level(slide_files, full, mpp, level, size):
    with open_source(str(slide_files["ome"])) as source:  # 0.5 µm/px, levels /2
        view = open_view(source, mpp=mpp)
        assert (view.level, view.size) == (level, size)
        assert view.downsample == (1000 / size[0], 1300 / size[1])
        assert view.mpp == pytest.approx((mpp, mpp), rel=2e-3)
        stored = slides.level_images(full, 3, 2)[level]
        whole = np.asarray(Image.fromarray(stored).resize(size[::-1], Image.Resampling.BILINEAR))
        h, w = size
        interior = view.read(h // 4, w // 3, h // 3, w // 4)
        assert np.abs(interior.astype(int) - whole[h // 4:h // 4 + h // 3, w // 3:w // 3 + w // 4]).max() <= 1
        border = view.read(h - 40, w - 50, 40, 50)
        assert np.abs(border.astype(int) - whole[h - 40:, w - 50:]).max() <= 1
        corner = view.read(0, 0, 33, 27)
        assert np.abs(corner.astype(int) - whole[:33, :27]).max() <= 1


def test_mpp_finer_than_level_0_upsamples_with_a_warning(slide_files, caplog):
    with open_source(str(slide_files["svs"])) as source, caplog.at_level(logging.WARNING):
        view = open_view(source, mpp=0.125)
        assert (view.level, view.size, view.downsample) == (0, (2000, 2600), (0.5, 0.5))
        assert "coarser" in caplog.text
        assert view.read(1990, 2590, 10, 10).shape == (10, 10, 3)


# ------------------------------------------------------------------------------------------------ thumbnails


def test_thumbnail_size_downsample_and_box_average(slide_files, full):
    with open_source(str(slide_files["generic"])) as source:  # levels 1, 2, 4
        thumb, downsample = read_thumbnail(source, max_pixels=20_000)
        assert thumb.shape[0] * thumb.shape[1] <= 20_000 and thumb.dtype == np.uint8
        assert downsample == (1000 / thumb.shape[0], 1300 / thumb.shape[1])
        assert 8 < downsample[0] < 8.2  # read from level 2 (/4), box-averaged again
        whole = np.asarray(Image.fromarray(slides.box_downsample(full, 4)[:250, :325]).resize(
            thumb.shape[1::-1], Image.Resampling.BOX))
        assert np.abs(thumb.astype(int) - whole).max() <= 1

        # /8 from level 2 (/4): the 2×2 box mean of level 2, up to rounding (Pillow rounds after each axis)
        thumb, downsample = read_thumbnail(open_view(source, level=1), max_pixels=4_000_000, min_downsample=8)
        assert downsample == (8.0, 1300 / 162)
        thumb, downsample = read_thumbnail(source, max_pixels=125 * 162, min_downsample=8)
        assert thumb.shape == (125, 162, 3)
        # columns are 2.006 level-2 pixels wide: compare the first ones, before the blocks drift apart
        expected = slides.box_downsample(slides.box_downsample(full, 4), 2)
        assert np.abs(thumb[:, :80].astype(int) - expected[:, :80]).max() <= 2

        # at most max_pixels even when that is tiny, and never finer than level 0
        assert read_thumbnail(source, max_pixels=1)[0].shape == (1, 1, 3)
        assert read_thumbnail(source, max_pixels=10**9)[1] == (1.0, 1.0)


def test_thumbnail_blocks_cover_a_fine_level(slide_files, full, monkeypatch):
    from fcnify.heatmap import sources

    monkeypatch.setattr(sources, "_THUMBNAIL_BLOCK", 100)  # many blocks: their seams must not show
    with open_source(str(slide_files["svs"])) as source:
        thumb, downsample = read_thumbnail(source, max_pixels=300_000)
        whole = np.asarray(Image.fromarray(full).resize(thumb.shape[1::-1], Image.Resampling.BOX))
        assert np.abs(thumb.astype(int) - whole).max() <= 1


# ------------------------------------------------------------------------------------------------ openslide


def test_openslide_reads_a_generic_tiff_as_tifffile_does(slide_files):
    pytest.importorskip("openslide")
    path = str(slide_files["bigtiff"])  # levels as pages: OpenSlide's generic-TIFF layout
    with OpenSlideSource(path) as slide, open_source(path) as tiff:
        assert slide.kind == "openslide" and not slide.whole
        assert slide.levels == tiff.levels
        assert slide.mpp == pytest.approx(tiff.mpp)
        for level in range(len(tiff.levels)):
            height, width = tiff.levels[level].size
            assert np.array_equal(slide.read_region(level, 0, 0, height, width),
                                  tiff.read_region(level, 0, 0, height, width))
        assert np.array_equal(slide.read_region(1, 123, 45, 67, 89), tiff.read_region(1, 123, 45, 67, 89))


def test_concurrent_reads_agree(slide_files, full):
    from concurrent.futures import ThreadPoolExecutor

    corners = [(y, x) for y in range(0, 900, 150) for x in range(0, 1200, 170)]
    with open_source(str(slide_files["svs"])) as source, ThreadPoolExecutor(8) as pool:
        regions = list(pool.map(lambda c: source.read_region(0, c[0], c[1], 100, 100), corners))
    for (y, x), region in zip(corners, regions):
        assert np.array_equal(region, full[y:y + 100, x:x + 100])
