"""Expanding what the user names into inputs: fcnify's own outputs and output folders are never inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnify.errors import InputError
from fcnify.heatmap.outputs import is_output_name
from fcnify.inputs import expand_inputs


def _photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("name, output", [
    ("x.heatmap.png", True), ("x.heatmap.cat.png", True), ("x.classes.png", True), ("x.mask.png", True),
    ("x.heatmap.ome.tif", True), ("x.heatmap.dog_2.ome.tif", True), ("x.scores.npz", True), ("x.geojson", True),
    ("x.png", False), ("heatmap.png", False), ("x.ome.tif", False), ("my.photo.jpg", False), ("mask.png", False),
])
def test_output_names_are_recognised(name, output):
    assert is_output_name(name) is output


def test_a_folder_run_twice_does_not_read_its_own_outputs(tmp_path):
    photo = _photo(tmp_path / "x.png")
    for name in ("x.heatmap.png", "x.classes.png", "x.mask.png", "x.heatmap.ome.tif"):
        _photo(tmp_path / "fcnify-out" / name)
    _photo(tmp_path / "fcnify-out" / "unrelated.png")  # in an output folder (a summary is there): never an input
    (tmp_path / "fcnify-out" / "summary.parquet").write_bytes(b"")
    _photo(tmp_path / "other-out" / "y.png")  # the -o folder of this run, inside the folder named
    _photo(tmp_path / "x.heatmap.png")  # beside the image, when -o was the image's folder
    found = expand_inputs([str(tmp_path)], outdir=tmp_path / "other-out")
    assert found.paths == [str(photo)]
    assert found.skipped == 7


def test_outputs_in_the_folder_named_itself_are_skipped_but_its_images_kept(tmp_path):
    photo = _photo(tmp_path / "a.png")
    _photo(tmp_path / "a.heatmap.png")
    (tmp_path / "summary.parquet").write_bytes(b"")
    found = expand_inputs([str(tmp_path)], outdir=tmp_path)
    assert found.paths == [str(photo)] and found.skipped == 1
    globbed = expand_inputs([str(tmp_path / "*.png")], outdir=tmp_path)
    assert globbed.paths == [str(photo)] and globbed.skipped == 1


def test_a_folder_of_outputs_only_is_an_error_that_says_so(tmp_path):
    _photo(tmp_path / "out" / "a.heatmap.png")
    (tmp_path / "out" / "summary.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="fcnify's own outputs"):
        expand_inputs([str(tmp_path / "out")])
