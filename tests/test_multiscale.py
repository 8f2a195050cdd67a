"""fcnify.heatmap.multiscale (image pyramid) and the CLI options for tiling, output stride and scales."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fcnify.cli import app
from fcnify.convert import convert
from fcnify.dense import score_map
from fcnify.errors import InputError
from fcnify.heatmap.multiscale import multiscale_map, parse_scales, reference_scale, resample_to
from fcnify.images import PreparedImage
from fcnify.zoo.digits import DIGITS_LABELS, DigitsNet

runner = CliRunner()


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(6)
    return convert(DigitsNet().eval(), 32)


def pyramid(fcn, x: torch.Tensor, scales, combine: str = "mean"):
    """``multiscale_map`` of a plain C×H×W tensor, each scale computed by ``dense.score_map`` in one pass."""
    size = (int(x.shape[1]), int(x.shape[2]))
    prepared = PreparedImage(x, size, 1.0, size, False)
    return multiscale_map(lambda t: score_map(fcn, t, fcn.geometry, DIGITS_LABELS).logits, prepared, fcn.geometry,
                          DIGITS_LABELS, scales, combine)


def test_pyramid_shapes_and_combination(digits):
    x = torch.randn(1, 80, 96)
    mean = pyramid(digits, x, (0.5, 1, 2))
    one = score_map(digits, x, digits.geometry, DIGITS_LABELS)
    assert mean.map_size == one.map_size  # the grid of scale 1
    assert mean.stride == (4, 4) and mean.window == (32, 32)
    extra = mean.extra
    assert list(extra["scales"]) == [0.5, 1.0, 2.0]
    assert extra["scores_by_scale"].shape == (3, 11, *one.map_size)
    assert extra["scores_scale_1"].shape == (11, *one.map_size)
    assert extra["scores_scale_2"].shape == (11, (160 - 32) // 4 + 1, (192 - 32) // 4 + 1)
    assert tuple(extra["stride_scale_2"]) == (2.0, 2.0) and tuple(extra["window_scale_0.5"]) == (64.0, 64.0)
    # Scale 1 resampled onto its own grid is itself; the combination is the mean of the resampled maps.
    np.testing.assert_allclose(extra["scores_by_scale"][1], one.scores.numpy(), atol=1e-6)
    np.testing.assert_allclose(mean.scores.numpy(), extra["scores_by_scale"].mean(0), atol=1e-6)
    np.testing.assert_allclose(mean.scores.sum(0).numpy(), 1.0, atol=1e-5)
    top = pyramid(digits, x, (0.5, 1, 2), combine="max")
    np.testing.assert_allclose(top.scores.numpy(), extra["scores_by_scale"].max(0), atol=1e-6)


def test_small_scales_are_skipped_and_none_fitting_is_refused(digits, caplog):
    x = torch.randn(1, 40, 50)
    with caplog.at_level(logging.INFO, logger="fcnify"):
        result = pyramid(digits, x, (0.5, 2))
    assert list(result.extra["scales"]) == [2.0]  # 0.5 would be 20x25, below the 32x32 window
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        "scale 0.5 skipped: the image would be 20x25, smaller than the 32x32 window"]
    assert result.stride == (2.0, 2.0)  # no scale 1: the grid of the first scale kept
    with pytest.raises(InputError, match="window"):
        pyramid(digits, x, (0.25, 0.5))


def test_resampling_and_parsing():
    class Grid:
        def __init__(self, stride, offset, window, size):
            self.stride, self.offset, self.window, self.map_size = stride, offset, window, size

    values = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    same = Grid((4, 4), (0, 0), (32, 32), (3, 4))
    assert torch.allclose(resample_to(values, same, same), values)
    half = Grid((2, 2), (0, 0), (32, 32), (5, 7))  # every other cell lies half-way between source cells
    out = resample_to(values, same, half)
    assert torch.allclose(out[0, ::2, ::2], values[0]) and torch.isclose(out[0, 0, 1], torch.tensor(0.5))
    assert parse_scales("0.5, 1,2") == (0.5, 1.0, 2.0) and reference_scale((0.5, 2)) == 0.5
    for bad in ("a,b", "0,1", "1,1", ""):
        with pytest.raises(InputError):
            parse_scales(bad)


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from pathlib import Path

    path = tmp_path_factory.mktemp("scene") / "scene.png"
    sample = Path(__file__).parent.parent / "sample_images" / "digits_scene_1.png"
    Image.open(sample).convert("RGB").crop((0, 0, 128, 96)).save(path)
    return path


def heatmap(scene, outdir, *options):
    result = runner.invoke(app, ["heatmap", str(scene), "-o", str(outdir), "--json", "--device", "cpu",
                                 *map(str, options)], catch_exceptions=False)
    return result


def load(outdir):
    return np.load(outdir / "scene.scores.npz")


@pytest.mark.slow
def test_cli_tile_output_stride_scales(scene, tmp_path):
    """Through ``fcnify heatmap``: tiles equal one pass, a finer output stride interleaves the native map, and
    --scales writes the pyramid (every cell computed: ``--foreground all``)."""
    plain = heatmap(scene, tmp_path / "plain", "--foreground", "all")
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["rows"][0]["tiles"] == 1
    reference = load(tmp_path / "plain")["logits"]
    assert reference.shape == (11, (96 - 32) // 4 + 1, (128 - 32) // 4 + 1) and np.isfinite(reference).all()
    tiled = heatmap(scene, tmp_path / "tiled", "--tile", 48, "--foreground", "all")
    assert tiled.exit_code == 0, tiled.output
    assert json.loads(tiled.stdout)["rows"][0]["tiles"] == 4 * 5  # 5 cells of 4 px per 48 px tile
    np.testing.assert_allclose(load(tmp_path / "tiled")["logits"], reference, rtol=1e-4, atol=1e-4)
    budget = heatmap(scene, tmp_path / "budget", "--max-memory", "1GB", "--foreground", "all")
    assert budget.exit_code == 0, budget.output
    np.testing.assert_allclose(load(tmp_path / "budget")["logits"], reference, rtol=1e-4, atol=1e-4)
    fine = heatmap(scene, tmp_path / "fine", "--output-stride", 2, "--tile", 64, "--foreground", "all")
    assert fine.exit_code == 0, fine.output
    assert json.loads(fine.stdout)["rows"][0]["tiles"] > 1
    data = load(tmp_path / "fine")
    assert tuple(data["stride"]) == (2, 2) and tuple(data["window"]) == (32, 32)
    assert data["logits"].shape[1:] == ((96 - 32) // 2 + 1, (128 - 32) // 2 + 1)
    np.testing.assert_allclose(data["logits"][:, ::2, ::2], reference, rtol=1e-4, atol=1e-4)
    multi = heatmap(scene, tmp_path / "multi", "--scales", "0.5,1,2", "--combine", "max", "--foreground", "all")
    assert multi.exit_code == 0, multi.output
    data = load(tmp_path / "multi")
    assert list(data["scales"]) == [0.5, 1.0, 2.0]
    assert data["scores_scale_0.5"].shape == (11, (48 - 32) // 4 + 1, (64 - 32) // 4 + 1)
    assert data["scores_scale_2"].shape == (11, (192 - 32) // 4 + 1, (256 - 32) // 4 + 1)
    np.testing.assert_allclose(data["scores_scale_1"], load(tmp_path / "plain")["scores"], atol=1e-5)
    np.testing.assert_allclose(data["scores"], data["scores_by_scale"].max(0), atol=1e-6)
    row = json.loads(multi.stdout)["rows"][0]
    assert tuple(row["map_size"]) == data["scores"].shape[1:] == load(tmp_path / "plain")["scores"].shape[1:]


def test_cli_rejects_bad_options(scene, tmp_path):
    for options, code, fragment in (
        (("--tile", "huge"), 1, "--tile"),
        (("--max-memory", "lots"), 1, "--max-memory"),
        (("--combine", "median"), 1, "--combine"),
        (("--scales", "0,1"), 1, "--scales"),
        (("--output-stride", 3), 4, "does not divide"),
        (("--tile", 8), 1, "receptive field"),
    ):
        result = heatmap(scene, tmp_path / "bad", *options)
        assert result.exit_code == code, (options, result.output)
        assert fragment in result.output, (options, result.output)
