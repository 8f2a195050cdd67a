"""The rewrite: structure and numbers, on hand-written heads and Hypothesis-generated CNN classifiers."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from nets import FlattenStyleNet, RichHead, SENet, TokenMixer
from torch import nn

import fcnify
from fcnify.convert import convert, parse_input_size

FP64_TOL = 1e-10


def _logits(module, x):
    with torch.no_grad():
        out = module(x)
    return out.flatten(1) if out.dim() == 4 else out


@pytest.mark.parametrize("style", ["nn.Flatten", "torch.flatten", "method", "view-size", "view-const", "reshape",
                                   "channels-last"])
def test_every_flatten_style_becomes_a_kxk_conv_and_matches_crops(style):
    model = FlattenStyleNet(style).double().eval()
    fcn = convert(model, (20, 24))
    convs = [m for m in fcn.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == model.chw[1:]]
    assert len(convs) == 1, "the first Linear must become a conv with the flattened map's H×W kernel"
    assert not any(isinstance(m, nn.Linear) for m in fcn.modules())
    x = torch.randn(3, 3, 20, 24, dtype=torch.float64)
    assert relative_error(_logits(model, x), _logits(fcn, x)) < FP64_TOL
    assert fcn.geometry.exact and fcn.geometry.stride == (2, 2) and fcn.geometry.offset == (0, 0)
    big = torch.randn(1, 3, 20 + 7, 24 + 10, dtype=torch.float64)
    dense = fcn(big)[0]
    assert dense.shape[-2:] == fcn.output_size(27, 34) == (4, 6)
    for i in range(dense.shape[1]):
        for j in range(dense.shape[2]):
            y, x0 = fcn.geometry.window_origin(i, j)
            crop = big[:, :, y:y + 20, x0:x0 + 24]
            assert relative_error(_logits(model, crop)[0], dense[:, i, j]) < FP64_TOL


@pytest.mark.parametrize("pool", ["avg", "max", "mean", "amax", "catavgmax"])
def test_global_pool_heads_become_stride1_windowed_pools(pool):
    model = RichHead(pool).eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    model = model.double()
    fcn = convert(model, (16, 12))
    pools = [m for m in fcn.modules() if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d))]
    assert pools and all(p.kernel_size == (8, 6) and p.stride in (1, (1, 1)) for p in pools)
    assert any(isinstance(m, nn.BatchNorm2d) for m in fcn.modules())
    assert not any(isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.AdaptiveAvgPool2d)) for m in fcn.modules())
    x = torch.randn(4, 3, 16, 12, dtype=torch.float64)
    assert relative_error(_logits(model, x), _logits(fcn, x)) < FP64_TOL
    out = fcn(torch.randn(2, 3, 16 + 6, 12 + 8, dtype=torch.float64))
    assert out.shape == (2, 7, 4, 5)
    # LogSoftmax stays over classes: each cell's scores exponentiate to a distribution.
    assert torch.allclose(out.exp().sum(1), torch.ones(2, 4, 5, dtype=torch.float64))


def test_identity_adaptive_pool_is_dropped_and_input_model_untouched():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d((6, 6)), nn.Flatten(), nn.Linear(144, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fcn = convert(model, 8)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in fcn.modules())
    assert any("identity" in r.old for r in fcn.rewrites)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[3], nn.Linear) and not model.training
    assert fcn(torch.randn(1, 1, 12, 14)).shape == (1, 3, 5, 7)


def test_global_context_in_body_converts_exactly_and_is_reported():
    model = SENet().double().eval()
    fcn = convert(model, 10)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    assert relative_error(_logits(model, x), _logits(fcn, x)) < FP64_TOL
    assert fcn.geometry.global_context and not fcn.geometry.exact
    report = fcnify.verify(model, fcn)
    assert report.passed and report.dense.label == "approximate"
    assert any("global context" in c for c in report.dense.causes)


def test_token_sequences_are_refused_with_the_node_and_reason():
    with pytest.raises(fcnify.ConversionError) as info:
        convert(TokenMixer().eval(), 16)
    assert "flatten" in str(info.value) and "token sequence" in str(info.value)
    assert info.value.hint


def test_wrong_input_size_is_a_clear_input_error():
    model = FlattenStyleNet("torch.flatten").eval()
    with pytest.raises(fcnify.InputError, match="does not run at input size 30x30"):
        convert(model, 30)
    with pytest.raises(fcnify.InputError, match="224x192"):
        parse_input_size("big")
    assert parse_input_size("224x192") == (224, 192) and parse_input_size(7) == (7, 7)


def test_pool_then_classifier_runs_classifier_first_when_it_shrinks_channels():
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 5)).double().eval()
    fcn = convert(model, 9)
    order = [type(m).__name__ for _, m in fcn.net.named_children()]
    nodes = [n for n in fcn.net.graph.nodes if n.op == "call_module"]
    kinds = [type(fcn.net.get_submodule(n.target)).__name__ for n in nodes]
    assert kinds[-2:] == ["Conv2d", "AvgPool2d"], (kinds, order)
    x = torch.randn(2, 3, 15, 17, dtype=torch.float64)
    unoptimized = convert(model, 9, optimize=False)
    assert relative_error(unoptimized(x), fcn(x)) < FP64_TOL


# ------------------------------------------------------------------------------ Hypothesis: random CNNs


class RandomCNN(nn.Module):
    def __init__(self, in_chans, layers, head, hidden, bn1d, dropout, classes, size):
        super().__init__()
        blocks, channels = [], in_chans
        for out, kernel, stride, padding, pool in layers:
            blocks += [nn.Conv2d(channels, out, kernel, stride=stride, padding=padding), nn.ReLU()]
            if pool == "max":
                blocks.append(nn.MaxPool2d(2))
            elif pool == "avg":
                blocks.append(nn.AvgPool2d(2))
            channels = out
        self.body = nn.Sequential(*blocks)
        self.head = head
        with torch.no_grad():
            c, h, w = self.body(torch.zeros(1, in_chans, *size)).shape[1:]
        features = c * h * w if head == "flatten" else c
        mlp = []
        for width in hidden:
            mlp.append(nn.Linear(features, width))
            if bn1d:
                mlp.append(nn.BatchNorm1d(width))
            mlp += [nn.ReLU(), nn.Dropout(dropout)]
            features = width
        mlp.append(nn.Linear(features, classes))
        self.mlp = nn.Sequential(*mlp)

    def forward(self, x):
        x = self.body(x)
        if self.head == "flatten":
            x = torch.flatten(x, 1)
        elif self.head == "mean":
            x = x.mean(dim=(2, 3))
        elif self.head == "avgpool":
            x = nn.functional.adaptive_avg_pool2d(x, 1).view(x.size(0), -1)
        else:
            x = nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
        return self.mlp(x)


layer = st.tuples(st.integers(2, 6), st.integers(1, 4), st.integers(1, 2), st.integers(0, 1),
                  st.sampled_from(["none", "max", "avg"]))


@st.composite
def random_classifiers(draw):
    in_chans = draw(st.sampled_from([1, 3]))
    layers = draw(st.lists(layer, min_size=1, max_size=3))
    head = draw(st.sampled_from(["flatten", "mean", "avgpool", "maxpool"]))
    hidden = draw(st.lists(st.integers(2, 8), max_size=2))
    size = (draw(st.integers(12, 28)), draw(st.integers(12, 28)))
    bn1d, dropout, classes = draw(st.booleans()), draw(st.sampled_from([0.0, 0.5])), draw(st.integers(2, 5))
    try:
        model = RandomCNN(in_chans, layers, head, hidden, bn1d, dropout, classes, size)
    except RuntimeError:
        assume(False)  # the drawn body shrinks the map below a kernel: not a valid classifier
    return model, size, in_chans


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_classifiers(), st.integers(0, 2**31 - 1))
def test_random_cnn_classifiers_convert_and_match(case, seed):
    model, size, in_chans = case
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model = model.double().eval()
    fcn = convert(model, size, in_chans=in_chans)
    x = torch.randn(3, in_chans, *size, dtype=torch.float64)
    assert relative_error(_logits(model, x), _logits(fcn, x)) < FP64_TOL
    g = fcn.geometry
    big = torch.randn(1, in_chans, size[0] + 2 * g.stride[0] + 1, size[1] + 3 * g.stride[1], dtype=torch.float64)
    dense = fcn(big)[0]
    if not g.padded:
        assert tuple(dense.shape[-2:]) == fcn.output_size(*big.shape[-2:])
    if g.exact:  # padding-free: every dense cell is the classifier on its crop
        for i in range(dense.shape[1]):
            for j in range(dense.shape[2]):
                y, x0 = g.window_origin(i, j)
                crop = big[:, :, y:y + size[0], x0:x0 + size[1]]
                assert relative_error(_logits(model, crop)[0], dense[:, i, j]) < FP64_TOL
