"""The synthetic slides' one-sided layout (``write_slide(tissue_width=…)``): glass as one contiguous region."""

from __future__ import annotations

import numpy as np
import tifffile
from slides import tissue_tile, write_slide


def test_tissue_width_leaves_glass_to_the_right(tmp_path):
    path = write_slide(tmp_path / "s.svs", (256, 512), compression=None, levels=1, density=1.0, tissue_width=0.6,
                       thumbnail=False, label_macro=False)
    pixels = tifffile.imread(path)
    edge = round(0.6 * 512)
    assert np.array_equal(pixels[:, edge:], tissue_tile(0, edge, 256, 512 - edge, "white", 0, 0.0))  # glass only
    assert np.array_equal(pixels[:, :edge], tissue_tile(0, 0, 256, edge, "white", 0, 1.0))  # tissue untouched
    assert pixels[:, edge:].min() >= 230 and pixels[:, :edge].mean() < 200
