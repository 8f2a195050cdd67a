"""issue 18: heatmaps of a model with several outputs — ``--output`` picks the map, the note names the outputs
once per job, the selection is recorded in summary.parquet and the score files, tiles equal one pass."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import wild_models as wild
from PIL import Image
from typer.testing import CliRunner

from fcnify.cli import app
from fcnify.convert import convert

runner = CliRunner()
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def cascade(tmp_path, monkeypatch):
    """The cascade net's weights, two images (one size not a multiple of its stride) and its one-pass maps."""
    monkeypatch.chdir(tmp_path)
    model = wild.cascade_rnet()
    torch.save(model.state_dict(), "rnet.pth")
    fcn = convert(model, 24)
    rng = np.random.default_rng(0)
    expected = {}
    for name, size in (("a", (61, 75)), ("b", (48, 56))):
        small = rng.integers(0, 256, size=(size[0] // 3, size[1] // 3, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size[::-1]).save(f"{name}.png")
        x = torch.from_numpy(np.asarray(Image.open(f"{name}.png").convert("RGB"), np.float32)).permute(2, 0, 1)
        x = (x / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        with torch.no_grad():
            expected[name] = {k: torch.softmax(v[0], dim=0).numpy() for k, v in fcn.maps(x[None]).items()}
    return fcn, expected


COMMON = ["--arch", "wild_models:cascade_rnet", "--input-size", "24", "--mean", "0.5", "--std", "0.25",
          "--foreground", "all", "--formats", "scores"]


@pytest.mark.parametrize("output, name", [("1", "1"), (None, "0")])
def test_output_picks_the_map_and_is_recorded(cascade, output, name):
    fcn, expected = cascade
    picked = ["--output", output] if output else []
    result = invoke("heatmap", "a.png", "b.png", "-m", "rnet.pth", *COMMON, *picked, "-o", "out", "--json")
    assert result.exit_code == 0, result.output
    note = "outputs: 0 (4 ch), 1 (2 ch); using 0 — pick another with --output 0|1"
    assert result.stderr.count(note) == (0 if output else 1)  # once per job, not per image
    for image in ("a", "b"):
        with np.load(f"out/{image}.scores.npz") as data:
            scores = data["scores"]
        assert scores.shape == expected[image][name].shape
        np.testing.assert_allclose(scores, expected[image][name], atol=1e-5, rtol=0)
    summary = pq.read_table("out/summary.parquet").to_pylist()
    assert [r["output"] for r in summary] == [name, name]
    assert all(r["output_names"] == ["0", "1"] for r in summary)


def test_tiles_of_the_selected_output_equal_one_pass_and_zarr_records_it(cascade):
    fcn, expected = cascade
    result = invoke("heatmap", "a.png", "-m", "rnet.pth", *COMMON, "--output", "1", "--tile", "40", "--scores",
                    "zarr", "-o", "tiles", "--json")
    assert result.exit_code == 0, result.output
    import zarr

    store = zarr.open_group("tiles/a.scores.zarr", mode="r")
    scores = np.asarray(store["scores"])
    np.testing.assert_allclose(scores, expected["a"]["1"], atol=1e-5, rtol=0)
    attrs = json.loads(json.dumps(dict(store.attrs)))
    assert "output" in json.dumps(attrs) and '"output_names": ["0", "1"]' in json.dumps(attrs)
    summary = pq.read_table("tiles/summary.parquet").to_pylist()
    assert summary[0]["output"] == "1" and summary[0]["tiles"] > 1


def test_an_unknown_output_is_one_line(cascade):
    result = invoke("heatmap", "a.png", "-m", "rnet.pth", *COMMON, "--output", "bbox", "-o", "bad")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--output 0|1" in " ".join(result.output.split())
