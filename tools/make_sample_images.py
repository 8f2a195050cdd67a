"""Write the sample images in ``sample_images/`` (deterministic).

* ``digits_scene_1.png`` .. ``digits_scene_4.png``: synthetic scenes of handwritten digits rendered from the
  HELD-OUT digits of scikit-learn's ``load_digits()`` (images 1400..1796 only), white on black, RGB PNG.
* ``china.jpg``: a photo bundled with scikit-learn (CC BY 2.0, see ``sample_images/README.md``), copied as is.

Usage: ``python tools/make_sample_images.py [--out sample_images]``
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from fcnify.zoo.scenes import load_split, random_scene, save_png

ROOT = Path(__file__).resolve().parent.parent

# (file name, (height, width), number of digits to try to place, seed)
SCENES = [
    ("digits_scene_1.png", (160, 224), (6, 8), 101),
    ("digits_scene_2.png", (256, 320), (14, 18), 102),
    ("digits_scene_3.png", (200, 480), (14, 18), 103),
    ("digits_scene_4.png", (320, 320), (18, 24), 104),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "sample_images")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = load_split("heldout")
    for name, size, n_glyphs, seed in SCENES:
        rng = np.random.default_rng(seed)
        scene, boxes = random_scene(images, labels, rng, size=size, n_glyphs=n_glyphs)
        save_png(args.out / name, scene)
        digits = " ".join(str(b.label) for b in sorted(boxes, key=lambda b: (b.top // 32, b.left)))
        print(f"{name}: {size[0]}x{size[1]}, {len(boxes)} digits: {digits}")

    import sklearn.datasets

    src = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
    shutil.copyfile(src, args.out / "china.jpg")
    print(f"china.jpg: copied from {src}")


if __name__ == "__main__":
    main()
