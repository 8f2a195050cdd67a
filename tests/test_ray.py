"""The Ray engine against the local engine, on one local Ray (2 CPUs, 127.0.0.1 only) for the whole module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
import pyarrow.csv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fcnify.cli import app  # noqa: E402
from fcnify.heatmap.summary import read_summary  # noqa: E402

pytestmark = pytest.mark.ray

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
SCENES = sorted(SAMPLES.glob("digits_scene_*.png"))
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def heatmap(*args):
    result = invoke("heatmap", *args, "--json")
    return result, json.loads(result.stdout)


@pytest.fixture
def scenes(tmp_path) -> Path:
    """The digit scenes and one corrupt file, in a folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    for scene in SCENES:
        shutil.copy(scene, folder / scene.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def output_files(outdir: Path) -> set[str]:
    return {p.relative_to(outdir).as_posix() for p in outdir.rglob("*")
            if p.is_file() and SUMMARY not in p.parts}


SUMMARY = "summary.parquet"


def assert_same_outputs(local: Path, ray: Path) -> None:
    """Same file names; the same scores (to float rounding: the engines batch and thread differently) and
    images (to one grey level)."""
    names = output_files(local)
    assert names == output_files(ray)
    assert any(n.endswith(".scores.npz") for n in names)
    for name in names:
        if name.endswith(".npz"):
            with np.load(local / name) as a, np.load(ray / name) as b:
                assert a.files == b.files
                for key in a.files:
                    if a[key].dtype.kind == "f":
                        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=f"{name}:{key}")
                    else:
                        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
        else:
            a = np.asarray(Image.open(local / name), dtype=np.int16)
            b = np.asarray(Image.open(ray / name), dtype=np.int16)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1, name


def assert_same_summary(local: Path, ray: Path) -> None:
    a, b = read_summary(local), read_summary(ray)
    assert a.schema.equals(b.schema)
    assert (ray / SUMMARY).is_dir() and (local / SUMMARY).is_file()  # Ray's writer gives a folder
    for column in a.column_names:
        if column not in ("top", "seconds"):  # seconds: each engine's own timing
            assert a.column(column).to_pylist() == b.column(column).to_pylist(), column
    assert all(t is not None and t >= 0 for t in b.column("seconds").to_pylist())
    for top_a, top_b in zip(a.column("top").to_pylist(), b.column("top").to_pylist(), strict=True):
        assert [p["label"] for p in top_a] == [p["label"] for p in top_b]
        assert [(p["y"], p["x"]) for p in top_a] == [(p["y"], p["x"]) for p in top_b]
        np.testing.assert_allclose([p["score"] for p in top_a], [p["score"] for p in top_b], atol=1e-6)


def test_ray_engine_gives_the_local_files(local_ray, scenes, tmp_path):
    local, ray = tmp_path / "local", tmp_path / "ray"
    result_local, report_local = heatmap(scenes, "-o", local)
    result_ray, report_ray = heatmap(scenes, "-o", ray, "--engine", "ray", "--workers", "2", "--batch-size", "2")
    # The corrupt file is an error row; the job goes on and exits non-zero.
    for result, report in ((result_local, report_local), (result_ray, report_ray)):
        assert result.exit_code == 1
        assert (report["ok"], report["errors"]) == (len(SCENES), 1)
        assert "1 of 5 images failed" in result.stderr
        assert [r["path"] for r in report["rows"] if r["status"] == "error"] == [str(scenes / "broken.png")]
    assert report_ray["engine"] == "ray"
    assert report_ray["cluster"]["node_ips"] == ["127.0.0.1"]
    assert report_ray["cluster"]["address"] == local_ray.get_runtime_context().gcs_address
    def rows(report, outdir):
        return [[r["path"], r["status"], r["error"], r["image_size"], r["map_size"],
                 [Path(o).relative_to(outdir).as_posix() for o in r["outputs"]]] for r in report["rows"]]

    assert rows(report_ray, ray) == rows(report_local, local)
    assert_same_outputs(local, ray)
    assert_same_summary(local, ray)


@pytest.mark.parametrize("kind", ["txt", "csv", "parquet"])
def test_every_manifest_format_on_ray(local_ray, scenes, tmp_path, kind):
    images = [p.name for p in sorted(scenes.glob("digits_scene_*.png"))[:2]]
    manifest = scenes / f"list.{kind}"  # relative entries: relative to the manifest's folder
    if kind == "txt":
        manifest.write_text("# two scenes\n" + "\n".join(images) + "\n")
    elif kind == "csv":
        pyarrow.csv.write_csv(pa.table({"path": images, "note": ["a", "b"]}), manifest)
    else:
        pq.write_table(pa.table({"path": images}), manifest)
    outdir = tmp_path / f"out-{kind}"
    result, report = heatmap("--manifest", manifest, "-o", outdir, "--engine", "ray")
    assert result.exit_code == 0, result.output
    assert report["ok"] == 2
    stems = [Path(i).stem for i in images]
    # Ordinary pictures: every cell computed by default, so no background mask is written.
    assert output_files(outdir) == {f"{s}.{suffix}" for s in stems
                                    for suffix in ("heatmap.png", "classes.png", "scores.npz")}
    assert read_summary(outdir).column("stem").to_pylist() == stems


def test_duplicate_stems_keep_their_folders_on_both_engines(local_ray, tmp_path):
    for folder in ("a", "b/c"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        shutil.copy(SCENES[0], tmp_path / "in" / folder / "scene.png")
    shutil.copy(SCENES[1], tmp_path / "in" / "other.png")
    local, ray = tmp_path / "local", tmp_path / "ray"
    assert heatmap(tmp_path / "in", "-o", local)[0].exit_code == 0
    result, report = heatmap(tmp_path / "in", "-o", ray, "--engine", "ray", "--workers", "2", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert {n.rsplit(".", 2)[0] for n in output_files(ray)} == {"a/scene", "b/c/scene", "other"}
    assert_same_outputs(local, ray)
    assert_same_summary(local, ray)


def test_resume_redoes_exactly_the_incomplete_inputs(local_ray, scenes, tmp_path):
    (scenes / "broken.png").unlink()
    outdir = tmp_path / "out"
    assert heatmap(scenes, "-o", outdir)[0].exit_code == 0
    names = sorted(p.stem for p in scenes.glob("*.png"))
    # A job stopped midway: one input never done, one with a file missing and a temp file left by the
    # interrupted write in its place, two complete.
    for path in outdir.glob(f"{names[0]}.*"):
        path.unlink()
    scores = outdir / f"{names[1]}.scores.npz"
    scores.rename(outdir / f".{scores.name}.x1y2z3.tmp")
    (outdir / f".{scores.name}.x1y2z3.tmp").write_bytes(b"half")
    before = {p.name: p.stat().st_mtime_ns for p in outdir.glob("*") if p.is_file()}

    result, report = heatmap(scenes, "-o", outdir, "--engine", "ray", "--workers", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert report["processed"] == 2 and report["skipped"] == 2
    redone = {Path(r["path"]).stem for r in report["rows"] if not r["skipped"]}
    assert redone == {names[0], names[1]}
    for name in names[2:]:  # untouched
        for path in outdir.glob(f"{name}.*"):
            assert path.stat().st_mtime_ns == before[path.name]
    for name in names[:2]:
        assert all((outdir / f"{name}.{s}").is_file() for s in ("heatmap.png", "classes.png", "scores.npz"))
    # Skipped rows are filled from their scores.npz: the same as a fresh run's.
    fresh = tmp_path / "fresh"
    assert heatmap(scenes, "-o", fresh)[0].exit_code == 0
    resumed, reference = read_summary(outdir), read_summary(fresh)
    assert resumed.column("skipped").to_pylist() == [n not in redone for n in names]
    for column in ("path", "stem", "status", "image_height", "map_width", "top", "outputs"):
        if column == "top":
            assert [[p["label"] for p in t] for t in resumed.column(column).to_pylist()] == \
                [[p["label"] for p in t] for t in reference.column(column).to_pylist()]
        else:
            assert resumed.column(column).to_pylist() == reference.column(column).to_pylist(), column


def test_uris_are_read_by_the_workers(local_ray, tmp_path):
    manifest = tmp_path / "uris.txt"
    manifest.write_text(f"{SCENES[0].as_uri()}\nfile://{tmp_path}/missing.png\n")
    result, report = heatmap("--manifest", manifest, "-o", tmp_path / "out", "--engine", "ray")
    assert result.exit_code == 1
    rows = {Path(r["path"]).name: r for r in report["rows"]}
    assert rows[SCENES[0].name]["status"] == "ok"
    assert "no such image" in rows["missing.png"]["error"]
    assert (tmp_path / "out" / f"{SCENES[0].stem}.scores.npz").is_file()
