"""ONNX export: dynamic sizes, runtime agreement with PyTorch, metadata, OnnxNet, and the refusals."""

from __future__ import annotations

import copy
import json
import sys

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcnify.convert import FullyConvolutionalNet, convert
from fcnify.convert.geometry import Geometry
from fcnify.errors import ExportError, ModelLoadError, NotEquivalentError, OutputError
from fcnify.export import ModelMetadata
from fcnify.onnx_export import check_sizes, export_onnx, size_problems, verify_onnx
from fcnify.onnx_runtime import OnnxNet, load_onnx_model, read_metadata

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class SmallCNN(nn.Module):
    """Padding-free CNN with a flatten → Linear head (a stand-in for the embedded digits model)."""

    def __init__(self, in_chans: int = 3, size=(20, 24), classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_chans, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3),
                                      nn.ReLU())
        h, w = (size[0] - 2) // 2 - 2, (size[1] - 2) // 2 - 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * h * w, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def _small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN().eval()


def _torchvision(name: str):
    import torchvision

    def build():
        torch.manual_seed(0)
        return getattr(torchvision.models, name)(weights=None).eval()
    return build


def _digits():
    from fcnify.zoo import load_digits_model

    return load_digits_model()


# name: (factory, training size, channels)
ARCHS = {
    "small_cnn": (_small, (20, 24), 3),
    "resnet18": (_torchvision("resnet18"), (64, 64), 3),
    "mobilenet_v3_small": (_torchvision("mobilenet_v3_small"), (64, 64), 3),
    "squeezenet1_1": (_torchvision("squeezenet1_1"), (64, 64), 3),
}
try:
    from fcnify.zoo import load_digits_model  # noqa: F401

    ARCHS["digits"] = (_digits, (32, 32), 1)
except ImportError:  # the embedded model is optional for this module
    pass


def _metadata(fcn: FullyConvolutionalNet, source: str, classes: int) -> ModelMetadata:
    mean, std = IMAGENET if fcn.in_chans == 3 else ((0.1,), (0.3,))
    return ModelMetadata(fcn.input_size, fcn.in_chans, mean, std, tuple(f"class {i}" for i in range(classes)),
                         fcn.geometry, source)


def _relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export each architecture once (per test module); returns name → (model, fcn, metadata, report)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            factory, size, chans = ARCHS[name]
            model = factory()
            fcn = convert(model, size, chans)
            with torch.no_grad():
                classes = model(torch.zeros(1, chans, *size)).shape[1]
            meta = _metadata(fcn, f"test:{name}", classes)
            path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
            cache[name] = (model, fcn, meta, export_onnx(fcn, meta, path))
        return cache[name]
    return get


# ----------------------------------------------------------------------------------------- architectures


# The torchvision exports take 8-11 s each: slow (make test runs them; make test-fast keeps the small ones).
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("resnet18", "mobilenet_v3_small",
                                                                                    "squeezenet1_1") else n
                                  for n in ARCHS])
def test_export_agrees_with_pytorch_at_dynamic_sizes(exported, name):
    model, fcn, meta, report = exported(name)
    assert report.path.is_file() and report.passed
    assert report.exporter == "dynamo" and report.opset >= 18
    sizes = [c.input_size for c in report.checks]
    (h, w), (sy, sx) = fcn.input_size, fcn.geometry.stride
    assert sizes[0] == (h, w)
    assert any(a != b for a, b in sizes[1:]), "a non-square size is checked"
    assert any((a - h) % sy or (b - w) % sx for a, b in sizes[1:]) or (sy, sx) == (1, 1)
    assert all(a >= h and b >= w for a, b in sizes) and len(sizes) >= 3
    for check in report.checks:
        assert check.max_rel_error < 1e-4
        with torch.no_grad():
            assert check.output_size == tuple(fcn(torch.zeros(1, fcn.in_chans, *check.input_size)).shape[2:])

    graph = onnx.load(str(report.path), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"] and dims[1].dim_value == fcn.in_chans
    out = graph.output[0].type.tensor_type.shape.dim
    assert out[0].dim_param == "batch" and out[2].dim_param and out[3].dim_param

    # OnnxNet in place of the torch FCN, at a size none of the checks used, batch 3.
    net = load_onnx_model(report.path).module
    x = torch.randn(3, fcn.in_chans, h + 3 * sy + 2, w + sx + 3)
    with torch.no_grad():
        expected = fcn(x)
    got = net(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert _relative_error(expected, got) < 1e-4

    # At the training size the one-cell map is the original classifier's logits.
    x = torch.randn(2, fcn.in_chans, h, w)
    with torch.no_grad():
        logits = model(x)
    assert _relative_error(logits, net(x).flatten(1)) < 1e-4


def test_metadata_round_trips(exported):
    _, fcn, meta, report = exported("small_cnn")
    props = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert json.loads(props["input_size"]) == [20, 24]
    assert json.loads(props["geometry"]) == fcn.geometry.to_dict()
    assert json.loads(props["labels"]) == list(meta.labels)
    assert json.loads(props["mean"]) == list(meta.mean) and json.loads(props["std"]) == list(meta.std)
    assert json.loads(props["source"]) == "test:small_cnn"
    back = read_metadata(props)
    assert back.geometry == fcn.geometry and back.labels == meta.labels and back.input_size == meta.input_size
    assert back.mean == meta.mean and back.std == meta.std and back.in_chans == 3 and back.fcnify_version

    loaded = load_onnx_model(report.path)
    assert loaded.converted and isinstance(loaded.module, OnnxNet)
    assert loaded.geometry == fcn.geometry and loaded.labels == meta.labels and loaded.input_size == (20, 24)
    assert loaded.in_chans == 3 and loaded.mean == meta.mean and loaded.source == "test:small_cnn"
    assert loaded.module.geometry == fcn.geometry and loaded.module.output_size(40, 40) == fcn.output_size(40, 40)


def test_onnxnet_behaves_like_a_module(exported):
    _, fcn, _, report = exported("small_cnn")
    net = OnnxNet(report.path)
    assert net.to("cuda") is net and net.to(torch.float64) is net and net.eval() is net
    assert net.double() is net and list(net.parameters()) == []
    clone = copy.deepcopy(net)
    x = torch.randn(1, 3, 33, 41, dtype=torch.float64)
    out = clone(x)
    assert out.dtype == torch.float64
    with torch.no_grad():
        assert _relative_error(fcn.double()(x), out) < 1e-4
    fcn.float()
    assert "CPUExecutionProvider" in net.providers


def test_verify_onnx_against_the_original_classifier_and_a_different_one(exported):
    model, _, _, report = exported("small_cnn")
    results = verify_onnx(report.path, model)
    assert len(results) == 3 and all(r.passed for r in results)
    other = verify_onnx(report.path, _small(seed=1), sizes=[(20, 24), (30, 31)])
    assert [r.input_size for r in other] == [(20, 24), (30, 31)]
    assert not any(r.passed for r in other) and all(r.max_rel_error > 1e-2 for r in other)


def test_check_sizes_cover_training_non_square_and_off_stride():
    for size, stride in [((224, 224), (32, 32)), ((32, 32), (4, 4)), ((20, 24), (2, 2)), ((64, 64), (16, 16))]:
        sizes = check_sizes(size, stride)
        assert sizes[0] == size
        assert any(h != w for h, w in sizes[1:])
        assert any((h - size[0]) % stride[0] or (w - size[1]) % stride[1] for h, w in sizes[1:])


# -------------------------------------------------------------------------------------------- refusals


def _body_fcn(body: nn.Module, global_context: bool = False) -> tuple[FullyConvolutionalNet, ModelMetadata]:
    torch.manual_seed(0)
    geometry = Geometry((1, 1), (0, 0), (8, 8), (3, 3), global_context=global_context)
    fcn = FullyConvolutionalNet(nn.Sequential(nn.Conv2d(3, 4, 3), body, nn.Conv2d(4, 2, 1)), geometry, (8, 8), 3)
    return fcn.eval(), ModelMetadata((8, 8), 3, IMAGENET[0], IMAGENET[1], ("a", "b"), geometry, "test:body")


class Bessel(nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x)  # no ONNX function, no TorchScript symbolic


class FixedPool(nn.Module):
    def forward(self, x):
        return F.adaptive_avg_pool2d(x, (4, 4))  # a 4×4 map whatever the input size


class SqueezeExcite(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True))


class Noise(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)  # PyTorch and onnxruntime draw different numbers


def test_refuses_to_overwrite_without_force(exported, tmp_path):
    _, fcn, meta, _ = exported("small_cnn")
    path = tmp_path / "model.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputError) as info:
        export_onnx(fcn, meta, path)
    assert "exists" in info.value.message and info.value.hint
    assert path.read_bytes() == b"keep me"
    report = export_onnx(fcn, meta, path, force=True)
    assert report.passed and onnx.load(str(path)).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_missing_folder_is_an_output_error(exported, tmp_path):
    _, fcn, meta, _ = exported("small_cnn")
    with pytest.raises(OutputError):
        export_onnx(fcn, meta, tmp_path / "missing" / "model.onnx")
    assert not (tmp_path / "missing").exists()


def test_an_op_onnx_cannot_express_is_an_export_error(tmp_path, capfd):
    fcn, meta = _body_fcn(Bessel())
    capfd.readouterr()
    with pytest.raises(ExportError) as info:
        export_onnx(fcn, meta, tmp_path / "bessel.onnx")
    assert capfd.readouterr() == ("", "")  # neither exporter's log reaches the terminal
    error = info.value
    assert error.exit_code == 4 and "bessel" in error.message and "\n" not in error.message and error.hint
    assert list(tmp_path.iterdir()) == []


def test_an_export_time_size_baked_into_the_graph_is_refused(tmp_path):
    fcn, meta = _body_fcn(FixedPool())
    with pytest.raises(ExportError) as info:
        export_onnx(fcn, meta, tmp_path / "fixed.onnx")
    assert "fixed" in info.value.message
    assert list(tmp_path.iterdir()) == []


def test_global_pooling_only_when_the_geometry_records_global_context(tmp_path):
    fcn, meta = _body_fcn(SqueezeExcite(), global_context=False)
    with pytest.raises(ExportError, match="height/width"):
        export_onnx(fcn, meta, tmp_path / "se.onnx")
    fcn, meta = _body_fcn(SqueezeExcite(), global_context=True)
    report = export_onnx(fcn, meta, tmp_path / "se.onnx")
    assert report.passed
    assert size_problems(onnx.load(str(report.path)), fcn.geometry) == []


def test_runtime_disagreement_is_not_equivalent_and_leaves_no_file(tmp_path):
    fcn, meta = _body_fcn(Noise())
    with pytest.raises(NotEquivalentError) as info:
        export_onnx(fcn, meta, tmp_path / "noise.onnx")
    assert info.value.exit_code == 3 and "8x8" in info.value.message and "relative error" in info.value.message
    assert list(tmp_path.iterdir()) == []


def test_torchscript_exporter_when_onnxscript_is_missing(exported, tmp_path, monkeypatch):
    _, fcn, meta, _ = exported("small_cnn")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    report = export_onnx(fcn, meta, tmp_path / "ts.onnx")
    assert report.exporter == "torchscript" and report.passed
    assert any("onnxscript" in note for note in report.notes)
    assert all(c.max_rel_error < 1e-4 for c in report.checks)


def test_load_errors(exported, tmp_path):
    _, _, _, report = exported("small_cnn")
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError) as info:
        load_onnx_model(text)
    assert "not an ONNX model" in info.value.message and info.value.hint

    bare = onnx.load(str(report.path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelLoadError) as info:
        load_onnx_model(tmp_path / "bare.onnx")
    assert "fcnify metadata" in info.value.message and info.value.hint

    with pytest.raises(ModelLoadError):
        load_onnx_model(tmp_path / "absent.onnx")


def test_export_is_silent_and_leaves_a_float64_network_alone(tmp_path, capfd):
    fcn = convert(_small(), (20, 24)).double()
    meta = _metadata(fcn, "test:small_cnn", 5)
    capfd.readouterr()
    report = export_onnx(fcn, meta, tmp_path / "double.onnx")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert report.passed and next(fcn.parameters()).dtype == torch.float64
    assert onnx.load(str(report.path)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
