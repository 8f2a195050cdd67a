"""Real architectures (random weights, fixed seed): every torchvision CNN family and common timm CNNs convert
and match at the training size in float32 (relative error ≤ 1e-4); transformers convert or are refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import relative_error

import fcnify
from fcnify.convert import convert

FP32_RTOL = 1e-4

TORCHVISION_CNNS = [
    "alexnet", "vgg11_bn", "resnet18", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "squeezenet1_0",
    "squeezenet1_1", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "shufflenet_v2_x0_5",
    "mnasnet0_5", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
    "googlenet", "inception_v3",
]

TIMM_CNNS = [
    "resnet18d", "seresnext26d_32x4d", "efficientnet_b0", "tf_efficientnet_b0", "tf_mixnet_s", "mobilenetv3_small_100",
    "convnext_atto", "regnety_002", "densenet121", "vgg11", "dla34", "cspresnet50", "ghostnet_100", "rexnet_100",
    "dpn68", "res2net50_14w_8s", "selecsls42b", "nfnet_l0", "resnet50_gn", "ecaresnet26t", "hrnet_w18_small",
    "fastvit_t8", "efficientvit_b0", "xception41",
]


def _check(model: torch.nn.Module, size: tuple[int, int]) -> fcnify.FullyConvolutionalNet:
    fcn = convert(model, size)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        reference = model(x)
        dense = fcn(x)
    assert dense.shape == (2, reference.shape[1], 1, 1)
    assert relative_error(reference, dense.flatten(1)) <= FP32_RTOL
    (sy, sx) = fcn.geometry.stride
    with torch.no_grad():
        grown = fcn(torch.randn(1, 3, size[0] + 2 * sy, size[1] + sx))
    assert grown.shape[-2:] == (3, 2)
    return fcn


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION_CNNS)
def test_torchvision_cnn_families_convert_and_match(name):
    import torchvision

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None).eval()
    loaded_size = fcnify.load_model(f"torchvision:{name}", weights="none").input_size
    # The training size is the crop of the model's published preprocessing (inception_v3's own 299).
    crop = torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size
    assert loaded_size == ((299, 299) if name == "inception_v3" else (crop[0], crop[-1]))
    fcn = _check(model, loaded_size)
    assert fcn.geometry.stride == ((16, 16) if name.startswith("squeezenet") else (32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_CNNS)
def test_timm_cnns_convert_and_match(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    _check(model, tuple(model.pretrained_cfg["input_size"][1:]))


@pytest.mark.parametrize("spec", ["timm:vit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224",
                                  pytest.param("timm:maxvit_nano_rw_256", marks=pytest.mark.slow),
                                  "torchvision:vit_b_16"])
def test_transformers_are_refused_with_a_reason(spec):
    pytest.importorskip("timm")
    loaded = fcnify.load_model(spec, weights="none")
    with pytest.raises(fcnify.ConversionError) as info:
        convert(loaded.module, loaded.input_size)
    assert info.value.hint and ("node" in info.value.message or "training size" in info.value.message)


@pytest.mark.slow
def test_window_attention_converts_exactly_and_is_labelled_approximate_when_dense():
    """torchvision's Swin attends within fixed 7×7 windows, so it runs at any size: exact at the training
    size, and its dense maps carry the attention windows' context (reported, not hidden)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None).eval()
    fcn = _check(model, (224, 224))
    assert not fcn.geometry.exact
    assert any("shifted_window_attention" in note for note in fcn.geometry.notes)
