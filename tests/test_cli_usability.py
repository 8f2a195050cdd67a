"""What a new user meets in the first hour: re-runs, output formats, failures, progress, flags (issue 21)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from nets import small_cnn
from PIL import Image
from test_cli import SAMPLES, assert_clean_error, invoke

from fcnify._version import __version__

ROOT = Path(__file__).resolve().parent.parent


def _photos(folder: Path, count: int, size=(40, 52)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"p{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _converted(tmp_path: Path, *extra: str) -> Path:
    weights = tmp_path / "small.pth"
    torch.save(small_cnn().state_dict(), weights)
    out = tmp_path / "small.pt2"
    result = invoke("convert", weights, "--arch", "nets:small_cnn", "--input-size", "20x24", "-o", out, *extra)
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------------------------------- 1: re-runs


def test_heatmap_of_a_folder_run_twice_takes_no_output_as_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _photos(tmp_path, 2)
    first = invoke("heatmap", ".", "--json")
    assert first.exit_code == 0, first.output
    assert len(json.loads(first.stdout)["rows"]) == 2
    second = invoke("heatmap", ".", "--json")
    assert second.exit_code == 0, second.output
    rows = json.loads(second.stdout)["rows"]
    assert sorted(Path(r["path"]).name for r in rows) == ["p000.png", "p001.png"]
    assert not list((tmp_path / "fcnify-out").glob("*.heatmap.heatmap.png"))
    outputs = [p for p in (tmp_path / "fcnify-out").iterdir() if p.suffix == ".png"]  # heatmaps, class panels
    assert len(outputs) >= 4 and f"skipped {len(outputs)} files" in second.stderr


# -------------------------------------------------------------------------------------- 5: -o suffixes


def test_convert_writes_the_format_its_output_suffix_names(tmp_path):
    onnx = _converted(tmp_path).with_name("small.onnx")
    weights = tmp_path / "small.pth"
    result = invoke("convert", weights, "--arch", "nets:small_cnn", "--input-size", "20x24", "-o", onnx, "--json")
    assert result.exit_code == 0, result.output
    assert not zipfile.is_zipfile(onnx)
    import onnx as onnx_lib

    onnx_lib.checker.check_model(str(onnx))
    assert json.loads(result.stdout)["output"] == str(onnx)
    checked = invoke("verify", onnx, "--against", weights, "--arch", "nets:small_cnn")
    assert checked.exit_code == 0, checked.output
    bad = invoke("convert", weights, "--arch", "nets:small_cnn", "--input-size", "20x24", "-o", tmp_path / "m.zip")
    assert_clean_error(bad, 1, "m.zip", ".pt2", ".onnx")
    assert not (tmp_path / "m.zip").exists()


def test_an_onnx_without_metadata_hints_at_a_command_that_writes_onnx(tmp_path):
    from fcnify.errors import ModelLoadError
    from fcnify.onnx_runtime import load_onnx_model

    text = tmp_path / "foreign.onnx"
    text.write_text("not onnx")
    with pytest.raises(ModelLoadError) as caught:
        load_onnx_model(text)
    # The command the hint names must write ONNX: with -o ending in .onnx it does (tested above).
    assert "-o model.onnx" in caught.value.hint or "--onnx model.onnx" in caught.value.hint


# ------------------------------------------------------------------------------ 7: onnxruntime for a .pt2


def test_runtime_onnxruntime_runs_a_converted_pt2(tmp_path):
    pt2 = _converted(tmp_path)
    image = _photos(tmp_path / "in", 1, (61, 75))[0]
    maps = {}
    for runtime in ("torch", "onnxruntime"):
        out = tmp_path / runtime
        result = invoke("heatmap", image, "--model", pt2, "--runtime", runtime, "-o", out, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["rows"][0]["runtime"] == runtime
        with np.load(out / "p000.scores.npz", allow_pickle=False) as npz:
            maps[runtime] = npz["scores"]
    assert maps["torch"].shape == (5, 21, 26)
    np.testing.assert_allclose(maps["onnxruntime"], maps["torch"], rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- 8: failures


def test_a_failed_image_is_one_line_and_the_footer_names_only_written_outputs(tmp_path):
    good = _photos(tmp_path / "in", 1)[0]
    out = tmp_path / "out"
    result = invoke("heatmap", good, tmp_path / "missing.png", "-o", out, "--formats", "scores")
    assert result.exit_code == 1
    assert result.stderr.count("missing.png") == 1, result.stderr
    assert "missing.png" not in result.stdout
    assert ".heatmap.png" not in result.stdout and ".classes.png" not in result.stdout
    assert "mask.png" not in result.stdout  # the image has no background: no mask was written
    assert "p000.scores.npz" in result.stdout or ".scores.npz" in result.stdout


def test_nothing_is_left_when_no_image_ran(tmp_path):
    out = tmp_path / "out"
    result = invoke("heatmap", tmp_path / "missing.png", tmp_path / "gone.jpg", "-o", out)
    assert_clean_error(result, 1, "missing.png", "gone.jpg")
    assert not out.exists()
    assert "Dense class maps" not in result.stdout


def test_library_log_lines_stay_off_the_terminal_unless_verbose(tmp_path):
    import tifffile

    # A TIFF with a tag of an unknown type: tifffile reads the image and logs an ERROR about the tag.
    odd = tmp_path / "odd.tif"
    tifffile.imwrite(odd, np.zeros((40, 52, 3), np.uint8), photometric="rgb", extratags=[(65000, "H", 1, 7, True)])
    data = bytearray(odd.read_bytes())
    at = data.find((65000).to_bytes(2, "little"))
    data[at + 2:at + 4] = (99).to_bytes(2, "little")
    odd.write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*flags):
        return subprocess.run([sys.executable, "-m", "fcnify", *flags, "heatmap", str(odd), "-o", str(tmp_path / "o"),
                               "--formats", "scores", "--foreground", "all"], capture_output=True, text=True, env=env, timeout=120)

    quiet = run()
    assert quiet.returncode == 0, quiet.stderr
    assert "TiffTag" not in quiet.stderr, quiet.stderr
    assert "TiffTag" in run("--verbose").stderr


@pytest.mark.parametrize("command", ["convert", "heatmap"])
def test_a_text_file_as_a_model_says_which_formats_fcnify_reads(tmp_path, command):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes on the model\n")
    args = ("convert", notes) if command == "convert" else ("heatmap", SAMPLES / "digits_scene_1.png", "--model",
                                                            notes, "-o", tmp_path / "o")
    result = invoke(*args)
    assert_clean_error(result, 1, "notes.txt", "not a model", ".pt2", ".onnx", ".safetensors")
    assert "IndexError" not in result.output
    trusted = invoke(*args, "--trust-model")
    assert_clean_error(trusted, 1, "notes.txt", "not a model")


# ------------------------------------------------------------------------------------------- 9: progress


def test_without_a_terminal_each_image_gets_a_progress_line(tmp_path):
    paths = _photos(tmp_path / "in", 3)
    result = invoke("heatmap", *paths, "-o", tmp_path / "out", "--formats", "scores")
    assert result.exit_code == 0, result.output
    for i, path in enumerate(paths, 1):
        assert f"[{i}/3] {path.name}" in result.stderr, result.stderr


def test_without_a_terminal_an_image_of_many_tiles_gets_lines_as_it_goes(tmp_path):
    image = _photos(tmp_path / "in", 1, (200, 260))[0]
    result = invoke("heatmap", image, "-o", tmp_path / "out", "--formats", "scores", "--tile", "48",
                    "--foreground", "all", "--json")
    assert result.exit_code == 0, result.output
    tiles = json.loads(result.stdout)["rows"][0]["tiles"]
    assert tiles >= 50
    lines = [line for line in result.stderr.splitlines() if "tiles)" in line and line.startswith("[1/1] p000.png")]
    assert 10 <= len(lines) <= 11, result.stderr
    assert lines[-1].endswith(f"({tiles}/{tiles} tiles)") or f"/{tiles} tiles)" in lines[-1]


def test_many_images_get_a_summary_not_a_table_and_json_stays_parseable(tmp_path):
    paths = _photos(tmp_path / "in", 22, (24, 28))
    out = tmp_path / "out"
    result = invoke("heatmap", *paths, tmp_path / "missing.png", "-o", out, "--formats", "scores")
    assert result.exit_code == 1
    assert "Dense class maps" not in result.stdout
    assert "22 ok, 1 failed" in result.stdout and "summary.parquet" in result.stdout
    assert len(result.stdout.splitlines()) < 15, result.stdout
    assert "missing.png" in result.stderr
    as_json = invoke("heatmap", *paths, "-o", out, "--formats", "scores", "--json")
    assert as_json.exit_code == 0
    assert len(json.loads(as_json.stdout)["rows"]) == 22


# -------------------------------------------------------------------------------------- 11: flags, version


def test_version_prints_the_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"fcnify {__version__}"


def test_help_shows_flags_without_a_value_type():
    for command in ("heatmap", "convert", "verify"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "<bool>" not in result.stdout and "BOOLEAN" not in result.stdout, result.stdout
    assert "<bool>" not in invoke("--help").stdout


def test_resume_takes_no_value(tmp_path):
    image = _photos(tmp_path / "in", 1)[0]
    out = tmp_path / "out"
    assert invoke("heatmap", image, "-o", out, "--formats", "scores").exit_code == 0
    again = invoke("heatmap", "--resume", image, "-o", out, "--formats", "scores", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["skipped"] == 1
    valued = invoke("heatmap", image, "--resume", "true", "-o", out)
    assert_clean_error(valued, 1, "true", "take no value")
