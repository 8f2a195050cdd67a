"""ONNX classifiers fcnify did not make: imported, converted, and proven against onnxruntime on the original file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import wild_onnx
from PIL import Image
from typer.testing import CliRunner

from fcnify.cli import app
from fcnify.convert import convert
from fcnify.convert.from_onnx import NCHW, NHWC, import_onnx
from fcnify.errors import ConversionError, InputError
from fcnify.export import ModelMetadata, load_pt2
from fcnify.models import load_model
from fcnify.onnx_export import export_onnx
from fcnify.onnx_runtime import OnnxClassifier, load_onnx_model
from fcnify.verify import verify

RTOL = 1e-4

# name: (builder, --input-size or None when the graph fixes it, the original's layout)
CORPUS = {
    "paddle_opset11": (lambda: wild_onnx.paddle_style(11), None, NCHW),
    "paddle_opset18": (lambda: wild_onnx.paddle_style(18), None, NCHW),
    "tf_nhwc_input": (wild_onnx.tf_nhwc_input, None, NHWC),
    "tf_same_padding": (wild_onnx.tf_same_padding, None, NCHW),
    "se_reduce_mean_opset13": (lambda: wild_onnx.se_reduce_mean(13), (24, 24), NCHW),
    "se_reduce_mean_opset18": (lambda: wild_onnx.se_reduce_mean(18), (24, 24), NCHW),
    "se_reduce_mean_opset21": (lambda: wild_onnx.se_reduce_mean(21), (24, 24), NCHW),
    "se_reduce_mean_current": (lambda: wild_onnx.se_reduce_mean(onnx.defs.onnx_opset_version()), (24, 24), NCHW),
    "pools_opset9": (lambda: wild_onnx.ceil_pools(9), None, NCHW),
    "pools_opset11": (lambda: wild_onnx.ceil_pools(11), None, NCHW),
    "keras_opset9": (lambda: wild_onnx.keras_export(9), None, NHWC),
    "keras_opset13_17px": (lambda: wild_onnx.keras_export(13, 17), None, NHWC),
    "keras_opset18_ceil": (lambda: wild_onnx.keras_export(18), None, NHWC),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The wild corpus, written once as files (kept for the module's tests)."""
    folder = tmp_path_factory.mktemp("wild_onnx")
    files = {}
    for name, (build, _, _) in CORPUS.items():
        path = folder / f"{name}.onnx"
        path.write_bytes(build())
        files[name] = path
    return files


def _original_logits(path, images: torch.Tensor, layout: str) -> np.ndarray:
    """onnxruntime on the original file, images given N×C×H×W."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays = images.permute(0, 2, 3, 1) if layout == NHWC else images
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: a[None].numpy()})[0] for a in arrays])


@pytest.mark.parametrize("name", list(CORPUS))
def test_wild_onnx_converts_and_matches_onnxruntime(corpus, name):
    _, size, layout = CORPUS[name]
    path = corpus[name]
    imported = import_onnx(onnx.load(str(path)), size)
    assert imported.input_layout == layout and imported.classes == (wild_onnx.CLASSES,)
    leftovers = {type(m).__name__ for m in imported.module.modules() if type(m).__module__.startswith("onnx2torch")}
    assert not leftovers  # the rules read plain layers and calls, never onnx2torch's modules
    fcn = convert(imported.module, imported.input_size, imported.in_chans)

    # Logits at the training size: the conversion against onnxruntime on the original file.
    images = torch.randn(3, imported.in_chans, *imported.input_size, generator=torch.Generator().manual_seed(1))
    expected = _original_logits(path, images, layout)
    got = fcn(images).detach().flatten(1).numpy()
    assert np.abs(expected - got).max() <= RTOL * np.abs(expected).max()

    # Dense cells against onnxruntime on each crop, where the geometry says they are exact.
    report = verify(OnnxClassifier(path, layout), fcn, dense_cells=8)
    assert report.strict.passed and report.strict.device == "cpu (onnxruntime)"
    assert report.dense.cells_checked >= 4
    if fcn.geometry.exact:
        assert report.dense.max_rel_error <= RTOL, report.dense
    else:
        assert report.dense.causes  # approximate, and the cause is named


def test_dense_map_equals_crops_cell_by_cell(corpus):
    """The whole map of a padding-free NHWC graph, every cell against onnxruntime on its crop."""
    path = corpus["tf_nhwc_input"]
    imported = import_onnx(onnx.load(str(path)))
    fcn = convert(imported.module, imported.input_size, imported.in_chans)
    g = fcn.geometry
    assert g.exact and g.stride == (2, 2)
    image = torch.randn(1, 3, 16 + 2 * 2 + 1, 16 + 3 * 2 + 1, generator=torch.Generator().manual_seed(2))
    dense = fcn(image)[0].detach()
    assert dense.shape[-2:] == (3, 4)
    crops = torch.stack([image[0, :, y:y + 16, x:x + 16] for i in range(3) for j in range(4)
                         for y, x in [g.window_origin(i, j)]])
    expected = _original_logits(path, crops, NHWC)
    got = dense.permute(1, 2, 0).reshape(12, -1).numpy()
    assert np.abs(expected - got).max() <= RTOL * np.abs(expected).max()


def test_converted_onnx_runs_any_size_in_onnxruntime(corpus, tmp_path):
    loaded = load_model(str(corpus["paddle_opset11"]))
    fcn = convert(loaded.module, loaded.input_size, loaded.in_chans)
    out = tmp_path / "paddle.fcn.onnx"
    export_onnx(fcn, ModelMetadata.of(loaded, fcn), out)
    reloaded = load_onnx_model(out)
    assert reloaded.converted and reloaded.input_size == (20, 20)
    for height, width in ((20, 20), (29, 37), (52, 24)):
        x = torch.randn(2, 3, height, width)
        assert torch.allclose(reloaded.module(x), fcn(x).detach(), rtol=1e-4, atol=1e-5)


def test_input_size_rules(corpus):
    symbolic = onnx.load(str(corpus["se_reduce_mean_opset13"]))
    with pytest.raises(InputError, match="symbolic height and width.*--input-size"):
        import_onnx(symbolic)
    fixed = onnx.load(str(corpus["paddle_opset11"]))
    with pytest.raises(InputError, match="fixes its input at 20x20"):
        import_onnx(fixed, (24, 24))
    assert import_onnx(fixed, (20, 20)).input_size == (20, 20)


@pytest.mark.parametrize("builder, fragments", [
    (wild_onnx.lstm_head, ("ONNX node 'recurrent_head' (LSTM)", "no converter")),
    (wild_onnx.position_mixing_head, ("ONNX node 'rows_reshape' (Reshape)", "flattened map")),
    (wild_onnx.nhwc_preprocessing, ("ONNX node 'keras_rescaling' (Mul)", "N×H×W×C")),
])
def test_unsupported_graphs_name_the_onnx_node(tmp_path, builder, fragments):
    path = tmp_path / "bad.onnx"
    path.write_bytes(builder())
    with pytest.raises(ConversionError) as error:
        fcn_model = load_model(str(path))
        convert(fcn_model.module, fcn_model.input_size, fcn_model.in_chans)
    for fragment in fragments:
        assert fragment in str(error.value)
    result = CliRunner().invoke(app, ["convert", str(path), "-o", str(tmp_path / "bad.pt2")])
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output and fragments[0] in result.output
    assert not (tmp_path / "bad.pt2").exists()


# ------------------------------------------------------------------------------------------- command line


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_convert_verify_heatmap_an_nhwc_keras_export(corpus, tmp_path):
    source = corpus["keras_opset13_17px"]
    out = tmp_path / "keras.fcn.pt2"
    result = _invoke("convert", source, "-o", out, "--labels", "a,b,c,d,e", "--mean", "0.5", "--std", "0.25")
    assert result.exit_code == 0, result.output
    assert "takes N×H×W×C images; the converted network takes N×C×H×W" in " ".join(result.output.split())
    onnx_out = tmp_path / "keras.fcn.onnx"
    assert out.is_file() and onnx_out.is_file()  # an ONNX source: its conversion as ONNX too

    module, metadata = load_pt2(out)
    assert metadata.input_layout == NHWC and metadata.labels == ("a", "b", "c", "d", "e")
    assert metadata.input_size == (17, 17) and metadata.in_chans == 3
    images = torch.randn(2, 3, 17, 17)
    expected = _original_logits(source, images, NHWC)
    assert np.abs(module(images).flatten(1).detach().numpy() - expected).max() <= RTOL * np.abs(expected).max()
    session = ort.InferenceSession(str(onnx_out), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["fcnify"]["input_layout"] == NHWC
    big = torch.randn(1, 3, 33, 41)
    dense = session.run(None, {session.get_inputs()[0].name: big.numpy()})[0]
    assert dense.shape[:2] == (1, 5) and dense.shape[2:] == tuple(module(big).shape[2:]) and dense.shape[-1] > 1

    verified = _invoke("verify", source, "--json")
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.stdout)
    assert report["passed"] and report["strict"]["max_rel_error"] <= RTOL
    assert report["dense"]["label"] == "exact" and report["dense"]["max_rel_error"] <= RTOL

    against = _invoke("verify", out, "--against", source, "--json")
    assert against.exit_code == 0, against.output
    assert json.loads(against.stdout)["strict"]["max_rel_error"] <= RTOL
    onnx_against = _invoke("verify", onnx_out, "--against", source, "--json")
    assert onnx_against.exit_code == 0, onnx_against.output

    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(image)
    heat = _invoke("heatmap", image, "--model", source, "-o", tmp_path / "maps", "--mean", "0.5", "--std", "0.25")
    assert heat.exit_code == 0, heat.output
    scores = np.load(tmp_path / "maps" / "scene.scores.npz")
    cells = module(torch.zeros(1, 3, 40, 52)).shape[2:]  # the one-pass map of the whole image
    assert scores["scores"].shape == (5, *cells) and min(cells) > 5
    assert (tmp_path / "maps" / "scene.heatmap.png").is_file()


def test_cli_symbolic_size_needs_input_size(corpus, tmp_path):
    source = corpus["se_reduce_mean_opset18"]
    missing = _invoke("convert", source, "-o", tmp_path / "se.pt2")
    assert missing.exit_code == 1 and "--input-size" in missing.output and "Traceback" not in missing.output
    ok = _invoke("convert", source, "--input-size", "24", "-o", tmp_path / "se.pt2", "--json")
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert report["input_layout"] == {"original": NCHW, "converted": NCHW}
    assert report["geometry"]["global_context"] and report["onnx"]["output"].endswith("se.onnx")


def test_two_onnx_heads_each_a_dense_map(tmp_path):
    """A graph with two outputs: the converted network returns both by their ONNX names, each proven."""
    path = tmp_path / "two_heads.onnx"
    path.write_bytes(wild_onnx.two_heads())
    loaded = load_model(str(path))
    fcn = convert(loaded.module, loaded.input_size, loaded.in_chans)
    assert fcn.output_names == ("bbox", "prob") and fcn.selected == "bbox"
    assert fcn.channels == {"bbox": 4, "prob": 2}
    for name in fcn.output_names:
        fcn.select(name)
        report = verify(loaded.original, fcn, dense_cells=6)
        assert report.passed and fcn.geometry.exact
        assert {a.output for a in report.outputs} == {"bbox", "prob"}
        assert report.dense.max_rel_error <= RTOL
    image = torch.randn(2, 3, 12 + 2 * 3, 12 + 2 * 5)
    maps = fcn(image)
    assert set(maps) == {"bbox", "prob"} and maps["prob"].shape == (2, 2, 4, 6)
    assert torch.allclose(maps["prob"].sum(1), torch.ones(2, 4, 6), atol=1e-5)  # the softmax over classes, per cell

    result = _invoke("convert", path, "-o", tmp_path / "two.fcn.pt2", "--json")
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(tmp_path / "two.fcn.onnx"), providers=["CPUExecutionProvider"])
    assert len(session.get_outputs()) == 2
    verified = _invoke("verify", path, "--json")
    assert verified.exit_code == 0, verified.output


def test_paddle_flatten_and_fully_connected_become_plain_layers(corpus):
    """The computed reshape is a constant flatten ``[-1, F]`` and MatMul + Add one Linear with a bias."""
    imported = import_onnx(onnx.load(str(corpus["paddle_opset11"])))
    linears = [m for m in imported.module.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].bias is not None and linears[0].in_features == 6 * 3 * 3
    reshapes = [n for n in imported.module.graph.nodes if n.target is torch.reshape]
    assert [n.args[1] for n in reshapes] == [(-1, 54)]
    assert not any(n.target in ("Shape", "Concat") or "shape" in n.name for n in imported.module.graph.nodes)
