"""Finer output stride: the dilation rewrite keeps the native grid; shift-and-stitch agrees without padding."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import relative_error
from nets import PaddedNet, SENet, StridedSENet

from fcnify.convert import convert
from fcnify.convert.dilate import DilatedAvgPool2d, dilate, shift_and_stitch
from fcnify.errors import ConversionError
from fcnify.zoo.digits import DigitsNet


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(3)
    return convert(DigitsNet().eval(), 32)


def native_grid(fine, k):
    return fine[:, :, ::k, ::k]


@pytest.mark.parametrize("stride", [2, 1])
def test_digits_fine_map_keeps_the_native_grid_and_has_the_documented_shape(digits, stride):
    fine = dilate(digits, stride)
    assert fine.geometry.stride == (stride, stride)
    assert fine.geometry.window == digits.geometry.window
    assert fine.geometry.receptive_field == digits.geometry.receptive_field
    assert digits.geometry.stride == (4, 4)  # the input network is untouched
    x = torch.randn(2, 1, 75, 90)
    with torch.no_grad():
        native, dense = digits(x), fine(x)
    # Padding-free: one cell per window at every multiple of the stride, (H - window) // S + 1 of them.
    assert tuple(dense.shape[-2:]) == fine.output_size(75, 90) == ((75 - 32) // stride + 1, (90 - 32) // stride + 1)
    k = 4 // stride
    assert relative_error(native, native_grid(dense, k)[:, :, : native.shape[2], : native.shape[3]]) <= 1e-4
    # Padding-free: shift-and-stitch computes the same map.
    assert relative_error(dense, shift_and_stitch(digits, x, 4, stride)) <= 1e-4


@pytest.mark.parametrize("stride", [4, 2])
def test_padded_network_with_ceil_pool_and_residual(stride):
    torch.manual_seed(4)
    fcn = convert(PaddedNet().eval(), 32)
    fine = dilate(fcn, stride)
    x = torch.randn(1, 3, 83, 70)
    with torch.no_grad():
        native, dense = fcn(x), fine(x)
    k = 8 // stride
    h, w = native.shape[-2:]
    assert dense.shape[-2] >= (h - 1) * k + 1 and dense.shape[-1] >= (w - 1) * k + 1
    assert relative_error(native, native_grid(dense, k)[:, :, :h, :w]) <= 1e-4


def test_global_context_is_averaged_over_the_native_grid():
    fcn = convert(SENet().eval(), 16)
    assert fcn.geometry.stride == (1, 1)  # nothing to dilate; output stride 1 is the network itself
    assert dilate(fcn, 1) is fcn
    # Squeeze-excitation on a map the rewrite makes finer: its mean reads only the original grid's positions,
    # so the fine map sampled on the native grid is the native map (not the mean over every fine position).
    torch.manual_seed(6)
    fcn = convert(StridedSENet().eval(), 32)
    assert fcn.geometry.stride == (4, 4)
    fine = dilate(fcn, 2)
    assert "global mean" in [r.old for r in fine.rewrites]  # the SE reduction took the rewrite's global path
    x = torch.randn(1, 3, 61, 77)
    with torch.no_grad():
        native, dense = fcn(x), fine(x)
    h, w = native.shape[-2:]
    assert relative_error(native, native_grid(dense, 2)[:, :, :h, :w]) <= 1e-4


@pytest.mark.slow
def test_resnet50_matches_torchvision_dilated_resnet50():
    torch.manual_seed(5)
    model = torchvision.models.resnet50().eval()
    dilated = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    dilated.load_state_dict(model.state_dict())
    fine = dilate(convert(model, 224), 8)
    # Sizes a multiple of 32: there torchvision's fine maps have exactly 2 (4) cells per original one. At other
    # sizes its maps run one original cell on, and its border cells on the original grid read that cell where
    # the original network reads padding; ours crop so that they read padding.
    x = torch.randn(1, 3, 256, 288)
    with torch.no_grad():
        body = torch.nn.Sequential(*list(dilated.children())[:-2])(x)
        reference = dilated.fc(DilatedAvgPool2d(7, 4)(body).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        out = fine(x)
    # Our map stops at the last cell on the original grid (or the last whole window); torchvision's runs on.
    h, w = out.shape[-2:]
    assert reference.shape[-2] >= h and reference.shape[-1] >= w and h > 1 and w > 1
    assert relative_error(reference[:, :, :h, :w], out) <= 1e-4


def test_dilated_avg_pool_equals_a_dilated_uniform_convolution():
    x = torch.randn(2, 3, 23, 19)
    pool = DilatedAvgPool2d((3, 2), (2, 3), padding=(2, 3))
    weight = torch.full((3, 1, 3, 2), 1 / 6)
    reference = torch.nn.functional.conv2d(x, weight, padding=(2, 3), dilation=(2, 3), groups=3)
    assert relative_error(reference, pool(x)) <= 1e-5


def test_refusals(digits):
    with pytest.raises(ConversionError, match="does not divide") as info:
        dilate(digits, 3)
    assert info.value.hint
    import dataclasses

    same = type(digits)(digits.net, dataclasses.replace(digits.geometry, size_dependent_padding=True),
                        digits.input_size, digits.in_chans)
    with pytest.raises(ConversionError, match="same"):
        dilate(same, 2)


def test_opaque_windowed_modules_are_refused():
    class Opaque(torch.nn.Module):  # untraceable: control flow on values, so it stays a leaf
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            if x.sum() > 1e30:
                return x
            return self.conv(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 3, stride=2)
            self.b = torch.nn.Conv2d(8, 8, 3, stride=2)
            self.opaque = Opaque()
            self.fc = torch.nn.Linear(8, 2)

        def forward(self, x):
            x = self.opaque(self.b(self.a(x)))
            return self.fc(x.mean((2, 3)))

    fcn = convert(Net().eval(), 24)
    with pytest.raises(ConversionError, match="opaque"):
        dilate(fcn, 2)
