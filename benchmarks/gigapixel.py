"""Gigapixel slides through the whole ``fcnify heatmap`` process, as a user runs it (``benchmarks/run.py``).

Every figure of the CLI is one ``/usr/bin/time -v .venv/bin/fcnify heatmap ...`` in a fresh process: wall time is
GNU time's "Elapsed (wall clock) time", peak RSS its "Maximum resident set size" (model, libraries, image
reading, previews and all). Synthetic JPEG slides (``tests/slides.py``) are written into a temporary folder, one
at a time, and deleted after their runs. Only the network-only figure and the naive patch loop run in this
(warm) process.

    python benchmarks/gigapixel.py [--quick]      # prints the Markdown section
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
FCNIFY = ROOT / ".venv" / "bin" / "fcnify"
GNU_TIME = "/usr/bin/time"

#: Time budget of the whole section in the full run; the 48000² slide runs only if it is projected to fit.
SECTION_BUDGET_S = 30 * 60
#: The ResNet-50 run falls back to a coarser --mpp when projected to take longer than this.
R50_BUDGET_S = 5 * 60

FULL = {"sizes": [6000, 12000, 24000], "huge": 48000, "black": 12000, "r50_size": 24000, "r50_density": 0.12,
        "e2e": 12000, "naive_region": 1024, "naive_sample": 3000, "png": (2400, 3000), "png_tile": 768}
#: --quick: one 1024² slide (default and --foreground all, network only, naive loop on the same slide) and a small
#: PNG; no start-up, black-slide or ResNet-50 runs (each CLI process costs seconds of start-up alone).
QUICK = {"sizes": [1024], "huge": None, "black": None, "r50_size": None, "r50_density": 0.12,
         "e2e": 1024, "naive_region": 1024, "naive_sample": 200, "png": (480, 560), "png_tile": 1024}

# ------------------------------------------------------------------------------------------ the CLI


def _parse_time(text: str) -> tuple[float | None, int | None]:
    wall = rss = None
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        wall = sum(v * 60 ** k for k, v in enumerate(reversed(parts)))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        rss = int(m.group(1)) * 1024
    return wall, rss


def run_cli(args: list[str], outdir: Path, timeout: float = 1800) -> dict:
    """``/usr/bin/time -v fcnify heatmap ARGS -o OUTDIR`` in a fresh process: wall, peak RSS, summary row."""
    shutil.rmtree(outdir, ignore_errors=True)

    cmd = [GNU_TIME, "-v", str(FCNIFY), "heatmap", *args, "-o", str(outdir)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=outdir.parent)
    elapsed = time.perf_counter() - start
    wall, rss = _parse_time(done.stderr)
    result = {"args": args, "rc": done.returncode, "wall_s": wall or elapsed, "peak_rss": rss}
    if done.returncode != 0:
        text = done.stderr.split("\tCommand being timed:")[0]
        result["error"] = [line for line in text.strip().splitlines() if line.strip()][-30:] or ["(no output)"]
        return result
    import pyarrow.parquet as pq

    row = pq.read_table(outdir / "summary.parquet").to_pylist()[0]
    keys = ("tiles", "tiles_computed", "tiles_background", "runtime", "seconds", "map_height", "map_width",
            "megapixels", "level", "downsample", "background_fraction", "foreground", "cells_masked",
            "masked_fraction", "pixels_saved")
    result.update({k: row.get(k) for k in keys})
    masks = list(outdir.glob("*.mask.png"))
    if masks:
        from PIL import Image

        result["foreground_fraction"] = float((np.asarray(Image.open(masks[0])) > 0).mean())
    return result


def make_slide(folder: Path, size: int, name: str | None = None, **kw) -> tuple[Path, float]:
    sys.path.insert(0, str(ROOT / "tests"))
    from slides import write_slide

    kind = kw.pop("kind", "svs")
    suffix = ".ome.tif" if kind == "ome" else ".svs"
    path = folder / ((name or f"slide_{size}") + suffix)
    start = time.perf_counter()
    write_slide(path, (size, size), kind=kind, **{"seed": 1, "density": 0.3, **kw})
    return path, time.perf_counter() - start


def mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f} MB"


def tick(ok: bool) -> str:
    return "✓" if ok else "✗"


def _log(msg: str) -> None:
    print(f"[gigapixel] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- warm measurements


def network_only(slide: Path, runtime: str) -> dict:
    """Only the network's forward passes on exactly the tiles the CLI computes (same plan, mask, batching,
    runtime), on zero tensors of the tiles' shapes, in this process after one untimed warm-up batch."""
    import torch

    from fcnify.cli import _convert, _load
    from fcnify.export import ModelMetadata
    from fcnify.heatmap import compute, plan
    from fcnify.heatmap.job import ImageJob
    from fcnify.heatmap.options import HeatmapOptions
    from fcnify.heatmap.sources import open_source, open_view

    loaded = _load("digits", "default", None, None, False)
    fcn = _convert(loaded)
    meta = ModelMetadata.of(loaded, fcn)
    with tempfile.TemporaryDirectory() as tmp:
        options = HeatmapOptions(outdir=Path(tmp), runtime=runtime)
        job = ImageJob(fcn, fcn.geometry, loaded, options, meta)
        with open_source(str(slide)) as source:
            view = open_view(source)
            tiles = plan.plan_tiles(job.fcn, job.geometry, job.model.in_chans, view.size, job.tile_cells())
            mask = plan.estimate_foreground(view, job.window, options.foreground)
        computed = compute.foreground_tiles(tiles, mask, job.bounds)
        todo = [t for t, c in zip(tiles.tiles(), computed, strict=True) if c]
        pixels = sum(t.input_shape[0] * t.input_shape[1] for t in todo)
        network = job.runner(pixels)
        batches: list[list] = []
        size = job.tiles_per_batch(tiles.tile(0).input_shape)
        for tile in todo:  # the batching of compute.compute_tiles: same-size runs of at most `size`
            if batches and len(batches[-1]) < size and batches[-1][0].input_shape == tile.input_shape:
                batches[-1].append(tile)
            else:
                batches.append([tile])
        shape = (job.model.in_chans,)
        with torch.inference_mode():
            network.run(torch.zeros(1, *shape, *todo[0].input_shape))  # warm-up, untimed
            start = time.perf_counter()
            for batch in batches:
                network.run(torch.zeros(len(batch), *shape, *batch[0].input_shape))
            seconds = time.perf_counter() - start
    return {"seconds": seconds, "tiles": len(todo), "batches": len(batches), "runtime": network.runtime,
            "pixels": pixels}


def naive_loop(slide: Path, stride: int, sample: int | None, batch: int = 256) -> dict:
    """The original digits classifier on one 32×32 window per output cell, each window read from the slide with
    tifffile + zarr; all cells, or a random sample of ``sample`` cells extrapolated to all."""
    import tifffile
    import torch
    import zarr

    from fcnify.zoo import DIGITS_META, load_digits_model

    model = load_digits_model()
    window = int(DIGITS_META["input_size"][0])
    mean, std = float(DIGITS_META["mean"][0]), float(DIGITS_META["std"][0])
    with tifffile.TiffFile(slide) as tif:
        store = tif.series[0].aszarr(level=0)
        array = zarr.open_array(store, mode="r")
        h, w = array.shape[:2]
        rows, cols = (h - window) // stride + 1, (w - window) // stride + 1
        cells = [(i, j) for i in range(rows) for j in range(cols)]
        todo = cells if sample is None or sample >= len(cells) else random.Random(0).sample(cells, sample)
        start = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, len(todo), batch):
                crops = []
                for i, j in todo[b:b + batch]:
                    rgb = np.asarray(array[i * stride:i * stride + window, j * stride:j * stride + window])
                    r, g, bl = (rgb[..., c].astype(np.uint32) for c in range(3))
                    grey = ((r * 19595 + g * 38470 + bl * 7471 + 0x8000) >> 16).astype(np.float32)
                    crops.append((grey / 255.0 - mean) / std)
                x = torch.from_numpy(np.stack(crops))[:, None]
                torch.softmax(model(x), dim=1)
        seconds = time.perf_counter() - start
        store.close()
    total = seconds * len(cells) / len(todo)
    return {"stride": stride, "cells": len(cells), "timed_cells": len(todo), "timed_s": seconds,
            "seconds": total, "extrapolated": len(todo) < len(cells), "megapixels": h * w / 1e6}


# ----------------------------------------------------------------------------------------- the section


def run(quick: bool = False, tmp_parent: str | None = None) -> tuple[list[str], dict]:
    """All measurements; returns the Markdown lines and the raw figures."""
    cfg = QUICK if quick else FULL
    started = time.perf_counter()
    res: dict = {"quick": quick, "cfg": {k: v for k, v in cfg.items()}}
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fcnify-bench-gigapixel-", dir=tmp_parent) as tmp:
        tmp = Path(tmp)

        def cli(args, name, **kw):
            r = run_cli(args, tmp / f"out-{name}", **kw)
            if r["rc"] != 0:
                _log(f"{name} failed: {' '.join(r.get('error', [])[-3:])}")
            else:
                _log(f"{name}: {r['wall_s']:.1f} s, {mb(r['peak_rss'])}, tiles {r.get('tiles_computed')}/"
                     f"{r.get('tiles')}, {r.get('runtime')}")
            shutil.rmtree(tmp / f"out-{name}", ignore_errors=True)
            return r

        # ---- start-up: the CLI on a tiny image
        from PIL import Image

        tiny = tmp / "tiny.png"
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tiny)
        res["startup"] = None if quick else cli([str(tiny)], "tiny")

        # ---- peak RSS against image size
        res["sizes"] = []
        slide_times: dict[int, float] = {}
        kept: dict[int, Path] = {}
        for size in cfg["sizes"]:
            path, write_s = make_slide(tmp, size)
            slide_times[size] = write_s
            _log(f"wrote {size}² slide in {write_s:.0f} s")
            r = cli([str(path)], f"s{size}")
            r.update(size=size, kind="svs", background="white", write_s=write_s)
            res["sizes"].append(r)
            if size == cfg["e2e"]:
                kept[size] = path
            else:
                path.unlink()
        # 48000²: only when projected to fit the section's budget (writing and running scale with pixels).
        huge = cfg["huge"]
        res["huge_skipped"] = None
        if huge:
            last = res["sizes"][-1]
            factor = (huge / last["size"]) ** 2
            projected = factor * (last["write_s"] + last["wall_s"])
            rest = 900.0  # the rest of this section, measured at about 10-15 minutes on this machine
            elapsed = time.perf_counter() - started
            if elapsed + projected + rest <= SECTION_BUDGET_S:
                path, write_s = make_slide(tmp, huge)
                r = cli([str(path)], f"s{huge}", timeout=SECTION_BUDGET_S)
                r.update(size=huge, kind="svs", background="white", write_s=write_s)
                res["sizes"].append(r)
                path.unlink()
            else:
                res["huge_skipped"] = (f"skipped: projected {projected / 60:.0f} min (writing the slide and "
                                       f"running it, {factor:.0f}× the {last['size']}² run's "
                                       f"{(last['write_s'] + last['wall_s']) / 60:.1f} min) on top of "
                                       f"{elapsed / 60:.0f} min spent and ~{rest / 60:.0f} min for the rest of "
                                       f"the section would exceed the section's {SECTION_BUDGET_S // 60} min budget")
                _log(res["huge_skipped"])
        res["black"] = None
        if cfg["black"]:
            path, write_s = make_slide(tmp, cfg["black"], name=f"black_{cfg['black']}", kind="ome",
                                       background="black")
            r = cli([str(path)], "black")
            r.update(size=cfg["black"], kind="ome", background="black", write_s=write_s)
            res["black"] = r
            path.unlink()

        # ---- ResNet-50 on a mostly-background slide
        res["r50"] = None
        size = cfg["r50_size"]
        if size:
            path, write_s = make_slide(tmp, size, name=f"r50_{size}", density=cfg["r50_density"])
            r50_args = [str(path), "--model", "torchvision:resnet50", "--weights", "none"]
            plan50 = _plan_r50(path, size)
            res["r50_plan"] = plan50
            _log(f"ResNet-50 plan: {plan50}")
            if plan50["projected_s"] > R50_BUDGET_S:
                r50_args += ["--mpp", "1.0"]
            r = cli(r50_args, "r50", timeout=SECTION_BUDGET_S)
            r.update(size=size, density=cfg["r50_density"], write_s=write_s, flags=r50_args[1:])
            res["r50"] = r
            path.unlink()

        # ---- end to end vs network only (the same slide's default run above)
        e2e = next(r for r in res["sizes"] if r["size"] == cfg["e2e"])
        slide = kept[cfg["e2e"]]
        runtime = e2e.get("runtime") or "torch"
        res["network"] = network_only(slide, runtime)
        res["network"]["e2e_s"] = e2e["wall_s"]
        res["network"]["ratio"] = res["network"]["seconds"] / e2e["wall_s"]
        _log(f"network only: {res['network']['seconds']:.1f} s vs {e2e['wall_s']:.1f} s")

        # ---- foreground skipping vs every pixel
        res["fg_all"] = cli([str(slide), "--foreground", "all"], "fgall")

        # ---- naive patch loop vs fcnify at equal output
        region = cfg["naive_region"]
        if region == cfg["e2e"]:  # the same slide: its --foreground all run is fcnify's equal-output figure
            path = slide
            res["naive_fcnify"] = res["fg_all"]
        else:
            path, _ = make_slide(tmp, region, name=f"naive_{region}", levels=1)
            res["naive_fcnify"] = cli([str(path), "--foreground", "all"], "naive")
        res["naive_dense"] = naive_loop(path, 4, cfg["naive_sample"])
        res["naive_grid"] = naive_loop(path, 32, None)
        _log(f"naive: dense {res['naive_dense']['seconds']:.1f} s, grid {res['naive_grid']['seconds']:.1f} s")
        path.unlink()
        slide.unlink(missing_ok=True)

        # ---- the 2400×3000 PNG: tiles vs one shot (ResNet-18)
        ph, pw = cfg["png"]
        png = tmp / f"photo_{ph}x{pw}.png"
        china = Image.open(ROOT / "sample_images" / "china.jpg").convert("RGB")
        china.resize((pw, ph), Image.Resampling.BICUBIC).save(png)
        r18 = [str(png), "--model", "torchvision:resnet18", "--weights", "none"]
        res["png_tiled"] = cli([*r18, "--tile", str(cfg["png_tile"])], "png-tiled")
        res["png_one"] = cli([*r18, "--tile", "100000"], "png-one")
    res["seconds"] = time.perf_counter() - started
    lines = markdown(res, cfg)
    return lines, res


def _plan_r50(path: Path, size: int) -> dict:
    """ResNet-50's tiles on this slide as the CLI plans them (default budget), with a projected time from a
    timed 1024² forward pass (PyTorch; the CLI may use onnxruntime, which is faster)."""
    import torch

    from fcnify.cli import _convert, _load
    from fcnify.heatmap import compute, plan
    from fcnify.heatmap.memory import bytes_per_pixel, tile_side
    from fcnify.heatmap.sources import open_source, open_view

    loaded = _load("torchvision:resnet50", "none", None, None, False)
    fcn = _convert(loaded)
    bounds = plan.bounds_of(fcn.geometry)
    window = tuple(int(v) for v in fcn.geometry.window)
    side = tile_side(bytes_per_pixel(fcn, 3, window), None)
    cells = plan.cells_for_tile_size(bounds, (side, side))
    with open_source(str(path)) as source:
        view = open_view(source)
        tiles = plan.plan_tiles(fcn, fcn.geometry, 3, view.size, cells)
        mask = plan.estimate_foreground(view, window, "auto")
    computed = compute.foreground_tiles(tiles, mask, bounds)
    pixels = sum(t.input_shape[0] * t.input_shape[1] for t, c in zip(tiles.tiles(), computed, strict=True) if c)
    probe = min(1024, size)
    with torch.inference_mode():
        x = torch.zeros(1, 3, probe, probe)
        fcn(x)
        start = time.perf_counter()
        fcn(x)
        per_px = (time.perf_counter() - start) / probe ** 2
    return {"tile_side": side, "tiles": tiles.count, "computed": int(sum(computed)), "pixels": pixels,
            "projected_s": pixels * per_px, "mask_fraction": None if mask is None else mask.fraction}


# ------------------------------------------------------------------------------------------------ report


def _wall(r: dict) -> str:
    return "failed" if r.get("rc") else f"{r['wall_s']:.1f} s"


def markdown(res: dict, cfg: dict) -> list[str]:
    L = ["## Gigapixel slides through the CLI (`fcnify heatmap`, whole process)", "",
         "Each figure is one `/usr/bin/time -v .venv/bin/fcnify heatmap …` in a fresh process: *seconds* is its "
         "wall-clock time (start-up, model loading, reading and decoding, the network, previews and the score store "
         "all included), *peak RSS* its maximum resident set. Synthetic JPEG slides from `tests/slides.py` (tissue-"
         "like clusters, seed 1), written to a temporary folder before the run (not timed) and deleted after. "
         "*Mpx/s* is the slide's level-0 megapixels over the whole process's seconds. Random weights for "
         "torchvision models.", ""]
    su = res["startup"] or {}
    if su.get("rc") == 0:
        L += [f"Start-up: `fcnify heatmap tiny.png` (a 64×64 PNG, default model) takes {su['wall_s']:.1f} s and "
              f"peaks at {mb(su['peak_rss'])}: the floor under every figure below.", ""]

    # -- sizes
    L += ["### Peak RSS against image size (default model: `fcnify heatmap slide.svs -o out`)", "",
          "| slide | Mpx | foreground (mask) | tiles computed / background | runtime | seconds | Mpx/s | peak RSS |",
          "|---|---|---|---|---|---|---|---|"]
    rows = [*res["sizes"], *([res["black"]] if res["black"] else [])]
    for r in rows:
        label = f"{r['size']}² {r['kind']}, {r['background']}"
        if r.get("rc"):
            L.append(f"| {label} | {r['size'] ** 2 / 1e6:.0f} | – | – | – | failed: {r['error'][-1][:120]} | – | – |")
            continue
        mpx = r["size"] ** 2 / 1e6
        fg = f"{r['foreground_fraction']:.0%}" if r.get("foreground_fraction") is not None else "–"
        L.append(f"| {label} | {mpx:.0f} | {fg} | {r['tiles_computed']} / {r['tiles_background']} "
                 f"(of {r['tiles']}) | {r['runtime']} | {r['wall_s']:.1f} | {mpx / r['wall_s']:.2f} | "
                 f"{mb(r['peak_rss'])} |")
    L.append("")
    by = {r["size"]: r for r in res["sizes"] if not r.get("rc")}
    goals = res.setdefault("goals", {})
    if len(by) >= 2 and not res["quick"]:
        a, b = by.get(12000), by.get(24000)
        if a and b:
            limit = 1.15 * a["peak_rss"] + 64 * 2**20
            flat = b["peak_rss"] <= limit
            goals["rss_flat"] = flat
            goals["rss_24000_le_2_5GB"] = b["peak_rss"] <= 2.5e9
            L += [f"- Goal, RSS flat: 24000² peak {mb(b['peak_rss'])} ≤ 1.15 × 12000² ({mb(a['peak_rss'])}) + 64 MB "
                  f"= {mb(limit)}: {tick(flat)}", f"- Goal, 24000² peak ≤ 2.5 GB: {tick(b['peak_rss'] <= 2.5e9)}"]
    if res.get("huge_skipped"):
        L.append(f"- 48000²: {res['huge_skipped']}.")
    L.append("")

    # -- ResNet-50
    r = res["r50"]
    if r is None:
        L += ["### ResNet-50 on a large slide", "", "Skipped in --quick mode (as are the start-up and black-slide "
              "runs).", ""]
    else:
        _r50_lines(L, r, res["r50_plan"], goals)
    _rest_lines(L, res, cfg, goals)
    return L


def _r50_lines(L, r, p, goals) -> None:
    flags = " ".join(r["flags"])
    L += [f"### ResNet-50 on a {r['size']}² slide", "",
          f"`fcnify heatmap slide.svs {flags}` on a slide written with density {r['density']} "
          f"(mostly background). As the CLI plans it (default 640 MB tile budget): {p['tile_side']} px tiles, "
          f"{p['computed']} of {p['tiles']} with foreground ({p['pixels'] / 1e6:.0f} Mpx through the network, halos "
          f"included); projected {p['projected_s'] / 60:.1f} min in PyTorch from a timed 1024² pass"
          + (f" — over the {R50_BUDGET_S // 60} min cap, so the run computes at `--mpp 1.0` (level 1 resampled: "
             "half the side)" if "--mpp" in r["flags"] else "") + ".", ""]
    if r.get("rc"):
        L += [f"Failed: `{r['error'][-1][:300]}`", ""]
        goals["r50_rss_le_2_5GB"] = False
    else:
        ok = r["peak_rss"] <= 2.5e9
        goals["r50_rss_le_2_5GB"] = ok
        L += ["| tiles computed / background | runtime | seconds | peak RSS | goal ≤ 2.5 GB |", "|---|---|---|---|---|",
              f"| {r['tiles_computed']} / {r['tiles_background']} (of {r['tiles']}) | {r['runtime']} | "
              f"{r['wall_s']:.1f} | {mb(r['peak_rss'])} | {tick(ok)} |", ""]


def _rest_lines(L, res, cfg, goals) -> None:
    # -- network only
    n = res["network"]
    ok = n["ratio"] >= 0.8
    goals["network_share_ge_0_8"] = ok
    L += [f"### End to end vs network only ({cfg['e2e']}² slide, default model)", "",
          f"The CLI's whole process ({n['e2e_s']:.1f} s, above) against only the network's forward passes on "
          f"exactly the {n['tiles']} tiles it computed ({n['batches']} batches as the pipeline forms them, zero "
          f"tensors of the tiles' shapes, runtime {n['runtime']} as the CLI chose, in a warm process after one "
          f"untimed warm-up): **{n['seconds']:.1f} s of network, ratio {n['ratio']:.2f}** (goal ≥ 0.8: {tick(ok)}). "
          "Nothing subtracted" + (f"; the CLI's start-up alone is {res['startup']['wall_s']:.1f} s." if res['startup']
                                  else "."), ""]

    # -- foreground
    d = next(r for r in res["sizes"] if r["size"] == cfg["e2e"])
    a = res["fg_all"]
    if not d.get("rc") and not a.get("rc"):
        skipped = d["tiles_background"] / max(1, d["tiles"])
        L += [f"### Foreground skipping vs every pixel ({cfg['e2e']}² slide, density 0.3)", "",
              "| run | tiles computed | runtime | seconds | peak RSS |", "|---|---|---|---|---|",
              f"| default (`--foreground auto`) | {d['tiles_computed']} of {d['tiles']} | {d['runtime']} | "
              f"{d['wall_s']:.1f} | {mb(d['peak_rss'])} |",
              f"| `--foreground all` | {a['tiles_computed']} of {a['tiles']} | {a['runtime']} | {a['wall_s']:.1f} | "
              f"{mb(a['peak_rss'])} |", "",
              f"{skipped:.0%} of the tiles skipped as background (mask: {d.get('foreground_fraction', 0):.0%} of the "
              f"thumbnail is foreground); the default run takes {d['wall_s'] / a['wall_s']:.2f}× the time of "
              f"computing every pixel ({a['wall_s'] / d['wall_s']:.2f}× faster).", ""]

    # -- naive
    nd, ng, nf = res["naive_dense"], res["naive_grid"], res["naive_fcnify"]
    region = cfg["naive_region"]
    mpx = nd["megapixels"]
    L += [f"### Against a naive patch loop at equal output ({region}² region, digits model)", "",
          "Naive: one 32×32 window per output cell read with tifffile (`zarr.open_array(TiffFile.aszarr(level=0))"
          "[y:y+32, x:x+32]`), converted to grey and classified by the original (unconverted) digits model in "
          "batches of 256 — as patch-based tools do. *Equal output*: stride 4, the same cells as fcnify's map; "
          "*patch grid*: stride = window = 32 (64× fewer cells, the grid patch-based tools usually compute). fcnify: "
          f"the CLI on a {region}² slide with `--foreground all` (every cell), and at scale the {cfg['e2e']}² "
          "`--foreground all` run above.", "",
          "| method | cells | cells timed | seconds | s / Mpx |", "|---|---|---|---|---|",
          f"| naive loop, stride 4 (equal output) | {nd['cells']} | {nd['timed_cells']}"
          f"{' (extrapolated)' if nd['extrapolated'] else ''} | {nd['seconds']:.1f} | {nd['seconds'] / mpx:.1f} |",
          f"| naive loop, stride 32 (patch grid) | {ng['cells']} | {ng['timed_cells']} | {ng['seconds']:.2f} | "
          f"{ng['seconds'] / mpx:.2f} |"]
    if not nf.get("rc"):
        L.append(f"| fcnify CLI, {region}² slide (whole process) | {nd['cells']} | all | {nf['wall_s']:.1f} | "
                 f"{nf['wall_s'] / mpx:.1f} |")
        L.append(f"| fcnify, same run, the image's own time (`summary.parquet` seconds) | {nd['cells']} | all | "
                 f"{nf['seconds']:.2f} | {nf['seconds'] / mpx:.2f} |")
    if not a.get("rc") and cfg["e2e"] != region:
        big = cfg["e2e"] ** 2 / 1e6
        L.append(f"| fcnify CLI, {cfg['e2e']}² slide, `--foreground all` | {a['map_height'] * a['map_width']} | all | "
                 f"{a['wall_s']:.1f} | {a['wall_s'] / big:.2f} |")
    L.append("")
    if not nf.get("rc"):
        L += [f"At equal output the naive loop takes {nd['seconds'] / nf['seconds']:.0f}× fcnify's image time "
              f"({nd['seconds'] / nf['wall_s']:.0f}× its whole process, start-up included); even the 64× sparser "
              f"patch grid takes {ng['seconds'] / nf['seconds']:.1f}× fcnify's image time for the dense map.", ""]

    # -- PNG
    t, o = res["png_tiled"], res["png_one"]
    ph, pw = cfg["png"]
    L += [f"### The {ph}×{pw} PNG through the CLI (ResNet-18): `--tile {cfg['png_tile']}` vs one shot", "",
          f"`fcnify heatmap photo.png --model torchvision:resnet18 --weights none` (china.jpg resized) with "
          f"`--tile {cfg['png_tile']}` and with `--tile 100000` (one tile).", "",
          "| run | tiles | runtime | seconds | peak RSS |", "|---|---|---|---|---|"]
    for label, r in ((f"`--tile {cfg['png_tile']}`", t), ("one shot (`--tile 100000`)", o)):
        if r.get("rc"):
            L.append(f"| {label} | failed: {r['error'][-1][:150]} | – | – | – |")
        else:
            L.append(f"| {label} | {r['tiles']} | {r['runtime']} | {r['wall_s']:.1f} | {mb(r['peak_rss'])} |")
    if not t.get("rc") and not o.get("rc"):
        ratio = t["peak_rss"] / o["peak_rss"]
        goals["png_rss_ratio_le_0_6"] = ratio <= 0.6
        L += ["", f"Peak RSS tiled / one shot: **{ratio:.0%}** (goal ≤ 60%: {tick(ratio <= 0.6)}); time "
              f"{t['wall_s'] / o['wall_s']:.2f}× one shot."]
    L += ["", f"Section time: {res['seconds'] / 60:.1f} min.", ""]


def section_main(run_section, description: str, argv: list[str] | None = None) -> int:
    """A benchmark section run on its own: ``--quick``, ``--json FILE``; prints its Markdown."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    lines, res = run_section(quick=args.quick)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return section_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
