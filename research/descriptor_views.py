"""Descriptor heads read from the whole frame or from the nodule's box, on the same held-out frames, paired by patient.

    python research/descriptor_views.py MODEL_FOLDER [MODEL_FOLDER ...] [--resamples 1000]

For each model folder trained with ``--descriptor_loss_weight`` on DDTI: its test split's frames
(``predictions_test.csv``) that have a radiologist's outline, read by the folder's ``Predictor`` twice, from the whole
frame and from the box around the outline (``nodule_boxes``: what a person drawing that box gets). Per descriptor,
Cohen's kappa against the radiologist both ways on the same frames, and the paired difference (box minus frame) with a
95% interval resampling patients. Where the heads were trained on (``--descriptor_view``) is read from the folder.
A model with an outline head (``--outline_loss_weight``) is also read a third way, as a frame without a box is: from
the nodule it locates (the whole frame where it locates none), with that reading's paired difference against the
frame and how its boxes overlap the radiologists' (IoU).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from thyroid_classifier.descriptors import CLASSES, MISSING, box_iou, cohen_kappa, frame_labels, frame_nodule_boxes
from thyroid_classifier.known_data import DESCRIPTORS
from thyroid_classifier.metrics import group_resamples
from thyroid_classifier.predict import Predictor
from thyroid_classifier.preprocess import open_image


def _classes_said(answers: list[dict], name: str) -> np.ndarray:
    terms = [t for t, _ in CLASSES[name]]
    return np.array([terms.index(a[name]["term"]) for a in answers])


def compare(folder: Path, resamples: int, seed: int = 0) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    with (folder / f"predictions_{metrics['split']}.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    data_dir = str(metrics["data"]["data_dir"])
    paths = [r["path"] for r in rows]
    sources = [r.get("source") or "" for r in rows]
    folders = {s: data_dir for s in set(sources)}
    boxes = frame_nodule_boxes(paths, sources, folders)
    keep = [i for i, b in enumerate(boxes) if not np.isnan(b).any()]
    targets = frame_labels([paths[i] for i in keep], [sources[i] for i in keep], folders)
    groups = np.array([rows[i]["group"] for i in keep])
    predictor = Predictor.from_pretrained(str(folder))
    images = [open_image(paths[i]) for i in keep]
    from_frame = [p.descriptors for p in predictor.predict(images, explain=False, outline=False)]  # the whole frame, even with an outline head
    from_box = [p.descriptors for p in predictor.predict(images, explain=False, nodule_boxes=[boxes[i] for i in keep])]
    out = {"model": str(folder), "trained_on": (metrics.get("training") or {}).get("descriptor_view", "frame"), "frames": len(keep), "per_descriptor": {}}
    located = None
    if predictor.descriptors.heads.outline is not None:
        read = predictor.predict(images, explain=False)  # as without a box: the located nodule, else the frame
        located = [p.descriptors for p in read]
        ious = [box_iou(p.nodule_box, boxes[i]) for p, i in zip(read, keep, strict=True) if p.nodule_box is not None]
        out["located"] = {"found": len(ious), "iou_median": float(np.median(ious)) if ious else float("nan"),
                          "iou_at_least_half": sum(v >= 0.5 for v in ious) / len(keep)}
    for j, name in enumerate(DESCRIPTORS):
        known = targets[:, j] != MISSING
        y, a, g = targets[known, j], _classes_said(from_frame, name)[known], groups[known]
        out["per_descriptor"][name] = {"n": int(known.sum()), "frame": cohen_kappa(y, a)}
        for key, answers in (("box", from_box), ("located", located)):
            if answers is None:
                continue
            b = _classes_said(answers, name)[known]
            diffs = [cohen_kappa(y[idx], b[idx]) - cohen_kappa(y[idx], a[idx]) for idx in group_resamples(len(g), list(g), resamples, seed)]
            diffs = [d for d in diffs if d == d]
            out["per_descriptor"][name][key] = cohen_kappa(y, b)
            out["per_descriptor"][name][f"{key}_minus_frame"] = [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))] if diffs else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args(argv)
    print("| model (heads trained on) | descriptor | frames | kappa, whole frame | kappa, nodule box | box minus frame, 95% interval "
          "| kappa, located nodule | located minus frame, 95% interval |")
    print("|---|---|---|---|---|---|---|---|")
    located = []
    for folder in args.models:
        r = compare(folder, args.resamples)
        for name, d in r["per_descriptor"].items():
            cells = []
            for key in ("box", "located"):
                ci = d.get(f"{key}_minus_frame")
                cells += [f"{d[key]:.3f}", f"{d[key] - d['frame']:+.3f} " + (f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "n/a")] if key in d else ["", ""]
            print(f"| {folder.parent.name} ({r['trained_on']}) | {name} | {d['n']} | {d['frame']:.3f} | " + " | ".join(cells) + " |")
        if "located" in r:
            located.append(f"{folder.parent.name}: located a nodule on {r['located']['found']} of {r['frames']} outlined frames; median IoU with the "
                           f"radiologist's box {r['located']['iou_median']:.2f}; IoU >= 0.5 on {r['located']['iou_at_least_half']:.0%}")
    print("\n".join(["", *located]) if located else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
