"""issue 18 part 5: one rule for the score map's size — the cells a one-pass forward gives — on every runtime
and file format (in-memory PyTorch, ``--runtime onnxruntime``, ``.pt2``, ``.onnx``), for padded and padding-free
networks at sizes that are and are not multiples of the stride."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from heatmap_helpers import save
from nets import PaddedNet
from PIL import Image

from fcnify.convert import convert
from fcnify.convert.geometry import Geometry
from fcnify.dense import with_output_stride
from fcnify.export import ModelMetadata, save_pt2
from fcnify.heatmap import plan
from fcnify.heatmap.job import ImageJob, ModelInfo
from fcnify.heatmap.options import HeatmapOptions
from fcnify.heatmap.pipeline import run_image
from fcnify.models import load_model
from fcnify.onnx_export import export_onnx
from fcnify.zoo.digits import DigitsNet

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _padded():
    torch.manual_seed(1)
    return convert(PaddedNet().eval(), input_size=(32, 32))


def _digits():
    torch.manual_seed(2)
    return convert(DigitsNet().eval(), 32)


@pytest.fixture(scope="module", params=["padded", "digits"])
def formats(request, tmp_path_factory):
    """The converted network in memory, and as ``.pt2`` and ``.onnx`` loaded back."""
    fcn = _padded() if request.param == "padded" else _digits()
    folder = tmp_path_factory.mktemp(request.param)
    mean, std = (MEAN, STD) if fcn.in_chans == 3 else ((0.5,), (0.25,))
    classes = int(fcn(torch.zeros(1, fcn.in_chans, *fcn.input_size)).shape[1])
    meta = ModelMetadata(fcn.input_size, fcn.in_chans, mean, std, tuple(f"c{k}" for k in range(classes)),
                         fcn.geometry, f"test:{request.param}")
    save_pt2(fcn, meta, folder / "m.pt2")
    export_onnx(fcn, meta, folder / "m.onnx")
    return request.param, fcn, meta, load_model(str(folder / "m.pt2")), load_model(str(folder / "m.onnx"))


def _image(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, size=(size[0] // 2 + 1, size[1] // 2 + 1, 3), dtype=np.uint8))
    return noise.resize((size[1], size[0]))


def _scores(tmp: Path, image: Path, fcn, geometry, meta, runtime: str, tile=None) -> np.ndarray:
    options = HeatmapOptions(outdir=tmp, device="cpu", runtime=runtime, foreground="all", scores="npz",
                             formats=("scores",), tile=tile)
    info = ModelInfo(meta.in_chans, tuple(meta.mean), tuple(meta.std), tuple(meta.labels))
    row = run_image(str(image), "img", ImageJob(fcn, geometry, info, options, meta))
    assert row.status == "ok", row.error
    with np.load(tmp / "img.scores.npz") as data:
        return data["scores"]


@pytest.mark.parametrize("offset", [(0, 0), (7, 7), (3, 5)])  # (0, 0): a multiple of the stride above the window
def test_every_runtime_and_format_gives_the_one_pass_map(formats, offset, tmp_path):
    name, fcn, meta, pt2, onnx = formats
    stride = fcn.geometry.stride
    size = (fcn.input_size[0] + 4 * stride[0] + offset[0], fcn.input_size[1] + 7 * stride[1] + offset[1])
    image = save(_image(size).convert("RGB" if fcn.in_chans == 3 else "L"), tmp_path / "img.png")
    x = torch.from_numpy(np.asarray(Image.open(image).convert("RGB" if fcn.in_chans == 3 else "L"), np.float32))
    x = (x.reshape(*size, -1).permute(2, 0, 1) / 255 - torch.tensor(meta.mean)[:, None, None]) \
        / torch.tensor(meta.std)[:, None, None]
    with torch.no_grad():
        reference = torch.softmax(fcn(x[None])[0], dim=0).numpy()
    assert fcn.geometry.map_size(*size) == reference.shape[1:]
    maps = {
        "memory": _scores(tmp_path / "a", image, fcn, fcn.geometry, meta, "torch"),
        "onnxruntime": _scores(tmp_path / "b", image, fcn, fcn.geometry, meta, "onnxruntime"),
        "pt2": _scores(tmp_path / "c", image, pt2.module, pt2.geometry, meta, "torch"),
        "onnx": _scores(tmp_path / "d", image, onnx.module, onnx.geometry, meta, "auto"),
        "tiles": _scores(tmp_path / "e", image, onnx.module, onnx.geometry, meta, "auto",
                         tile=max(plan.bounds_of(fcn.geometry).halo(a) for a in range(2)) + 2 * max(stride)),
    }
    if name == "digits":  # padding-free: the valid cells are every cell
        assert fcn.geometry.valid_map_size(*size) == reference.shape[1:]
    for runtime, scores in maps.items():
        assert scores.shape == reference.shape, runtime
        np.testing.assert_allclose(scores, reference, atol=1e-4, rtol=0, err_msg=runtime)


def test_padded_network_counts_its_partial_border_cells():
    fcn = _padded()
    size = (63, 71)  # one pass: 5×6 cells; windows inside the image: 4×5
    with torch.no_grad():
        out = fcn(torch.zeros(1, 3, *size))
    assert fcn.geometry.map_size(*size) == tuple(out.shape[-2:]) != fcn.geometry.valid_map_size(*size)
    assert plan.map_size(object(), fcn.geometry, 3, size) == tuple(out.shape[-2:])  # no PyTorch needed
    restored = Geometry.from_dict(fcn.geometry.to_dict())
    assert restored == fcn.geometry and restored.map_size(*size) == tuple(out.shape[-2:])


def test_the_dilated_map_size_follows_the_refine_step():
    fcn = _padded()
    fine, geometry = with_output_stride(fcn, fcn.geometry, 4)
    for size in [(45, 53), (48, 48), (61, 40)]:
        with torch.no_grad():
            out = fine(torch.zeros(1, 3, *size))
        assert geometry.map_size(*size) == tuple(out.shape[-2:]), size
