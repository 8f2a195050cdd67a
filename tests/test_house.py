"""Honest errors: bugs are reported as bugs, the caller's model is never changed, errors have their types."""

from __future__ import annotations

import copy
import importlib
import logging

import pytest
import torch
from nets import FlattenStyleNet
from typer.testing import CliRunner

import fcnify.cli as cli
from fcnify.convert import convert
from fcnify.errors import MissingDependencyError
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
