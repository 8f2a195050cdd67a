"""Model specs, safe loading (nothing from an untrusted file runs), and the standalone .pt2."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import relative_error
from nets import small_cnn
from safetensors.torch import save_file

import fcnify
from fcnify.convert import convert
from fcnify.export import ModelMetadata, inspect_pt2, load_pt2, save_pt2
from fcnify.models import load_model


class FileCreatingPayload:
    """A pickle payload that would create a file when unpickled (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _metadata(fcn) -> ModelMetadata:
    return ModelMetadata(fcn.input_size, fcn.in_chans, (0.5,) * 3, (0.25,) * 3, tuple("abcde"), fcn.geometry,
                         "nets:small_cnn")


@pytest.fixture(scope="module")
def small_pt2(tmp_path_factory) -> Path:
    model = small_cnn().eval()
    fcn = convert(model, (20, 24))
    path = tmp_path_factory.mktemp("pt2") / "small.fcn.pt2"
    save_pt2(fcn, _metadata(fcn), path)
    return path


def test_pt2_runs_with_torch_alone_at_any_size_and_keeps_metadata(small_pt2):
    model = small_cnn().eval()
    program = torch.export.load(small_pt2).module()  # no fcnify involved
    for size, cells in [((20, 24), (1, 1)), ((33, 47), (7, 12)), ((64, 25), (23, 1))]:
        x = torch.randn(2, 3, *size)
        out = program(x)
        assert out.shape == (2, 5, *cells)
        if size == (20, 24):
            assert relative_error(model(x), out.flatten(1)) < 1e-5
    module, meta = load_pt2(small_pt2)
    assert meta.labels == tuple("abcde") and meta.geometry.stride == (2, 2) and meta.input_size == (20, 24)
    loaded = load_model(str(small_pt2))
    assert loaded.converted and loaded.geometry.window == (20, 24)


def test_fcnify_pt2_passes_the_safety_check(small_pt2):
    assert inspect_pt2(small_pt2.read_bytes()).safe


def test_tampered_pt2_is_refused_and_its_payload_never_runs(small_pt2, tmp_path):
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save(FileCreatingPayload(marker), evil)
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(small_pt2) as src, zipfile.ZipFile(tampered, "w") as dst:
        replaced = 0
        for info in src.infolist():
            data = src.read(info.filename)
            if "/data/sample_inputs/" in info.filename:
                data, replaced = evil.getvalue(), replaced + 1
            dst.writestr(info, data)
    assert replaced == 1
    assert not inspect_pt2(tampered.read_bytes()).safe
    with pytest.raises(fcnify.UnsafeModelError, match="sample inputs") as info:
        load_model(str(tampered))
    assert not marker.exists()
    # The message names the archive's entries as the user would see them, not fcnify's temporary file.
    assert ".tmp" not in str(info.value) and "archive/data/sample_inputs" in str(info.value)


def test_pickled_payload_is_refused_naming_what_blocks_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save(FileCreatingPayload(marker), path)
    with pytest.raises(fcnify.UnsafeModelError) as info:
        load_model(str(path))
    assert "open" in info.value.message and "run code" in info.value.message
    assert "--trust-model" in info.value.hint and "--arch" in info.value.hint
    assert not marker.exists()


def test_pickled_module_needs_trust_and_then_converts(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(small_cnn(), path)
    with pytest.raises(fcnify.UnsafeModelError, match=r"needs nets\.FlattenStyleNet, torch\.nn\..*run code"):
        load_model(str(path))
    loaded = load_model(str(path), trust_model=True, input_size="20x24")
    assert loaded.module(torch.randn(1, 3, 20, 24)).shape == (1, 5)


def test_torchscript_needs_trust(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(small_cnn().eval()).save(str(path))
    with pytest.raises(fcnify.UnsafeModelError, match="TorchScript"):
        load_model(str(path))
    loaded = load_model(str(path), trust_model=True)
    assert isinstance(loaded.module, torch.jit.ScriptModule)


def test_state_dict_and_safetensors_with_arch(tmp_path):
    model = small_cnn().eval()
    pth, st = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pth)
    save_file(model.state_dict(), st, metadata={"input_size": "[20, 24]", "labels": '["a","b","c","d","e"]'})
    x = torch.randn(1, 3, 20, 24)
    for path in (pth, st):
        loaded = load_model(str(path), arch="nets:small_cnn_other_seed", input_size="20x24")
        assert torch.equal(loaded.module(x), model(x))
    assert load_model(str(st), arch="nets:small_cnn").labels == tuple("abcde")
    with pytest.raises(fcnify.InputError, match="state_dict"):
        load_model(str(pth))
    with pytest.raises(fcnify.InputError, match="weights only"):
        load_model(str(st))
    with pytest.raises(fcnify.ModelLoadError, match="missing keys"):
        load_model(str(pth), arch="torchvision:resnet18")


def test_library_specs_and_metadata():
    loaded = load_model("torchvision:resnet18", weights="none")
    assert loaded.input_size == (224, 224) and len(loaded.labels) == 1000 and loaded.labels[0] == "tench"
    assert loaded.mean == pytest.approx((0.485, 0.456, 0.406))
    assert load_model("torchvision:inception_v3", weights="none").input_size == (299, 299)
    timm_loaded = load_model("timm:resnet18", weights="none")
    assert timm_loaded.input_size == (224, 224) and len(timm_loaded.labels) == 1000
    digits = load_model()
    assert digits.labels[-1] == "background" and digits.input_size == (32, 32) and digits.in_chans == 1
    with pytest.raises(fcnify.ModelLoadError, match="resnet18"):
        load_model("torchvision:resnet81", weights="none")
    with pytest.raises(fcnify.InputError, match="no such file"):
        load_model("missing.pth")


def test_default_weights_fail_clearly_offline(monkeypatch, tmp_path):
    # This machine cannot download; the library's own call fails and fcnify explains the ways on.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-such-torch-home"))
    with pytest.raises(fcnify.ModelLoadError) as info:
        load_model("torchvision:squeezenet1_1")
    assert "--weights" in info.value.hint
