"""A built-in, deterministic, SYNTHETIC sample dataset.

The images are speckle patterns drawn by this module: no patient is in them and a model trained on
them learns nothing about real thyroids. They exist so that the pipeline (loading, audit,
preprocessing, training, Grad-CAM, app) can be run and tested anywhere without real data.

Each frame imitates the layout of a real scanner frame (black border, a text panel of machine
settings on the right, a view label below) around a speckled tissue region. Nodules follow a few
TI-RADS-like features:

* ``normal``: homogeneous tissue, no nodule;
* ``benign``: wider-than-tall, smooth oval, iso-/hyperechoic or cystic, thin dark halo;
* ``malignant``: taller-than-wide, hypoechoic, lobulated margin, microcalcifications.

Nodule centre and radii are written to ``manifest.csv`` (so a heatmap can be scored against them),
with a ``case`` column: two frames of one case share a nodule and must share a split.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

SAMPLE_LABELS: tuple[str, ...] = ("normal", "benign", "malignant")
_VERSION = 1  # bump when the drawing changes, so cached samples are rebuilt
SYNTHETIC_MARKER = "SYNTHETIC.txt"  # written into every sample folder; cards and reports look for it


@dataclass(frozen=True)
class Nodule:
    cx: float
    cy: float
    rx: float
    ry: float


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Layered, depth-attenuated speckle in [0, 1]."""
    depth = np.linspace(0, 1, h)[:, None]
    layers = 0.55 + 0.12 * np.sin(depth * rng.uniform(8, 14) + rng.uniform(0, 6)) * np.ones((1, w))
    layers *= 1.0 - 0.35 * depth  # attenuation with depth
    layers[: max(2, h // 12)] *= 1.35  # bright skin / strap-muscle line near the probe
    speckle = gaussian_filter(rng.rayleigh(1.0, size=(h, w)), sigma=0.9)
    return layers * speckle / speckle.mean()


def _draw_nodule(rng: np.random.Generator, img: np.ndarray, label: str, nodule: Nodule) -> None:
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    dx, dy = (xx - nodule.cx) / nodule.rx, (yy - nodule.cy) / nodule.ry
    radius = np.hypot(dx, dy)
    if label == "malignant":
        # Lobulated / spiculated margin: the boundary radius wobbles with angle.
        angle = np.arctan2(dy, dx)
        wobble = sum(rng.uniform(0.05, 0.14) * np.cos(k * angle + rng.uniform(0, 6)) for k in (3, 5, 8))
        inside = radius < 1.0 + wobble
        img[inside] *= rng.uniform(0.3, 0.45)  # marked hypoechogenicity
        ys, xs = np.nonzero(inside)
        for i in rng.choice(len(ys), size=min(len(ys), int(rng.integers(4, 9))), replace=False):
            img[max(0, ys[i] - 1) : ys[i] + 2, max(0, xs[i] - 1) : xs[i] + 2] = rng.uniform(2.2, 2.8)
        shadow = (xx > nodule.cx - nodule.rx * 0.6) & (xx < nodule.cx + nodule.rx * 0.6) & (yy > nodule.cy + nodule.ry)
        img[shadow] *= 0.7  # posterior acoustic shadowing
    else:
        inside = radius < 1.0
        halo = (radius >= 1.0) & (radius < 1.12)
        cystic = rng.random() < 0.3
        img[inside] *= rng.uniform(0.08, 0.18) if cystic else rng.uniform(1.05, 1.35)
        img[halo] *= 0.45
        if cystic:  # posterior acoustic enhancement behind a fluid-filled nodule
            behind = (np.abs(xx - nodule.cx) < nodule.rx * 0.8) & (yy > nodule.cy + nodule.ry)
            img[behind] *= 1.25


def _frame(rng: np.random.Generator, label: str, nodule: Nodule | None, size: tuple[int, int], view: str) -> Image.Image:
    height, width = size
    # Scanner layout: black frame, settings panel on the right, view label below the image.
    x0, x1 = int(width * 0.06), int(width * 0.86)
    y0, y1 = int(height * 0.03), int(height * 0.84)
    tissue = _tissue(rng, y1 - y0, x1 - x0)
    if nodule is not None:
        _draw_nodule(rng, tissue, label, Nodule(nodule.cx - x0, nodule.cy - y0, nodule.rx, nodule.ry))
    canvas = np.zeros((height, width), dtype=np.float64)
    canvas[y0:y1, x0:x1] = np.clip(tissue * rng.uniform(85, 105), 0, 255)
    image = Image.fromarray(canvas.astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(image)
    panel_x = x1 + max(4, width // 60)
    for i, text in enumerate(("12L6", f"{rng.integers(7, 13)}.0", "31fps", f"DR{rng.integers(55, 75)}", f"G{rng.integers(40, 90)}")):
        draw.text((panel_x, y0 + 4 + i * 14), text, fill=(255, 255, 255))
    draw.text((x0 + 8, y1 + max(6, height // 30)), view, fill=(235, 235, 235))
    bar_x = max(1, x0 // 5)  # a grey-scale bar in the left margin
    draw.rectangle((bar_x, height // 3, bar_x + max(1, x0 // 6), 2 * height // 3), fill=(200, 200, 200))
    return image


def _split_frame(rng: np.random.Generator, label: str, nodule: Nodule | None, size: tuple[int, int], view: str) -> tuple[Image.Image, Nodule | None]:
    """A split-screen frame: two views of the nodule side by side in a wider region (as scanners
    show two planes), each view with its own gain; returns it and the left view's nodule."""
    height, width = size
    x0, x1 = int(width * 0.04), int(width * 0.96)
    y0, y1 = int(height * 0.03), int(height * 0.70)
    pane = (x1 - x0) // 2
    # Map the single-view nodule into a pane, keeping its shape.
    scale = min(pane / (0.80 * width), (y1 - y0) / (0.81 * height))
    canvas = np.zeros((height, width), dtype=np.float64)
    left_nodule = None
    for k in range(2):
        tissue = _tissue(rng, y1 - y0, pane)
        if nodule is not None:
            inner = Nodule((nodule.cx - 0.06 * width) * scale, (nodule.cy - 0.03 * height) * scale, nodule.rx * scale, nodule.ry * scale)
            _draw_nodule(rng, tissue, label, inner)
            if k == 0:
                left_nodule = Nodule(inner.cx + x0, inner.cy + y0, inner.rx, inner.ry)
        canvas[y0:y1, x0 + k * pane : x0 + (k + 1) * pane] = np.clip(tissue * rng.uniform(80, 110), 0, 255)
    image = Image.fromarray(canvas.astype(np.uint8)).convert("RGB")
    ImageDraw.Draw(image).text((x0 + 8, y1 + max(6, height // 30)), view, fill=(235, 235, 235))
    return image, left_nodule


def _case_nodule(rng: np.random.Generator, label: str, size: tuple[int, int]) -> Nodule | None:
    height, width = size
    if label == "normal":
        return None
    short = rng.uniform(0.06, 0.10) * width
    long = short * rng.uniform(1.25, 1.6)
    rx, ry = (short, long) if label == "malignant" else (long, short)  # taller-than-wide vs wider
    cx = rng.uniform(width * 0.06 + rx + 6, width * 0.86 - rx - 6)
    cy = rng.uniform(height * 0.03 + ry + 6, height * 0.84 - ry - 6)
    return Nodule(float(cx), float(cy), float(rx), float(ry))


def make_sample_dataset(
    out_dir: str | Path,
    *,
    cases_per_class: int = 12,
    frames_per_case: int = 2,
    labels: Sequence[str] = SAMPLE_LABELS,
    size: tuple[int, int] = (192, 256),
    seed: int = 0,
    split_screen_every: int = 0,
) -> Path:
    """Write ``out_dir/<label>/<case>_<frame>.png`` and ``out_dir/manifest.csv``; same seed, same bytes.

    ``split_screen_every=N``: every N-th case of each class is shown in split-screen frames (two
    views side by side; the manifest's ``layout`` column says which, and its nodule is the left view's)."""
    out = Path(out_dir)
    rows = []
    for li, label in enumerate(labels):
        (out / label).mkdir(parents=True, exist_ok=True)
        for c in range(cases_per_class):
            case = f"{li + 1}{c:03d}"
            rng = np.random.default_rng([seed, li, c])
            nodule = _case_nodule(rng, label, size)
            split = split_screen_every > 0 and c % split_screen_every == split_screen_every - 1  # a case's frames share a layout
            for frame in range(1, frames_per_case + 1):
                # A second frame: the probe moved a little; the same nodule, new speckle.
                jitter = rng.normal(0, 3, 2) if frame > 1 else np.zeros(2)
                frame_nodule = None if nodule is None else Nodule(nodule.cx + jitter[0], nodule.cy + jitter[1], nodule.rx, nodule.ry)
                view = ("DER", "IZQ")[frame % 2]
                if split:
                    image, frame_nodule = _split_frame(rng, label, frame_nodule, size, view)
                else:
                    image = _frame(rng, label, frame_nodule, size, view)
                name = f"{case}_{frame}.png"
                image.save(out / label / name, optimize=False)
                n = frame_nodule or Nodule(float("nan"), float("nan"), 0.0, 0.0)
                rows.append({
                    "file": f"{label}/{name}", "case": case, "label": label,
                    "cx": f"{n.cx:.1f}", "cy": f"{n.cy:.1f}", "rx": f"{n.rx:.1f}", "ry": f"{n.ry:.1f}", "layout": "split" if split else "single",
                })
    (out / SYNTHETIC_MARKER).write_text(
        "SYNTHETIC images drawn by thyroid_classifier.sample: no patient is in them. They demonstrate the "
        "pipeline only; a model trained on them knows nothing about real thyroids.\n"
    )
    with (out / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def cache_root() -> Path:
    """Where built artefacts such as the sample dataset are kept (``THYROID_CLASSIFIER_CACHE``)."""
    base = os.environ.get("THYROID_CLASSIFIER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "thyroid_classifier"
    )
    return Path(base)


#: Cases per class of the built-in sample: 216 frames, so that its test split (32 frames) can show whether the
#: quick start's model learned anything (12 cases gave a test split of 12 frames and intervals of [0.2, 1.0]).
BUILTIN_CASES = 36


def builtin_sample(cases_per_class: int = BUILTIN_CASES, seed: int = 0) -> Path:
    """The built-in sample's folder, made on first use and reused afterwards."""
    folder = cache_root() / f"sample-v{_VERSION}-c{cases_per_class}-s{seed}"
    if not (folder / "manifest.csv").is_file():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_sample_dataset(tmp, cases_per_class=cases_per_class, seed=seed)
        if folder.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            tmp.replace(folder)
    return folder


def example_frames() -> list[Path]:
    """One synthetic frame per class drawn with another seed than the built-in sample: the app's examples,
    never seen in training by a model trained on the sample."""
    folder = builtin_sample(cases_per_class=1, seed=12345)
    return [sorted((folder / label).glob("*.png"))[0] for label in SAMPLE_LABELS]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m thyroid_classifier.sample",
        description="Write the built-in SYNTHETIC sample dataset (demonstrates the pipeline only).",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--cases_per_class", type=int, default=BUILTIN_CASES)
    parser.add_argument("--frames_per_case", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_sample_dataset(args.out_dir, cases_per_class=args.cases_per_class, frames_per_case=args.frames_per_case, seed=args.seed)
    print(f"wrote a synthetic sample to {out} ({args.cases_per_class} cases x {args.frames_per_case} frames per class)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
