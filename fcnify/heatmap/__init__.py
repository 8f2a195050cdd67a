"""The heatmap pipeline, one way for every image (a small PNG is a slide with one tile)::

    source ──▶ plan ──▶ compute ──▶ sinks
    sources.py  plan.py    compute.py   sinks.py          pipeline.py: one image end to end, resume
                                                          runners.py:  the local loop and Ray over images

Memory follows the tile, not the image: no module here holds a whole gigapixel image or its whole map.
"""
