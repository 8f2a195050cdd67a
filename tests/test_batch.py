"""fcnify.batch: the local engine's summary, --resume, URIs, a missing Ray, and a run on a separate Ray head."""

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

from fcnify.batch import (
    RayOptions,
    completed_row,
    read_any,
    read_summary,
    rows_to_table,
    run_job,
    summary_schema,
    table_to_rows,
)
from fcnify.cli import app
from fcnify.errors import FcnifyError, InputError
from fcnify.models import load_model
from fcnify.outputs import HeatmapOptions, expected_outputs

pa = pytest.importorskip("pyarrow")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
SCENES = sorted(SAMPLES.glob("digits_scene_*.png"))
runner = CliRunner()


def heatmap(*args):
    result = runner.invoke(app, ["heatmap", *[str(a) for a in args], "--json"])
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
    assert report["images_per_second"] > 0
    table = read_summary(tmp_path / "out")
    assert (tmp_path / "out" / "summary.parquet").is_file()
    assert table.schema.equals(summary_schema())
    assert table.column("index").to_pylist() == [0, 1, 2, 3]
    rows = table.to_pylist()
    bad = next(r for r in rows if r["status"] == "error")
    assert "empty" in bad["error"] and bad["image_height"] is None and bad["top"] == []
    good = [r for r in rows if r["status"] == "ok"]
    assert all(len(r["top"]) == 2 and r["outputs"][0].endswith(".heatmap.png") for r in good)
    # The rows round-trip into the CLI's SummaryRow objects.
    indices, back = table_to_rows(table, tmp_path / "out")
    assert indices == [0, 1, 2, 3]
    assert [r.path for r in back] == [r["path"] for r in report["rows"]]
    assert [list(r.outputs) for r in back] == [r["outputs"] for r in report["rows"]]


def test_a_second_run_replaces_the_summary(scenes, tmp_path):
    outdir = tmp_path / "out"
    heatmap(scenes, "-o", outdir)
    (outdir / "summary.parquet").unlink()
    (outdir / "summary.parquet").mkdir()  # as Ray's writer leaves it
    (outdir / "summary.parquet" / "part-0.parquet").write_bytes(b"old")
    result, _ = heatmap(scenes, "-o", outdir)
    assert result.exit_code == 0
    assert read_summary(outdir).num_rows == 3


def test_completed_row_needs_every_file_and_a_loading_npz(digits, scenes, tmp_path):
    loaded, fcn = digits
    options = HeatmapOptions(outdir=tmp_path / "out", classes=("3", "5"))
    path = str(scenes / SCENES[0].name)
    fresh = run_job([path], fcn, fcn.geometry, loaded, options).rows[0]
    classes, labels, window = [3, 5], loaded.labels, fcn.geometry.window
    targets = expected_outputs(SCENES[0].stem, options.outdir, classes, labels)
    assert set(fresh.outputs) == {str(t) for t in targets.values()} and len(targets) == 4
    row = completed_row(path, SCENES[0].stem, options, classes, labels, window)
    assert row.skipped and row.top == fresh.top and row.map_size == fresh.map_size
    assert row.image_size == fresh.image_size and row.padded == fresh.padded
    # Other classes: other heatmap files, which do not exist.
    assert completed_row(path, SCENES[0].stem, options, [3], labels, window) is None
    # A temp file left in place of a missing output does not count.
    scores = targets["scores"]
    scores.rename(scores.with_name(f".{scores.name}.abc123.tmp"))
    assert completed_row(path, SCENES[0].stem, options, classes, labels, window) is None
    scores.write_bytes(b"PK\x03\x04 not a zip")  # half-written by something else
    assert completed_row(path, SCENES[0].stem, options, classes, labels, window) is None


def test_local_resume_skips_complete_inputs(scenes, tmp_path):
    outdir = tmp_path / "out"
    heatmap(scenes, "-o", outdir)
    (outdir / f"{SCENES[1].stem}.classes.png").unlink()
    mtime = (outdir / f"{SCENES[0].stem}.scores.npz").stat().st_mtime_ns
    result, report = heatmap(scenes, "-o", outdir, "--resume")
    assert result.exit_code == 0
    assert (report["processed"], report["skipped"]) == (1, 2)
    assert [r["skipped"] for r in report["rows"]] == [True, False, True]
    assert (outdir / f"{SCENES[1].stem}.classes.png").is_file()
    assert (outdir / f"{SCENES[0].stem}.scores.npz").stat().st_mtime_ns == mtime
    assert read_summary(outdir).column("skipped").to_pylist() == [True, False, True]


def test_read_any_reads_uris_in_memory(tmp_path):
    image = read_any(SCENES[0].as_uri())
    assert (image.height, image.width) == (160, 224)
    (tmp_path / "cut.png").write_bytes(SCENES[0].read_bytes()[:300])
    with pytest.raises(InputError, match=r"file://.*cut\.png is a (truncated|corrupt) image"):
        read_any((tmp_path / "cut.png").as_uri())
    with pytest.raises(InputError, match="no such image"):
        read_any((tmp_path / "nothing.png").as_uri())
    with pytest.raises(InputError, match="--max-pixels"):
        read_any(SCENES[0].as_uri(), max_pixels=100)
    with pytest.raises(InputError, match="cannot read"):
        read_any("nosuchscheme://bucket/x.png")


def test_summary_tables_have_one_schema(tmp_path):
    empty = rows_to_table([], [], [], tmp_path)
    assert empty.schema.equals(summary_schema()) and empty.num_rows == 0


def test_missing_ray_says_how_to_install_it(monkeypatch, scenes, tmp_path):
    for name in ("ray", "ray.data"):
        monkeypatch.setitem(sys.modules, name, None)  # import ray -> ImportError
    result = runner.invoke(app, ["heatmap", str(scenes), "-o", str(tmp_path / "o"), "--engine", "ray"])
    assert result.exit_code == 1
    assert "pip install 'fcnify[ray]'" in result.stderr
    with pytest.raises(FcnifyError) as info:
        from fcnify.batch import require_ray

        require_ray()
    assert info.value.hint == "pip install 'fcnify[ray]'"


def test_bad_engine_options_fail_before_any_work(scenes, tmp_path):
    result = runner.invoke(app, ["heatmap", str(scenes), "-o", str(tmp_path / "o"), "--engine", "spark"])
    assert result.exit_code == 1 and "unknown engine" in result.stderr
    with pytest.raises(InputError, match="--workers"):
        RayOptions(workers=0).validate()


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
    from test_ray import use_test_token

    with pytest.MonkeyPatch.context() as mp:
        token = use_test_token(mp)
        mp.delenv("RAY_ADDRESS", raising=False)
        port = _free_port()
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
               # Keep the node IP and every server on loopback (see fcnify.batch._loopback_only).
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
