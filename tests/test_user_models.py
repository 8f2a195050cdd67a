"""Models of the user's own, as users save them: their code in the current folder, their normalisation,
their torch.export archives and TorchScript files, their safetensors metadata.

Each test runs the CLI from a temporary project folder that is not on the Python path, as ``fcnify`` does
when a user types it in their project.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from fcnify.cli import app

runner = CliRunner()
SIZE = 16

MODEL_CODE = '''
import torch
from torch import nn


class SmallNet(nn.Module):
    """Padding-free, so every dense cell equals the classifier on its crop."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU())
        self.fc = nn.Linear(6 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def make_model():
    torch.manual_seed(0)
    return SmallNet()
'''


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A project folder with ``<name>.py`` (a unique module name) and ``models/net.py``, as the current folder."""
    folder = tmp_path / "project"
    (folder / "models").mkdir(parents=True)
    name = f"usernet_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(MODEL_CODE)
    (folder / "models" / "net.py").write_text(MODEL_CODE)
    monkeypatch.chdir(folder)
    assert str(folder) not in sys.path  # found because it is the current folder, as for the user
    # The reference model, from a copy outside the project under another name: the CLI must find its own.
    (tmp_path / "reference.py").write_text(MODEL_CODE)
    spec = importlib.util.spec_from_file_location(f"reference_{name}", tmp_path / "reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    model = reference.make_model().eval()
    torch.save(model.state_dict(), folder / "sd.pth")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(24, 30, 3), dtype=np.uint8)).save(folder / "scene.png")
    yield folder, name, model
    for module in [m for m in sys.modules if m.startswith("usernet_") or m == "net"]:
        sys.modules.pop(module, None)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in " ".join(result.stderr.split()), result.stderr


def crops_softmax(model, image_path: Path, stride, offset, window, map_size) -> np.ndarray:
    """The original classifier's softmax on the crop of every map cell, raw 0-1 pixels (K×h×w)."""
    pixels = torch.from_numpy(np.array(Image.open(image_path).convert("RGB"))).permute(2, 0, 1).float() / 255
    out = np.zeros((3, *map_size), dtype=np.float64)
    with torch.no_grad():
        for i in range(map_size[0]):
            for j in range(map_size[1]):
                y, x = offset[0] + i * stride[0], offset[1] + j * stride[1]
                crop = pixels[:, y:y + window[0], x:x + window[1]][None]
                out[:, i, j] = torch.softmax(model(crop), 1)[0].numpy()
    return out


def heatmap_scores(outdir: Path, stem: str = "scene"):
    with np.load(outdir / f"{stem}.scores.npz", allow_pickle=False) as data:
        return data["scores"], {key: data[key].tolist() for key in ("stride", "offset", "window")}, \
            json.loads(str(data["attributes"]))


def assert_scores_are_the_crops(outdir: Path, model) -> dict:
    scores, geometry, attributes = heatmap_scores(outdir)
    expected = crops_softmax(model, Path("scene.png"), map_size=scores.shape[1:], **geometry)
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    return attributes


# ----------------------------------------------------------------------------------------- importing user code


@pytest.mark.parametrize("arch", ["module", "file"])
def test_arch_from_the_current_folder_or_a_file_path(project, arch):
    folder, name, model = project
    spec = f"{name}:make_model" if arch == "module" else "./models/net.py:make_model"
    result = invoke("convert", "sd.pth", "--arch", spec, "--input-size", SIZE, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == "sd.fcn.pt2"  # named after the input file, nothing else
    assert (folder / "sd.fcn.pt2").is_file() and str(folder) not in sys.path
    program = torch.export.load(folder / "sd.fcn.pt2").module()
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(program(x).flatten(1), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec, fragments", [
    ("nosuchmodule:make_model", ["cannot import module 'nosuchmodule'", "in {folder}"]),
    ("./models/missing.py:make_model", ["no such file ./models/missing.py"]),
    ("{name}:no_factory", ["has no 'no_factory'"]),
    ("broken:make_model", ["importing module 'broken'", "ZeroDivisionError"]),
    ("needs_dep:make_model", ["imports 'not_a_real_package_xyz'", "not installed"]),
])
def test_an_import_that_fails_is_one_line(project, spec, fragments):
    folder, name, _ = project
    (folder / "broken.py").write_text("x = 1 / 0\n")
    (folder / "needs_dep.py").write_text("import not_a_real_package_xyz\n")
    result = invoke("convert", "sd.pth", "--arch", spec.format(name=name), "--input-size", SIZE)
    one_line_error(result, *(f.format(folder=folder) for f in fragments))


def test_a_pickled_module_finds_the_users_classes_in_the_current_folder(project):
    folder, name, model = project
    from fcnify.models import user_code_path

    with user_code_path(folder):  # pickled by reference to <name>.SmallNet, as in the user's own script
        user_module = importlib.import_module(name)
    torch.save(user_module.make_model().eval(), folder / "whole.pt")
    sys.modules.pop(name)
    result = invoke("convert", "whole.pt", "--trust-model", "--input-size", SIZE, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == "whole.fcn.pt2"
    elsewhere = folder / "models"
    (folder / "models" / "whole.pt").write_bytes((folder / "whole.pt").read_bytes())
    sys.modules.pop(name)
    (folder / f"{name}.py").rename(folder / "gone.py")
    result = invoke("convert", elsewhere / "whole.pt", "--trust-model", "--input-size", SIZE, "-o", "x.pt2")
    one_line_error(result, "needs the model's code", str(folder))


# ------------------------------------------------------------------------------------------------ preprocessing


def test_raw_pixels_give_the_original_scores_on_crops_and_are_recorded(project):
    folder, name, model = project
    result = invoke("heatmap", "scene.png", "-m", "sd.pth", "--arch", f"{name}:make_model", "--input-size", SIZE,
                    "--mean", "0", "--std", "1", "--foreground", "all", "-o", "out", "--json")
    assert result.exit_code == 0, result.output
    assert "assuming" not in result.stderr  # the user said how the model was trained
    attributes = assert_scores_are_the_crops(folder / "out", model)
    assert attributes["preprocessing"] == {"mean": [0.0] * 3, "std": [1.0] * 3, "source": "flag"}
    assert attributes["receptive_field"] == [SIZE, SIZE] and attributes["exact"] is True
    summary = folder / "out" / "summary.parquet"
    if summary.exists():
        import pyarrow.parquet as pq

        row = pq.read_table(summary).to_pylist()[0]
        assert (row["mean"], row["std"], row["preprocessing_source"]) == ([0.0] * 3, [1.0] * 3, "flag")


def test_assumed_imagenet_is_said_on_one_line_and_recorded(project):
    folder, name, _ = project
    result = invoke("convert", "sd.pth", "--arch", f"{name}:make_model", "--input-size", SIZE)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "assuming" in line]
    assert len(notes) == 1 and "--mean" in notes[0] and "0.485,0.456,0.406" in notes[0], result.stderr
    extra = {"fcnify.json": ""}
    torch.export.load(folder / "sd.fcn.pt2", extra_files=extra)
    meta = json.loads(extra["fcnify.json"])
    assert meta["normalisation"] == "assumed (ImageNet)" and meta["mean"] == [0.485, 0.456, 0.406]
    # The .pt2 carries the values and says again that they were assumed.
    result = invoke("heatmap", "scene.png", "-m", "sd.fcn.pt2", "-o", "out", "--foreground", "all", "--json")
    assert result.exit_code == 0, result.output
    assert sum("assuming" in line for line in result.stderr.splitlines()) == 1
    assert heatmap_scores(folder / "out")[2]["preprocessing"]["source"] == "assumed (ImageNet)"


@pytest.mark.slow
def test_flags_are_stored_in_the_pt2_and_onnx_and_read_back(project):
    folder, name, model = project
    (folder / "labels.txt").write_text("cat\ndog\n\nbird\n")
    result = invoke("convert", "sd.pth", "--arch", f"{name}:make_model", "--input-size", SIZE, "--mean", "0.5",
                    "--std", "0.25,0.5,1", "--labels", "labels.txt", "--onnx", "sd.onnx")
    assert result.exit_code == 0, result.output
    from fcnify.models import load_model

    for path in ("sd.fcn.pt2", "sd.onnx"):
        loaded = load_model(path)
        assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.5, 1.0)
        assert loaded.labels == ("cat", "dog", "bird") and loaded.normalisation == "flag"
    result = invoke("heatmap", "scene.png", "-m", "sd.fcn.pt2", "--labels", "a,b,c", "--mean", "0", "--std", "1",
                    "-o", "out", "--foreground", "all", "--json")
    assert result.exit_code == 0, result.output
    assert [p["label"] for p in json.loads(result.stdout)["rows"][0]["top"]][:1] != []
    assert set(heatmap_scores(folder / "out")[2]["labels"]) == {"a", "b", "c"}
    assert_scores_are_the_crops(folder / "out", model)


@pytest.mark.parametrize("flags, fragment", [
    (["--mean", "0,0"], "--mean has 2 values for a model with 3 input channels"),
    (["--std", "0"], "--std must not be 0"),
    (["--mean", "zero"], "--mean 'zero' is not a number"),
    (["--labels", "a,b"], "--labels has 2 names"),
])
def test_bad_preprocessing_flags_are_one_line(project, flags, fragment):
    _, name, _ = project
    result = invoke("convert", "sd.pth", "--arch", f"{name}:make_model", "--input-size", SIZE, *flags)
    one_line_error(result, fragment)


@pytest.mark.parametrize("metadata, fragment", [
    ({"input_size": '"64"'}, "input_size is '\"64\"'"),
    ({"input_size": "[64, 64, 3]"}, "input_size"),
    ({"mean": '["a", "b", "c"]'}, "mean is"),
    ({"std": "[0, 1, 1]"}, "std is"),
    ({"labels": "5"}, "labels is '5'"),
    ({"in_chans": "three"}, "not JSON"),
])
def test_malformed_safetensors_metadata_is_one_line(project, metadata, fragment):
    folder, name, model = project
    save_file(model.state_dict(), folder / "w.safetensors", metadata=metadata)
    result = invoke("convert", "w.safetensors", "--arch", f"{name}:make_model", "--input-size", SIZE)
    one_line_error(result, "w.safetensors has malformed metadata", fragment)


def test_safetensors_metadata_normalisation_is_used(project):
    folder, name, model = project
    save_file(model.state_dict(), folder / "w.safetensors",
              metadata={"input_size": str(SIZE), "mean": "[0, 0, 0]", "std": "1", "labels": '["a", "b", "c"]'})
    result = invoke("heatmap", "scene.png", "-m", "w.safetensors", "--arch", f"{name}:make_model", "-o", "out",
                    "--foreground", "all", "--json")
    assert result.exit_code == 0, result.output
    assert "assuming" not in result.stderr
    attributes = assert_scores_are_the_crops(folder / "out", model)
    assert attributes["preprocessing"]["source"] == "metadata"


# ------------------------------------------------------------------------------------- other ways of saving


def test_a_users_torch_export_archive_converts_and_matches_the_crops(project):
    folder, _, model = project
    program = torch.export.export(model, (torch.randn(1, 3, SIZE, SIZE),))
    torch.export.save(program, folder / "exported.pt2")
    result = invoke("convert", "exported.pt2", "--input-size", SIZE, "--mean", "0", "--std", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == "exported.fcn.pt2"
    result = invoke("heatmap", "scene.png", "-m", "exported.fcn.pt2", "-o", "out", "--foreground", "all", "--json")
    assert result.exit_code == 0, result.output
    assert_scores_are_the_crops(folder / "out", model)
    # Straight from the archive too; its size and channels come from the exported example.
    result = invoke("heatmap", "scene.png", "-m", "exported.pt2", "--mean", "0", "--std", "1", "-o", "direct",
                    "--foreground", "all", "--json")
    assert result.exit_code == 0, result.output
    assert_scores_are_the_crops(folder / "direct", model)


def test_an_archive_exported_in_training_mode_with_a_dynamic_batch_converts_for_inference(tmp_path):
    from nets import RichHead

    from fcnify.convert import convert
    from fcnify.models import load_model

    torch.manual_seed(0)
    model = RichHead("avg")  # BatchNorm and Dropout, left in training mode by the user
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, SIZE, SIZE),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, tmp_path / "train.pt2")
    loaded = load_model(str(tmp_path / "train.pt2"))
    assert (loaded.in_chans, loaded.input_size, len(loaded.labels)) == (3, (SIZE, SIZE), 7)
    fcn = convert(loaded.module, (SIZE, SIZE), 3)
    x = torch.randn(3, 3, SIZE + 6, SIZE + 6)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fcn(x[..., :SIZE, :SIZE]).flatten(1), model(x[..., :SIZE, :SIZE]),
                                   rtol=1e-4, atol=1e-5)
        assert fcn(x).shape[-2:] == (4, 4)


def test_a_torch_export_archive_with_pickles_is_refused_without_trust(project, monkeypatch):
    folder, _, model = project
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, SIZE, SIZE),)), folder / "exported.pt2")
    from fcnify import export

    monkeypatch.setattr(export, "inspect_pt2", lambda data: export.Pt2Inspection(["data/x (pickled object)"]))
    one_line_error(invoke("convert", "exported.pt2"), "would run code when loaded")


def test_output_stride_works_with_an_fcnify_pt2(project):
    folder, name, _ = project
    common = ["--arch", f"{name}:make_model", "--input-size", SIZE, "--mean", "0", "--std", "1"]
    assert invoke("convert", "sd.pth", *common).exit_code == 0
    from_pt2 = invoke("heatmap", "scene.png", "-m", "sd.fcn.pt2", "--output-stride", "1", "-o", "a",
                      "--foreground", "all", "--json")
    assert from_pt2.exit_code == 0, from_pt2.output
    from_module = invoke("heatmap", "scene.png", "-m", "sd.pth", *common, "--output-stride", "1", "-o", "b",
                         "--foreground", "all", "--json")
    assert from_module.exit_code == 0, from_module.output
    fine, geometry, _ = heatmap_scores(folder / "a")
    assert geometry["stride"] == [1, 1] and fine.shape[1:] == (24 - SIZE + 1, 30 - SIZE + 1)
    np.testing.assert_allclose(fine, heatmap_scores(folder / "b")[0], atol=1e-5)


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_with_trust_converts_without_deprecation_noise(project, how):
    folder, _, model = project
    example = torch.randn(1, 3, SIZE, SIZE)
    with pytest.warns(FutureWarning):  # torch's own notice when the file is made, not when fcnify reads it
        scripted = torch.jit.trace(model, example) if how == "trace" else torch.jit.script(model)
    scripted.save(str(folder / "ts.pt"))
    refused = invoke("convert", "ts.pt", "--input-size", SIZE)
    one_line_error(refused, "TorchScript", "--trust-model")
    result = invoke("convert", "ts.pt", "--trust-model", "--input-size", SIZE, "--mean", "0", "--std", "1", "--json")
    assert result.exit_code == 0, result.output
    assert "deprecated" not in result.stderr and "Warning" not in result.stderr
    program = torch.export.load(folder / "ts.fcn.pt2").module()
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(program(x).flatten(1), model(x), rtol=1e-4, atol=1e-5)


def test_in_chans_where_the_model_cannot_say(project):
    folder, _, _ = project
    torch.manual_seed(0)
    grey = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 14 * 14, 2)).eval()
    with pytest.warns(FutureWarning):
        torch.jit.trace(grey, torch.randn(1, 1, SIZE, SIZE)).save(str(folder / "grey.pt"))
        torch.jit.trace(grey[1:], torch.randn(1, 4, SIZE - 2, SIZE - 2)).save(str(folder / "head.pt"))
    # A network whose first layer is not a convolution does not say how many channels it reads.
    without = invoke("verify", "head.pt", "--trust-model", "--input-size", SIZE - 2)
    one_line_error(without, "--in-chans", code=4)
    result = invoke("verify", "head.pt", "--trust-model", "--input-size", SIZE - 2, "--in-chans", "4", "--json")
    assert result.exit_code == 0, result.output
    result = invoke("verify", "grey.pt", "--trust-model", "--input-size", SIZE, "--json")
    assert result.exit_code == 0, result.output
    result = invoke("convert", "grey.pt", "--trust-model", "--input-size", SIZE, "--in-chans", "1")
    assert result.exit_code == 0, result.output
    assert "0.449" in result.stderr  # the assumed normalisation follows the channels
    from fcnify.models import load_model

    loaded = load_model("grey.fcn.pt2")
    assert (loaded.in_chans, loaded.mean, loaded.std) == (1, (0.449,), (0.226,))


# ----------------------------------------------------------------------------------------------------- logging


@pytest.mark.parametrize("flag, level", [("-v", logging.INFO), ("--quiet", logging.ERROR), (None, logging.NOTSET)])
def test_verbose_and_quiet_set_the_fcnify_logger(project, flag, level):
    _, name, _ = project
    args = ([flag] if flag else []) + ["convert", "sd.pth", "--arch", f"{name}:make_model", "--input-size", SIZE,
                                       "--json"]
    assert invoke(*args).exit_code == 0
    assert logging.getLogger("fcnify").level == level
    logging.getLogger("fcnify").setLevel(logging.NOTSET)


def test_timm_offline_fails_within_seconds_with_the_whole_message(monkeypatch):
    import time

    pytest.importorskip("timm")
    hub = pytest.importorskip("huggingface_hub.constants")
    from fcnify.errors import ModelLoadError
    from fcnify.models import load_model

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", hub.HF_HUB_OFFLINE)  # restored after the test
    monkeypatch.setattr(hub, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens there: as good as offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    start = time.monotonic()
    try:
        load_model("timm:resnet18")  # the weights may be in the cache: then they load, offline
    except ModelLoadError as exc:
        assert "offline" in exc.message and "\n" not in exc.message and "..." not in exc.message
    assert time.monotonic() - start < 10
