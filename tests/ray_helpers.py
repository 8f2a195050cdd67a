"""A local Ray for a test module (2 CPUs, 127.0.0.1 only, token authentication), and its processes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest


def use_test_token(mp: pytest.MonkeyPatch) -> str:
    """Token authentication with a token for this test process only (nothing written to ~/.ray).

    Ray reads RAY_AUTH_MODE and the token once and caches them: refresh both after changing the variables.
    """
    from ray._private.authentication_test_utils import reset_auth_token_state

    token = hashlib.sha256(f"fcnify-tests-{os.getpid()}".encode()).hexdigest()
    mp.setenv("RAY_AUTH_MODE", "token")
    mp.setenv("RAY_AUTH_TOKEN", token)
    mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    reset_auth_token_state()
    return token


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: 2 CPUs, node IP and every server on 127.0.0.1, token auth on, no dashboard."""
    from fcnify.heatmap.ray_engine import ray_session

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        use_test_token(mp)
        with ray_session(None, num_cpus=2) as ray:
            nodes = ray.nodes()
            assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
            yield ray


def raylet_children(ray, name: str) -> list[int]:
    """Process ids of this Ray's worker processes whose title contains ``name`` (actors set theirs to
    ``ray::<class>``): children of this module's raylet only, never another Ray's on the machine."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if parent == raylet and name in title:
            found.append(int(entry.name))
    return found
