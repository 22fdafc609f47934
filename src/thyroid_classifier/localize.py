"""Where does the model look? Grad-CAM against radiologists' nodule outlines (DDTI XML).

    python -m thyroid_classifier.localize MODEL IMAGES_DIR --xml XML_DIR [--subset test] [--update_metrics]

For every frame ``<case>_<frame>.jpg`` with an outline in ``XML_DIR/<case>.xml``: the pointing game
(is the heatmap's peak inside the outline?) and the share of heatmap energy inside it, beside the
same numbers for a Gaussian centred on the ultrasound region, which needs no model at all.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .explain import centred_gaussian, energy_inside, outline_mask, pointing_hit
from .folder import METRICS, ModelFolder
from .known_data import frame_outline
from .predict import Predictor, list_files
from .preprocess import ImageError, open_image


def _mean_ci(values: Sequence[float], seed: int = 0, n: int = 2000) -> dict:
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return {"value": float("nan"), "ci": [float("nan"), float("nan")]}
    boots = np.random.default_rng(seed).choice(v, size=(n, len(v)), replace=True).mean(axis=1)
    return {"value": float(v.mean()), "ci": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]}


def localization_scores(predictor: Predictor, images: Sequence[Path], xml_dir: Path, batch_size: int = 8, progress: bool = True) -> dict:
    """Pointing game and energy inside the outline, for the model and the centred-Gaussian baseline."""
    outlined = []
    for path in images:
        polygons = frame_outline(path, xml_dir)
        if polygons:
            outlined.append((path, polygons))
    rows = []
    for start in tqdm(range(0, len(outlined), batch_size), desc="localisation", disable=not progress):
        chunk = outlined[start : start + batch_size]
        try:
            pil = [open_image(p) for p, _ in chunk]
        except ImageError:
            continue
        for (path, polygons), image, result in zip(chunk, pil, predictor.predict(pil), strict=True):
            mask = outline_mask(polygons, image.size)
            baseline = centred_gaussian(image.size, result.box)
            rows.append({
                "file": path.name, "label": result.label,
                "model_hit": pointing_hit(result.heatmap, mask), "model_energy": energy_inside(result.heatmap, mask),
                "baseline_hit": pointing_hit(baseline, mask), "baseline_energy": energy_inside(baseline, mask),
                "outline_share": float(mask.sum() / max(1, (result.box[2] - result.box[0]) * (result.box[3] - result.box[1]))),
            })
    column = lambda key: [float(r[key]) for r in rows]  # noqa: E731
    return {
        "n": len(rows),
        "model": {"pointing_game": _mean_ci(column("model_hit")), "energy_inside": _mean_ci(column("model_energy"))},
        "centred_gaussian": {"pointing_game": _mean_ci(column("baseline_hit")), "energy_inside": _mean_ci(column("baseline_energy"))},
        "outline_share_of_region": float(np.mean(column("outline_share"))) if rows else float("nan"),
        "frames": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thyroid_classifier.localize", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder written by train.py")
    parser.add_argument("images_dir", type=Path)
    parser.add_argument("--xml", type=Path, required=True, help="folder of DDTI <case>.xml files with the outlines")
    parser.add_argument("--subset", choices=["all", "test"], default="all", help="test: only the frames in the model's predictions_test.csv (never seen in training)")
    parser.add_argument("--update_metrics", action="store_true", help="write the result into the model's metrics.json (and so its card)")
    parser.add_argument("--json", type=Path, default=None, help="also write the full result, per frame, to this file")
    args = parser.parse_args(argv)
    predictor = Predictor.from_pretrained(args.model)
    images = list_files(args.images_dir)
    if args.subset == "test":
        listed = ModelFolder(args.model).predictions("test")
        if not listed.is_file():
            print(f"error: {listed} not found; --subset test needs a model folder written by train.py", file=sys.stderr)
            return 2
        keep = {Path(row["path"]).name for row in csv.DictReader(listed.open())}
        images = [p for p in images if p.name in keep]
    result = localization_scores(predictor, images, args.xml)
    result["subset"] = args.subset
    summary = {k: v for k, v in result.items() if k != "frames"}
    m, b = result["model"], result["centred_gaussian"]
    print(f"{result['n']} outlined frames ({args.subset}):")
    for name, r in (("model", m), ("centred Gaussian", b)):
        print(f"  {name:<17} pointing game {r['pointing_game']['value']:.3f} [{r['pointing_game']['ci'][0]:.3f}, {r['pointing_game']['ci'][1]:.3f}]"
              f", energy inside outline {r['energy_inside']['value']:.3f} [{r['energy_inside']['ci'][0]:.3f}, {r['energy_inside']['ci'][1]:.3f}]")
    print(f"  outlines cover {result['outline_share_of_region']:.3f} of the ultrasound region on average")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.update_metrics:
        folder = ModelFolder(args.model)
        folder.update_metrics(localization=summary)  # the card is re-rendered with it
        print(f"updated {folder.file(METRICS)} and the card")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
