"""issue 18: the score files of a model with several outputs store every output — ``scores`` is the selected
one's probabilities, each other output an ``output.<name>`` array of its raw values on its own grid (npz and zarr,
one pass and tile by tile, resumed) — and ``--labels`` counts the selected output's channels."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import torch
import wild_models as wild
import zarr
from typer.testing import CliRunner

from fcnify.cli import app
from fcnify.convert import convert

runner = CliRunner()
MEAN, STD = 0.5, 0.25
RTOL, ATOL = 1e-4, 1e-5
MODELS = {"LogitsAndEmbedding": 16, "DictHeads": 16, "FourAndTwo": 16}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def common(model: str) -> list[str]:
    return ["-m", f"{model}.pth", "--arch", f"wild_models:{model}", "--input-size", str(MODELS[model]),
            "--mean", str(MEAN), "--std", str(STD), "--foreground", "all", "--formats", "scores"]


@pytest.fixture()
def scene(tmp_path, monkeypatch):
    """Weights of the wild models, a 70×90 RGB picture in a tiled TIFF, and each model's converted network."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, size=(35, 45, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    tifffile.imwrite("a.tif", image, tile=(32, 32), photometric="rgb")
    x = (torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1) / 255 - MEAN) / STD
    nets = {}
    for name, size in MODELS.items():
        model = wild.build(name)
        torch.save(model.state_dict(), f"{name}.pth")
        nets[name] = convert(model, size)
    return nets, x[None]


def one_pass(fcn, x) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {name: value[0].numpy() for name, value in fcn.maps(x).items()}


def check_geometry(attrs: dict, geometry, channels: int) -> None:
    for key in ("stride", "offset", "window"):
        assert list(attrs[key]) == [int(v) for v in getattr(geometry, key)], key
    assert attrs["labels"] == [str(k) for k in range(channels)] and attrs["values"] == "raw"


@pytest.mark.parametrize("model, picked", [("LogitsAndEmbedding", None), ("DictHeads", "embedding")])
def test_npz_stores_every_output(scene, model, picked):
    nets, x = scene
    fcn = nets[model].select(picked)
    expected = one_pass(fcn, x)
    choose = ["--output", picked] if picked else []
    result = invoke("heatmap", "a.tif", *common(model), *choose, "--scores", "npz", "-o", "out")
    assert result.exit_code == 0, result.output
    with np.load("out/a.scores.npz") as data:
        attrs = json.loads(str(data["attributes"]))
        others = {key: data[key] for key in data.files if key.startswith("output.")}
        selected = data["scores"]
    np.testing.assert_allclose(selected, torch.softmax(torch.from_numpy(expected[fcn.selected]), 0).numpy(),
                               rtol=RTOL, atol=ATOL)
    assert sorted(others) == sorted(f"output.{n}" for n in fcn.output_names if n != fcn.selected)
    for name in fcn.output_names:
        if name == fcn.selected:
            continue
        values = others[f"output.{name}"]
        assert values.shape == expected[name].shape and values.dtype == np.float32
        np.testing.assert_allclose(values, expected[name], rtol=RTOL, atol=ATOL)
        described = attrs["output_arrays"][name]
        assert described["array"] == f"output.{name}" and described["map_size"] == list(values.shape[1:])
        check_geometry(described, fcn.geometries[name], fcn.channels[name])


def test_zarr_tiles_store_every_output_on_its_own_grid(scene):
    """The embedding head branches at stride 2, the logits at stride 4: the tiles (of the logits) give each
    output its own cells, equal to one pass."""
    nets, x = scene
    fcn = nets["LogitsAndEmbedding"]
    assert fcn.geometries["0"].stride != fcn.geometries["1"].stride
    expected = one_pass(fcn, x)
    result = invoke("heatmap", "a.tif", *common("LogitsAndEmbedding"), "--tile", "40", "--scores", "zarr", "-o",
                    "tiles")
    assert result.exit_code == 0, result.output
    assert pq.read_table("tiles/summary.parquet").to_pylist()[0]["tiles"] > 1
    group = zarr.open_group("tiles/a.scores.zarr", mode="r")
    assert sorted(group.keys()) == ["output.1", "scores", "tiles"]
    np.testing.assert_allclose(np.asarray(group["scores"]),
                               torch.softmax(torch.from_numpy(expected["0"]), 0).numpy(), rtol=RTOL, atol=ATOL)
    embedding = group["output.1"]
    assert embedding.shape == expected["1"].shape
    np.testing.assert_allclose(np.asarray(embedding), expected["1"], rtol=RTOL, atol=ATOL)
    check_geometry(dict(embedding.attrs), fcn.geometries["1"], 4)
    assert group.attrs["output_arrays"]["1"]["stride"] == [2, 2] and group.attrs["outputs_left_out"] == {}


def test_an_output_whose_cells_cannot_follow_the_tiles_is_left_out_and_named(scene, caplog):
    nets, x = scene
    fcn = nets["LogitsAndEmbedding"].select("1")  # the stride-2 map selected: the stride-4 one cannot follow
    expected = one_pass(fcn, x)
    tiled = invoke("heatmap", "a.tif", *common("LogitsAndEmbedding"), "--output", "1", "--tile", "40",
                   "--scores", "zarr", "-o", "tiled")
    assert tiled.exit_code == 0, tiled.output
    assert "output 0 is left out of the score file: its stride 4x4 does not divide" in caplog.text
    group = zarr.open_group("tiled/a.scores.zarr", mode="r")
    assert "output.0" not in group and "does not divide" in group.attrs["outputs_left_out"]["0"]
    np.testing.assert_allclose(np.asarray(group["scores"]), torch.softmax(torch.from_numpy(expected["1"]), 0),
                               rtol=RTOL, atol=ATOL)
    # In one tile it is the one-pass map.
    whole = invoke("heatmap", "a.tif", *common("LogitsAndEmbedding"), "--output", "1", "--scores", "npz", "-o",
                   "whole")
    assert whole.exit_code == 0, whole.output
    with np.load("whole/a.scores.npz") as data:
        np.testing.assert_allclose(data["output.0"], expected["0"], rtol=RTOL, atol=ATOL)


def test_a_resumed_store_keeps_the_other_outputs(scene):
    nets, x = scene
    expected = one_pass(nets["LogitsAndEmbedding"], x)
    args = ["heatmap", "a.tif", *common("LogitsAndEmbedding"), "--tile", "40", "--scores", "zarr", "-o", "run"]
    assert invoke(*args).exit_code == 0
    # A run killed after 4 of 9 tiles: the partial store, its log naming tiles 0-3, the rest never written.
    partial = "run/.a.scores.zarr.partial"
    shutil.move("run/a.scores.zarr", partial)
    group = zarr.open_group(partial, mode="r+")
    grid = group.attrs["output_arrays"]["1"]
    assert grid["map_size"] == list(expected["1"].shape[1:])
    del group["tiles"]
    group.attrs["complete"] = False
    cells = group.attrs["tile_cells"]
    group["scores"][:, cells[0]:, :] = np.nan  # tiles 3.. of a 3×3 grid start at row 1
    group["output.1"][:, 2 * cells[0]:, :] = np.nan
    with open(f"{partial}/fcnify-done.log", "w") as log:
        log.write("0\n1\n2\n")
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    row = pq.read_table("run/summary.parquet").to_pylist()[0]
    assert row["tiles_resumed"] == 3 and row["tiles_computed"] == 6
    store = zarr.open_group("run/a.scores.zarr", mode="r")
    np.testing.assert_allclose(np.asarray(store["output.1"]), expected["1"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(store["scores"]), torch.softmax(torch.from_numpy(expected["0"]), 0),
                               rtol=RTOL, atol=ATOL)


def test_a_single_output_model_writes_only_scores(scene, tmp_path):
    model = wild.build("TwoClassWrapper")
    torch.save(model.state_dict(), "single.pth")
    args = ["-m", "single.pth", "--arch", "wild_models:TwoClassWrapper", "--input-size", "16", "--foreground", "all",
            "--formats", "scores"]
    assert invoke("heatmap", "a.tif", *args, "--scores", "npz", "-o", "one").exit_code == 0
    with np.load("one/a.scores.npz") as data:
        assert not [k for k in data.files if k.startswith("output.")]
        assert "output_arrays" not in json.loads(str(data["attributes"]))
    assert invoke("heatmap", "a.tif", *args, "--tile", "40", "--scores", "zarr", "-o", "two").exit_code == 0
    group = zarr.open_group("two/a.scores.zarr", mode="r")
    assert sorted(group.keys()) == ["scores", "tiles"] and "output_arrays" not in group.attrs


def one_line_error(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output
    return " ".join(result.output.split())


def test_labels_count_the_selected_output_not_the_last_linear(scene):
    """``FourAndTwo``: output 0 has 2 channels, output 1 (its last-defined Linear) 4."""
    base = ["FourAndTwo.pth", "--arch", "wild_models:FourAndTwo", "--input-size", "16"]
    two = invoke("convert", *base, "--labels", "a,b", "-o", "two.pt2")
    assert two.exit_code == 0, two.output
    assert "has 2 classes" in one_line_error(invoke("convert", *base, "--labels", "a,b,c,d", "-o", "x.pt2"))
    four = invoke("convert", *base, "--output", "1", "--labels", "a,b,c,d", "-o", "four.pt2")
    assert four.exit_code == 0, four.output
    assert "has 4 classes" in one_line_error(invoke("convert", *base, "--output", "1", "--labels", "a,b", "-o",
                                                    "y.pt2"))
    heat = ["heatmap", "a.tif", *common("FourAndTwo"), "--scores", "npz"]
    assert invoke(*heat, "--labels", "a,b", "-o", "h2").exit_code == 0
    with np.load("h2/a.scores.npz") as data:
        assert data["labels"].tolist() == ["a", "b"] and data["output.1"].shape[0] == 4
    assert "has 2 classes" in one_line_error(invoke(*heat, "--labels", "a,b,c,d", "-o", "h3"))
    assert invoke(*heat, "--output", "1", "--labels", "a,b,c,d", "-o", "h4").exit_code == 0
    with np.load("h4/a.scores.npz") as data:
        assert data["labels"].tolist() == ["a", "b", "c", "d"] and data["output.0"].shape[0] == 2
    assert "has 4 classes" in one_line_error(invoke(*heat, "--output", "1", "--labels", "a,b", "-o", "h5"))


def test_converted_files_store_every_output_too(scene):
    """A ``.pt2`` (PyTorch) and an ``.onnx`` (onnxruntime) of the two-stride model, tiled into a zarr store."""
    nets, x = scene
    expected = one_pass(nets["LogitsAndEmbedding"], x)
    converted = invoke("convert", "LogitsAndEmbedding.pth", "--arch", "wild_models:LogitsAndEmbedding",
                       "--input-size", "16", "--mean", str(MEAN), "--std", str(STD), "-o", "le.pt2", "--onnx",
                       "le.onnx")
    assert converted.exit_code == 0, converted.output
    for model in ("le.pt2", "le.onnx"):
        result = invoke("heatmap", "a.tif", "-m", model, "--foreground", "all", "--formats", "scores", "--tile", "40",
                        "--scores", "zarr", "-o", f"out-{model}")
        assert result.exit_code == 0, result.output
        group = zarr.open_group(f"out-{model}/a.scores.zarr", mode="r")
        np.testing.assert_allclose(np.asarray(group["output.1"]), expected["1"], rtol=RTOL, atol=ATOL)
        check_geometry(dict(group["output.1"].attrs), nets["LogitsAndEmbedding"].geometries["1"], 4)
