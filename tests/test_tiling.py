"""Exact tiled inference: tiles stitched equal one pass, for padded and padding-free networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from nets import SENet
from torch import nn

from fcnify.convert import convert
from fcnify.convert.geometry import Geometry
from fcnify.dense import DenseEngine, _forward, score_map
from fcnify.errors import InputError
from fcnify.tiling import (
    check_tileable,
    choose_tile,
    parse_memory,
    parse_tile,
    plan_tiles,
    split_for_tiling,
    tiled_logits,
)
from fcnify.zoo.digits import DigitsNet


class PaddedNet(nn.Module):
    """Padding everywhere, a ceil-mode pool, a residual block: the hard case for tiling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.tail = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = F.relu(x + self.block(x))
        x = F.relu(self.tail(F.relu(self.down(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def run(module, batch):
    return _forward(module, batch, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def padded():
    torch.manual_seed(1)
    net = PaddedNet().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        net.stem[1].running_mean.uniform_(-0.5, 0.5)
        net.stem[1].running_var.uniform_(0.5, 2.0)
    return convert(net, 32)


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(2)
    return convert(DigitsNet().eval(), 32)


@pytest.mark.parametrize("size,tile", [((97, 130), (64, 64)), ((96, 128), (48, 80)), ((150, 111), (70, 53)),
                                       ((61, 200), (61, 61))])
def test_tiled_equals_one_pass_on_a_padded_network(padded, size, tile):
    tiled = split_for_tiling(padded, padded.geometry)
    assert tiled.suffix is not None  # cut inside the network: the halo is the prefix's field, not the whole net's
    x = torch.randn(3, *size)
    reference = run(padded, x[None])
    out = tiled_logits(tiled, x, tile, run, batch_size=3)
    assert out.shape == reference.shape
    assert relative_error(reference, out) <= 1e-4


@pytest.mark.parametrize("size,tile", [((100, 140), (48, 48)), ((96, 128), (64, 40)), ((37, 90), (40, 44))])
def test_tiled_equals_one_pass_on_the_padding_free_digits_net(digits, size, tile):
    tiled = split_for_tiling(digits, digits.geometry)
    x = torch.randn(1, *size)
    reference = run(digits, x[None])
    out = tiled_logits(tiled, x, tile, run)
    assert out.shape == reference.shape
    assert relative_error(reference, out) <= 1e-4


def test_tiles_are_stride_aligned_and_progress_counts_them(padded):
    tiled = split_for_tiling(padded, padded.geometry)
    plan = plan_tiles(tiled, (150, 170), (64, 64), 3)
    assert all(span.start % tiled.stride[0] == 0 for span in plan.rows + plan.cols)
    assert plan.count > 4
    calls = []
    tiled_logits(tiled, torch.randn(3, 150, 170), (64, 64), run, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (plan.count, plan.count)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_whole_network_tiling_for_modules_without_a_graph(padded):
    wrapped = nn.Sequential(padded.net)  # no cut search: the whole network is tiled with its full halo
    tiled = split_for_tiling(wrapped, padded.geometry)
    assert tiled.suffix is None and tiled.cut == "output"
    x = torch.randn(3, 120, 100)
    assert relative_error(run(padded, x[None]), tiled_logits(tiled, x, (80, 80), run)) <= 1e-4


def test_tiling_refuses_networks_it_cannot_reproduce():
    base = dict(stride=(4, 4), offset=(0, 0), window=(32, 32), receptive_field=(40, 40), rf_centre=(16.0, 16.0))
    for flags in ({"size_dependent_padding": True}, {"global_context": True}, {"notes": ("opaque",)}):
        with pytest.raises(InputError) as info:
            check_tileable(Geometry(**base, **flags))
        assert info.value.hint
    se = convert(SENet().eval(), 16)
    with pytest.raises(InputError, match="whole image"):
        score_map(se, torch.randn(3, 40, 40), se.geometry, list("abcd"), tile=24)


def test_a_tile_smaller_than_the_receptive_field_is_refused(padded):
    tiled = split_for_tiling(padded, padded.geometry)
    with pytest.raises(InputError, match="receptive field"):
        tiled_logits(tiled, torch.randn(3, 100, 100), (tiled.min_tile()[0] - 1,) * 2, run)


def test_auto_tile_follows_the_memory_budget(padded):
    tiled = split_for_tiling(padded, padded.geometry)
    assert choose_tile(tiled, (200, 200), 10**10, 3, (32, 32)) is None  # one pass fits
    tile = choose_tile(tiled, (600, 600), 3 * 10**6, 3, (32, 32))
    assert tile is not None and tiled.min_tile()[0] <= tile[0] < 600
    assert (tile[0] - tiled.halo[0]) % tiled.stride[0] == 0  # a whole number of kept cells
    with pytest.raises(InputError, match="too small"):
        choose_tile(tiled, (600, 600), 1000, 3, (32, 32))
    engine = DenseEngine(padded, padded.geometry, torch.device("cpu"), torch.float32, max_memory=1.5 * 10**6)
    x = torch.randn(3, 300, 260)
    assert relative_error(run(padded, x[None])[0], engine.logits(x)) <= 1e-4


def test_option_parsing():
    assert parse_memory("2GB") == 2 * 10**9 and parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert parse_memory("512mb") == 512 * 10**6 and parse_memory(1000) == 1000
    assert parse_tile("768") == (768, 768) and parse_tile("768x1024") == (768, 1024) and parse_tile("auto") == "auto"
    assert parse_tile(None) is None
    for bad in ("lots", "-1GB", "2XB"):
        with pytest.raises(InputError):
            parse_memory(bad)
    for bad in ("big", "0", "1x2x3"):
        with pytest.raises(InputError):
            parse_tile(bad)
