"""fcnify.heatmap.runners and summary: the local engine's summary, --resume, URIs, a missing Ray, and a run on a separate
Ray head."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fcnify.cli import app
from fcnify.errors import InputError, MissingDependencyError
from fcnify.heatmap.pipeline import HeatmapOptions, ImageJob, expected_outputs, run_image
from fcnify.heatmap.ray_engine import RayOptions
from fcnify.heatmap.runners import run_job
from fcnify.heatmap.summary import read_summary, rows_to_table, summary_schema, table_to_rows
from fcnify.images import fetch_uri, read_any
from fcnify.models import load_model

pa = pytest.importorskip("pyarrow")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
SCENES = sorted(SAMPLES.glob("digits_scene_*.png"))
runner = CliRunner()
NEW_COLUMNS = ("level", "downsample", "mpp", "tiles", "tiles_computed", "tiles_background", "tiles_resumed",
               "background_fraction", "seconds", "megapixels", "runtime", "scores_format", "mean", "std",
               "preprocessing_source")


def heatmap(*args):
    result = runner.invoke(app, ["heatmap", *[str(a) for a in args], "--json", "--device", "cpu"])
    return result, json.loads(result.stdout)


@pytest.fixture(scope="module")
def digits():
    from fcnify.convert import convert

    loaded = load_model("digits")
    fcn = convert(loaded.module, tuple(loaded.input_size), in_chans=loaded.in_chans)
    return loaded, fcn


@pytest.fixture
def scenes(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for scene in SCENES[:3]:
        shutil.copy(scene, folder / scene.name)
    return folder


def test_local_engine_writes_one_summary_file_with_the_schema(scenes, tmp_path):
    (scenes / "empty.png").write_bytes(b"")
    result, report = heatmap(scenes, "-o", tmp_path / "out", "--top-k", "2")
    assert result.exit_code == 1 and report["errors"] == 1 and report["processed"] == 4
    assert report["images_per_second"] > 0 and report["engine"] == "local"
    table = read_summary(tmp_path / "out")
    assert (tmp_path / "out" / "summary.parquet").is_file()
    assert table.schema.equals(summary_schema())
    assert set(NEW_COLUMNS) <= set(table.column_names)
    assert table.column("index").to_pylist() == [0, 1, 2, 3]
    rows = table.to_pylist()
    bad = next(r for r in rows if r["status"] == "error")
    assert "empty" in bad["error"] and bad["image_height"] is None and bad["top"] == []
    assert bad["tiles"] == 0 and bad["scores_format"] is None and bad["seconds"] >= 0
    good = [r for r in rows if r["status"] == "ok"]
    assert len(good) == 3
    for r, scene in zip(good, SCENES[:3], strict=True):
        assert r["path"] == str(scenes / scene.name) and r["stem"] == scene.stem and not r["skipped"]
        assert len(r["top"]) == 2 and r["outputs"][0] == f"{scene.stem}.heatmap.png"
        assert set(r["outputs"]) == {f"{scene.stem}.{kind}" for kind in ("heatmap.png", "classes.png", "scores.npz")}
        assert (r["level"], r["downsample"], r["mpp"]) == (0, 1.0, None)
        assert r["tiles"] >= 1 and r["tiles_computed"] + r["tiles_background"] == r["tiles"]
        assert r["tiles_resumed"] == 0 and r["background_fraction"] == r["tiles_background"] / r["tiles"]
        assert r["megapixels"] == pytest.approx(r["image_height"] * r["image_width"] / 1e6)
        assert r["seconds"] > 0 and r["runtime"] == "torch" and r["scores_format"] == "npz"
        assert r["mean"] == pytest.approx([0.1]) and r["std"] == pytest.approx([0.3])
        assert r["preprocessing_source"] == "zoo"  # the digits model brings its own normalisation
    # The rows round-trip into the CLI's SummaryRow objects.
    indices, back = table_to_rows(table, tmp_path / "out")
    assert indices == [0, 1, 2, 3]
    assert [r.path for r in back] == [r["path"] for r in report["rows"]]
    assert [list(r.outputs) for r in back] == [r["outputs"] for r in report["rows"]]
    for row, reported in zip(back, report["rows"], strict=True):
        for name in ("level", "downsample", "tiles", "tiles_computed", "tiles_background", "runtime",
                     "scores_format", "map_size", "image_size"):
            value = getattr(row, name)
            assert (list(value) if isinstance(value, tuple) else value) == reported[name], name


@pytest.mark.slow
def test_a_second_run_replaces_the_summary(scenes, tmp_path):
    outdir = tmp_path / "out"
    heatmap(scenes, "-o", outdir)
    (outdir / "summary.parquet").unlink()
    (outdir / "summary.parquet").mkdir()  # as Ray's writer leaves it
    (outdir / "summary.parquet" / "part-0.parquet").write_bytes(b"old")
    result, _ = heatmap(scenes / SCENES[0].name, scenes / SCENES[1].name, "-o", outdir)
    assert result.exit_code == 0
    assert (outdir / "summary.parquet").is_file()
    assert read_summary(outdir).column("stem").to_pylist() == [SCENES[0].stem, SCENES[1].stem]


def test_resume_redoes_incomplete_damaged_and_foreign_outputs(digits, scenes, tmp_path):
    """``run_image(resume=True)`` skips an input only when every file it gets is in place under its final name
    and its scores.npz loads, for a model with these labels."""
    loaded, fcn = digits
    options = HeatmapOptions(outdir=tmp_path / "out", classes=("3", "5"), device="cpu", top_k=2)
    job = ImageJob(fcn, fcn.geometry, loaded, options)
    path, stem = str(scenes / SCENES[0].name), SCENES[0].stem
    fresh = run_image(path, stem, job)
    targets = expected_outputs(stem, options.outdir, [3, 5], loaded.labels, "npz")
    assert len(targets) == 4 and {str(t) for t in targets.values()} <= set(fresh.outputs)
    row = run_image(path, stem, job, resume=True)
    assert row.skipped and row.status == "ok" and row.top == fresh.top and row.map_size == fresh.map_size
    assert row.image_size == fresh.image_size and row.scores_format == "npz"
    scores = targets["scores"]
    mtime = scores.stat().st_mtime_ns

    def redone() -> bool:
        row = run_image(path, stem, job, resume=True)
        assert row.status == "ok", row.error
        return not row.skipped

    # Other classes: other heatmap files, which do not exist.
    other = ImageJob(fcn, fcn.geometry, loaded, HeatmapOptions(outdir=tmp_path / "out", classes=("3",),
                                                               device="cpu", top_k=2))
    assert not run_image(path, stem, other, resume=True).skipped
    assert scores.stat().st_mtime_ns != mtime  # redone: the same stem's scores were rewritten
    # A temp file left in place of a missing output does not count.
    scores.rename(scores.with_name(f".{scores.name}.abc123.tmp"))
    assert redone() and scores.is_file()
    assert not list(scores.parent.glob(".*.tmp*"))  # the stale temporary is cleaned up
    scores.write_bytes(b"PK\x03\x04 not a zip")  # half-written by something else
    assert redone()
    with np.load(scores) as data:
        assert data["scores"].shape == (11, 33, 49)
    # A score file from another model (other labels) is redone.
    with np.load(scores) as data:
        arrays = {k: data[k] for k in data.files if k not in ("foreground",)}
    arrays["labels"] = np.asarray([f"x{i}" for i in range(11)])
    with open(scores, "wb") as f:
        np.savez_compressed(f, **arrays)
    assert redone()
    assert run_image(path, stem, job, resume=True).skipped  # and now it is complete again


def test_a_resumed_row_equals_the_fresh_one(digits, scenes, tmp_path):
    from heatmap_helpers import SMALL_META, converted_small, noise_image, save

    loaded, fcn = digits
    scene = ImageJob(fcn, fcn.geometry, loaded, HeatmapOptions(outdir=tmp_path / "out", device="cpu", top_k=2))
    small = ImageJob(converted_small(), converted_small().geometry, SMALL_META,
                     HeatmapOptions(outdir=tmp_path / "out", device="cpu", top_k=2))
    padded = str(save(noise_image(size=(20, 50)), tmp_path / "small.png"))
    for job, path, stem in ((scene, str(scenes / SCENES[0].name), SCENES[0].stem), (small, padded, "small")):
        fresh = run_image(path, stem, job)
        again = run_image(path, stem, job, resume=True)
        assert again.skipped
        for name in ("image_size", "map_size", "padded", "top", "outputs", "level", "downsample", "mpp",
                     "scores_format", "preprocessing"):
            assert getattr(again, name) == getattr(fresh, name), (stem, name)


@pytest.mark.slow
def test_local_resume_skips_complete_inputs(scenes, tmp_path):
    outdir = tmp_path / "out"
    heatmap(scenes, "-o", outdir)
    (outdir / f"{SCENES[1].stem}.classes.png").unlink()
    (outdir / f"{SCENES[2].stem}.scores.npz").write_bytes(b"damaged")
    mtime = (outdir / f"{SCENES[0].stem}.scores.npz").stat().st_mtime_ns
    result, report = heatmap(scenes, "-o", outdir, "--resume")
    assert result.exit_code == 0
    assert (report["processed"], report["skipped"]) == (2, 1)
    assert [r["skipped"] for r in report["rows"]] == [True, False, False]
    assert (outdir / f"{SCENES[1].stem}.classes.png").is_file()
    with np.load(outdir / f"{SCENES[2].stem}.scores.npz") as data:
        assert data["scores"].shape[0] == 11
    assert (outdir / f"{SCENES[0].stem}.scores.npz").stat().st_mtime_ns == mtime
    assert read_summary(outdir).column("skipped").to_pylist() == [True, False, False]


def test_read_any_reads_uris_in_memory(tmp_path):
    image = read_any(SCENES[0].as_uri())
    assert (image.height, image.width) == (160, 224)
    assert fetch_uri(SCENES[0].as_uri()) == SCENES[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(SCENES[0].read_bytes()[:300])
    with pytest.raises(InputError, match=r"file://.*cut\.png is a (truncated|corrupt) image"):
        read_any((tmp_path / "cut.png").as_uri())
    with pytest.raises(InputError, match="no such image"):
        read_any((tmp_path / "nothing.png").as_uri())
    with pytest.raises(InputError, match="is a folder"):
        fetch_uri(tmp_path.as_uri())
    with pytest.raises(InputError, match="--max-pixels"):
        read_any(SCENES[0].as_uri(), max_pixels=100)
    with pytest.raises(InputError, match="cannot read"):
        read_any("nosuchscheme://bucket/x.png")


def test_uris_run_through_the_local_engine(digits, tmp_path):
    """A file:// URI is read through pyarrow like any remote image; a missing one is an error row."""
    loaded, fcn = digits
    uris = [SCENES[0].as_uri(), (tmp_path / "missing.png").as_uri()]
    result = run_job(uris, fcn, fcn.geometry, loaded, HeatmapOptions(outdir=tmp_path / "out", device="cpu",
                                                                       top_k=1, foreground="all"))
    assert [r.status for r in result.rows] == ["ok", "error"] and [r.path for r in result.rows] == uris
    assert "no such image" in result.rows[1].error
    with np.load(tmp_path / "out" / f"{SCENES[0].stem}.scores.npz") as from_uri:
        scores = from_uri["scores"]
    local = run_job([SCENES[0]], fcn, fcn.geometry, loaded, HeatmapOptions(outdir=tmp_path / "local",
                                                                             device="cpu", top_k=1,
                                                                             foreground="all"))
    assert local.rows[0].status == "ok"
    with np.load(tmp_path / "local" / f"{SCENES[0].stem}.scores.npz") as data:
        np.testing.assert_array_equal(scores, data["scores"])
    assert read_summary(tmp_path / "out").column("path").to_pylist() == uris


def test_summary_tables_have_one_schema(tmp_path):
    empty = rows_to_table([], [], [], tmp_path)
    assert empty.schema.equals(summary_schema()) and empty.num_rows == 0


def test_missing_ray_says_how_to_install_it(monkeypatch, scenes, tmp_path):
    for name in ("ray", "ray.data"):
        monkeypatch.setitem(sys.modules, name, None)  # import ray -> ImportError
    result = runner.invoke(app, ["heatmap", str(scenes), "-o", str(tmp_path / "o"), "--engine", "ray"])
    assert result.exit_code == 1
    assert "pip install 'fcnify[ray]'" in result.stderr
    with pytest.raises(MissingDependencyError) as info:
        from fcnify.heatmap.ray_engine import require_ray

        require_ray()
    assert info.value.hint == "pip install 'fcnify[ray]'" and info.value.exit_code == 1
    assert not (tmp_path / "o").exists()  # refused before any work


def test_bad_engine_options_fail_before_any_work(digits, scenes, tmp_path):
    result = runner.invoke(app, ["heatmap", str(scenes), "-o", str(tmp_path / "o"), "--engine", "spark"])
    assert result.exit_code == 1 and "unknown engine" in result.stderr
    loaded, fcn = digits
    with pytest.raises(InputError, match="unknown engine"):
        run_job([SCENES[0]], fcn, fcn.geometry, loaded, HeatmapOptions(outdir=tmp_path / "o"), engine="spark")
    for options, fragment in ((RayOptions(workers=0), "--workers"), (RayOptions(gpus_per_worker=-1), "--gpus"),
                              (RayOptions(cpus_per_worker=0), "--cpus")):
        with pytest.raises(InputError, match=fragment):
            options.validate()
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ a separate Ray head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """``ray start --head --block`` on 127.0.0.1 with token authentication, in its own session; stopped by
    killing that session's process group (never ``ray stop``, which would stop every Ray on the machine)."""
    pytest.importorskip("ray.data")
    from ray_helpers import use_test_token

    with pytest.MonkeyPatch.context() as mp:
        token = use_test_token(mp)
        mp.delenv("RAY_ADDRESS", raising=False)
        port = _free_port()
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
               # Keep the node IP and every server on loopback (see fcnify.heatmap.ray_engine._loopback_only).
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        ray_cli = Path(sys.executable).with_name("ray")
        log = tmp_path_factory.mktemp("head") / "head.log"
        # Its own temp dir (short: Ray's socket paths must stay under 108 bytes), so that the address file
        # other Rays on this machine look at (/tmp/ray/ray_current_cluster) is not touched.
        temp_dir = tempfile.mkdtemp(prefix="fcnray", dir="/tmp")
        with open(log, "wb") as out:
            head = subprocess.Popen(
                [str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                 "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                 f"--temp-dir={temp_dir}"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            address = f"127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while b"block forever" not in log.read_bytes():
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start failed:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield {"address": address, "pid": head.pid, "pgid": os.getpgid(head.pid), "token": token}
        finally:
            _stop_session(head)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _stop_session(head: subprocess.Popen) -> None:
    """SIGTERM the head's process group, then SIGKILL what is left of its session after a few seconds
    (``ray start --block`` does not exit promptly on SIGTERM)."""
    sid = head.pid  # start_new_session: the head leads its own session and process group
    try:
        os.killpg(sid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 3
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    head.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _live(_session_pids(sid)):
        assert time.monotonic() < deadline, f"Ray processes left running: {_live(_session_pids(sid))}"
        time.sleep(0.2)


def _live(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except OSError:
            pass
    return alive


@pytest.mark.ray
def test_a_run_against_a_separate_head_uses_that_cluster(ray_head, scenes, tmp_path):
    import ray

    assert not ray.is_initialized()
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert heatmap(scenes, "-o", local)[0].exit_code == 0
    result, report = heatmap(scenes, "-o", remote, "--engine", "ray", "--ray-address", ray_head["address"],
                             "--workers", "2")
    assert result.exit_code == 0, result.output
    # The job ran on that head: its GCS address, its only node (loopback), and fcnify disconnected after.
    assert report["cluster"]["address"] == ray_head["address"]
    assert report["cluster"]["node_ips"] == ["127.0.0.1"] and len(report["cluster"]["nodes"]) == 1
    assert not ray.is_initialized()
    names = sorted(p.name for p in local.iterdir() if p.name != "summary.parquet")
    assert names == sorted(p.name for p in remote.iterdir() if p.name != "summary.parquet")
    for name in names:
        if name.endswith(".npz"):
            with np.load(local / name) as a, np.load(remote / name) as b:
                np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-6)
    assert read_summary(remote).column("path").to_pylist() == read_summary(local).column("path").to_pylist()

    # Without the cluster's token, the connection is refused with a line saying how to authenticate.
    with pytest.MonkeyPatch.context() as mp:
        from ray._private.authentication_test_utils import reset_auth_token_state

        mp.setenv("RAY_AUTH_TOKEN", "0" * 64)
        reset_auth_token_state()
        try:
            bad = runner.invoke(app, ["heatmap", str(scenes), "-o", str(tmp_path / "x"), "--engine", "ray",
                                      "--ray-address", ray_head["address"]])
        finally:
            mp.setenv("RAY_AUTH_TOKEN", ray_head["token"])
            reset_auth_token_state()
    assert bad.exit_code == 1 and "RAY_AUTH_TOKEN" in bad.stderr
