"""Images per second of ``fcnify heatmap``'s engines on one machine: local, and Ray with 1 and 2 workers.

The images are large digit scenes (the sample scenes tiled onto 1024×1024 canvases; 512×512 with
``quick``), run with the embedded ``digits`` model and the same options on every engine. Each engine runs the
job once into a fresh folder; the time is the engine's own (``JobResult.seconds``: the images, and for Ray the
pipeline with its actors' start-up and model loading, but not starting Ray itself, which happens once).

Every Ray configuration is given the machine's CPUs in total (``cpus_per_worker = CPUs // workers``; Ray caps
an actor's threads to its CPUs), so the comparison is of engines, not of thread counts.

    python benchmarks/engines.py [--quick]      # prints a Markdown table
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_images(folder: Path, count: int, size: int) -> list[str]:
    """``count`` size×size RGB scenes: the sample digit scenes tiled over a black canvas, each shifted."""
    from PIL import Image

    scene_paths = sorted((ROOT / "sample_images").glob("digits_scene_*.png"))
    scenes = [np.asarray(Image.open(p).convert("RGB")) for p in scene_paths]
    paths = []
    for n in range(count):
        canvas = np.zeros((size, size, 3), np.uint8)
        y = 0
        k = n
        while y < size:
            x, row_height = 0, 0
            while x < size:
                tile = scenes[k % len(scenes)]
                h, w = min(tile.shape[0], size - y), min(tile.shape[1], size - x)
                canvas[y:y + h, x:x + w] = tile[:h, :w]
                x, row_height, k = x + w, max(row_height, h), k + 1
            y += row_height
        path = folder / f"scene_{n:03d}.png"
        Image.fromarray(canvas).save(path)
        paths.append(str(path))
    return paths


def run(quick: bool = False) -> list[dict]:
    """One run of each engine; a row per engine with images/s and the ratio to the local engine."""
    from fcnify.convert import convert
    from fcnify.heatmap.options import HeatmapOptions
    from fcnify.heatmap.ray_engine import RayOptions, ray_session
    from fcnify.heatmap.runners import run_job
    from fcnify.models import load_model

    count, size = (4, 512) if quick else (8, 1024)
    cpus = os.cpu_count() or 1
    loaded = load_model("digits")
    fcn = convert(loaded.module, tuple(loaded.input_size), in_chans=loaded.in_chans)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fcnify-bench-engines-") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        paths = make_images(tmp / "in", count, size)

        def options(name: str) -> HeatmapOptions:
            return HeatmapOptions(outdir=tmp / name, device="cpu", batch_size=2)

        def record(engine: str, workers: int | None, result) -> None:
            assert not result.failed, result.failed[0].error
            rows.append({"benchmark": "engines", "engine": engine, "workers": workers, "images": count,
                         "image_size": f"{size}x{size}", "model": "digits", "cpus": cpus,
                         "seconds": round(result.seconds, 3), "images_per_second": round(result.images_per_second, 3)})

        record("local", None, run_job(paths, fcn, fcn.geometry, loaded, options("local")))
        try:
            with ray_session(None, num_cpus=cpus):
                for workers in (1, 2):
                    ray_options = RayOptions(workers=workers, cpus_per_worker=max(1, cpus // workers))
                    result = run_job(paths, fcn, fcn.geometry, loaded, options(f"ray{workers}"), engine="ray",
                                     ray_options=ray_options)
                    record("ray", workers, result)
        except Exception as exc:  # Ray missing or failing: the local figure still stands
            rows.append({"benchmark": "engines", "engine": "ray", "error": f"{type(exc).__name__}: {exc}"})
    local = rows[0]["images_per_second"]
    for row in rows:
        if "images_per_second" in row:
            row["ratio_vs_local"] = round(row["images_per_second"] / local, 3) if local else None
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| engine | workers | images | size | seconds | images/s | × local |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | – | – | – | – | {r['error']} | – |")
            continue
        lines.append(f"| {r['engine']} | {r['workers'] or '–'} | {r['images']} | {r['image_size']} | "
                     f"{r['seconds']:.2f} | {r['images_per_second']:.2f} | {r['ratio_vs_local']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 images of 512×512 instead of 8 of 1024×1024")
    args = parser.parse_args()
    print(markdown(run(quick=args.quick)))
