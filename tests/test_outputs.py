"""fcnify.outputs: the per-image job end to end with real converted networks and real files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from heatmap_helpers import (
    BLOB_META,
    LABELS,
    MEAN,
    SMALL_META,
    STD,
    blob_scene,
    converted_blob,
    converted_small,
    noise_image,
    save,
)
from PIL import Image

from fcnify.dense import score_map
from fcnify.errors import InputError, OutputError
from fcnify.images import prepare
from fcnify.outputs import HeatmapOptions, output_stems, resolve_classes, run_images, write_outputs


def _run(paths, outdir, meta=SMALL_META, fcn=None, **kwargs):
    fcn = fcn or converted_small()
    options = HeatmapOptions(outdir=outdir, device="cpu", **kwargs)
    return run_images(paths, fcn, fcn.geometry, meta, options)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ classes


def test_resolve_classes_by_name_index_and_case():
    assert resolve_classes(["class3", "10", 2, "BACKGROUND", "class3"], LABELS) == [3, 10, 2]
    assert resolve_classes([], LABELS) == []
    digits = tuple(str(i) for i in range(10)) + ("background",)
    assert resolve_classes(["7"], digits) == [7]  # a name that is also an index: the name


def test_unknown_class_lists_valid_names():
    with pytest.raises(InputError, match="unknown class 'clas3'") as info:
        resolve_classes(["clas3"], LABELS)
    assert "class3" in info.value.hint and "0–10" in info.value.hint
    with pytest.raises(InputError):
        resolve_classes(["11"], LABELS)


# ------------------------------------------------------------------------------------------------ writing


def test_outputs_round_trip(tmp_path):
    image_path = save(noise_image(size=(48, 64)), tmp_path / "in" / "scene.png")
    rows = _run([image_path], tmp_path / "out", top_k=3)
    row = rows[0]
    assert row.status == "ok" and row.error is None
    assert row.image_size == (48, 64) and row.map_size == (9, 17) and not row.padded
    assert len(row.top) == 3 and row.top[0].score >= row.top[1].score >= row.top[2].score
    assert _files(tmp_path / "out") == ["scene.classes.png", "scene.heatmap.png", "scene.scores.npz"]

    with Image.open(tmp_path / "out" / "scene.heatmap.png") as heat:
        assert heat.size == (64, 48) and heat.mode == "RGB"
    with Image.open(tmp_path / "out" / "scene.classes.png") as fig:
        assert fig.format == "PNG"
    with np.load(tmp_path / "out" / "scene.scores.npz") as data:  # allow_pickle=False: no object arrays
        assert data["scores"].dtype == np.float32 and data["scores"].shape == (11, 9, 17)
        assert data["logits"].dtype == np.float32 and data["logits"].shape == (11, 9, 17)
        assert data["labels"].dtype.kind == "U" and tuple(data["labels"]) == LABELS
        for key, value in (("stride", [2, 2]), ("offset", [0, 0]), ("window", [32, 32])):
            assert data[key].dtype == np.int64 and data[key].tolist() == value
        assert data["image_size"].tolist() == [48, 64]
        assert np.allclose(data["scores"].sum(0), 1.0, atol=1e-5)
        best = data["scores"].reshape(11, -1).max(1)
        assert int(best.argmax()) == row.top[0].index and best.max() == pytest.approx(row.top[0].score)


def test_scaled_geometry_is_float_in_original_pixels(tmp_path):
    image_path = save(noise_image(size=(96, 128)), tmp_path / "big.png")
    row = _run([image_path], tmp_path / "out", scale=0.5)[0]
    assert row.status == "ok" and row.map_size == (9, 17) and row.image_size == (96, 128)
    with np.load(tmp_path / "out" / "big.scores.npz") as data:
        assert data["stride"].dtype == np.float64 and data["stride"].tolist() == [4.0, 4.0]
        assert data["window"].tolist() == [64.0, 64.0]
    with Image.open(tmp_path / "out" / "big.heatmap.png") as heat:
        assert heat.size == (128, 96)


def test_several_classes_give_one_heatmap_each(tmp_path):
    image_path = save(noise_image(), tmp_path / "x.png")
    row = _run([image_path], tmp_path / "out", classes=("class1", "10"))[0]
    assert row.status == "ok"
    assert _files(tmp_path / "out") == ["x.classes.png", "x.heatmap.background.png", "x.heatmap.class1.png",
                                        "x.scores.npz"]


def test_small_image_is_padded_and_reported(tmp_path):
    image_path = save(noise_image(size=(20, 50)), tmp_path / "small.png")
    row = _run([image_path], tmp_path / "out")[0]
    assert row.status == "ok" and row.padded and row.map_size == (1, 10)
    with Image.open(tmp_path / "out" / "small.heatmap.png") as heat:
        assert heat.size == (50, 20)


@pytest.mark.parametrize("scale, scene, centre", [(1.0, (80, 96), (45, 30)), (0.5, (160, 160), (83, 70))])
def test_heatmap_brightest_pixel_is_at_the_blob(tmp_path, scale, scene, centre):
    """Alignment: the blob detector's heatmap (grey colormap, opaque) is brightest within one stride of the blob."""
    image_path = save(Image.fromarray(blob_scene(size=scene, centre=centre)), tmp_path / "blob.png")
    row = _run([image_path], tmp_path / "out", meta=BLOB_META, fcn=converted_blob(), classes=("blob",),
               cmap="gray", alpha=1.0, scale=scale)[0]
    assert row.status == "ok"
    stride = 2 / scale
    with Image.open(tmp_path / "out" / "blob.heatmap.png") as png:
        heat = np.asarray(png.convert("L")).astype(int)
    assert heat.shape == scene
    ys, xs = np.nonzero(heat == heat.max())
    assert np.all(np.abs(ys + 0.5 - centre[0]) <= stride) and np.all(np.abs(xs + 0.5 - centre[1]) <= stride)
    peak = next(p for p in row.top if p.label == "blob")
    assert abs(peak.y - centre[0]) <= stride and abs(peak.x - centre[1]) <= stride


def test_existing_outputs_without_overwrite(tmp_path):
    image_path = save(noise_image(), tmp_path / "x.png")
    _run([image_path], tmp_path / "out")
    before = {p: (tmp_path / "out" / p).read_bytes() for p in _files(tmp_path / "out")}
    row = _run([image_path], tmp_path / "out", overwrite=False)[0]
    assert row.status == "error" and "already exists" in row.error and "--force" in row.error
    assert {p: (tmp_path / "out" / p).read_bytes() for p in _files(tmp_path / "out")} == before


def test_a_failure_mid_image_leaves_no_file(tmp_path, monkeypatch):
    fcn = converted_small()
    image = noise_image()
    smap = score_map(fcn, prepare(image, 1, MEAN, STD), fcn.geometry, LABELS, "cpu")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("numpy.savez_compressed", broken)
    options = HeatmapOptions(outdir=tmp_path / "out")
    with pytest.raises(OutputError, match="No space left"):
        write_outputs(smap, image, "x", options)
    assert _files(tmp_path / "out") == []  # the heatmap and figure, already written to temp files, are gone


# -------------------------------------------------------------------------------------------------- loop


def test_bad_and_good_images_in_one_run(tmp_path):
    inputs = tmp_path / "in"
    good = save(noise_image(), inputs / "good.png")
    empty = inputs / "empty.png"
    empty.write_bytes(b"")
    text = inputs / "notes.txt"
    text.write_text("hello")
    corrupt = inputs / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff" + os.urandom(300))
    big = save(noise_image(size=(300, 300), seed=3), inputs / "big.png")
    paths = [empty, good, text, tmp_path / "missing.png", corrupt, big]
    seen = []
    options = HeatmapOptions(outdir=tmp_path / "out", device="cpu", max_pixels=50_000)
    fcn = converted_small()
    rows = run_images(paths, fcn, fcn.geometry, SMALL_META, options, progress=seen.append)
    assert [r.status for r in rows] == ["error", "ok", "error", "error", "error", "error"]
    assert seen and sorted(seen) == sorted(str(p) for p in paths)
    assert "empty" in rows[0].error and "not an image" in rows[2].error and "no such image" in rows[3].error
    assert "--max-pixels" in rows[5].error
    assert _files(tmp_path / "out") == ["good.classes.png", "good.heatmap.png", "good.scores.npz"]
    assert rows[1].to_dict()["top"][0]["label"] in LABELS


def test_shared_stems_keep_their_folders(tmp_path):
    a = save(noise_image(seed=1), tmp_path / "in" / "a" / "photo.png")
    b = save(noise_image(seed=2), tmp_path / "in" / "b" / "photo.jpg")
    c = save(noise_image(seed=3), tmp_path / "in" / "other.png")
    assert output_stems([a, b, c]) == ["a/photo", "b/photo", "other"]
    assert output_stems([a, a]) == ["photo", "photo-2"]
    rows = _run([a, b, c], tmp_path / "out")
    assert all(r.status == "ok" for r in rows)
    assert _files(tmp_path / "out") == sorted(
        [f"{s}.{kind}" for s in ("a/photo", "b/photo", "other") for kind in ("classes.png", "heatmap.png",
                                                                                "scores.npz")])


def test_unknown_class_and_bad_options_fail_before_any_image(tmp_path):
    image_path = save(noise_image(), tmp_path / "x.png")
    with pytest.raises(InputError, match="unknown class"):
        _run([image_path], tmp_path / "out", classes=("cat",))
    with pytest.raises(InputError, match="colormap"):
        _run([image_path], tmp_path / "out", cmap="nope")
    with pytest.raises(InputError, match="fp16"):
        _run([image_path], tmp_path / "out", precision="fp16")
    assert not (tmp_path / "out").exists() or _files(tmp_path / "out") == []


def test_unwritable_outdir(tmp_path):
    image_path = save(noise_image(), tmp_path / "x.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user (root) who can write to a 0o500 folder")
        with pytest.raises(OutputError, match="not writable"):
            _run([image_path], locked)
        with pytest.raises(OutputError, match="cannot create"):
            _run([image_path], locked / "sub")
    finally:
        locked.chmod(0o700)


def test_unwritable_subfolder_is_an_error_row(tmp_path, monkeypatch):
    """A write failure for one image (here: its sub-folder is a file) is that image's error, not the run's."""
    a = save(noise_image(seed=1), tmp_path / "in" / "a" / "photo.png")
    b = save(noise_image(seed=2), tmp_path / "in" / "b" / "photo.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("a file where a folder should be")
    rows = _run([a, b], out)
    assert [r.status for r in rows] == ["error", "ok"]
    assert "cannot create" in rows[0].error
    assert _files(out) == ["a", "b/photo.classes.png", "b/photo.heatmap.png", "b/photo.scores.npz"]


def test_outdir_refused_when_access_says_unwritable(tmp_path, monkeypatch):
    """The same check as above, made to fail even as root: nothing is read or written."""
    image_path = save(noise_image(), tmp_path / "x.png")
    monkeypatch.setattr("fcnify.outputs.os.access", lambda path, mode: False)
    with pytest.raises(OutputError, match="not writable"):
        _run([image_path], tmp_path / "out")
    assert _files(tmp_path / "out") == []
