"""The embedded ``digits`` model: packaged weights, scene rendering, and a golden dense-evaluation figure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fcnify.zoo import DIGITS_JSON, DIGITS_LABELS, DIGITS_META, DIGITS_WEIGHTS, DigitsNet, load_digits_model
from fcnify.zoo.scenes import (
    GLYPH_SIZE,
    HELDOUT_RANGE,
    MIN_GAP,
    TRAIN_RANGE,
    GlyphBox,
    box_gap,
    make_scene,
    render_glyph,
)


def _digits_pool(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 8x8 digit-like images (no scikit-learn needed), values 0..16, every one with a 16."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 17, size=(n, 8, 8)).astype(np.float64)
    imgs[:, 3, 3] = 16
    return imgs, rng.integers(0, 10, size=n)


# --- packaged weights ------------------------------------------------------------------------------------


def test_labels_and_meta():
    assert DIGITS_LABELS == ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "background")
    assert DIGITS_META["name"] == "digits"
    assert list(DIGITS_META["input_size"]) == [32, 32]
    assert DIGITS_META["in_chans"] == 1
    assert len(DIGITS_META["mean"]) == len(DIGITS_META["std"]) == 1
    assert list(DIGITS_META["labels"]) == list(DIGITS_LABELS)


def test_packaged_weights_load_and_are_small():
    assert DIGITS_WEIGHTS.is_file()
    assert DIGITS_WEIGHTS.stat().st_size < 1_000_000
    model = load_digits_model()
    assert isinstance(model, DigitsNet)
    assert not model.training
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 11)
    assert torch.isfinite(out).all()


def test_metadata_in_safetensors_and_json_agree():
    from safetensors import safe_open

    with safe_open(str(DIGITS_WEIGHTS), framework="pt") as f:
        meta = f.metadata()
    doc = json.loads(DIGITS_JSON.read_text())
    for key, value in DIGITS_META.items():
        st_value = meta[key] if isinstance(value, str) else json.loads(meta[key])
        assert st_value == value, key
        assert doc[key] == value, key


def test_blank_window_is_background():
    model = load_digits_model()
    mean, std = DIGITS_META["mean"][0], DIGITS_META["std"][0]
    with torch.no_grad():
        out = model(torch.full((1, 1, 32, 32), (0.0 - mean) / std))
    assert DIGITS_LABELS[int(out.argmax())] == "background"


# --- scenes ----------------------------------------------------------------------------------------------


def test_render_glyph_size_and_ink():
    img = np.zeros((8, 8))
    img[2:6, 3] = 16
    img[1, 1] = 8
    g = render_glyph(img)
    assert g.shape == (GLYPH_SIZE, GLYPH_SIZE) == (24, 24)
    assert g.dtype == np.uint8
    assert g.max() == 255
    assert g[3 * 2 + 1, 3 * 3 + 1] == 255  # centre of an upscaled 16 pixel
    assert g[3 * 1 + 1, 3 * 1 + 1] == round(8 * 255 / 16)
    assert render_glyph(np.zeros((8, 8))).max() == 0


def test_render_glyph_matches_torch_bilinear():
    imgs, _ = _digits_pool(5)
    for img in imgs:
        ref = torch.nn.functional.interpolate(
            torch.tensor(img * 255 / 16, dtype=torch.float64)[None, None],
            scale_factor=3,
            mode="bilinear",
            align_corners=False,
        )[0, 0]
        ref = ref.round().clamp(0, 255).to(torch.uint8).numpy()
        assert np.abs(render_glyph(img).astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("seed", range(8))
def test_scene_gap_size_and_ink(seed):
    imgs, labels = _digits_pool(40, seed)
    size = (160, 224)
    scene, boxes = make_scene(imgs, labels, size=size, rng=np.random.default_rng(seed), noise_sigma=0.0)
    assert scene.shape == size and scene.dtype == np.uint8
    assert len(boxes) >= 4
    for b in boxes:
        assert isinstance(b, GlyphBox)
        assert (b.height, b.width) == (24, 24)
        assert 0 <= b.top and b.top + b.height <= size[0]
        assert 0 <= b.left and b.left + b.width <= size[1]
        assert (b.centre_y, b.centre_x) == (b.top + 12, b.left + 12)
        assert 0 <= b.label <= 9
        # noise-free: the glyph is exactly the rendered digit, with full-white ink
        assert scene[b.top : b.bottom, b.left : b.right].max() == 255
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert box_gap(a, b) >= MIN_GAP
    # nothing outside the glyph boxes without noise
    mask = np.zeros(size, dtype=bool)
    for b in boxes:
        mask[b.top : b.bottom, b.left : b.right] = True
    assert scene[~mask].max() == 0
    assert scene.max() <= 255


def test_scene_is_deterministic_and_noisy():
    imgs, labels = _digits_pool(20)
    a, ba = make_scene(imgs, labels, size=(96, 128), rng=np.random.default_rng(3), noise_sigma=6.0)
    b, bb = make_scene(imgs, labels, size=(96, 128), rng=np.random.default_rng(3), noise_sigma=6.0)
    assert np.array_equal(a, b) and ba == bb
    mask = np.zeros(a.shape, dtype=bool)
    for g in ba:
        mask[g.top : g.bottom, g.left : g.right] = True
    assert 2 < a[~mask].astype(float).std() < 10  # mild noise on the black background


def test_split_is_disjoint():
    """Training and held-out images are consecutive, disjoint parts of load_digits() that cover it."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    from fcnify.zoo.scenes import load_split

    everything = load_digits()
    train, train_labels = load_split("train")
    heldout, heldout_labels = load_split("heldout")
    assert (len(train), len(heldout)) == (len(TRAIN_RANGE), len(HELDOUT_RANGE)) == (1400, 397)
    np.testing.assert_array_equal(np.concatenate([train, heldout]), everything.images)
    np.testing.assert_array_equal(np.concatenate([train_labels, heldout_labels]), everything.target)
    assert set(TRAIN_RANGE).isdisjoint(HELDOUT_RANGE)
    with pytest.raises(ValueError, match="unknown split"):
        load_split("test")


# --- golden figure: the shipped weights, converted with fcnify, on held-out scenes ------------------------


def test_shipped_weights_reach_targets_on_heldout_scenes():
    pytest.importorskip("sklearn")
    from fcnify.zoo.evaluate_digits import (
        BACKGROUND_TARGET,
        DIGIT_TARGET,
        dense_model,
        evaluate_scenes,
        heldout_scenes,
    )

    model = load_digits_model()
    fcn, geometry = dense_model(model)
    assert tuple(geometry.stride) == (4, 4)
    assert tuple(geometry.window) == (32, 32)
    assert tuple(geometry.offset) == (0, 0)
    scenes = heldout_scenes(n_scenes=12, seed=7)
    res = evaluate_scenes(fcn, geometry, scenes)
    assert res.n_digits >= 80
    assert res.n_background_cells >= 5000
    assert res.digit_accuracy >= DIGIT_TARGET, res
    assert res.background_accuracy >= BACKGROUND_TARGET, res


def test_dense_cells_equal_classifier_on_crops():
    pytest.importorskip("sklearn")
    from fcnify.zoo.evaluate_digits import dense_model, heldout_scenes, scene_to_tensor

    model = load_digits_model()
    fcn, g = dense_model(model)
    scene, _ = heldout_scenes(n_scenes=1, seed=11, size=(96, 128))[0]
    x = scene_to_tensor(scene, DIGITS_META["mean"], DIGITS_META["std"])
    with torch.no_grad():
        dense = fcn(x)[0]
        for i, j in [(0, 0), (3, 5), (dense.shape[1] - 1, dense.shape[2] - 1)]:
            y0, x0 = g.offset[0] + i * g.stride[0], g.offset[1] + j * g.stride[1]
            crop = x[:, :, y0 : y0 + g.window[0], x0 : x0 + g.window[1]]
            torch.testing.assert_close(dense[:, i, j], model(crop)[0], atol=1e-4, rtol=1e-4)
