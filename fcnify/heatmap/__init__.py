"""The heatmap pipeline, one way for every image (a small PNG is a slide with one tile)::

    options.py ──▶ job.py ──▶ runners.py ──▶ local.py | ray_engine.py ──▶ pipeline.py (one image)
    source ──▶ plan ──▶ compute ──▶ sinks ──▶ finish        outputs.py: names; resume.py; summary.py: rows
    sources.py  plan.py  compute.py  sinks.py  finish.py     mapgeometry.py: cell ↔ window

Memory follows the tile, not the image: no module here holds a whole gigapixel image or its whole map.
"""

__all__: list[str] = []
