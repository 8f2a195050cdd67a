"""Slides over Ray and the viewer outputs, through the whole ``fcnify heatmap`` process (``benchmarks/run.py``).

Every figure is one ``/usr/bin/time -v .venv/bin/fcnify heatmap ...`` in a fresh process (``gigapixel.run_cli``),
so the Ray figures include starting a local Ray (127.0.0.1 only), its actors and their model loading:

* one 24000² synthetic slide on the local engine, then ``--engine ray --split tiles`` with 1 and 2 workers (the
  tiles of the one slide shared out; each actor gets one CPU, as Ray's default ``--cpus-per-worker 1``);
* many small slides (16 of 2000²) on the local engine and on Ray with 1 and 2 workers (``--split auto``: whole
  slides per actor, as there are more than two per worker);
* the 24000² slide with every format (``--formats png,scores,geojson,ome-tiff``) on the local engine: wall time
  and the peak RSS of the whole process against the 2.5 GB goal.

    python benchmarks/clusters.py [--quick]      # prints the Markdown section
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from gigapixel import _log, make_slide, mb, run_cli, section_main, tick  # noqa: E402

FULL = {"slide": 24000, "small": 2000, "count": 16}
QUICK = {"slide": 2048, "small": 512, "count": 4}
MEMORY_GOAL = 2.5e9
ALL_FORMATS = "png,scores,geojson,ome-tiff"


def run(quick: bool = False, tmp_parent: str | None = None) -> tuple[list[str], dict]:
    cfg = QUICK if quick else FULL
    res: dict = {"cfg": cfg, "cpus": os.cpu_count()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fcnify-bench-clusters-", dir=tmp_parent) as tmp:
        tmp = Path(tmp)

        def cli(args, name):
            r = run_cli([str(a) for a in args], tmp / f"out-{name}", timeout=3600)
            if r["rc"] != 0:
                _log(f"{name} failed: {' '.join(r.get('error', [])[-3:])}")
            else:
                _log(f"{name}: {r['wall_s']:.1f} s, {mb(r['peak_rss'])}")
            return r

        slide, write_s = make_slide(tmp, cfg["slide"])
        res["write_s"] = write_s
        _log(f"wrote the {cfg['slide']}² slide in {write_s:.0f} s")
        res["one_local"] = cli([slide], "one-local")
        ray = ["--engine", "ray", "--split", "tiles"]
        res["one_ray1"] = cli([slide, *ray, "--workers", "1"], "one-ray1")
        res["one_ray2"] = cli([slide, *ray, "--workers", "2"], "one-ray2")
        res["formats"] = cli([slide, "--formats", ALL_FORMATS], "formats")
        outputs = sorted(p.name for p in (tmp / "out-formats").iterdir())
        res["formats"]["outputs"] = outputs
        slide.unlink()

        folder = tmp / "small"
        folder.mkdir()
        for n in range(cfg["count"]):
            make_slide(folder, cfg["small"], name=f"small_{n:02d}", seed=n + 1)
        res["many_local"] = cli([folder], "many-local")
        res["many_ray1"] = cli([folder, "--engine", "ray", "--workers", "1"], "many-ray1")
        res["many_ray2"] = cli([folder, "--engine", "ray", "--workers", "2"], "many-ray2")
    res["seconds"] = time.perf_counter() - started
    return markdown(res), res


def _wall(r: dict) -> str:
    return "failed" if r["rc"] != 0 else f"{r['wall_s']:.1f} s"


def _ratio(a: dict, b: dict) -> str:
    return "–" if a["rc"] or b["rc"] else f"{a['wall_s'] / b['wall_s']:.2f}"


def markdown(res: dict) -> list[str]:
    cfg = res["cfg"]
    side, small, count = cfg["slide"], cfg["small"], cfg["count"]
    one = [res["one_local"], res["one_ray1"], res["one_ray2"]]
    many = [res["many_local"], res["many_ray1"], res["many_ray2"]]
    lines = [f"Whole `fcnify heatmap` processes under `/usr/bin/time -v` on this machine ({res['cpus']} CPUs), "
             "default `digits` model; Ray figures include starting a local Ray, its actors and their model "
             "loading. Each Ray actor has one CPU (Ray caps its threads to it); the local engine uses every core.",
             "",
             "| job | local | Ray, 1 worker | Ray, 2 workers | 2 workers / 1 worker | 2 workers / local |",
             "|---|---|---|---|---|---|",
             f"| one {side}² slide, `--split tiles` | {_wall(one[0])} | {_wall(one[1])} | {_wall(one[2])} | "
             f"{_ratio(one[2], one[1])} | {_ratio(one[2], one[0])} |",
             f"| {count} slides of {small}², whole slides per actor | {_wall(many[0])} | {_wall(many[1])} | "
             f"{_wall(many[2])} | {_ratio(many[2], many[1])} | {_ratio(many[2], many[0])} |",
             ""]
    f = res["formats"]
    rss = f.get("peak_rss")
    ok = rss is not None and rss <= MEMORY_GOAL and f["rc"] == 0
    lines += [f"All viewer outputs for the {side}² slide (`--formats {ALL_FORMATS}`, local engine): "
              f"{_wall(f)} (the default formats: {_wall(one[0])}), peak RSS {mb(rss)} "
              f"(goal ≤ 2.5 GB: {tick(ok)}); wrote {', '.join(f.get('outputs', []))}.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    return section_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
