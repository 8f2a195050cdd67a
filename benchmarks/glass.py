"""Skipping glass: ``fcnify heatmap`` on a slide with ~40 % glass, ``--foreground auto`` against ``all``.

A synthetic SVS (``tests/slides.py``: H&E-like tissue on white glass, JPEG tiles, ``density`` 0.6 so that about
40 % of the slide is glass) goes through the whole CLI twice, one ``/usr/bin/time -v`` process each
(``gigapixel.run_cli``): the default mask (``auto`` on a slide) and ``--foreground all``. The ratio of their wall
times and peak RSS comes from this one run; the masked cells and the share of input pixels not pushed through the
network are the ``summary.parquet`` columns of the ``auto`` run. ``FCNIFY_GLASS_SIZE`` sets the slide's side
(default 6000; ``--quick`` 1024), ``FCNIFY_BIN`` another ``fcnify`` executable than ``.venv/bin/fcnify``.

    python benchmarks/glass.py [--quick]      # prints the Markdown section
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gigapixel  # noqa: E402

SIZE, QUICK_SIZE = 6000, 1024
DENSITY = 0.6  # the tissue's share of the plane: ~40 % glass


def run(quick: bool = False) -> tuple[list[str], dict]:
    """Write the slide, run the CLI with the default mask and with ``--foreground all``; Markdown and figures."""
    gigapixel.FCNIFY = Path(os.environ.get("FCNIFY_BIN", gigapixel.FCNIFY))
    size = int(os.environ.get("FCNIFY_GLASS_SIZE", QUICK_SIZE if quick else SIZE))
    res: dict = {"size": size, "density": DENSITY}
    with tempfile.TemporaryDirectory(prefix="fcnify-glass-bench-") as tmp:
        folder = Path(tmp)
        slide, res["write_s"] = gigapixel.make_slide(folder, size, name=f"glass_{size}", density=DENSITY)
        for name, flags in (("auto", []), ("all", ["--foreground", "all"])):
            res[name] = gigapixel.run_cli([str(slide), *flags], folder / f"out-{name}")
            gigapixel._log(f"glass {name}: {res[name]['wall_s']:.1f} s, {gigapixel.mb(res[name]['peak_rss'])}")
    return markdown(res), res


def markdown(res: dict) -> list[str]:
    auto, every = res["auto"], res["all"]
    size = res["size"]
    lines = [f"A {size}² synthetic SVS (H&E-like tissue, density {res['density']}: about "
             f"{1 - res['density']:.0%} white glass; JPEG tiles, written before the runs, not timed), default "
             "digits model, two `/usr/bin/time -v fcnify heatmap` processes in one run: the default mask "
             "(`--foreground default` = `auto` on a slide) and `--foreground all`.", "",
             "| run | tiles computed / background | masked cells | input pixels saved | runtime | seconds | peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for label, r in (("`--foreground auto` (default)", auto), ("`--foreground all`", every)):
        if r["rc"]:
            lines.append(f"| {label} | failed: {r['error'][-1][:120]} | | | | | |")
            continue
        masked = f"{r['cells_masked']} ({r['masked_fraction']:.0%})" if r.get("masked_fraction") is not None \
            else "–"
        saved = f"{r['pixels_saved']:.0%}" if r.get("pixels_saved") is not None else "–"
        lines.append(f"| {label} | {r['tiles_computed']} / {r['tiles_background']} (of {r['tiles']}) | {masked} | "
                     f"{saved} | {r['runtime']} | {r['wall_s']:.1f} | {gigapixel.mb(r['peak_rss'])} |")
    lines.append("")
    if not auto["rc"] and not every["rc"]:
        res["time_ratio"] = auto["wall_s"] / every["wall_s"]
        res["rss_ratio"] = auto["peak_rss"] / every["peak_rss"] if auto["peak_rss"] and every["peak_rss"] else None
        fg = auto.get("foreground_fraction")
        lines += [f"The mask ({'–' if fg is None else f'{fg:.0%}'} of the thumbnail foreground) left "
                  f"{auto['masked_fraction']:.0%} of the map's cells NaN and kept {auto['pixels_saved']:.0%} of the "
                  f"input pixels out of the network: **`auto` takes {res['time_ratio']:.2f}× the time of `all`**"
                  + (f", at {res['rss_ratio']:.2f}× its peak RSS" if res["rss_ratio"] else "") + ".", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    return gigapixel.section_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
