"""The command line: every command and error path gives one clear line and a documented exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from heatmap_helpers import split_heatmap
from nets import small_cnn
from PIL import Image
from typer.testing import CliRunner

from fcnify.cli import app

runner = CliRunner()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_clean_error(result, code: int, *fragments: str):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture()
def weights(tmp_path) -> Path:
    path = tmp_path / "small.pth"
    torch.save(small_cnn().state_dict(), path)
    return path


def test_convert_writes_a_verified_pt2_and_refuses_to_overwrite(tmp_path, weights):
    out = tmp_path / "small.fcn.pt2"
    result = invoke("convert", weights, "--arch", "nets:small_cnn", "--input-size", "20x24", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"]["strict"]["passed"] and report["geometry"]["stride"] == [2, 2]
    assert any("Conv2d(8→16, kernel 7×9)" in r["new"] for r in report["rewrites"])
    program = torch.export.load(out).module()
    assert program(torch.randn(1, 3, 30, 30)).shape == (1, 5, 6, 4)
    again = invoke("convert", weights, "--arch", "nets:small_cnn", "--input-size", "20x24", "-o", out)
    assert_clean_error(again, 1, "already exists", "--force")
    table = invoke("convert", weights, "--arch", "nets:small_cnn", "--input-size", "20x24", "-o", out, "--force")
    assert table.exit_code == 0 and "Rewritten layers" in table.output and "Geometry" in table.output


@pytest.mark.slow
def test_convert_torchvision_resnet18_maps(tmp_path):
    out = tmp_path / "r18.pt2"
    result = invoke("convert", "torchvision:resnet18", "--weights", "none", "-o", out)
    assert result.exit_code == 0, result.output
    program = torch.export.load(out).module()
    assert program(torch.randn(1, 3, 224, 224)).shape == (1, 1000, 1, 1)
    assert program(torch.randn(1, 3, 384, 512)).shape == (1, 1000, 6, 10)


def test_verify_default_digits_and_exit_codes(tmp_path, weights):
    result = invoke("verify", "--json", "--image", SAMPLES / "digits_scene_1.png", "--image", SAMPLES / "china.jpg")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["strict"]["samples"] == 4 + 2
    assert report["passed"] and report["dense"]["label"] == "exact" and report["dense"]["max_rel_error"] < 1e-10
    pt2 = tmp_path / "s.pt2"
    assert invoke("convert", weights, "--arch", "nets:small_cnn", "--input-size", "20x24", "-o", pt2).exit_code == 0
    other = tmp_path / "other.pth"
    torch.save({k: v + 0.5 for k, v in small_cnn().state_dict().items()}, other)
    same = invoke("verify", pt2, "--against", weights, "--arch", "nets:small_cnn")
    assert same.exit_code == 0, same.output
    different = invoke("verify", pt2, "--against", other, "--arch", "nets:small_cnn")
    assert_clean_error(different, 3, "FAIL")
    assert_clean_error(invoke("verify", pt2), 1, "already converted", "--against")


@pytest.mark.parametrize("args, code, fragments", [
    (["convert", "torchvision:resnet81", "--weights", "none"], 1, ["no classification model", "resnet18"]),
    (["convert", "timm:notamodel", "--weights", "none"], 1, ["timm has no model"]),
    (["convert", "missing.pth"], 1, ["no such file"]),
    (["convert", "timm:vit_tiny_patch16_224", "--weights", "none"], 4, ["cannot convert", "transformer"]),
    (["verify", "torchvision:alexnet", "--weights", "none", "--input-size", "32"], 1, ["does not run at", "--input-size"]),
    (["convert", "torchvision:resnet18", "--weights", "none", "--input-size", "big"], 1, ["HxW"]),
])
def test_bad_input_gives_one_clear_line(args, code, fragments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clean_error(invoke(*args), code, *fragments)
    assert not list(tmp_path.glob("*.pt2"))


def test_state_dict_errors(tmp_path, weights):
    assert_clean_error(invoke("convert", weights), 1, "state_dict", "--arch")
    assert_clean_error(invoke("convert", weights, "--arch", "torchvision:resnet18", "-o", tmp_path / "x.pt2"), 1,
                       "missing keys")
    assert_clean_error(invoke("convert", weights, "--arch", "nets:small_cnn", "--input-size", "21x21",
                              "-o", tmp_path / "x.pt2"), 1, "does not run at input size 21x21")
    assert_clean_error(invoke("convert", weights, "--arch", "nets:small_cnn", "--input-size", "20x24",
                              "-o", tmp_path / "no" / "dir" / "x.pt2"), 1, "does not exist")
    assert not (tmp_path / "x.pt2").exists()


def test_untrusted_pickle_is_refused_by_the_cli_without_running_it(tmp_path):
    from test_models_and_export import FileCreatingPayload

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(FileCreatingPayload(marker), path)
    assert_clean_error(invoke("convert", path), 1, "run code", "--trust-model")
    assert_clean_error(invoke("heatmap", SAMPLES / "digits_scene_1.png", "--model", path, "-o", tmp_path / "o"),
                       1, "run code")
    assert not marker.exists()


def test_heatmap_default_model_on_a_scene(tmp_path):
    out = tmp_path / "out"
    result = invoke("heatmap", SAMPLES / "digits_scene_1.png", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["rows"][0]
    assert row["status"] == "ok" and row["map_size"] == [33, 49]
    image = Image.open(SAMPLES / "digits_scene_1.png")
    assert split_heatmap(out / "digits_scene_1.heatmap.png")[0].shape == (image.height, image.width, 3)
    with np.load(out / "digits_scene_1.scores.npz", allow_pickle=False) as npz:
        assert npz["scores"].shape == (11, 33, 49) and npz["labels"][-1] == "background"
        assert npz["stride"].tolist() == [4, 4] and npz["window"].tolist() == [32, 32]


def test_heatmap_goes_on_past_a_bad_image_and_reports_it(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    result = invoke("heatmap", SAMPLES / "digits_scene_2.png", bad, tmp_path / "missing.png", "-o", out)
    assert_clean_error(result, 1, "2 of 3 images failed", "broken.png")
    assert sorted(p.name for p in out.iterdir()) == [
        "digits_scene_2.classes.png", "digits_scene_2.heatmap.png", "digits_scene_2.scores.npz",
        "summary.parquet"]  # no mask: an ordinary picture has every cell computed by default
    import pyarrow.parquet as pq

    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert [row["status"] for row in sorted(summary, key=lambda r: r["index"])] == ["ok", "error", "error"]
    mode = (out / "digits_scene_2.heatmap.png").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask(), oct(mode)  # readable by others as the umask allows, not mkstemp's 0600


def test_heatmap_bad_options(tmp_path):
    scene = SAMPLES / "digits_scene_1.png"
    assert_clean_error(invoke("heatmap", scene, "--class", "cat", "-o", tmp_path), 1, "cat")
    assert_clean_error(invoke("heatmap", scene, "--precision", "fp16", "--device", "cpu", "-o", tmp_path), 1, "fp16")
    assert_clean_error(invoke("heatmap", scene, "--max-pixels", "100", "-o", tmp_path / "o"), 1, "--max-pixels")
    assert_clean_error(invoke("heatmap", "-o", tmp_path), 1, "no images")
    # Object storage as the output folder is refused, never written to a local folder named "s3:".
    for engine in ("local", "ray"):
        assert_clean_error(invoke("heatmap", scene, "-o", "s3://bucket/out", "--engine", engine, "--split", "tiles"),
                           1, "s3://bucket/out", "object storage", "shared filesystem")
    assert not Path("s3:").exists()
    assert_clean_error(invoke("heatmap", scene, "--engine", "ray", "--split", "slides", "-o", tmp_path), 1, "--split")
    # Refused before any image: nothing of an image is written (the summary records the failure).
    assert not (tmp_path / "o").exists() or {p.name for p in (tmp_path / "o").iterdir()} <= {"summary.parquet"}


def test_onnx_from_convert_verifies_against_its_source_and_draws_the_same_heatmap(tmp_path, weights):
    pt2, onnx = tmp_path / "s.pt2", tmp_path / "s.onnx"
    result = invoke("convert", weights, "--arch", "nets:small_cnn", "--input-size", "20x24", "-o", pt2, "--onnx", onnx)
    assert result.exit_code == 0, result.output
    checked = invoke("verify", onnx, "--against", weights, "--arch", "nets:small_cnn", "--json")
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["strict"]["max_rel_error"] < 1e-5 and len(report["onnx_vs_pytorch"]) >= 3
    assert all(a["passed"] for a in report["onnx_vs_pytorch"])
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (61, 75, 3), dtype=np.uint8)).save(image)
    maps = {}
    for model in (pt2, onnx):
        out = tmp_path / model.suffix[1:]
        assert invoke("heatmap", image, "--model", model, "-o", out).exit_code == 0
        with np.load(out / "photo.scores.npz", allow_pickle=False) as npz:
            maps[model.suffix] = npz["scores"]
    assert maps[".pt2"].shape == (5, 21, 26)
    assert np.abs(maps[".pt2"] - maps[".onnx"]).max() <= 1e-4
