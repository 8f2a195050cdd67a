"""fcnify.dense: score maps of real converted networks, batching, devices and precisions."""

from __future__ import annotations

import pytest
import torch
from heatmap_helpers import (
    LABELS,
    MEAN,
    STD,
    blob_scene,
    converted_blob,
    converted_small,
    noise_image,
    small_cnn,
)
from PIL import Image

from fcnify.dense import ScoreMap, score_map, score_maps
from fcnify.device import check_precision, cpu_bf16_convolutions_are_accurate, select_device
from fcnify.errors import InputError
from fcnify.images import prepare


def _prepared(size=(48, 64), seed=0, scale=1.0):
    return prepare(noise_image(size=size, seed=seed), 1, MEAN, STD, scale=scale, min_size=(32, 32))


def test_cells_equal_the_classifier_on_their_windows():
    fcn, model = converted_small(), small_cnn()
    prepared = _prepared()
    smap = score_map(fcn, prepared, fcn.geometry, LABELS, "cpu")
    assert smap.map_size == fcn.output_size(48, 64) == (9, 17)
    assert smap.logits.dtype == torch.float32 and smap.logits.device.type == "cpu"
    assert smap.stride == (2, 2) and smap.offset == (0, 0) and smap.window == (32, 32)
    assert all(isinstance(v, int) for v in smap.stride + smap.offset + smap.window)
    for i, j in [(0, 0), (4, 7), (8, 16)]:
        y, x = fcn.geometry.window_origin(i, j)
        with torch.no_grad():
            crop = model(prepared.tensor[None, :, y:y + 32, x:x + 32])[0]
        assert torch.allclose(smap.logits[:, i, j], crop, atol=1e-4)


def test_batches_group_sizes_and_keep_the_order():
    fcn = converted_small()
    items = [_prepared((48, 64), 0), _prepared((40, 40), 1), _prepared((48, 64), 2), _prepared((20, 20), 3)]
    together = score_maps(fcn, items, fcn.geometry, LABELS, "cpu", batch_size=2)
    alone = [score_map(fcn, item, fcn.geometry, LABELS, "cpu") for item in items]
    assert [m.map_size for m in together] == [(9, 17), (5, 5), (9, 17), (1, 1)]
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert together[3].padded and together[3].image_size == (20, 20)


def test_plain_tensors_are_accepted():
    fcn = converted_small()
    smap = score_map(fcn, torch.zeros(1, 40, 36), fcn.geometry, LABELS, "cpu")
    assert smap.image_size == (40, 36) and smap.map_size == (5, 3)


def test_scaled_images_report_geometry_in_original_pixels():
    fcn = converted_small()
    smap = score_map(fcn, _prepared((96, 128), scale=0.5), fcn.geometry, LABELS, "cpu")
    assert smap.image_size == (96, 128) and smap.map_size == (9, 17)
    assert smap.stride == (4.0, 4.0) and smap.window == (64.0, 64.0) and smap.offset == (0.0, 0.0)
    assert smap.window_centre(1, 2) == (36.0, 40.0)


def test_scores_peaks_and_top_classes():
    logits = torch.full((3, 2, 4), -5.0)
    logits[1, 1, 2] = 5.0
    logits[2, 0, 0] = 1.0
    smap = ScoreMap(logits, ("a", "b", "c"), (2, 2), (0, 0), (8, 8), (10, 14))
    assert torch.allclose(smap.scores.sum(0), torch.ones(2, 4))
    score, (y, x) = smap.peak(1)
    assert score == pytest.approx(1.0, abs=1e-3) and (y, x) == (6.0, 8.0)
    assert smap.top_classes(2) == [1, 2]
    assert smap.argmax_map()[1, 2] == 1


def test_blob_peak_is_at_the_blob():
    fcn = converted_blob()
    prepared = prepare(Image.fromarray(blob_scene(centre=(45, 30))), 1, (0.0,), (1.0,), min_size=(32, 32))
    smap = score_map(fcn, prepared, fcn.geometry, ("none", "blob"), "cpu")
    score, (y, x) = smap.peak(1)
    assert score > 0.9 and abs(y - 45) <= 2 and abs(x - 30) <= 2


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(InputError, match="unknown --device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            select_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(InputError, match="MPS"):
            select_device("mps")


def test_fp16_on_cpu_is_refused():
    with pytest.raises(InputError, match="fp16 needs a GPU"):
        check_precision("fp16", torch.device("cpu"))
    fcn = converted_small()
    with pytest.raises(InputError):
        score_map(fcn, _prepared(), fcn.geometry, LABELS, "cpu", precision="fp16")
    with pytest.raises(InputError, match="unknown --precision"):
        check_precision("fp8", torch.device("cpu"))


def test_bf16_on_cpu_is_close_to_fp32():
    """bf16 (autocast) keeps ~3 significant digits: logits within 5% of their range, probabilities within 0.02."""
    if not cpu_bf16_convolutions_are_accurate():  # this CPU's bf16 convolutions are wrong: bf16 is refused
        with pytest.raises(InputError, match="bf16 convolutions on this CPU are wrong"):
            check_precision("bf16", torch.device("cpu"))
        return
    fcn = converted_small()
    prepared = _prepared()
    full = score_map(fcn, prepared, fcn.geometry, LABELS, "cpu", precision="fp32")
    half = score_map(fcn, prepared, fcn.geometry, LABELS, "cpu", precision="bf16")
    assert half.logits.dtype == torch.float32
    span = float(full.logits.max() - full.logits.min())
    assert float((half.logits - full.logits).abs().max()) <= 0.05 * span
    assert float((half.scores - full.scores).abs().max()) <= 0.02


def test_label_count_must_match():
    fcn = converted_small()
    with pytest.raises(InputError, match="11 classes"):
        score_map(fcn, _prepared(), fcn.geometry, LABELS[:3], "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 0.02), ("bf16", 0.05)])
def test_cuda_matches_cpu(precision, tolerance):
    import copy

    fcn = copy.deepcopy(converted_small())
    items = [_prepared((48, 64), 0), _prepared((48, 64), 1), _prepared((40, 40), 2)]
    cpu = score_maps(converted_small(), items, fcn.geometry, LABELS, "cpu")
    gpu = score_maps(fcn, items, fcn.geometry, LABELS, "cuda", precision=precision)
    assert next(fcn.parameters()).is_cuda
    for a, b in zip(cpu, gpu, strict=True):
        assert b.logits.device.type == "cpu" and b.logits.dtype == torch.float32
        span = float(a.logits.max() - a.logits.min())
        assert float((a.logits - b.logits).abs().max()) <= tolerance * span
