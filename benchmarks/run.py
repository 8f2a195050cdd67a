"""fcnify benchmarks: one run measures everything and writes a Markdown report (``make bench``).

Sections: dense vs naive sliding window (and vs the bare backbone), gigapixel slides through the whole
``fcnify heatmap`` process (peak RSS and time against slide size, ResNet-50, network share, foreground
skipping, a naive patch loop, tiles vs one shot on a PNG; ``gigapixel.py``), finer output stride by dilation vs
shift-and-stitch, ONNX Runtime vs PyTorch on the CPU, local vs Ray engines, one slide's tiles over Ray workers
and every viewer format (``clusters.py``), skipping a slide's glass (``glass.py``), and CUDA precision/layout (skipped
without CUDA).

    python benchmarks/run.py                 # the full run (about 40 minutes on 2 CPU cores)
    python benchmarks/run.py --quick -o x.md # a tiny version in seconds (used by the tests)

All models have random weights (speed does not depend on them). Ratios come from one run on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fcnify.convert import convert  # noqa: E402

_logger = logging.getLogger("fcnify.benchmarks")

FULL = {
    "models": ["resnet18", "resnet50", "vgg16", "mobilenet_v3_large"],
    "sizes": [448, 640, 1024],
    "repeats": 3,
    "crop_budget_s": 6.0,  # time every crop when that takes less than this, else extrapolate from a sample
    "stride_sizes": [448, 640],
    "onnx_sizes": [448, 1024],
}
QUICK = {
    "models": ["resnet18"],
    "sizes": [256],
    "repeats": 1,
    "crop_budget_s": 1.0,
    "stride_sizes": [256],
    "onnx_sizes": [],
}


# ------------------------------------------------------------------------------------------------ helpers


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Fastest wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs (the minimum is the
    figure least disturbed by other processes on a shared machine)."""
    slow = False
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        slow = time.perf_counter() - start > 3.0
    if slow:  # a run of seconds is long enough to time once
        repeats = 1
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def tv_model(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def backbone(name: str, model: nn.Module) -> nn.Module:
    """The network without its head (global pool and classifier)."""
    if name.startswith("resnet"):
        return nn.Sequential(*list(model.children())[:-2]).eval()
    return model.features.eval()


def crops_of(x: torch.Tensor, window: int, stride: int, how: str) -> torch.Tensor:
    """All window×window crops on the grid of stride ``stride``: by ``unfold`` (one copy) or slicing + stack."""
    if how == "unfold":
        patches = x.unfold(2, window, stride).unfold(3, window, stride)  # 1×C×nh×nw×win×win view
        return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], window, window)
    nh, nw = (x.shape[2] - window) // stride + 1, (x.shape[3] - window) // stride + 1
    return torch.stack([x[0, :, i * stride:i * stride + window, j * stride:j * stride + window]
                        for i in range(nh) for j in range(nw)])


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ------------------------------------------------------------------------------------- dense vs crops


def bench_dense(cfg, report: list[str], results: dict) -> None:
    report += ["## Dense (one pass) vs naive sliding window vs bare backbone", "",
               "Sliding window: the original classifier on every 224×224 crop of the dense map's grid (stride 32, "
               "crops wholly inside the image), in batches of 16. *Pixel bound*: pixels the crops push through "
               "the network / pixels of one pass (the speed-up if cost were proportional to pixels). *Goal*: "
               "speed-up ≥ 0.8 × pixel bound. *Head overhead*: converted net vs the bare backbone (the net without "
               "global pool and classifier) at the same size; goal ≤ 10%.", "",
               "| model | size | dense | crops | crops timed | speed-up | pixel bound | speed-up / bound | "
               "backbone | head overhead |",
               "|---|---|---|---|---|---|---|---|---|---|"]
    rng = random.Random(0)
    for name in cfg["models"]:
        model = tv_model(name)
        fcn = convert(model, 224)
        body = backbone(name, model)
        for size in cfg["sizes"]:
            torch.manual_seed(size)
            x = torch.randn(1, 3, size, size)
            with torch.inference_mode():
                t_dense = timed(lambda f=fcn, x=x: f(x), cfg["repeats"])
                t_body = timed(lambda f=body, x=x: f(x), cfg["repeats"])
                crops = crops_of(x, 224, 32, "unfold")
                n = crops.shape[0]
                t_batch = timed(lambda f=model, c=crops: f(c[:16]), 1)  # 16 crops
                estimate = t_batch * n / 16
                if estimate <= cfg["crop_budget_s"]:
                    start = time.perf_counter()
                    for b in range(0, n, 16):
                        model(crops[b:b + 16])
                    t_crops, how = time.perf_counter() - start, f"all {n}"
                else:
                    sample = rng.sample(range(n), min(n, 48))
                    start = time.perf_counter()
                    for b in range(0, len(sample), 16):
                        model(crops[sample[b:b + 16]])
                    t_crops = (time.perf_counter() - start) * n / len(sample)
                    how = f"{len(sample)} of {n}, extrapolated"
            bound = n * 224 * 224 / (size * size)
            speedup = t_crops / t_dense
            overhead = t_dense / t_body - 1
            results.setdefault("dense", []).append({"model": name, "size": size, "dense_s": t_dense,
                                                     "crops_s": t_crops, "speedup": speedup, "bound": bound,
                                                     "backbone_s": t_body, "overhead": overhead})
            report.append(f"| {name} | {size} | {fmt_s(t_dense)} | {fmt_s(t_crops)} | {how} | {speedup:.1f}× | "
                          f"{bound:.1f}× | {speedup / bound:.2f} {'✓' if speedup >= 0.8 * bound else '✗'} | "
                          f"{fmt_s(t_body)} | {overhead:+.0%} {'✓' if overhead <= 0.10 else '✗'} |")
    # Building the crop batch: unfold (one strided copy) vs slicing each crop and stacking.
    x = torch.randn(1, 3, cfg["sizes"][-1], cfg["sizes"][-1])
    t_unfold = timed(lambda: crops_of(x, 224, 32, "unfold"), cfg["repeats"])
    t_stack = timed(lambda: crops_of(x, 224, 32, "stack"), cfg["repeats"])
    results["crop_building"] = {"unfold_s": t_unfold, "stack_s": t_stack}
    report += ["", f"Building the crop batch at {cfg['sizes'][-1]} px: `unfold` {fmt_s(t_unfold)}, slicing + "
               f"`stack` {fmt_s(t_stack)} ({'unfold' if t_unfold < t_stack else 'stack'} is used: it is faster); "
               "either is negligible next to running the crops.", ""]


# ------------------------------------------------------------------------------------------- gigapixel


def bench_gigapixel(report: list[str], results: dict, quick: bool) -> None:
    """Slides of 6000²–24000² (and a PNG) through the whole ``fcnify heatmap`` process: ``gigapixel.py``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gigapixel

    lines, figures = gigapixel.run(quick=quick)
    report += lines
    results["gigapixel"] = figures


# ---------------------------------------------------------------------------------------- output stride


def bench_stride(cfg, report: list[str], results: dict) -> None:
    from fcnify.convert.dilate import dilate, shift_and_stitch

    report += ["## Finer output stride: dilation vs shift-and-stitch (ResNet-18 and ResNet-50)", "",
               "Dilation: one pass of the rewritten network (`--output-stride`). Shift-and-stitch: (32/S)² passes "
               "of the original network on shifted images, interleaved. *Agree on grid*: the dilated map sampled "
               "every 32/S cells vs the native map.", "",
               "| model | size | S | native | dilation | shift-and-stitch | faster | agree on grid |",
               "|---|---|---|---|---|---|---|---|"]
    plan = [("resnet18", cfg["stride_sizes"]), ("resnet50", cfg["stride_sizes"][:1])]
    for name, sizes in (plan if len(cfg["models"]) > 1 else plan[:1]):
        fcn = convert(tv_model(name), 224)
        for S in (16, 8):
            fine = dilate(fcn, S)
            k = 32 // S
            for size in sizes:
                x = torch.randn(1, 3, size, size)
                with torch.inference_mode():
                    t_native = timed(lambda f=fcn, x=x: f(x), cfg["repeats"])
                    t_dil = timed(lambda f=fine, x=x: f(x), cfg["repeats"])
                    t_sas = timed(lambda f=fcn, x=x, s=S: shift_and_stitch(f, x, 32, s), max(1, cfg["repeats"] - 1))
                    native, dense = fcn(x), fine(x)
                h, w = native.shape[-2:]
                err = float((dense[:, :, ::k, ::k][:, :, :h, :w] - native).abs().max() / native.abs().max())
                faster = "dilation" if t_dil < t_sas else "shift-and-stitch"
                results.setdefault("stride", []).append({"model": name, "size": size, "S": S, "native_s": t_native,
                                                          "dilation_s": t_dil, "sas_s": t_sas, "grid_rel_err": err})
                report.append(f"| {name} | {size} | {S} | {fmt_s(t_native)} | {fmt_s(t_dil)} | {fmt_s(t_sas)} | "
                              f"{faster} ({max(t_dil, t_sas) / min(t_dil, t_sas):.1f}×) | {err:.1e} |")
    report.append("")


# ------------------------------------------------------------------------------------------------- ONNX


def bench_onnx(cfg, report: list[str], results: dict, threads: int) -> None:
    report += ["## ONNX Runtime vs PyTorch (CPU, ResNet-18)", ""]
    if not cfg["onnx_sizes"]:
        report += ["Skipped in --quick mode.", ""]
        return
    try:
        from fcnify.export import ModelMetadata
        from fcnify.onnx_export import export_onnx
        from fcnify.onnx_runtime import OnnxNet
    except Exception as exc:  # pragma: no cover - optional dependency
        report += [f"Skipped: {type(exc).__name__}: {exc}", ""]
        return
    fcn = convert(tv_model("resnet18"), 224)
    meta = ModelMetadata((224, 224), 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                         tuple(str(i) for i in range(1000)), fcn.geometry, "torchvision:resnet18")
    report += ["| size | PyTorch | ONNX Runtime | ORT / PyTorch |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r18.onnx"
        try:
            with contextlib.redirect_stdout(sys.stderr):
                export_onnx(fcn, meta, path)
            net = OnnxNet(path, device="cpu")
            session = getattr(net, "session", None)
            if session is not None:
                _logger.info("onnxruntime providers %s", session.get_providers())
        except Exception as exc:
            report += [f"Skipped: export failed: {type(exc).__name__}: {str(exc)[:200]}", ""]
            return
        for size in cfg["onnx_sizes"]:
            x = torch.randn(1, 3, size, size)
            with torch.inference_mode():
                t_pt = timed(lambda x=x: fcn(x), cfg["repeats"])
                t_ort = timed(lambda x=x: net(x), cfg["repeats"])
            results.setdefault("onnx", []).append({"size": size, "pytorch_s": t_pt, "ort_s": t_ort})
            report.append(f"| {size} | {fmt_s(t_pt)} | {fmt_s(t_ort)} | {t_ort / t_pt:.2f} |")
    report.append("")


# ------------------------------------------------------------------------------------------------- CUDA

# Dense peak throughput (FLOP/s) by device name fragment; used for the fraction of peak.
_PEAK_FLOPS = {"H100": {"fp32": 67e12, "fp16": 989e12, "bf16": 989e12},
               "A100": {"fp32": 19.5e12, "fp16": 312e12, "bf16": 312e12},
               "H200": {"fp32": 67e12, "fp16": 989e12, "bf16": 989e12}}


def bench_cuda(cfg, report: list[str], results: dict, quick: bool) -> None:
    report += ["## CUDA: precision and memory layout (ResNet-50)", ""]
    if not torch.cuda.is_available():
        report += ["Skipped: no CUDA device on this machine.", ""]
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in _PEAK_FLOPS.items() if k in name), None)
    fcn = convert(tv_model("resnet50"), 224).to(device)
    flops_224 = 2 * 4.1e9  # ResNet-50: 4.1 GMAC at 224² (backbone dominates; scales with pixels)
    report += [f"Device: {name}. FLOPs estimated as 8.2 GFLOP × (pixels / 224²).", "",
               "| size | precision | layout | images/s | fraction of peak |", "|---|---|---|---|---|"]
    for size in ([256] if quick else [1024, 2048]):
        x = torch.randn(1, 3, size, size, device=device)
        for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            for layout in ("contiguous", "channels_last"):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                net = fcn.to(memory_format=fmt)
                xi = x.contiguous(memory_format=fmt)

                def step(net=net, xi=xi, dtype=dtype):
                    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                        net(xi)
                    torch.cuda.synchronize()

                seconds = timed(step, cfg["repeats"] + 2, warmup=2)
                flops = flops_224 * size * size / 224 ** 2
                frac = f"{flops / seconds / peak[precision]:.0%}" if peak else "-"
                results.setdefault("cuda", []).append({"size": size, "precision": precision, "layout": layout,
                                                        "images_per_s": 1 / seconds})
                report.append(f"| {size} | {precision} | {layout} | {1 / seconds:.1f} | {frac} |")
    report.append("")


# ------------------------------------------------------------------------------------------------ main


def bench_engines(report: list[str], results: dict, quick: bool) -> None:
    """Images per second: the local engine vs Ray Data with 1 and 2 actors (issue: batch and distributed runs)."""
    if quick:  # starting Ray costs more than the rest of --quick; tests/test_ray.py covers the engine itself
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import engines

    rows = engines.run(quick=False)
    results["engines"] = rows
    report += ["## Engines: local loop vs Ray Data", "",
               "The same `fcnify heatmap` job (digits model) over a folder of large scenes, one run each; Ray's "
               "time includes starting its actors and loading the model in each.", "", engines.markdown(rows), ""]


def bench_clusters(report: list[str], results: dict, quick: bool) -> None:
    """One slide's tiles over 1 and 2 Ray workers, many small slides, every viewer format: ``clusters.py``."""
    if quick:  # starting Ray costs more than the rest of --quick; tests/test_ray_tiles.py covers the engine
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import clusters

    lines, figures = clusters.run(quick=False)
    results["clusters"] = figures
    report += ["## Slides over Ray, and every viewer format", "", *lines]


def bench_geo(report: list[str], results: dict, quick: bool) -> None:
    """A 20000² 4-band uint16 GeoTIFF through the whole CLI: ``geo.py``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import geo

    lines, figures = geo.run(quick=quick)
    results["geo"] = figures
    report += ["## Satellite scenes", "", *lines]


def bench_glass(report: list[str], results: dict, quick: bool) -> None:
    """A slide with ~40 % glass, ``--foreground auto`` against ``all``, through the whole CLI: ``glass.py``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import glass

    lines, figures = glass.run(quick=quick)
    results["glass"] = figures
    report += ["## Skipping glass: `--foreground auto` vs `all`", "", *lines]


def machine(threads: int) -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [f"- machine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
            f"- torch {torch.__version__}, {threads} threads (`torch.set_num_threads`), Python "
            f"{platform.python_version()}",
            f"- CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
            f"- load average at the start: {os.getloadavg()[0]:.1f} (other processes share the CPUs; times are "
            "the fastest of the repeats)",
            f"- date: {time.strftime('%Y-%m-%d %H:%M')}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: seconds")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the raw figures as JSON")
    parser.add_argument("--only", default="dense,gigapixel,stride,onnx,engines,clusters,geo,glass,cuda",
                        help="comma-separated sections")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    sections = set(args.only.split(","))
    start = time.perf_counter()
    report = ["# fcnify benchmarks", "", "Written by `benchmarks/run.py`" + (" --quick" if args.quick else "") +
              " (`make bench`); all figures from one run. Random weights.", "", *machine(args.threads), ""]
    results: dict = {}
    steps = [("dense", lambda: bench_dense(cfg, report, results)),
             ("gigapixel", lambda: bench_gigapixel(report, results, args.quick)),
             ("stride", lambda: bench_stride(cfg, report, results)),
             ("onnx", lambda: bench_onnx(cfg, report, results, args.threads)),
             ("engines", lambda: bench_engines(report, results, args.quick)),
             ("clusters", lambda: bench_clusters(report, results, args.quick)),
             ("geo", lambda: bench_geo(report, results, args.quick)),
             ("glass", lambda: bench_glass(report, results, args.quick)),
             ("cuda", lambda: bench_cuda(cfg, report, results, args.quick))]
    for name, step in steps:
        if name in sections:
            t = time.perf_counter()
            step()
            print(f"[bench] {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    report.append(f"Total benchmark time: {time.perf_counter() - start:.0f} s; load average at the end: "
                  f"{os.getloadavg()[0]:.1f}.")
    notes = ROOT / "benchmarks" / "notes.md"
    if notes.exists() and not args.quick:
        report += ["", notes.read_text().strip()]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(report) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
