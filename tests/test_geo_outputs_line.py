"""The CLI's final "outputs in …" line names the Cloud-Optimized GeoTIFF of a georeferenced scene."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fcnify.cli import _written
from fcnify.errors import MissingDependencyError
from fcnify.heatmap.geo import require_rasterio


def test_outputs_line_lists_scores_tif(tmp_path: Path):
    row = SimpleNamespace(status="ok", outputs=(str(tmp_path / "scene.heatmap.png"),
                                                str(tmp_path / "scene.scores.zarr"),
                                                str(tmp_path / "scene.scores.tif")))
    line = _written([row], tmp_path, tmp_path / "summary.parquet")
    assert "1 .scores.tif" in line
    assert line.endswith("summary.parquet")


def test_missing_rasterio_names_the_geo_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rasterio", None)  # import rasterio now raises ImportError, as when not installed
    with pytest.raises(MissingDependencyError) as caught:
        require_rasterio("read a georeferenced scene")
    assert "rasterio is not installed" in str(caught.value)
    assert caught.value.hint == "pip install 'fcnify[geo]'"
