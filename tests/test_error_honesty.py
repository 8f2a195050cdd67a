"""Honest errors: bugs are reported as bugs, the caller's model is never changed, errors have their types."""

from __future__ import annotations

import copy
import importlib
import json
import logging
import zipfile

import pytest
import torch
from nets import FlattenStyleNet
from typer.testing import CliRunner

import fcnify.cli as cli
from fcnify.convert import convert
from fcnify.errors import MissingDependencyError, ModelLoadError
from fcnify.export import ModelMetadata
from fcnify.models import load_model
from fcnify.optional import require
from fcnify.verify import verify


def test_verify_leaves_the_callers_model_as_it_was():
    torch.manual_seed(0)
    model = FlattenStyleNet().double().train()
    before = copy.deepcopy(model.state_dict())
    fcn = convert(model, (20, 24))
    fcn_before = {k: v.clone() for k, v in fcn.state_dict().items()}
    fcn_dtype = next(fcn.parameters()).dtype
    report = verify(model, fcn, samples=2, dense_cells=2)
    assert report.passed
    assert model.training and next(model.parameters()).dtype == torch.float64
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(fcn.parameters()).dtype == fcn_dtype
    assert all(torch.equal(fcn_before[k], v) for k, v in fcn.state_dict().items())


def _broken_convert(*args, **kwargs):
    raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")


def test_a_bug_is_a_crash_with_a_report_line_not_a_conversion_error(monkeypatch):
    """An exception fcnify does not mean to raise exits 70 with one 'please report' line; --verbose adds the
    traceback."""
    monkeypatch.setattr(importlib.import_module("fcnify.convert"), "_convert", _broken_convert)
    runner = CliRunner()
    result = runner.invoke(cli.app, ["verify", "digits", "--cells", "0"])
    assert result.exit_code == 70, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "internal error: TypeError" in lines[0] and "please report" in lines[0]
    assert "Traceback" not in result.output
    try:
        verbose = runner.invoke(cli.app, ["--verbose", "verify", "digits", "--cells", "0"])
    finally:
        logging.getLogger("fcnify").setLevel(logging.NOTSET)
    assert verbose.exit_code == 70
    assert "Traceback" in verbose.stderr and "_broken_convert" in verbose.stderr


def test_a_missing_optional_package_names_its_extra():
    with pytest.raises(MissingDependencyError) as info:
        require("fcnify_no_such_package.sub", "ray", "run --engine ray")
    assert info.value.hint == "pip install 'fcnify[ray]'" and info.value.exit_code == 1
    assert "fcnify_no_such_package is not installed: it is needed to run --engine ray" == info.value.message
    with pytest.raises(MissingDependencyError, match="pip install onnxscript"):
        require("onnxscript_missing_for_test", None, "export ONNX")
    assert require("json", None, "anything").dumps([]) == "[]"


# --- metadata of .pt2 and .onnx files: malformed text is one error, never a traceback -------------------------

GOOD = {"input_size": [20, 24], "in_chans": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "labels": ["a", "b"], "geometry": {"stride": [2, 2], "offset": [0, 0], "window": [20, 24],
                                           "receptive_field": [20, 24]}, "source": "x"}
MALFORMED = [
    ("{not json", "not JSON"),
    ("[1, 2]", "a list, not an object"),
    ('{"input_size": [20, 24]}', "no in_chans"),
    (json.dumps({**GOOD, "input_size": "64"}), "input_size '64'"),
    (json.dumps({**GOOD, "input_size": [10**12, 24]}), "input_size"),
    (json.dumps({**GOOD, "in_chans": True}), "in_chans True"),
    (json.dumps({**GOOD, "mean": [0.5]}), "mean [0.5] is not 3 numbers"),
    (json.dumps({**GOOD, "std": [0.25, 0.0, 0.25]}), "std has a value ≤ 0"),
    (json.dumps({**GOOD, "labels": "ab"}), "labels is not a list"),
    (json.dumps({**GOOD, "geometry": {**GOOD["geometry"], "stride": "ab"}}), "geometry.stride 'ab'"),
    (json.dumps({**GOOD, "geometry": {**GOOD["geometry"], "window": [0, 24]}}), "stride or window ≤ 0"),
]


@pytest.mark.parametrize("raw, fragment", MALFORMED)
def test_malformed_metadata_is_one_model_load_error(raw, fragment):
    with pytest.raises(ModelLoadError) as info:
        ModelMetadata.parse(raw, "m.pt2")
    assert fragment in info.value.message and "m.pt2" in info.value.message
    assert "fcnify convert" in info.value.hint


@pytest.mark.slow
def test_malformed_metadata_in_files_through_the_cli(tmp_path):
    """A .pt2 and an .onnx whose fcnify metadata was damaged: exit 1, one line, no traceback."""
    runner = CliRunner()
    good = tmp_path / "good.pt2"
    assert runner.invoke(cli.app, ["convert", "digits", "-o", str(good), "--onnx", str(tmp_path / "good.onnx")]
                         ).exit_code == 0
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, json.dumps({**json.loads(data), "in_chans": "one"}) if
                         info.filename.endswith("extra/fcnify.json") else data)
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(tmp_path / "good.onnx"))
    for prop in model.metadata_props:
        if prop.key == "fcnify":
            prop.value = prop.value.replace('"labels": [', '"labels": 7, "x": [')
    onnx.save(model, str(tmp_path / "bad.onnx"))
    for path, fragment in ((bad, "in_chans 'one'"), (tmp_path / "bad.onnx", "labels is not a list")):
        result = runner.invoke(cli.app, ["heatmap", str(tmp_path / "x.png"), "--model", str(path), "-o",
                                         str(tmp_path / "out")])
        assert result.exit_code == 1, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and fragment in lines[0] and "malformed" in lines[0], lines
        assert "Traceback" not in result.output


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b'{"config": {"w": 3}}'])
def test_a_damaged_pt2_index_is_one_error_before_anything_loads(tmp_path, damage):
    """The trusted-file check reads the archive's tensor indexes itself: damaged ones are a ModelLoadError."""
    good = tmp_path / "good.pt2"
    assert CliRunner().invoke(cli.app, ["convert", "digits", "-o", str(good)]).exit_code == 0
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, damage if info.filename.endswith("data/weights/model_weights_config.json") else data)
    with pytest.raises(ModelLoadError, match="damaged: its entry .*model_weights_config.json"):
        load_model(str(bad))


def test_an_unsafe_pickle_is_one_line_without_library_warnings(tmp_path, monkeypatch):
    """Refusing a pickled module prints the refusal and its hint only: no warning lines from torch.load."""
    torch.save(FlattenStyleNet(), tmp_path / "whole.pt")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["convert", "whole.pt", "--input-size", "20x24"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--trust-model" in lines[0] and "would run code" in lines[0], lines
    assert "Unpickler" not in result.output and "Warning" not in result.output
