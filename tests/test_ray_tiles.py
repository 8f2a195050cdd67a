"""The Ray engine sharing the tiles of slides over its actors: the same store as the local engine, a killed
worker retried, a killed driver resumed. One local Ray (2 CPUs, 127.0.0.1 only) for the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data")
import torch  # noqa: E402
import zarr  # noqa: E402
from ray_helpers import raylet_children  # noqa: E402
from slides import write_slide  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fcnify.cli import app  # noqa: E402

pytestmark = pytest.mark.ray
runner = CliRunner()
NET = ["--arch", "nets:slide_net", "--input-size", "32"]
ACTOR = "MapWorker(MapBatches(_Worker))"  # the title Ray Data gives the pool's actor processes


@pytest.fixture(scope="module")
def slide_model(tmp_path_factory) -> Path:
    """A state_dict of ``nets.slide_net`` (padded, stride 4, window 32, 3 classes)."""
    import nets

    path = tmp_path_factory.mktemp("model") / "slide_net.pt"
    torch.manual_seed(3)
    torch.save(nets.slide_net().state_dict(), path)
    return path


def heatmap(*args) -> tuple[object, dict]:
    result = runner.invoke(app, ["heatmap", *map(str, args), "--json"])
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else {})


def store(path: Path):
    group = zarr.open_group(str(path), mode="r")
    return group["scores"][:], group["tiles"][:], dict(group.attrs)


def assert_same_store(local: Path, ray: Path) -> None:
    """Values to 1e-5 (the engines thread differently), the same NaN (background) pattern, the same tile
    status grid and attributes (geometry, run key, peaks)."""
    a, tiles_a, attrs_a = store(local)
    b, tiles_b, attrs_b = store(ray)
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(tiles_a, tiles_b)
    for key in set(attrs_a) | set(attrs_b):
        if key == "peaks":
            assert [p["label"] for p in attrs_a[key]] == [p["label"] for p in attrs_b[key]]
            assert [(p["y"], p["x"]) for p in attrs_a[key]] == [(p["y"], p["x"]) for p in attrs_b[key]]
        else:
            assert attrs_a.get(key) == attrs_b.get(key), key


def done_lines(outdir: Path, stem: str) -> int:
    log = outdir / f".{stem}.scores.zarr.partial" / "fcnify-done.log"
    try:
        return log.read_text().count("\n")
    except OSError:
        return 0


def test_tiles_of_two_slides_on_two_workers_equal_the_local_engine(local_ray, tmp_path, slide_model):
    white = write_slide(tmp_path / "white.svs", size=(900, 1100), kind="svs", background="white", seed=1,
                        density=0.35)
    black = write_slide(tmp_path / "black.ome.tif", size=(700, 800), kind="ome", background="black", seed=2)
    args = [white, black, "--model", slide_model, *NET, "--tile", "160", "--formats", "png,scores,geojson"]
    local, ray = tmp_path / "local", tmp_path / "ray"
    result, report_local = heatmap(*args, "-o", local)
    assert result.exit_code == 0, result.output
    result, report = heatmap(*args, "-o", ray, "--engine", "ray", "--workers", "2", "--split", "tiles",
                             "--batch-size", "3")
    assert result.exit_code == 0, result.output
    assert report["cluster"]["split"] == "tiles" and report["cluster"]["node_ips"] == ["127.0.0.1"]
    for name in ("white", "black"):
        assert_same_store(local / f"{name}.scores.zarr", ray / f"{name}.scores.zarr")
        features = [json.loads((d / f"{name}.geojson").read_text())["features"] for d in (local, ray)]
        assert [f["properties"]["classification"] for f in features[0]] == \
            [f["properties"]["classification"] for f in features[1]]
    for row_local, row in zip(report_local["rows"], report["rows"], strict=True):
        assert row["status"] == "ok" and row["tiles"] > 4  # several tiles: the slide really was shared out
        for key in ("path", "tiles", "tiles_computed", "tiles_background", "map_size", "image_size"):
            assert row[key] == row_local[key], key
        assert row["tiles_background"] > 0  # tissue-free tiles skipped by the actors as by the local engine
        assert [Path(o).relative_to(ray) for o in row["outputs"]] == \
            [Path(o).relative_to(local) for o in row_local["outputs"]]
    assert not [p for p in ray.iterdir() if p.name.startswith(".")]  # no partial stores left


def test_a_killed_worker_is_retried_and_the_job_exits_0(local_ray, tmp_path, slide_model):
    slide = write_slide(tmp_path / "long.svs", size=(1536, 1536), kind="svs", background="white", seed=4,
                        density=0.6)
    args = [slide, "--model", slide_model, *NET, "--tile", "96", "--foreground", "all", "--batch-size", "2"]
    reference = tmp_path / "local"
    assert heatmap(*args, "-o", reference)[0].exit_code == 0
    out = tmp_path / "ray"
    killed: list[tuple[int, int]] = []

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            logged = done_lines(out, "long")
            workers = raylet_children(local_ray, ACTOR)
            if logged >= 20 and workers:
                os.kill(workers[0], signal.SIGKILL)
                killed.append((workers[0], logged))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    result, report = heatmap(*args, "-o", out, "--engine", "ray", "--workers", "2", "--split", "tiles")
    killer.join(timeout=5)
    assert killed, "no worker was killed: the job ended first"
    pid, logged = killed[0]
    assert logged < report["rows"][0]["tiles"]  # killed mid-run
    assert not Path(f"/proc/{pid}").exists()
    assert result.exit_code == 0, result.output
    assert report["rows"][0]["tiles_computed"] == report["rows"][0]["tiles"]
    assert_same_store(reference / "long.scores.zarr", out / "long.scores.zarr")


def test_a_killed_driver_resumes_from_its_store(local_ray, tmp_path, slide_model):
    slide = write_slide(tmp_path / "long.svs", size=(1536, 1536), kind="svs", background="white", seed=5,
                        density=0.6)
    args = [slide, "--model", slide_model, *NET, "--tile", "96", "--foreground", "all", "--batch-size", "2",
            "--engine", "ray", "--workers", "2", "--split", "tiles"]
    reference = tmp_path / "local"
    assert heatmap(*args[:-6], "-o", reference)[0].exit_code == 0
    out = tmp_path / "ray"
    # A second driver joins this module's Ray (its address and token), as a driver on a cluster would.
    address = local_ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    driver = subprocess.Popen([sys.executable, "-m", "fcnify", "heatmap", *map(str, args), "-o", str(out),
                               "--ray-address", address], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while done_lines(out, "long") < 20 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    logged = done_lines(out, "long")
    assert logged >= 20
    assert not (out / "long.scores.zarr").exists()  # nothing under the final name
    result, report = heatmap(*args, "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    row = report["rows"][0]
    assert row["tiles_resumed"] >= logged and row["tiles_resumed"] + row["tiles_computed"] == row["tiles"]
    assert_same_store(reference / "long.scores.zarr", out / "long.scores.zarr")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
