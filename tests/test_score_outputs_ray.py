"""issue 18: the Ray engine's workers write every output's array of a shared-out store, as the local engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("ray.data")
import zarr  # noqa: E402
from ray_helpers import local_ray  # noqa: E402, F401
from test_score_outputs import ATOL, RTOL, common, invoke, one_pass, scene  # noqa: E402, F401

pytestmark = pytest.mark.ray


def test_ray_tiles_store_every_output(local_ray, scene):  # noqa: F811
    nets, x = scene
    expected = one_pass(nets["LogitsAndEmbedding"], x)
    result = invoke("heatmap", "a.tif", *common("LogitsAndEmbedding"), "--tile", "40", "--scores", "zarr",
                    "--engine", "ray", "--workers", "2", "--split", "tiles", "-o", "ray", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cluster"]["split"] == "tiles"
    group = zarr.open_group("ray/a.scores.zarr", mode="r")
    assert group["tiles"].shape == (3, 3)
    np.testing.assert_allclose(np.asarray(group["output.1"]), expected["1"], rtol=RTOL, atol=ATOL)
    assert dict(group["output.1"].attrs)["stride"] == [2, 2]
