"""Real-world classifiers (``wild_models``): several outputs, permuted flattens, ceil-mode pools, PReLU, softmax
in one head, squeeze-excitation. Each converts, agrees with the original at the training size, and its dense
map equals the crops where the geometry says exact (and says why not elsewhere)."""

from __future__ import annotations

import json

import pytest
import torch
import wild_models as wild
from typer.testing import CliRunner

from fcnify.cli import app
from fcnify.convert import convert
from fcnify.convert.outputs import flatten_outputs
from fcnify.errors import ConversionError, InputError
from fcnify.export import ExportedNet, ModelMetadata, save_pt2
from fcnify.loaded import LoadedModel
from fcnify.models import apply_preprocessing, load_model
from fcnify.onnx_export import export_onnx
from fcnify.verify import check_dense, verify

runner = CliRunner()
MODELS = ["CascadeRNet", "DictHeads", "NamedTupleHeads", "LogitsAndEmbedding", "FourAndTwo", "TwoClassWrapper",
          "SEBody"]
OUTPUTS = {"CascadeRNet": {"0": 4, "1": 2}, "DictHeads": {"logits": 3, "embedding": 6},
           "NamedTupleHeads": {"logits": 5, "embedding": 7}, "LogitsAndEmbedding": {"0": 3, "1": 4},
           "FourAndTwo": {"0": 2, "1": 4}, "TwoClassWrapper": {"0": 2}, "SEBody": {"0": 4}}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.detach().double(), candidate.detach().double()
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-12))


def outputs_at_training_size(model, fcn, size, seed=1) -> dict[str, float]:
    """The float32 relative error of each output at the training size."""
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference, converted = flatten_outputs(model(x)), flatten_outputs(fcn(x))
    assert list(reference) == list(converted)
    return {name: relative_error(reference[name], converted[name].flatten(1)) for name in reference}


@pytest.mark.parametrize("name", MODELS)
def test_each_wild_model_converts_agrees_per_output_and_states_its_exactness(name):
    model, size = wild.build(name), wild.TRAINING_SIZES[name]
    fcn = convert(model, size)
    assert fcn.channels == OUTPUTS[name] and fcn.output_names == tuple(OUTPUTS[name])
    assert fcn.selected == fcn.output_names[0] and fcn.geometry is fcn.geometries[fcn.selected]
    errors = outputs_at_training_size(model, fcn, size)
    assert max(errors.values()) <= 1e-4, errors
    # The same structure back: a tuple stays a tuple, a dict a dict, a namedtuple its type.
    with torch.no_grad():
        original, converted = model(torch.zeros(1, 3, *size)), fcn(torch.zeros(1, 3, *size))
    assert type(converted) is type(original)
    report = verify(model, fcn)
    assert report.passed and report.strict.max_rel_error <= 1e-7
    assert len(report.outputs) == (len(OUTPUTS[name]) if len(OUTPUTS[name]) > 1 else 0)
    dense = report.dense
    if fcn.geometry.exact:
        assert dense.label == "exact" and dense.max_rel_error <= 1e-5, dense
    else:
        assert dense.label == "approximate" and dense.causes
        assert dense.max_rel_error > 1e-5  # the cause named is real: crops and cells do differ


def test_the_cascade_net_names_its_ceil_mode_pool_as_why_dense_cells_differ():
    fcn = convert(wild.build("CascadeRNet"), (24, 24))
    for geometry in fcn.geometries.values():
        assert not geometry.padded and not geometry.global_context and not geometry.exact
        assert not geometry.notes and len(geometry.partial_windows) == 1  # pool2 divides evenly
        assert "ceil-mode pool 'pool1'" in geometry.partial_windows[0]
        assert geometry.stride == (4, 4)
    # One stride more input gives one more cell, whatever the ceil mode adds at other sizes.
    with torch.no_grad():
        assert fcn(torch.zeros(1, 3, 28, 28))[0].shape[-2:] == (2, 2)
        assert fcn(torch.zeros(1, 3, 24, 24))[1].shape[-2:] == (1, 1)


def test_heads_branching_at_different_depths_have_their_own_geometry_and_dense_maps():
    model = wild.build("LogitsAndEmbedding")
    fcn = convert(model, (16, 16))
    assert fcn.geometries["0"].stride == (4, 4) and fcn.geometries["1"].stride == (2, 2)
    assert fcn.geometries["0"].receptive_field != fcn.geometries["1"].receptive_field
    embedding = fcn.select("1")
    assert embedding.geometry.stride == (2, 2) and embedding.net is fcn.net  # same weights
    dense = check_dense(model, embedding, cells=8)
    assert dense.exact and dense.output == "1" and dense.max_rel_error <= 1e-5


@pytest.mark.parametrize("flatten", wild.FLATTENS)
@pytest.mark.parametrize("permutation", wild.PERMUTATIONS)
def test_every_axis_order_before_the_flatten_reorders_the_linear(permutation, flatten):
    model = wild.build("PermutedFlatten", permutation, flatten)
    fcn = convert(model, (14, 12))
    assert outputs_at_training_size(model, fcn, (14, 12))["0"] <= 1e-4
    dense = check_dense(model, fcn, cells=6)
    assert dense.exact and dense.cells_checked >= 4 and dense.max_rel_error <= 1e-5


def test_select_and_unknown_outputs():
    fcn = convert(wild.build("DictHeads"), (16, 16))
    assert fcn.select(1).selected == "embedding" and fcn.select("logits").selected == "logits"
    assert fcn.selected == "logits"  # select returns another network
    assert [(o.name, o.channels) for o in fcn.outputs_summary()] == [("logits", 3), ("embedding", 6)]
    assert fcn.outputs_note() == ("outputs: logits (3 ch), embedding (6 ch); using logits — pick another with "
                                  "--output logits|embedding")
    for bad in ("2", "scores"):
        with pytest.raises(InputError, match=r"outputs logits \(3 channels\), embedding \(6 channels\)") as info:
            fcn.select(bad)
        assert "--output logits|embedding" in info.value.hint
    with torch.no_grad():
        maps = fcn.maps(torch.randn(1, 3, 20, 22))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"logits": (1, 3, 3, 4), "embedding": (1, 6, 3, 4)}


def test_an_output_that_is_not_a_tensor_is_refused_by_name():
    class WithNone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = wild.build("FourAndTwo")

        def forward(self, x):
            two, _ = self.inner(x)
            return {"scores": two, "aux": None}

    with pytest.raises(ConversionError, match="output aux is NoneType"):
        convert(WithNone(), (16, 16))


def test_class_count_comes_from_the_output_not_the_last_linear():
    loaded = LoadedModel(wild.build("TwoClassWrapper"), (16, 16), 3, (0,) * 3, (1,) * 3, ("0", "1", "2", "3"), "w")
    assert apply_preprocessing(loaded, labels="face,background").labels == ("face", "background")
    loaded = LoadedModel(wild.build("FourAndTwo"), (16, 16), 3, (0,) * 3, (1,) * 3, ("0", "1", "2", "3"), "w")
    assert apply_preprocessing(loaded, output="1").labels == ("0", "1", "2", "3")
    loaded.labels = ("0", "1", "2", "3")
    with pytest.raises(InputError, match="--labels has 4 names and w has 2 classes"):
        apply_preprocessing(loaded, labels="a,b,c,d", output="0")


@pytest.fixture()
def weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def save(factory: str) -> str:
        torch.save(getattr(wild, factory)().state_dict(), tmp_path / f"{factory}.pth")
        return f"{factory}.pth"

    return save


def test_cli_wrapper_of_two_classes_accepts_two_labels(weights):
    path = weights("two_class_wrapper")
    common = ["--arch", "wild_models:two_class_wrapper", "--input-size", "16"]
    result = invoke("convert", path, *common, "--labels", "face,other", "-o", "w.pt2", "--json")
    assert result.exit_code == 0, result.output
    assert load_model("w.pt2").labels == ("face", "other")
    refused = invoke("convert", path, *common, "--labels", "a,b,c,d", "-o", "x.pt2")
    assert refused.exit_code == 1 and "has 2 classes" in refused.output and "Traceback" not in refused.output


def test_cli_output_by_index_and_name_convert_and_verify(weights):
    rnet = weights("cascade_rnet")
    common = ["--arch", "wild_models:cascade_rnet", "--input-size", "24"]
    plain = invoke("convert", rnet, *common, "-o", "first.pt2")
    assert plain.exit_code == 0, plain.output
    assert "outputs: 0 (4 ch), 1 (2 ch); using 0 — pick another with --output 0|1" in " ".join(plain.output.split())
    picked = invoke("convert", rnet, *common, "--output", "1", "--labels", "face,not", "-o", "prob.pt2", "--json")
    assert picked.exit_code == 0, picked.output
    data = json.loads(picked.stdout)
    assert data["selected_output"] == "1" and [o["channels"] for o in data["outputs"]] == [4, 2]
    loaded = load_model("prob.pt2")
    assert isinstance(loaded.module, ExportedNet) and loaded.module.selected == "1"
    assert loaded.labels == ("face", "not") and loaded.module.output_names == ("0", "1")
    # verify, by index on the original and by name on a dict model; the .pt2 against its original.
    checked = invoke("verify", rnet, *common, "--output", "1", "--json")
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["dense"]["output"] == "1" and report["dense"]["label"] == "approximate"
    assert any("ceil-mode" in cause for cause in report["dense"]["causes"])
    assert [o["output"] for o in report["outputs"]] == ["0", "1"]
    against = invoke("verify", "prob.pt2", "--against", rnet, *common, "--json")
    assert against.exit_code == 0, against.output
    assert all(o["passed"] for o in json.loads(against.stdout)["outputs"])
    heads = weights("dict_heads")
    named = invoke("verify", heads, "--arch", "wild_models:dict_heads", "--input-size", "16", "--output",
                   "embedding", "--json")
    assert named.exit_code == 0, named.output
    dense = json.loads(named.stdout)["dense"]
    assert dense["output"] == "embedding" and dense["label"] == "exact" and dense["max_rel_error"] <= 1e-5
    unknown = invoke("verify", heads, "--arch", "wild_models:dict_heads", "--input-size", "16", "--output", "9")
    assert unknown.exit_code == 1 and "Traceback" not in unknown.output
    assert "pick one with --output logits|embedding" in " ".join(unknown.output.split())
    file_name = invoke("convert", rnet, *common, "--output", "x.pt2")
    assert file_name.exit_code == 1 and "-o x.pt2" in file_name.output


def _metadata(fcn, labels) -> ModelMetadata:
    loaded = LoadedModel(None, fcn.input_size, 3, (0.5,) * 3, (0.25,) * 3, labels, "wild")
    return ModelMetadata.of(loaded, fcn)


def test_pt2_and_onnx_round_trips_keep_every_output_and_the_selection(tmp_path):
    model = wild.build("CascadeRNet")
    fcn = convert(model, (24, 24)).select("1")
    metadata = _metadata(fcn, ("face", "not"))
    save_pt2(fcn, metadata, tmp_path / "r.pt2")
    report = export_onnx(fcn, metadata, tmp_path / "r.onnx")
    assert report.passed and {c.output for c in report.checks} == {"0", "1"}
    x = torch.randn(2, 3, 37, 45, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = fcn.maps(x)
    for suffix, tolerance in (("pt2", 1e-5), ("onnx", 1e-4)):
        loaded = load_model(str(tmp_path / f"r.{suffix}"))
        net = loaded.module
        assert net.output_names == ("0", "1") and net.selected == "1" and net.channels == {"0": 4, "1": 2}
        assert net.geometries == fcn.geometries and loaded.geometry == fcn.geometries["1"]
        assert loaded.labels == ("face", "not")
        with torch.no_grad():
            got = net.maps(x)
        for name in expected:
            assert got[name].shape == expected[name].shape
            assert relative_error(expected[name], got[name]) <= tolerance
        assert net.select(0).selected == "0" and net.select(0).geometry == fcn.geometries["0"]
        # Picking another output of a converted file: its labels are numbered (the file's names are output 1's).
        other = apply_preprocessing(load_model(str(tmp_path / f"r.{suffix}")), output="0")
        assert other.module.selected == "0" and other.labels == ("0", "1", "2", "3")
