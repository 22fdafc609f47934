"""The descriptor route against the class head, and against today's recipe, on the same frames, paired by patient.

    python research/descriptor_route.py HEADS_PREDICTIONS [--baseline TODAY_PREDICTIONS] [--resamples 2000]

HEADS_PREDICTIONS: a prediction file of a model trained with ``--descriptor_loss_weight`` (``cv_predictions.csv``
lacks the descriptors; use ``evaluate``'s ``predictions.csv`` or a run's ``predictions_test.csv``), whose
``tirads_descriptors`` column holds each frame's expected ACR points. TODAY_PREDICTIONS: the same frames scored by
today's recipe (no heads). Reported, each as macro ROC AUC (two classes: malignant against the rest) with a 95%
interval over patients, and the paired differences: the route (points / 10 as the malignancy score) minus the
class head of the same model; the class head with heads minus today's; the route minus today's class head.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

from thyroid_classifier.metrics import bootstrap_intervals, macro_auc, paired_difference


def read(path: Path) -> dict[str, dict]:
    with path.open(newline="") as f:
        return {str(Path(r["path"]).resolve()): r for r in csv.DictReader(f)}


def two_class(score: np.ndarray) -> np.ndarray:
    """A malignancy score in [0, 1] as (rest, malignant) probabilities."""
    return np.stack([1 - score, score], axis=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("heads", type=Path)
    p.add_argument("--baseline", type=Path, default=None)
    p.add_argument("--resamples", type=int, default=2000)
    a = p.parse_args(argv)
    rows = read(a.heads)
    base = read(a.baseline) if a.baseline else {}
    keys = [k for k in rows if rows[k].get("tirads_descriptors") and (not base or k in base)]
    if not keys:
        print(f"{a.heads}: no frame has descriptors (trained without --descriptor_loss_weight?)", file=sys.stderr)
        return 2
    y = np.array([int(rows[k]["label"] == "malignant") for k in keys])
    groups = [rows[k]["group"] or k for k in keys]
    points = np.array([float(re.search(r"points=([0-9.]+)", rows[k]["tirads_descriptors"]).group(1)) for k in keys])
    scores = {"route (expected ACR points)": two_class(points / 10), "class head, with heads": two_class(np.array([float(rows[k]["p_malignant"]) for k in keys]))}
    if base:
        scores["class head, today's recipe"] = two_class(np.array([float(base[k]["p_malignant"]) for k in keys]))
    labels = ["rest", "malignant"]
    print(f"{len(keys)} frames, {len(set(groups))} patients, {int(y.sum())} malignant")
    for name, s in scores.items():
        ci = bootstrap_intervals(y.tolist(), s, labels, groups=groups, n_resamples=a.resamples)["roc_auc"]
        print(f"| {name} | {macro_auc(y, s):.3f} [{ci[0]:.3f}, {ci[1]:.3f}] |")
    pairs = [("class head, with heads", "route (expected ACR points)")]
    if base:
        pairs += [("class head, today's recipe", "class head, with heads"), ("class head, today's recipe", "route (expected ACR points)")]
    for a_name, b_name in pairs:
        d = paired_difference(y, scores[a_name], scores[b_name], groups, n_resamples=a.resamples)["roc_auc"]
        print(f"| {b_name} minus {a_name} | {d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
