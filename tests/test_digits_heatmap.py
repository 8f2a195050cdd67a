"""The main job end to end with the embedded model: one held-out digit in a scene, its heatmap peaks on it."""

from __future__ import annotations

import numpy as np
import pytest
from heatmap_helpers import split_heatmap
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from fcnify.cli import app
from fcnify.zoo.scenes import render_glyph


@pytest.mark.parametrize("index, top, left", [(1400, 40, 57), (1523, 101, 13), (1777, 9, 150)])
def test_heatmap_peak_lies_within_a_stride_of_the_glyph_centre(tmp_path, index, top, left):
    digits = load_digits()
    label = int(digits.target[index])  # held-out digit
    scene = np.zeros((150, 200), dtype=np.uint8)
    scene[top:top + 24, left:left + 24] = render_glyph(digits.images[index])
    path = tmp_path / "one_digit.png"
    Image.fromarray(scene).convert("RGB").save(path)
    result = CliRunner().invoke(app, ["heatmap", str(path), "-o", str(tmp_path / "out"), "--class", str(label),
                                      "--cmap", "gray", "--alpha", "1",
                                      "--foreground", "auto"])  # a picture: masking only when asked
    assert result.exit_code == 0, result.output
    heat = split_heatmap(tmp_path / "out" / "one_digit.heatmap.png", "L")[0].astype(np.float64)  # no legend
    assert heat.shape == scene.shape
    peak = np.argwhere(heat == heat.max()).mean(axis=0)
    centre = (top + 12, left + 12)
    stride = 4
    assert abs(peak[0] - centre[0]) <= stride and abs(peak[1] - centre[1]) <= stride, (peak, centre)
    with np.load(tmp_path / "out" / "one_digit.scores.npz", allow_pickle=False) as npz:
        scores, labels = npz["scores"], list(npz["labels"])
        i, j = np.unravel_index(np.nanargmax(scores[labels.index(str(label))]), scores.shape[1:])
        window_centre = npz["offset"] + np.array([i, j]) * npz["stride"] + npz["window"] / 2
        assert np.abs(window_centre - centre).max() <= stride
        # The black background is found and skipped: an empty corner is not computed ...
        assert np.isnan(scores[:, 0, 0]).all() and np.isfinite(scores[:, i, j]).all()
    # ... and, computed anyway, it is the background class.
    result = CliRunner().invoke(app, ["heatmap", str(path), "-o", str(tmp_path / "all"), "--foreground", "all"])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "all" / "one_digit.scores.npz", allow_pickle=False) as npz:
        assert npz["scores"][list(npz["labels"]).index("background"), 0, 0] > 0.99
