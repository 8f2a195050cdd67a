"""Train the embedded ``digits`` model and write ``fcnify/zoo/digits.safetensors`` + ``digits.json``.

``python -m fcnify.zoo.train_digits`` (deterministic: fixed seeds, deterministic torch algorithms, 2 CPU
threads; about two minutes on 2 CPU cores).

Training data: ONLY ``load_digits()`` images 0..1399. Scenes are rendered on the fly exactly as the evaluation
renders them (:mod:`fcnify.zoo.scenes`), then 32x32 windows are cropped from them:

* digit windows: a glyph box sits at window offset (4, 4) +- ``JITTER`` (3) px in y and x -> its digit;
* near-miss windows: a glyph box sits more than ``JITTER`` px (4..12) away from the centred position
  -> ``background``;
* random windows anywhere in the scene (empty, parts of glyphs, neighbours entering the window)
  -> ``background`` unless some glyph happens to be centred (then that digit).

Every window gets Gaussian pixel noise with a random sigma in 0..12 grey levels.

The held-out digits (1400..1796) are used only at the very end, to print the accuracy on held-out windows;
they play no part in training or in choosing hyperparameters. ``--dev`` trains on 0..1199 and reports
dense-scene figures on 1200..1399 instead (for tuning), writing nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from fcnify.zoo import DIGITS_LABELS, DIGITS_META, ZOO_DIR, DigitsNet
from fcnify.zoo.evaluate_digits import dense_model, evaluate_scenes, make_scenes
from fcnify.zoo.scenes import GLYPH_SIZE, MIN_GAP, load_split, place_boxes, render_glyph

__all__ = [
    "BACKGROUND", "CENTRE_OFFSET", "JITTER", "PAD", "WINDOW", "main", "normalise", "save", "train",
    "window_accuracy", "WindowSampler"
]

WINDOW = DIGITS_META["input_size"][0]
CENTRE_OFFSET = (WINDOW - GLYPH_SIZE) // 2  # glyph box top-left inside a window when centred (4)
JITTER = 3
PAD = 16  # zero border around training scenes, so windows may hang over the scene edge
BACKGROUND = DIGITS_LABELS.index("background")


class WindowSampler:
    """Draws labelled 32x32 training windows from synthetic scenes of a fixed digit pool."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        self.glyphs = np.stack([render_glyph(im) for im in images]).astype(np.float32)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.rng = rng

    def _scene(self) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        rng = self.rng
        h = int(rng.integers(64, 129))
        w = int(rng.integers(64, 161))
        n = int(rng.integers(1, 12))
        pos = place_boxes(
            n,
            (h, w),
            rng,
            gap=MIN_GAP + int(rng.integers(0, 3)) * int(rng.random() < 0.3),
            margin=0,
            max_tries=30,
        )
        canvas = np.zeros((h + 2 * PAD, w + 2 * PAD), dtype=np.float32)
        idx = rng.integers(0, len(self.glyphs), size=len(pos))
        boxes = []
        for (top, left), k in zip(pos, idx, strict=False):
            t, lft = top + PAD, left + PAD
            canvas[t : t + GLYPH_SIZE, lft : lft + GLYPH_SIZE] = self.glyphs[k]
            boxes.append((t, lft, int(self.labels[k])))
        return canvas, boxes

    @staticmethod
    def _label(wy: int, wx: int, boxes: list[tuple[int, int, int]]) -> int:
        for t, lft, lab in boxes:
            if abs(t - wy - CENTRE_OFFSET) <= JITTER and abs(lft - wx - CENTRE_OFFSET) <= JITTER:
                return lab
        return BACKGROUND

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        xs = np.empty((n, WINDOW, WINDOW), dtype=np.float32)
        ys = np.empty(n, dtype=np.int64)
        k = 0
        while k < n:
            canvas, boxes = self._scene()
            H, W = canvas.shape
            wins: list[tuple[int, int]] = []
            for t, lft, _ in boxes:
                dy, dx = rng.integers(-JITTER, JITTER + 1, size=2)
                wins.append((t - CENTRE_OFFSET - dy, lft - CENTRE_OFFSET - dx))
                if rng.random() < 0.7:  # near miss: glyph off-centre by more than the jitter
                    while True:
                        dy, dx = rng.integers(-12, 13, size=2)
                        if max(abs(dy), abs(dx)) > JITTER:
                            break
                    wins.append((t - CENTRE_OFFSET - dy, lft - CENTRE_OFFSET - dx))
            for _ in range(max(1, int(0.8 * len(boxes)) + int(rng.integers(0, 2)))):
                wins.append((int(rng.integers(0, H - WINDOW + 1)), int(rng.integers(0, W - WINDOW + 1))))
            for wy, wx in wins:
                if k >= n:
                    break
                wy = min(max(wy, 0), H - WINDOW)
                wx = min(max(wx, 0), W - WINDOW)
                xs[k] = canvas[wy : wy + WINDOW, wx : wx + WINDOW]
                ys[k] = self._label(wy, wx, boxes)
                k += 1
        # Gaussian pixel noise, random strength per window, then quantise like a uint8 image
        sigma = rng.uniform(0.0, 12.0, size=(n, 1, 1)).astype(np.float32)
        xs = xs + rng.standard_normal(size=xs.shape, dtype=np.float32) * sigma
        xs = np.clip(np.rint(xs), 0, 255)
        return xs, ys


def normalise(xs: np.ndarray) -> torch.Tensor:
    mean, std = DIGITS_META["mean"][0], DIGITS_META["std"][0]
    return ((torch.from_numpy(xs).float() / 255.0 - mean) / std)[:, None]


def window_accuracy(model: nn.Module, xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float]:
    """(overall, digit-window, background-window) accuracy."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(normalise(xs[i : i + 1024])).argmax(1) for i in range(0, len(xs), 1024)])
    pred = pred.numpy()
    ok = pred == ys
    dig = ys != BACKGROUND
    return float(ok.mean()), float(ok[dig].mean()), float(ok[~dig].mean())


def train(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 250,
) -> DigitsNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sampler = WindowSampler(images, labels, rng)
    model = DigitsNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    run_loss = run_acc = 0.0
    for step in range(1, steps + 1):
        model.train()
        xs, ys = sampler.batch(batch_size)
        x, y = normalise(xs), torch.from_numpy(ys)
        out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run_loss += float(loss)
        run_acc += float((out.argmax(1) == y).float().mean())
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            print(
                f"step {step:5d}/{steps}  loss {run_loss / n:.4f}  train-acc {run_acc / n:.4f}"
                f"  lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:6.1f}s",
                flush=True,
            )
            run_loss = run_acc = 0.0
    model.eval()
    return model


def save(model: DigitsNet, out_dir: Path, info: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    st_path = out_dir / "digits.safetensors"
    js_path = out_dir / "digits.json"
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in DIGITS_META.items()}
    meta["arch"] = "fcnify.zoo.digits.DigitsNet"
    save_file(state, str(st_path), metadata=meta)
    st_path.chmod(0o644)
    doc = dict(DIGITS_META)
    doc["arch"] = "fcnify.zoo.digits.DigitsNet"
    doc["weights"] = st_path.name
    doc["training"] = info
    js_path.write_text(json.dumps(doc, indent=2) + "\n")
    return st_path, js_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fcnify.zoo.train_digits", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the package's zoo folder)")
    p.add_argument(
        "--dev",
        action="store_true",
        help="tune: train on digits 0..1199, report on scenes of 1200..1399, write only with --out",
    )
    args = p.parse_args(argv)

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    images, labels = load_split("train")
    if args.dev:
        train_imgs, train_labels = images[:1200], labels[:1200]
    else:
        train_imgs, train_labels = images, labels
    print(f"training on {len(train_imgs)} digits (load_digits() images 0..{len(train_imgs) - 1})", flush=True)
    t0 = time.perf_counter()
    model = train(
        train_imgs, train_labels, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    train_s = time.perf_counter() - t0
    print(f"training time: {train_s:.1f}s", flush=True)

    info: dict = {
        "script": "python -m fcnify.zoo.train_digits",
        "data": "sklearn load_digits() images 0..1399 (1400..1796 held out)",
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "jitter_px": JITTER,
        "train_seconds": round(train_s, 1),
    }
    if args.dev:
        val_imgs, val_labels = images[1200:], labels[1200:]
        vx, vy = WindowSampler(val_imgs, val_labels, np.random.default_rng(99)).batch(4096)
        acc, dacc, bacc = window_accuracy(model, vx, vy)
        print(
            f"validation windows (digits 1200..1399): all {acc:.4f}  digit {dacc:.4f}  background {bacc:.4f}"
        )
        fcn, geom = dense_model(model)
        res = evaluate_scenes(fcn, geom, make_scenes(val_imgs, val_labels, 40, seed=7))
        print(
            f"validation scenes: digit {res.digit_accuracy:.4f} ({res.n_digits})"
            f"  background {res.background_accuracy:.4f} ({res.n_background_cells})"
        )
        if args.out is None:
            return 0

    out_dir = args.out if args.out is not None else ZOO_DIR
    # held-out windows: reported once, at the end, never used to train or tune
    h_imgs, h_labels = load_split("heldout")
    hx, hy = WindowSampler(h_imgs, h_labels, np.random.default_rng(12345)).batch(4096)
    acc, dacc, bacc = window_accuracy(model, hx, hy)
    print(
        f"held-out windows (digits 1400..1796, {len(hy)} windows): all {acc:.4f}  digit {dacc:.4f}"
        f"  background {bacc:.4f}"
    )
    info["heldout_window_accuracy"] = {
        "all": round(acc, 4),
        "digit": round(dacc, 4),
        "background": round(bacc, 4),
    }
    st_path, js_path = save(model, out_dir, info)
    print(f"wrote {st_path} ({st_path.stat().st_size / 1024:.0f} KiB) and {js_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
