"""What an earlier run left: the row of an image whose outputs are complete (``--resume`` skips it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from fcnify.heatmap import sinks
from fcnify.heatmap.summary import ClassPeak, SummaryRow

__all__ = ["completed_row"]

_logger = logging.getLogger(__name__)


def completed_row(path, outdir: Path, targets: dict[str, Path], model, fmt: str,
               top_k: int) -> SummaryRow | None:
    """The row of an image whose outputs are all in place and belong to this model, else None (redo it)."""
    if not all(t.exists() for t in targets.values()):
        return None
    scores = targets["scores"]
    try:
        if fmt == "zarr":
            attrs = sinks.read_store_attrs(scores)
            if attrs is None:
                return None
            labels, peaks, row = tuple(attrs["labels"]), attrs.get("peaks", []), attrs.get("row")
            image_size, map_size = tuple(attrs["image_size"]), tuple(attrs["map_size"])
        else:
            with np.load(scores, allow_pickle=False) as data:
                labels = tuple(str(v) for v in data["labels"])
                image_size = tuple(int(v) for v in data["image_size"])
                map_size = tuple(int(v) for v in data["scores"].shape[1:])
                summary = json.loads(str(data["summary"])) if "summary" in data.files else {}
                peaks, row = summary.get("peaks", []), summary.get("row")
    except Exception as exc:  # a damaged or foreign file: redo the image
        _logger.info("%s: redoing, %s does not load (%s)", path, scores, exc)
        return None
    if labels != tuple(model.labels):
        _logger.info("%s: redoing, %s is from another model", path, scores)
        return None
    if not isinstance(row, dict) or not isinstance(row.get("outputs"), list):
        _logger.info("%s: redoing, %s has no record of its outputs", path, scores)
        return None
    outputs = tuple(str(outdir / name) for name in row["outputs"])
    if not all(Path(o).exists() for o in outputs):
        return None
    top = tuple(ClassPeak(**p) for p in (peaks or [])[:top_k])
    facts = {key: row.get(key) for key in ("padded", "level", "downsample", "mpp", "preprocessing", "output",
                                           "foreground", "masked_fraction", "pixels_saved")}
    facts["cells_masked"] = int(row.get("cells_masked") or 0)
    facts["preprocessing"] = facts["preprocessing"] or {}
    facts["output_names"] = tuple(row.get("output_names") or ())
    return SummaryRow(path=str(path), status="ok", image_size=image_size, map_size=map_size, top=top,
                      outputs=outputs, skipped=True, scores_format=fmt, **facts)
