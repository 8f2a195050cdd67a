from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI runs a fixed sequence of examples (reproducible verdicts); local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

sys.path.insert(0, str(Path(__file__).parent))  # `nets` for --arch nets:FACTORY

pytest_plugins = ["ray_helpers"]  # the `local_ray` fixture (Ray itself is imported only by tests that use it)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-12))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
