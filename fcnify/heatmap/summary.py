"""``summary.parquet``: one row per input, the same from every engine, and the result of a job.

The local engine writes one file; Ray Data's writer a folder of Parquet files; ``pyarrow.parquet.read_table``
reads either as one table. Rows come in completion order: sort by ``index`` for input order.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fcnify.atomic import temp_beside
from fcnify.errors import OutputError

__all__ = [
    "ClassPeak", "JobResult", "SummaryRow", "SUMMARY_NAME", "clear_summary", "read_summary", "rows_to_table",
    "summary_schema", "table_to_rows", "write_summary"
]

SUMMARY_NAME = "summary.parquet"


@dataclass(frozen=True)
class ClassPeak:
    """A class's best cell in one image: peak probability and its window centre (y, x) in level-0 pixels."""

    index: int
    label: str
    score: float
    y: float
    x: float


@dataclass
class SummaryRow:
    """One input's outcome (a row of ``summary.parquet``).

    Attributes:
        path: the input path as given.
        status: ``"ok"`` or ``"error"``.
        error: the error message (with its hint) when ``status`` is ``"error"``.
        image_size: the image's level-0 (height, width), when it was read.
        map_size: the score map's (rows, cols).
        padded: the image was smaller than the window and was padded.
        top: the top-k classes by peak probability.
        outputs: the files written.
        skipped: a resumed job found the outputs complete and did not redo them.
        level, downsample, mpp: the resolution computed at (level-0 pixels per pixel; µm per pixel).
        tiles, tiles_computed, tiles_background, tiles_resumed: the tile counts.
        background_fraction: the share of tiles skipped as background.
        foreground: the mask mode applied (``auto`` or ``all``, after ``default`` was resolved).
        cells_masked, masked_fraction: map cells left NaN as background, and their share of the map.
        pixels_saved: the share of input pixels (halos included) not pushed through the network because of the
            mask, against computing every cell.
        seconds: time spent on the image; megapixels: its pixels at the resolution computed at.
        runtime: torch or onnxruntime; scores_format: npz or zarr.
        preprocessing: the mean and std the images were normalised with.
        output, output_names: the model output the map is (``--output``) and all the model's outputs.
    """

    path: str
    status: str
    error: str | None = None
    image_size: tuple[int, int] | None = None
    map_size: tuple[int, int] | None = None
    padded: bool = False
    top: tuple[ClassPeak, ...] = ()
    outputs: tuple[str, ...] = field(default_factory=tuple)
    skipped: bool = False
    level: int | None = None
    downsample: float | None = None
    mpp: float | None = None
    tiles: int = 0
    tiles_computed: int = 0
    tiles_background: int = 0
    tiles_resumed: int = 0
    background_fraction: float | None = None
    foreground: str | None = None
    cells_masked: int = 0
    masked_fraction: float | None = None
    pixels_saved: float | None = None
    seconds: float = 0.0
    megapixels: float = 0.0
    runtime: str | None = None
    scores_format: str | None = None
    preprocessing: dict = field(default_factory=dict)
    output: str | None = None
    output_names: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["top"] = [asdict(peak) for peak in self.top]
        data["outputs"] = list(self.outputs)
        return data


@dataclass
class JobResult:
    """A finished job.

    Attributes:
        rows: one per input, in input order (``outputs`` as paths under the outdir given).
        engine: ``local`` or ``ray``.
        seconds: time spent on the images (not loading the model or starting Ray).
        processed: inputs run (not skipped); ``images_per_second`` counts these.
        summary: the ``summary.parquet`` written (None when pyarrow is missing).
        cluster: for Ray, ``{"address": GCS address, "nodes": [node ids], "node_ips": […]}``.
    """

    rows: list[SummaryRow]
    engine: str
    seconds: float
    processed: int
    summary: Path | None = None
    cluster: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[SummaryRow]:
        return [row for row in self.rows if row.status != "ok"]

    @property
    def skipped(self) -> int:
        return sum(1 for row in self.rows if row.skipped)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")

    def totals(self) -> dict:
        """The job in figures (the report's JSON keys): images ok, failed, skipped and run, time and throughput,
        megapixels computed and the share of tiles skipped as background (None without tiles)."""
        ran = [row for row in self.rows if not row.skipped]
        megapixels = sum(row.megapixels for row in ran if row.status == "ok")
        tiles = sum(row.tiles for row in ran)
        background = sum(row.tiles_background for row in ran)
        return {"ok": len(self.rows) - len(self.failed), "errors": len(self.failed), "skipped": self.skipped,
                "processed": self.processed, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 3), "engine": self.engine,
                "megapixels": round(megapixels, 3),
                "megapixels_per_second": round(megapixels / self.seconds, 3) if self.seconds > 0 else None,
                "background_fraction": round(background / tiles, 4) if tiles else None,
                "summary": str(self.summary) if self.summary else None}


def summary_schema():
    """The Arrow schema of ``summary.parquet`` (both engines): one row per input.

    ``top`` is the top-k classes by peak probability, best first: class index, label, peak probability and
    the peak cell's window centre (y, x) in level-0 pixels (of its part inside the image). ``outputs`` are
    relative to OUTDIR. The tile columns count the image's tiles: computed now, skipped as background, and done
    by an earlier run. ``foreground`` is the mask mode applied (auto or all), ``cells_masked`` and
    ``masked_fraction`` the map cells left NaN as background, ``pixels_saved`` the share of input pixels the
    mask kept out of the network (whole tiles and blocks of tiles skipped).
    """
    import pyarrow as pa  # lazy: heavy, only the summary needs it

    peak = pa.struct([("class_index", pa.int32()), ("label", pa.string()), ("score", pa.float64()),
                      ("y", pa.float64()), ("x", pa.float64())])
    return pa.schema([
        ("index", pa.int64()), ("path", pa.string()), ("stem", pa.string()), ("status", pa.string()),
        ("skipped", pa.bool_()), ("error", pa.string()),
        ("image_height", pa.int64()), ("image_width", pa.int64()),
        ("map_height", pa.int64()), ("map_width", pa.int64()), ("padded", pa.bool_()),
        ("top", pa.list_(peak)), ("outputs", pa.list_(pa.string())),
        ("level", pa.int64()), ("downsample", pa.float64()), ("mpp", pa.float64()),
        ("tiles", pa.int64()), ("tiles_computed", pa.int64()), ("tiles_background", pa.int64()),
        ("tiles_resumed", pa.int64()), ("background_fraction", pa.float64()), ("foreground", pa.string()),
        ("cells_masked", pa.int64()), ("masked_fraction", pa.float64()), ("pixels_saved", pa.float64()),
        ("seconds", pa.float64()),
        ("megapixels", pa.float64()), ("runtime", pa.string()), ("scores_format", pa.string()),
        ("mean", pa.list_(pa.float64())), ("std", pa.list_(pa.float64())),
        ("preprocessing_source", pa.string()), ("output", pa.string()), ("output_names", pa.list_(pa.string())),
    ])


def _relative(path: str, outdir: Path) -> str:
    try:
        return Path(path).relative_to(outdir).as_posix()
    except ValueError:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(outdir)).as_posix()


_COUNTS = ("level", "downsample", "mpp", "tiles", "tiles_computed", "tiles_background", "tiles_resumed",
           "background_fraction", "foreground", "cells_masked", "masked_fraction", "pixels_saved", "seconds",
           "megapixels", "runtime", "scores_format")


def rows_to_table(rows: Sequence[SummaryRow], indices: Sequence[int], stems: Sequence[str], outdir):
    """Summary rows as a ``pyarrow.Table`` of ``summary_schema``."""
    import pyarrow as pa  # lazy: heavy, only the summary needs it

    outdir = Path(outdir)
    columns: dict[str, list] = {name: [] for name in summary_schema().names}
    for row, index, stem in zip(rows, indices, stems, strict=True):
        image = row.image_size or (None, None)
        cells = row.map_size or (None, None)
        values = {
            "index": int(index), "path": row.path, "stem": stem, "status": row.status, "skipped": bool(row.skipped),
            "error": row.error, "image_height": image[0], "image_width": image[1], "map_height": cells[0],
            "map_width": cells[1], "padded": bool(row.padded),
            "top": [{"class_index": p.index, "label": p.label, "score": float(p.score), "y": float(p.y),
                     "x": float(p.x)} for p in row.top],
            "outputs": [_relative(p, outdir) for p in row.outputs],
            **{name: getattr(row, name) for name in _COUNTS},
            "mean": list(row.preprocessing.get("mean") or []) or None,
            "std": list(row.preprocessing.get("std") or []) or None,
            "preprocessing_source": row.preprocessing.get("source"),
            "output": row.output, "output_names": list(row.output_names) or None,
        }
        for name, value in values.items():
            columns[name].append(value)
    return pa.table(columns, schema=summary_schema())


def table_to_rows(table, outdir) -> tuple[list[int], list[SummaryRow]]:
    """(indices, rows) of a summary table, sorted by index; ``outputs`` joined onto ``outdir``."""
    records = sorted(table.to_pylist(), key=lambda r: r["index"])
    rows = []
    for r in records:
        size = (r["image_height"], r["image_width"]) if r["image_height"] is not None else None
        cells = (r["map_height"], r["map_width"]) if r["map_height"] is not None else None
        top = tuple(ClassPeak(p["class_index"], p["label"], p["score"], p["y"], p["x"]) for p in r["top"] or [])
        counts = {name: r[name] for name in _COUNTS if r.get(name) is not None}
        rows.append(SummaryRow(path=r["path"], status=r["status"], error=r["error"], image_size=size,
                               map_size=cells, padded=bool(r["padded"]), top=top,
                               outputs=tuple(str(Path(outdir) / p) for p in r["outputs"] or []),
                               skipped=bool(r["skipped"]), **counts, output=r.get("output"),
                               output_names=tuple(r.get("output_names") or ()),
                               preprocessing={"mean": r["mean"], "std": r["std"], "source": r["preprocessing_source"]}))
    return [r["index"] for r in records], rows


def clear_summary(target: Path) -> None:
    """Remove an earlier summary: a file, or a folder of Parquet files (Ray's writer); nothing else."""
    if target.is_dir():
        foreign = [p.name for p in target.iterdir() if not (p.name.endswith(".parquet") or p.name.startswith("."))]
        if foreign:
            raise OutputError(f"{target} is a folder holding other files ({', '.join(foreign[:3])})",
                              hint="move it away: fcnify writes the job's summary there")
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


def write_summary(table, outdir) -> Path:
    """Write ``OUTDIR/summary.parquet`` as one file, atomically (replacing an earlier file or folder)."""
    import pyarrow.parquet as pq  # lazy: heavy, only the summary needs it

    target = Path(outdir) / SUMMARY_NAME
    tmp = temp_beside(target)
    try:
        pq.write_table(table, tmp)
        clear_summary(target)
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}", hint="check the output folder") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def read_summary(outdir):
    """``OUTDIR/summary.parquet`` (a file or Ray's folder of files) as one table, sorted by ``index``."""
    import pyarrow.parquet as pq  # lazy: heavy, only the summary needs it

    table = pq.read_table(Path(outdir) / SUMMARY_NAME, schema=summary_schema())
    return table.sort_by("index")
