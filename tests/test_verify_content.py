"""What verify's dense-vs-crops check runs on: the user's images when given, else a picture-like scene, and it says
which."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from nets import small_cnn
from PIL import Image
from typer.testing import CliRunner

from fcnify import convert
from fcnify.cli import app
from fcnify.images import centre_region
from fcnify.verify import SYNTHETIC_CONTENT, dense_input_size, synthetic_scene

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
runner = CliRunner()


def _verify_json(*args) -> dict:
    result = runner.invoke(app, ["verify", *map(str, args), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _top1_on_crops(model: torch.nn.Module, image: torch.Tensor) -> tuple[float, int]:
    """Top-1 agreement of every dense cell whose window lies inside ``image`` with the model on its crop."""
    model = model.double().eval()
    fcn = convert(model, (64, 64)).double().eval()
    g = fcn.geometry
    with torch.no_grad():
        dense = fcn(image.unsqueeze(0))[0]
        inside = [(i, j) for i in range(dense.shape[1]) for j in range(dense.shape[2])
                  if min(g.window_origin(i, j)) >= 0 and g.window_origin(i, j)[0] + 64 <= image.shape[1]
                  and g.window_origin(i, j)[1] + 64 <= image.shape[2]]
        crops = torch.stack([image[:, y:y + 64, x:x + 64] for y, x in (g.window_origin(i, j) for i, j in inside)])
        on_crops = model(crops).argmax(1)
        agree = [int(on_crops[n]) == int(dense[:, i, j].argmax()) for n, (i, j) in enumerate(inside)]
    return sum(agree) / len(agree), len(agree)


def test_dense_check_runs_on_the_users_image_and_counts_its_top1(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()  # padded: dense cells near a crop's border differ from crops
    weights = tmp_path / "r18.pth"
    torch.save(model.state_dict(), weights)
    photo = SAMPLES / "china.jpg"
    report = _verify_json(weights, "--arch", "torchvision:resnet18", "--input-size", "64x64", "--samples", "1",
                          "--cells", "1000",
                          "--image", photo)
    dense = report["dense"]
    assert dense["content"] == "image china.jpg (centre, at full resolution)"
    # The same content computed here: the photo's centre at its own resolution, ImageNet-normalised.
    size = tuple(dense["input_size"])
    region, resized = centre_region(Image.open(photo).convert("RGB"), size)
    assert not resized and region.size == (size[1], size[0])
    pixels = torch.from_numpy(np.asarray(region, dtype=np.float64) / 255).permute(2, 0, 1)
    image = (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    top1, cells = _top1_on_crops(model, image)
    assert dense["cells_checked"] == cells
    assert dense["top1_agreement"] == pytest.approx(top1, abs=1e-9)
    assert top1 < 1  # a padded network does not match its crops everywhere on a photo: an honest count shows it
    assert not dense["exact"] and any("zero padding" in c for c in dense["causes"])


def test_without_an_image_the_dense_check_runs_on_a_named_picture_like_scene(tmp_path):
    weights = tmp_path / "small.pth"
    torch.save(small_cnn().state_dict(), weights)
    report = _verify_json(weights, "--arch", "nets:small_cnn", "--input-size", "20x24")
    assert report["dense"]["content"] == SYNTHETIC_CONTENT
    table = runner.invoke(app, ["verify", str(weights), "--arch", "nets:small_cnn", "--input-size", "20x24"])
    assert table.exit_code == 0 and "synthetic scene" in table.output


def test_synthetic_scene_is_correlated_like_a_picture_not_noise():
    scene = synthetic_scene(3, (96, 120), seed=0)
    assert scene.shape == (3, 96, 120) and scene.min() >= 0 and scene.max() <= 1
    assert torch.equal(scene, synthetic_scene(3, (96, 120), seed=0))
    # Neighbouring pixels of a picture are strongly correlated; of iid noise, not at all.
    left, right = scene[..., :-1].flatten(), scene[..., 1:].flatten()
    assert torch.corrcoef(torch.stack([left, right]))[0, 1] > 0.8
    # Several regions with distinct colours, not one flat field.
    assert scene.std(dim=(1, 2)).min() > 0.05


def test_small_images_are_resized_to_cover_the_dense_input(tmp_path):
    size = dense_input_size(convert(small_cnn().eval(), (20, 24)).geometry)
    small = Image.new("RGB", (size[1] // 2, size[0] // 2), (10, 200, 30))
    region, resized = centre_region(small, size)
    assert resized and region.size == (size[1], size[0])
