"""Satellite scenes: a 4-band uint16 GeoTIFF through the whole CLI (``--bands 4,3,2``, score COG, GeoJSON).

The scene (UTM, 10 m, nodata 0 on a border strip, 256² deflate tiles, no overviews) is written tile by tile with
rasterio, so making it holds one tile. The figure is one ``/usr/bin/time -v fcnify heatmap …`` in a fresh
process (``gigapixel.run_cli``): peak RSS must stay within the slides' (≤ 2.5 GB). ``FCNIFY_BIN`` names another
``fcnify`` executable than ``.venv/bin/fcnify``; ``FCNIFY_GEO_SIZE`` another scene side.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gigapixel  # noqa: E402

SIZE, QUICK_SIZE = 20000, 2048
BLOCK = 256


def make_scene(path: Path, size: int) -> float:
    """A 4-band uint16 scene: smooth fields plus noise, bright squares, nodata (0) over the left 5 %."""
    import rasterio
    from rasterio.windows import Window

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    profile = dict(driver="GTiff", width=size, height=size, count=4, dtype="uint16", crs="EPSG:32633",
                   transform=rasterio.Affine(10, 0, 500000, 0, -10, 4600000), nodata=0, tiled=True,
                   blockxsize=BLOCK, blockysize=BLOCK, compress="deflate", bigtiff="if_safer")
    border = size // 20
    with rasterio.open(path, "w", **profile) as dst:
        for y in range(0, size, BLOCK):
            for x in range(0, size, BLOCK):
                h, w = min(BLOCK, size - y), min(BLOCK, size - x)
                yy, xx = np.mgrid[y:y + h, x:x + w]
                field = 800 + 400 * np.sin(yy / 700.0) * np.cos(xx / 900.0)
                tile = (field[None] + rng.normal(0, 60, (4, h, w))).clip(1, 65535).astype(np.uint16)
                tile[:, (yy % 1500 < 40) & (xx % 1700 < 40)] = 6000
                tile[:, xx < border] = 0
                dst.write(tile, window=Window(x, y, w, h))
    return time.perf_counter() - start


def run(quick: bool = False) -> tuple[list[str], dict]:
    """Write the scene, run the CLI on it once; Markdown lines and figures."""
    gigapixel.FCNIFY = Path(os.environ.get("FCNIFY_BIN", gigapixel.FCNIFY))
    size = int(os.environ.get("FCNIFY_GEO_SIZE", QUICK_SIZE if quick else SIZE))  # a smaller scene on small machines
    with tempfile.TemporaryDirectory(prefix="fcnify-geo-bench-") as tmp:
        folder = Path(tmp)
        scene = folder / f"scene_{size}.tif"
        made = make_scene(scene, size)
        args = [str(scene), "--bands", "4,3,2", "--formats", "png,scores,geojson", "--min-score", "0.9"]
        result = gigapixel.run_cli(args, folder / "out", timeout=3 * 3600)
        result.update(size=size, write_s=made, scene_bytes=scene.stat().st_size)
        if result["rc"] == 0:
            cog = folder / "out" / f"scene_{size}.scores.tif"
            result["cog_bytes"] = cog.stat().st_size
    ok = result["rc"] == 0
    lines = ["A 4-band uint16 GeoTIFF (UTM, 10 m, nodata border), digits model on `--bands 4,3,2` (luma of three "
             "bands), default percentile scaling, `--formats png,scores,geojson` plus the automatic score COG; one "
             "`/usr/bin/time -v` run.", "",
             "| scene | file | seconds | peak RSS | tiles (computed/background) | COG |", "|---|---|---|---|---|---|",
             f"| {size}² ×4 uint16 | {gigapixel.mb(result['scene_bytes'])} | "
             + (f"{result['wall_s']:.0f} | {gigapixel.mb(result['peak_rss'])} | {result.get('tiles_computed')}/"
                f"{result.get('tiles_background')} | {gigapixel.mb(result.get('cog_bytes'))} |" if ok
                else f"failed: {result.get('error', ['?'])[-1]} | | | |"), ""]
    return lines, result


def main(argv: list[str] | None = None) -> int:
    return gigapixel.section_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
