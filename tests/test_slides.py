"""Slides end to end through the CLI: streamed stores equal one pass, background is skipped, --mpp picks the
level, kill -9 then --resume equals an uninterrupted run, damaged files give one clear line.

Slides are small synthetic pyramidal TIFFs written tile by tile by ``slides.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from heatmap_helpers import split_heatmap
from PIL import Image, ImageFilter
from slides import corrupt_tile, full_image, truncate_file, write_slide
from typer.testing import CliRunner

from fcnify.cli import app
from fcnify.convert import convert
from fcnify.dense import score_map
from fcnify.images import prepare
from fcnify.models import load_model

runner = CliRunner()
NET = ["--arch", "nets:slide_net", "--input-size", "32"]


@pytest.fixture(scope="module")
def slide_model(tmp_path_factory) -> Path:
    """A state_dict of ``nets.slide_net`` (padded, stride 4, window 32, 3 classes)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import nets

    path = tmp_path_factory.mktemp("model") / "slide_net.pt"
    torch.save(nets.slide_net().state_dict(), path)
    return path


def heatmap(*args: str) -> object:
    result = runner.invoke(app, ["heatmap", *map(str, args)])
    return result


def one_pass(model: Path, image: np.ndarray) -> np.ndarray:
    """The reference: the converted network on the whole image in one pass, as probabilities."""
    loaded = load_model(str(model), arch="nets:slide_net", input_size=32)
    fcn = convert(loaded.module, (32, 32), in_chans=3)
    prepared = prepare(Image.fromarray(image), 3, loaded.mean, loaded.std)
    return score_map(fcn, prepared, fcn.geometry, loaded.labels).scores.numpy()


def receptive_field_inside(shape: tuple[int, int], image_size: tuple[int, int], model: Path) -> np.ndarray:
    loaded = load_model(str(model), arch="nets:slide_net", input_size=32)
    g = convert(loaded.module, (32, 32), in_chans=3).geometry
    inside = np.ones(shape, dtype=bool)
    for axis in range(2):
        q = np.arange(shape[axis])
        lo = q * g.stride[axis] + g.offset[axis] + g.rf_centre[axis] - g.receptive_field[axis] / 2
        hi = lo + g.receptive_field[axis]
        ok = (lo >= 0) & (hi <= image_size[axis])
        inside &= ok[:, None] if axis == 0 else ok[None, :]
    return inside


@pytest.mark.slow
def test_svs_store_equals_one_pass_with_geometry_in_level0_pixels(tmp_path, slide_model):
    size = (600, 760)
    slide = write_slide(tmp_path / "case.svs", size=size, kind="svs", background="white", tile=128, levels=2,
                        mpp=0.25, compression="zlib", seed=1)
    out = tmp_path / "out"
    result = heatmap(slide, "--model", slide_model, *NET, "--tile", "160", "--foreground", "all", "-o", out)
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(out / "case.scores.zarr"), mode="r")
    scores = group["scores"][:]
    reference = one_pass(slide_model, full_image(size, "white", seed=1))
    assert scores.shape == reference.shape
    # Padded network: every cell matches, those whose receptive field lies inside the image certainly.
    inside = receptive_field_inside(scores.shape[1:], size, slide_model)
    assert inside.sum() > 100
    diff = np.abs(scores - reference)
    assert diff[:, inside].max() <= 1e-4 * np.abs(reference).max()
    assert diff.max() <= 1e-4
    attrs = dict(group.attrs)
    assert attrs["stride"] == [4, 4] and attrs["window"] == [32, 32] and attrs["offset"] == [0, 0]
    assert attrs["image_size"] == list(size) and attrs["level"] == 0 and attrs["downsample"] == [1.0, 1.0]
    assert attrs["mpp"] == pytest.approx([0.25, 0.25])
    assert attrs["labels"] == ["0", "1", "2"] and attrs["complete"] is True
    assert group["scores"].chunks == (3, *attrs["tile_cells"])
    assert attrs["tile_grid"][0] * attrs["tile_grid"][1] > 4  # several tiles really ran
    assert sorted(p.name for p in out.iterdir()) == [
        "case.classes.png", "case.heatmap.png", "case.scores.zarr", "summary.parquet"]
    assert split_heatmap(out / "case.heatmap.png")[0].shape == (*size, 3)


def test_background_is_nan_tissue_computed_and_the_mask_saved(tmp_path, slide_model):
    size = (640, 640)
    slide = write_slide(tmp_path / "sparse.svs", size=size, kind="svs", background="white", tile=128, levels=2,
                        mpp=0.5, compression="zlib", seed=4, density=0.3)
    out = tmp_path / "out"
    result = heatmap(slide, "--model", slide_model, *NET, "--tile", "128", "-o", out)
    assert result.exit_code == 0, result.output
    scores = zarr.open_group(str(out / "sparse.scores.zarr"), mode="r")["scores"][:]
    image = full_image(size, "white", seed=4, density=0.3).astype(np.float32)
    computed = np.isfinite(scores).all(axis=0)
    assert np.isnan(scores).all(axis=0)[~computed].all()  # a cell is computed for every class or none
    # Every cell whose window holds clear tissue is computed; cells on flat background are not.
    distance = np.linalg.norm(image - np.median(image.reshape(-1, 3), axis=0), axis=2)
    tissue_windows = np.zeros(computed.shape, dtype=bool)
    empty_windows = np.zeros(computed.shape, dtype=bool)
    for i in range(computed.shape[0]):
        for j in range(computed.shape[1]):
            window = distance[i * 4:i * 4 + 32, j * 4:j * 4 + 32]
            tissue_windows[i, j] = (window > 80).mean() > 0.1
            empty_windows[i, j] = window.max() < 15
    assert tissue_windows.sum() > 50 and empty_windows.sum() > 50
    assert computed[tissue_windows].all()
    # The mask is widened by one thumbnail pixel (window/8 = 4 px) and rounded outwards to thumbnail pixels:
    # only empty windows within that margin of tissue are computed.
    far = ~np.asarray(Image.fromarray(~empty_windows).filter(ImageFilter.MaxFilter(7)), dtype=bool)
    assert far.sum() > 50 and not computed[far].any()
    assert computed[empty_windows].mean() < 0.2
    mask = np.asarray(Image.open(out / "sparse.mask.png"))
    assert mask.dtype == np.uint8 and 0 < (mask > 0).mean() < 0.9
    table = pq.read_table(out / "summary.parquet").to_pylist()[0]
    assert table["tiles_background"] > 0 and table["tiles_computed"] + table["tiles_background"] == table["tiles"]
    assert table["scores_format"] == "zarr" and table["mpp"] == pytest.approx(0.5)


@pytest.mark.slow
def test_black_background_ome_tiff_and_bigtiff(tmp_path, slide_model):
    size = (512, 512)
    ome = write_slide(tmp_path / "fluo.ome.tif", size=size, kind="ome", background="black", tile=128, levels=2,
                      mpp=0.65, compression="zlib", seed=2, density=0.3)
    big = write_slide(tmp_path / "big.tif", size=size, kind="generic", background="black", tile=128, levels=2,
                      mpp=0.65, bigtiff=True, compression="zlib", seed=2, density=0.3)
    out = tmp_path / "out"
    result = heatmap(ome, big, "--model", slide_model, *NET, "--tile", "128", "-o", out)
    assert result.exit_code == 0, result.output
    a = zarr.open_group(str(out / "fluo.scores.zarr"), mode="r")
    b = zarr.open_group(str(out / "big.scores.zarr"), mode="r")
    assert a.attrs["mpp"] == pytest.approx([0.65, 0.65]) and b.attrs["mpp"] == pytest.approx([0.65, 0.65])
    assert a.attrs["foreground"]["kind"] == "black"
    np.testing.assert_array_equal(a["scores"][:], b["scores"][:])  # the same pixels, NaN pattern included
    finite = np.isfinite(a["scores"][0])
    assert 0.05 < finite.mean() < 0.95


def test_mpp_reads_the_nearest_finer_level_resampled(tmp_path, slide_model):
    slide = write_slide(tmp_path / "pyr.svs", size=(1024, 1280), kind="svs", background="white", tile=128,
                        levels=3, mpp=0.25, compression="zlib", seed=5)
    out = tmp_path / "out"
    result = heatmap(slide, "--model", slide_model, *NET, "--mpp", "1.2", "--foreground", "all", "-o", out,
                     "--json")
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(out / "pyr.scores.zarr"), mode="r")
    attrs = dict(group.attrs)
    assert attrs["level"] == 1  # 1.0 µm/px is the nearest level finer than 1.2
    # Level 1 (256×320 at 1.0 µm/px) resampled by 1.0/1.2 to whole pixels: the downsample is exact for the
    # rounded size, and the pixel size is 1.2 µm up to that rounding.
    view_size = (round(256 / 1.2), round(320 / 1.2))
    assert attrs["downsample"] == pytest.approx([1024 / view_size[0], 1280 / view_size[1]])
    assert attrs["mpp"] == pytest.approx([1.2, 1.2], rel=5e-3)
    assert attrs["stride"] == pytest.approx([4 * 1024 / view_size[0], 4 * 1280 / view_size[1]])
    assert attrs["image_size"] == [1024, 1280]
    assert group["scores"].shape[1:] == ((view_size[0] - 32) // 4 + 1, (view_size[1] - 32) // 4 + 1)
    assert np.isfinite(group["scores"][:]).all()


def _done_lines(out: Path) -> int:
    logs = list(out.glob(".*.partial/fcnify-done.log"))
    return len(logs[0].read_text().splitlines()) if logs else 0


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, slide_model):
    slide = write_slide(tmp_path / "long.svs", size=(1024, 1024), kind="svs", background="white", tile=256,
                        levels=2, mpp=0.5, compression="zlib", seed=6, density=0.5)
    args = [str(slide), "--model", str(slide_model), *NET, "--tile", "96", "--foreground", "all",
            "--runtime", "torch"]
    whole = tmp_path / "whole"
    assert heatmap(*args, "-o", whole).exit_code == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    process = subprocess.Popen([sys.executable, "-m", "fcnify", "heatmap", *args, "-o", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _done_lines(out) < 25 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = _done_lines(out)
    assert finished >= 25
    assert not (out / "long.scores.zarr").exists()  # nothing half-written under the final name
    result = heatmap(*args, "-o", out, "--resume", "--json")
    assert result.exit_code == 0, result.output
    row = pq.read_table(out / "summary.parquet").to_pylist()[0]
    assert row["tiles_resumed"] >= finished and row["tiles_computed"] + row["tiles_resumed"] == row["tiles"]
    expected = zarr.open_group(str(whole / "long.scores.zarr"), mode="r")["scores"][:]
    resumed = zarr.open_group(str(out / "long.scores.zarr"), mode="r")["scores"][:]
    # Equal up to float rounding (tiles batch differently after a restart); the same NaN pattern.
    np.testing.assert_allclose(resumed, expected, rtol=0, atol=1e-6)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    # A later run without --resume over finished outputs replaces them whole and leaves no temporaries.
    assert heatmap(*args, "-o", out).exit_code == 0
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_stale_temporaries_are_cleaned_and_a_partial_store_restarted(tmp_path, slide_model):
    slide = write_slide(tmp_path / "s.svs", size=(256, 256), kind="svs", background="white", tile=128, levels=1,
                        mpp=0.5, compression="zlib", seed=7)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".s.heatmap.abcd.tmp.png").write_bytes(b"stale")
    stale_store = out / ".s.scores.zarr.partial"
    stale_store.mkdir()
    (stale_store / "fcnify-done.log").write_text("0\n")
    result = heatmap(slide, "--model", slide_model, *NET, "-o", out)
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert zarr.open_group(str(out / "s.scores.zarr"), mode="r").attrs["complete"] is True


def test_damaged_slides_give_one_line_and_no_output(tmp_path, slide_model):
    good = write_slide(tmp_path / "good.svs", size=(512, 512), kind="svs", background="white", tile=128, levels=1,
                       mpp=0.5, compression="zlib", seed=8, density=0.6)
    truncated = write_slide(tmp_path / "cut.svs", size=(512, 512), kind="svs", background="white", tile=128,
                            levels=1, mpp=0.5, compression="zlib", seed=8, density=0.6)
    truncate_file(truncated, 0.2)
    corrupt = write_slide(tmp_path / "bad.svs", size=(512, 512), kind="svs", background="white", tile=128,
                          levels=1, mpp=0.5, compression="zlib", seed=8, density=0.6)
    corrupt_tile(corrupt, level=0, tile_index=5)
    out = tmp_path / "out"
    result = heatmap(truncated, good, corrupt, "--model", slide_model, *NET, "--foreground", "all", "-o", out)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]  # "[i/n] error: …" without a terminal
    assert len(errors) == 2 and "cut.svs" in errors[0] and "bad.svs" in errors[1], result.output
    assert (out / "good.scores.zarr").is_dir()  # the batch went on past the bad inputs
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(("cut.", "bad.", ".cut.", ".bad."))], names


def test_bomb_guard_refuses_a_big_png_but_not_a_tiled_tiff(tmp_path, slide_model):
    png = tmp_path / "huge.png"
    Image.fromarray(full_image((300, 300), "white", seed=9)).save(png)
    tif = write_slide(tmp_path / "big.tif", size=(300, 300), kind="generic", background="white", tile=128,
                      levels=1, mpp=0.5, compression="zlib", seed=9)
    out = tmp_path / "out"
    result = heatmap(png, tif, "--model", slide_model, *NET, "--max-pixels", "10000", "-o", out)
    assert result.exit_code == 1
    assert "decompression bomb" in result.output and "huge.png" in result.output
    assert (out / "big.scores.zarr").is_dir()


def test_default_flags_just_work_on_a_slide(tmp_path):
    slide = write_slide(tmp_path / "slide.svs", size=(700, 900), kind="svs", background="black", tile=256,
                        levels=2, mpp=0.5, compression="jpeg", seed=10, density=0.2)
    out = tmp_path / "out"
    result = heatmap(slide, "-o", out, "--preview-size", "300")
    assert result.exit_code == 0, result.output
    assert split_heatmap(out / "slide.heatmap.png")[0].shape == (round(700 * 300 / 900), 300, 3)
    group = zarr.open_group(str(out / "slide.scores.zarr"), mode="r")
    assert group["scores"].shape[0] == 11 and group.attrs["stride"] == [4, 4]
    assert (out / "slide.mask.png").is_file()


def _summary(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "summary.parquet").to_pylist(), key=lambda r: r["index"])


def test_photos_compute_every_cell_by_default_slides_skip_their_glass(tmp_path, slide_model):
    """Issue 21/2: a flat light sky is content in a photo: no cell is masked unless --foreground auto is asked
    for; a white-background slide is still masked by default; the table and summary count the masked cells."""
    rng = np.random.default_rng(5)
    photo = np.empty((96, 128, 3), np.uint8)
    photo[:48] = (205, 214, 228)  # a flat, pale blue-grey sky
    ground = rng.integers(0, 256, size=(25, 33, 3), dtype=np.uint8)
    photo[48:] = np.asarray(Image.fromarray(ground).resize((128, 48), Image.Resampling.BILINEAR))
    Image.fromarray(photo).save(tmp_path / "holiday.png")
    slide = write_slide(tmp_path / "glass.svs", size=(384, 384), kind="svs", background="white", tile=128,
                        levels=1, mpp=0.5, compression="zlib", seed=4, density=0.3)
    out = tmp_path / "out"
    result = heatmap(tmp_path / "holiday.png", slide, "--model", slide_model, *NET, "-o", out)
    assert result.exit_code == 0, result.output
    with np.load(out / "holiday.scores.npz") as data:
        assert np.isfinite(data["scores"]).all()
    slide_scores = zarr.open_group(str(out / "glass.scores.zarr"), mode="r")["scores"][:]
    photo_row, slide_row = _summary(out)
    assert photo_row["foreground"] == "all" and photo_row["cells_masked"] == 0 and photo_row["pixels_saved"] == 0
    assert slide_row["foreground"] == "auto"
    assert slide_row["cells_masked"] == int(np.isnan(slide_scores[0]).sum()) > 0
    assert slide_row["masked_fraction"] == pytest.approx(np.isnan(slide_scores[0]).mean())
    assert "masked cells" in result.output and f"{slide_row['cells_masked']} =" in result.output

    asked = tmp_path / "asked"
    result = heatmap(tmp_path / "holiday.png", "--model", slide_model, *NET, "--foreground", "auto", "-o", asked)
    assert result.exit_code == 0, result.output
    with np.load(asked / "holiday.scores.npz") as data:
        scores = data["scores"]
    (row,) = _summary(asked)
    assert row["foreground"] == "auto" and row["cells_masked"] == int(np.isnan(scores[0]).sum()) > 0
    assert np.isfinite(scores[:, -1]).all()  # the textured ground is computed


@pytest.fixture(scope="module")
def sparse_slide(tmp_path_factory) -> Path:
    """2048² at 0.25 µm/px with small scattered tissue (10%): at --mpp 16 the view is 32 px."""
    return write_slide(tmp_path_factory.mktemp("sparse") / "sparse.svs", size=(2048, 2048), kind="svs",
                       background="white", tile=256, levels=3, mpp=0.25, compression="zlib", seed=4, density=0.1)


@pytest.mark.parametrize("mpp", ["8", "16", "100"])
def test_a_coarse_mpp_still_sees_the_tissue(tmp_path, slide_model, sparse_slide, mpp):
    """Issue 21/3: the mask comes from a thumbnail fine enough to see small tissue whatever --mpp is: cells whose
    window holds tissue are computed, and every reported peak lies inside the image."""
    out = tmp_path / "out"
    result = heatmap(sparse_slide, "--model", slide_model, *NET, "--mpp", mpp, "-o", out)
    assert result.exit_code == 0, result.output
    scores = zarr.open_group(str(out / "sparse.scores.zarr"), mode="r")["scores"][:]
    computed = np.isfinite(scores[0])
    assert computed.any()
    (row,) = _summary(out)
    assert row["status"] == "ok" and row["top"]
    for peak in row["top"]:
        assert np.isfinite(peak["score"]) and 0 <= peak["y"] <= 2048 and 0 <= peak["x"] <= 2048
    if mpp == "8":  # 32 level-0 px per view px: a cell's window is 1024 level-0 px
        tissue = full_image((2048, 2048), "white", seed=4, density=0.1).min(axis=2) < 150
        for i in range(scores.shape[1]):
            for j in range(scores.shape[2]):
                window = tissue[i * 128:i * 128 + 1024, j * 128:j * 128 + 1024]
                if window.mean() > 0.01:
                    assert computed[i, j], (i, j)


def test_a_blank_slide_is_a_failed_image_with_a_reason(tmp_path, slide_model):
    """Issue 21/3: an all-NaN map is no result: the image fails with its reason, the batch goes on, exit 1."""
    blank = write_slide(tmp_path / "blank.svs", size=(384, 384), kind="svs", background="white", tile=128,
                        levels=1, mpp=0.5, compression="zlib", seed=4, density=0.0)
    good = write_slide(tmp_path / "good.svs", size=(384, 384), kind="svs", background="white", tile=128,
                       levels=1, mpp=0.5, compression="zlib", seed=4, density=0.3)
    out = tmp_path / "out"
    result = heatmap(blank, good, "--model", slide_model, *NET, "-o", out)
    assert result.exit_code == 1, result.output
    assert "no cell was computed" in result.output and "--foreground all" in result.output
    bad_row, good_row = _summary(out)
    assert bad_row["status"] == "error" and "no cell was computed" in bad_row["error"] and not bad_row["top"]
    assert good_row["status"] == "ok"
    assert not any(p.name.startswith("blank") for p in out.iterdir())
