"""fcnify.heatmap.plan, .memory and .compute: tile plans and budgets, and the key property — tiles computed
one by one (``compute.compute_tiles``) give the one-pass probabilities, for padded and padding-free networks."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from heatmap_helpers import ArrayView
from nets import PaddedNet, SENet
from PIL import Image
from torch import nn

from fcnify.convert import convert
from fcnify.convert.geometry import Geometry
from fcnify.dense import score_map
from fcnify.errors import InputError
from fcnify.heatmap import compute, plan
from fcnify.heatmap.job import ImageJob
from fcnify.heatmap.memory import (
    DEFAULT_TILE_BUDGET,
    MAX_TILE_SIDE,
    available_memory,
    bytes_per_pixel,
    parse_memory,
    parse_tile,
    tile_side,
)
from fcnify.heatmap.options import HeatmapOptions
from fcnify.images import prepare
from fcnify.zoo.digits import DigitsNet

MEAN3, STD3 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SamePadded(nn.Module):
    """TensorFlow-style 'same' padding (timm's Conv2dSame): the padding depends on the input size."""

    def __init__(self):
        super().__init__()
        from timm.layers import Conv2dSame

        self.conv = Conv2dSame(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


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


@functools.cache
def resnet18():
    """torchvision's ResNet-18, random weights (fixed seed), converted on 64×64 windows: stride 32, a 467 px
    receptive field reaching 217 px before its window."""
    import torchvision

    torch.manual_seed(3)
    net = torchvision.models.resnet18(num_classes=6).eval()
    with torch.no_grad():  # batch norms that do something
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return convert(net, 64)


def rgb_image(size, seed=0) -> np.ndarray:
    """A smooth random RGB image (noise blurred a little: activations far from ReLU's kink everywhere)."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8))
    return np.asarray(noise.resize((size[1] // 2 + 1, size[0] // 2 + 1)).resize((size[1], size[0])))


def one_pass(fcn, image: np.ndarray, in_chans: int, mean, std) -> np.ndarray:
    """The reference: the whole image through the network at once, as probabilities K×h×w."""
    picture = Image.fromarray(image)
    prepared = prepare(picture, in_chans, mean, std, min_size=tuple(int(w) for w in fcn.geometry.window))
    labels = [str(k) for k in range(fcn(prepared.tensor[None]).shape[1])]
    return score_map(fcn, prepared, fcn.geometry, labels, "cpu").scores.numpy()


def tiled(fcn, image: np.ndarray, in_chans: int, mean, std, cells, batch_size=1, mask=None, geometry=None):
    """The image through ``compute.compute_tiles`` with ``cells`` per tile: (probabilities, plan, view)."""
    geometry = geometry or fcn.geometry
    view = ArrayView(image)
    tiles = plan.plan_tiles(fcn, geometry, in_chans, view.size, cells)
    bounds = plan.bounds_of(geometry)
    network = compute.TileNetwork.build(fcn, in_chans, mean, std, "cpu")
    out = None
    written = []

    def write(tile, block):
        nonlocal out
        if out is None:
            out = np.full((block.shape[0], *tiles.map_size), -1.0, dtype=np.float32)
        region = out[:, tile.rows.first:tile.rows.last, tile.cols.first:tile.cols.last]
        assert block.shape == region.shape and (region == -1).all()  # each cell written once
        region[...] = block
        written.append(tiles.index(tile))

    todo = [t for t, c in zip(tiles.tiles(), compute.foreground_tiles(tiles, mask, bounds), strict=True) if c]
    compute.compute_tiles(view, tiles, network, bounds, todo, mask, write, batch_size=batch_size)
    assert sorted(written) == [tiles.index(t) for t in todo]
    return out, tiles, view


def check_plan(tiles: plan.TilePlan, bounds: plan.NetworkBounds) -> None:
    """Tile starts on stride multiples; cells partitioned exactly; each tile's input holds its cells' receptive
    fields (clipped to the canvas); the last tile of each axis ends at the canvas edge."""
    for axis, spans in enumerate((tiles.rows, tiles.cols)):
        stride, cells, canvas = tiles.stride[axis], tiles.map_size[axis], tiles.canvas[axis]
        assert spans[0].first == 0 and spans[-1].last == cells
        assert all(a.last == b.first for a, b in zip(spans, spans[1:]))  # no gap, no overlap
        assert all(s.last - s.first == tiles.cells[axis] for s in spans[:-1])
        assert 1 <= spans[-1].last - spans[-1].first <= tiles.cells[axis]
        for s in spans:
            assert s.start % stride == 0 and 0 <= s.start < s.stop <= canvas
            assert s.start <= max(0, s.first * stride + bounds.lo[axis])
            assert s.stop >= min(canvas, (s.last - 1) * stride + bounds.hi[axis])
        assert spans[-1].stop == canvas


# ---------------------------------------------------------------------------------------------- planning


def test_bounds_of_a_padding_free_and_a_padded_network(digits, padded):
    b = plan.bounds_of(digits.geometry)
    assert (b.stride, b.lo, b.hi, b.offset, b.window) == ((4, 4), (0, 0), (32, 32), (0, 0), (32, 32))
    assert b.tileable and b.halo(0) == 32 - 4
    p = plan.bounds_of(padded.geometry)
    assert p.tileable and p.lo[0] < 0 < p.hi[0] and p.stride == (8, 8)
    # The receptive field around the window's centre, rounded outwards.
    g = padded.geometry
    assert p.hi[0] - p.lo[0] in (g.receptive_field[0], g.receptive_field[0] + 1)
    assert p.halo(0) == p.hi[0] - (p.lo[0] // 8) * 8 - 8


@pytest.mark.parametrize("size", [(97, 130), (150, 111), (61, 200), (20, 50), (32, 32)])
@pytest.mark.parametrize("cells", [None, (1, 1), (2, 5), (3, 3)])
def test_plan_tiles_partition_the_cells_on_stride_multiples(padded, digits, size, cells):
    for fcn, chans in ((padded, 3), (digits, 1)):
        tiles = plan.plan_tiles(fcn, fcn.geometry, chans, size, cells)
        reference = fcn(torch.zeros(1, chans, *tiles.canvas)).shape[-2:]
        assert tiles.map_size == tuple(reference)  # what one pass gives, counted without computing it
        assert tiles.canvas == (max(size[0], 32), max(size[1], 32)) and tiles.image_size == size
        check_plan(tiles, plan.bounds_of(fcn.geometry))
        if cells is None:
            assert tiles.count == 1 and tiles.cells == tiles.map_size
        else:
            expected = tuple(-(-tiles.map_size[a] // min(cells[a], tiles.map_size[a])) for a in range(2))
            assert tiles.grid == expected and tiles.count == expected[0] * expected[1]
        assert [tiles.index(t) for t in tiles.tiles()] == list(range(tiles.count))
        assert all(tiles.tile(tiles.index(t)) == t for t in tiles.tiles())


def test_cells_for_tile_size_refuses_a_tile_below_receptive_field_plus_stride(padded, digits, tmp_path):
    for fcn in (padded, digits):
        bounds = plan.bounds_of(fcn.geometry)
        need = tuple(bounds.halo(a) + bounds.stride[a] for a in range(2))
        assert plan.cells_for_tile_size(bounds, need) == (1, 1)
        assert plan.cells_for_tile_size(bounds, (need[0] + 3 * bounds.stride[0], need[1])) == (4, 1)
        with pytest.raises(InputError, match="receptive field") as info:
            plan.cells_for_tile_size(bounds, (need[0] - 1, need[1]))
        assert f"at least {need[0]} px" in info.value.hint
    # Through the job's options: --tile 8 is refused for the digits net.
    meta = SimpleNamespace(in_chans=1, mean=(0.1,), std=(0.3,), labels=tuple("0123456789") + ("bg",))
    job = ImageJob(digits, digits.geometry, meta, HeatmapOptions(outdir=tmp_path, device="cpu", tile=8))
    with pytest.raises(InputError, match="receptive field"):
        job.tile_cells()


def test_networks_that_cannot_be_tiled_get_one_tile():
    base = dict(stride=(4, 4), offset=(0, 0), window=(32, 32), receptive_field=(40, 40), rf_centre=(16.0, 16.0))
    for flags, why in (({"size_dependent_padding": True}, "same"), ({"global_context": True}, "squeeze"),
                       ({"notes": ("opaque",)}, "approximate")):
        bounds = plan.bounds_of(Geometry(**base, **flags))
        assert not bounds.tileable and why in bounds.why_not
    assert plan.bounds_of(Geometry(**base)).tileable
    torch.manual_seed(4)
    for net, size in ((SENet().eval(), 16), (SamePadded().eval(), 16)):
        fcn = convert(net, size)
        assert not plan.bounds_of(fcn.geometry).tileable
        image = rgb_image((40, 44), seed=5)
        # One tile: computed whole, exactly as one pass.
        scores, tiles, _ = tiled(fcn, image, 3, MEAN3, STD3, None)
        assert tiles.count == 1
        assert relative_error(torch.from_numpy(one_pass(fcn, image, 3, MEAN3, STD3)), torch.from_numpy(scores)) <= 1e-5
        # Several tiles: refused, with a way out.
        with pytest.raises(InputError, match="cannot be computed tile by tile") as info:
            plan.plan_tiles(fcn, fcn.geometry, 3, (40, 44), (4, 4))
        assert "--max-memory" in info.value.hint or "--level" in info.value.hint
        # A plan whose one tile covers the map is not several tiles.
        assert plan.plan_tiles(fcn, fcn.geometry, 3, (40, 44), (1000, 1000)).count == 1


def test_an_image_smaller_than_the_window_is_padded_to_one_cell(digits):
    tiles = plan.plan_tiles(digits, digits.geometry, 1, (20, 50), (2, 2))
    assert tiles.canvas == (32, 50) and tiles.map_size == (1, 5) and tiles.grid == (1, 3)


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("size, cells, batch", [((97, 130), (3, 4), 1), ((96, 128), (4, 3), 3),
                                                ((150, 111), (5, 4), 2), ((61, 200), (2, 6), 4),
                                                ((20, 50), (1, 2), 1), ((40, 40), (1, 1), 2)])
def test_tiles_equal_one_pass_on_a_padded_network(padded, size, cells, batch):
    image = rgb_image(size, seed=sum(size))
    reference = one_pass(padded, image, 3, MEAN3, STD3)
    scores, tiles, view = tiled(padded, image, 3, MEAN3, STD3, cells, batch_size=batch)
    assert tiles.count > 1
    assert scores.shape == reference.shape and (scores >= 0).all()  # every cell written
    assert relative_error(torch.from_numpy(reference), torch.from_numpy(scores)) <= 1e-4
    # Each tile read only its own input region (clipped to the image), never the whole image.
    expected = [(t.rows.start, t.cols.start, min(t.rows.stop, size[0]) - t.rows.start,
                 min(t.cols.stop, size[1]) - t.cols.start) for t in tiles.tiles()]
    assert sorted(view.reads) == sorted(expected)


def test_a_module_without_a_graph_is_tiled_whole(padded):
    """Any module mapping N×C×H×W to N×K×h×w tiles by its geometry alone (a loaded .pt2 has no FX graph)."""
    wrapped = nn.Sequential(padded.net).eval()
    image = rgb_image((120, 100), seed=11)
    scores, tiles, _ = tiled(wrapped, image, 3, MEAN3, STD3, (4, 3), geometry=padded.geometry)
    assert tiles.count > 1
    reference = one_pass(padded, image, 3, MEAN3, STD3)
    assert relative_error(torch.from_numpy(reference), torch.from_numpy(scores)) <= 1e-4


@pytest.mark.parametrize("size, cells", [((100, 140), (7, 9)), ((96, 128), (6, 5)), ((37, 90), (1, 6)),
                                         ((20, 50), (1, 2))])
def test_tiles_equal_one_pass_on_the_padding_free_digits_net(digits, size, cells):
    rng = np.random.default_rng(size[0])
    image = rng.integers(0, 256, size=size, dtype=np.uint8)
    reference = one_pass(digits, image, 1, (0.1,), (0.3,))
    scores, tiles, _ = tiled(digits, image, 1, (0.1,), (0.3,), cells, batch_size=2)
    assert tiles.count > 1 and scores.shape == reference.shape
    assert relative_error(torch.from_numpy(reference), torch.from_numpy(scores)) <= 1e-4


@pytest.mark.slow
def test_tiles_equal_one_pass_on_resnet18():
    """ResNet-18 (padding in every conv, a padded max pool, strided 1×1 shortcuts): tiles of 8 cells cut each
    axis in two, the second tile starting inside the image and the first ending inside it."""
    fcn = resnet18()
    size = (512, 544)
    image = rgb_image(size, seed=7)
    bounds = plan.bounds_of(fcn.geometry)
    cells = plan.cells_for_tile_size(bounds, (bounds.halo(0) + 8 * 32, bounds.halo(1) + 8 * 32))
    assert cells == (8, 8)
    scores, tiles, _ = tiled(fcn, image, 3, MEAN3, STD3, cells, batch_size=4)
    assert tiles.grid == (2, 2)
    assert tiles.rows[1].start > 0 and tiles.rows[0].stop < size[0]  # real cuts on both sides
    reference = one_pass(fcn, image, 3, MEAN3, STD3)
    assert scores.shape == reference.shape == (6, 15, 16)
    assert relative_error(torch.from_numpy(reference), torch.from_numpy(scores)) <= 1e-4


def test_background_cells_are_nan_and_background_tiles_skipped(digits):
    """With a foreground mask, cells whose window holds no foreground pixel are NaN and tiles with none are not
    computed; the foreground cells keep their one-pass values."""
    size = (96, 128)
    rng = np.random.default_rng(9)
    image = rng.integers(0, 256, size=size, dtype=np.uint8)
    pixels = np.zeros(size, dtype=bool)
    pixels[10:30, 90:100] = True  # foreground only near the top right
    mask = plan.ForegroundMask(pixels, (1.0, 1.0), (0, 0, 0), "black")
    reference = one_pass(digits, image, 1, (0.1,), (0.3,))
    scores, tiles, view = tiled(digits, image, 1, (0.1,), (0.3,), (4, 4), mask=mask)
    bounds = plan.bounds_of(digits.geometry)
    keep = mask.cells((0, tiles.map_size[0]), (0, tiles.map_size[1]), bounds)
    for i in range(tiles.map_size[0]):  # the cells holding foreground, counted by hand
        for j in range(tiles.map_size[1]):
            assert keep[i, j] == pixels[4 * i:4 * i + 32, 4 * j:4 * j + 32].any()
    computed = compute.foreground_tiles(tiles, mask, bounds)
    assert 0 < sum(computed) < tiles.count and len(view.reads) == sum(computed)
    skipped = [t for t, c in zip(tiles.tiles(), computed, strict=True) if not c]
    for t in skipped:  # never written
        assert (scores[:, t.rows.first:t.rows.last, t.cols.first:t.cols.last] == -1).all()
    done = scores[:, keep]
    assert np.isfinite(done).all()
    np.testing.assert_allclose(done, reference[:, keep], rtol=1e-4, atol=1e-6)
    written = np.zeros(tiles.map_size, dtype=bool)
    for t in tiles.tiles():
        if computed[tiles.index(t)]:
            written[t.rows.first:t.rows.last, t.cols.first:t.cols.last] = True
    assert np.isnan(scores[:, written & ~keep]).all()


# ------------------------------------------------------------------------------------------------ memory


def test_option_parsing():
    assert parse_memory("2GB") == 2 * 10**9 and parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert parse_memory("512mb") == 512 * 10**6 and parse_memory(1000) == 1000 and parse_memory("64 KiB") == 65536
    assert parse_tile("768") == (768, 768) and parse_tile("768x1024") == (768, 1024) and parse_tile("auto") == "auto"
    assert parse_tile(512) == (512, 512) and parse_tile((64, 96)) == (64, 96) and parse_tile("AUTO") == "auto"
    assert parse_tile(None) is None and parse_tile("") is None
    for bad in ("lots", "-1GB", "2XB", "0", 0):
        with pytest.raises(InputError, match="--max-memory"):
            parse_memory(bad)
    for bad in ("big", "-5", "1x2x3", "0x10"):
        with pytest.raises(InputError, match="--tile"):
            parse_tile(bad)


def test_a_larger_budget_gives_a_larger_tile(padded, digits, tmp_path):
    per_pixel = bytes_per_pixel(padded, 3, (32, 32))
    assert 1.8 * 3 * 4 <= per_pixel < 10_000  # at least the float32 input, ×1.8 for workspaces
    sides = [tile_side(per_pixel, budget) for budget in (10**6, 4 * 10**6, 16 * 10**6)]
    assert sides[0] < sides[1] < sides[2] <= MAX_TILE_SIDE
    assert sides[1] == pytest.approx(2 * sides[0], abs=2)  # side ∝ √budget
    assert tile_side(per_pixel, None) == tile_side(per_pixel, DEFAULT_TILE_BUDGET)
    assert tile_side(per_pixel, 10**15) == MAX_TILE_SIDE and tile_side(per_pixel, 1) == 1
    assert tile_side(per_pixel, 4 * 10**6, batch=4) == pytest.approx(sides[0], abs=1)
    assert bytes_per_pixel(nn.Identity(), 3, (32, 32)) == 400.0  # no graph to measure: conservative
    assert available_memory() > 0
    # Through the job: a budget gives cells per tile; a larger one more cells; too small is refused.
    meta = SimpleNamespace(in_chans=1, mean=(0.1,), std=(0.3,), labels=tuple("0123456789") + ("bg",))

    def cells(**options):
        return ImageJob(digits, digits.geometry, meta, HeatmapOptions(outdir=tmp_path, device="cpu",
                                                                      **options)).tile_cells()

    small, large = cells(max_memory="1MB"), cells(max_memory="20MB")
    assert 1 <= small[0] < large[0]
    assert cells(tile=200) == plan.cells_for_tile_size(plan.bounds_of(digits.geometry), (200, 200)) == (43, 43)
    assert cells() == cells(tile="auto") == cells(max_memory=f"{DEFAULT_TILE_BUDGET}B")
    with pytest.raises(InputError, match="--max-memory .* too small"):
        cells(max_memory="1KB")


def test_a_batch_of_tiles_fits_the_memory_budget_together(digits, tmp_path):
    """On a GPU, tiles run together only as far as their summed working set fits the budget (at least one at a
    time); on the CPU one at a time."""
    meta = SimpleNamespace(in_chans=1, mean=(0.1,), std=(0.3,), labels=tuple("0123456789") + ("bg",))
    assert ImageJob(digits, digits.geometry, meta, HeatmapOptions(outdir=tmp_path, device="cpu")
                    ).tiles_per_batch((64, 64)) == 1

    def job(**options):
        built = ImageJob(digits, digits.geometry, meta, HeatmapOptions(outdir=tmp_path, device="cpu", **options))
        # The batching rule only reads the device's type: decide as for a GPU without needing one here.
        built.network.device = torch.device("cuda")
        return built

    default = job()
    per_tile = default.per_pixel() * 2048 * 2048
    assert per_tile > DEFAULT_TILE_BUDGET / 2  # the default tile of this network: one per batch
    assert default.tiles_per_batch((2048, 2048)) == 1
    assert default.tiles_per_batch((64, 64)) == 8  # --batch-size's default
    assert job(batch_size=3).tiles_per_batch((64, 64)) == 3
    four = int(4.5 * default.per_pixel() * 256 * 256)
    assert job(max_memory=f"{four}B", batch_size=16).tiles_per_batch((256, 256)) == 4
    assert job(max_memory="1KB").tiles_per_batch((256, 256)) == 1


def test_partly_background_tiles_run_only_their_foreground_blocks(padded):
    """Issue 21/4: with large background areas inside tiles, only blocks holding foreground go through the network
    (each with its exact halo): fewer input pixels by about the background share, the same values."""
    size = (320, 352)
    image = rgb_image(size, seed=21)
    pixels = np.zeros(size, dtype=bool)
    for y, x in ((20, 30), (30, 200), (180, 40), (200, 220)):  # one tissue island per tile, glass around it
        pixels[y:y + 60, x:x + 60] = True
    mask = plan.ForegroundMask(pixels, (1.0, 1.0), (255, 255, 255), "white")
    bounds = plan.bounds_of(padded.geometry)
    cells = (19, 21)  # tiles larger than the islands: every tile holds some tissue
    scores_all, tiles, _ = tiled(padded, image, 3, MEAN3, STD3, cells)
    network = compute.TileNetwork.build(padded, 3, MEAN3, STD3, "cpu")
    view = ArrayView(image)
    everything = compute.compute_tiles(view, tiles, network, bounds, list(tiles.tiles()), None, lambda t, b: None)
    out = np.full_like(scores_all, -1.0)

    def write(tile, block):
        out[:, tile.rows.first:tile.rows.last, tile.cols.first:tile.cols.last] = block

    census = compute.foreground_census(tiles, mask, bounds)
    todo = [t for t, c in zip(tiles.tiles(), census.computed, strict=True) if c]
    assert len(todo) == tiles.count  # tile-level skipping alone would save nothing here
    pushed = compute.compute_tiles(ArrayView(image), tiles, network, bounds, todo, mask, write)
    keep = mask.cells((0, tiles.map_size[0]), (0, tiles.map_size[1]), bounds)
    background = 1.0 - keep.mean()
    assert everything == tiles.input_pixels() == census.pixels_all
    assert pushed == census.pixels and census.masked_cells == int((~keep).sum())
    # The pixels pushed drop by at least the background share, less the halos the blocks add.
    blocks = [b for t in todo for b in compute.foreground_blocks(t, compute._tile_mask(t, mask, bounds), tiles, bounds)]
    assert len(blocks) >= 4 and all(b.input_shape[0] < t.input_shape[0] for b, t in zip(blocks, todo))
    stride = tiles.stride
    halos = sum(b.input_shape[0] * b.input_shape[1] - (b.rows.last - b.rows.first) * stride[0]
                * (b.cols.last - b.cols.first) * stride[1] for b in blocks)
    assert background > 0.5 and pushed <= everything * (1.0 - background) + halos
    assert census.saved_fraction == pytest.approx(1.0 - pushed / everything) and census.saved_fraction > 0.3
    np.testing.assert_allclose(out[:, keep], scores_all[:, keep], rtol=1e-5, atol=1e-6)
    assert np.isnan(out[:, ~keep]).all()
