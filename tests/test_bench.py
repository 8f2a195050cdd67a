"""The benchmark script runs end to end in --quick mode and writes its Markdown report where it is told."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmark_writes_the_report(tmp_path):
    out = tmp_path / "bench.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--output", str(out),
                           "--json", str(tmp_path / "bench.json")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    for heading in ("Dense (one pass) vs naive sliding window", "Gigapixel slides through the CLI",
                    "dilation vs shift-and-stitch", "ONNX Runtime", "Skipping glass", "CUDA"):
        assert heading in text
    assert "| resnet18 | 256 |" in text and "torch " in text and "threads" in text
    assert (tmp_path / "bench.json").exists()
