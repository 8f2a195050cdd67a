"""The heatmap pipeline, one way for every image (a small PNG is a slide with one tile)::

    source ──▶ plan ──▶ compute ──▶ sinks
    sources.py  plan.py    compute.py   sinks.py          pipeline.py: one image end to end, resume
                                                          runners.py:  a job over many inputs: local.py (this
                                                          process) | ray_engine.py (Ray Data); summary.py

Memory follows the tile, not the image: no module here holds a whole gigapixel image or its whole map.
"""
