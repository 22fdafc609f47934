"""Is recipe B better than recipe A? Both scored on the same images, compared patient by patient.

    python -m thyroid_classifier.compare A B [--names A_NAME B_NAME] [--json OUT]

A and B are prediction files of this project (``cv_predictions.csv`` from ``train.py --cv``,
``predictions_test.csv`` from a training run, ``predictions.csv`` from ``evaluate``) or the folders
that hold one. Rows are matched by image path; both files must cover the same images with the same
labels and classes. Prints each one's macro ROC AUC and balanced accuracy and the difference B - A
with a 95% *paired* bootstrap interval over patients (each resample scores both on the same
patients). On a few hundred frames two runs' separate intervals overlap almost always; the paired
interval says whether the difference itself is told apart from zero. One run of each recipe still
carries its seed's luck: a difference smaller than the spread between seeds is not a finding.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .folder import PREDICTION_FILES
from .metrics import paired_difference



@dataclass
class Predictions:
    source: Path
    classes: list[str]
    rows: dict[str, tuple[str, str, np.ndarray]]  # path -> (group, label, probabilities)


def find_predictions(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the first of :data:`PREDICTION_FILES` inside it."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in PREDICTION_FILES:
            if (path / name).is_file():
                return path / name
        raise ValueError(f"{path}: no prediction file in this folder (looked for {', '.join(PREDICTION_FILES)})")
    raise ValueError(f"{path}: no such file or folder")


def read_predictions(path: str | Path) -> Predictions:
    """Read a prediction CSV (columns ``path``, ``group``, ``label`` and ``p_<class>``)."""
    source = find_predictions(path)
    with source.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        classes = [c.removeprefix("p_") for c in columns if c.startswith("p_")]
        missing = [c for c in ("path", "group", "label") if c not in columns]
        if missing or not classes:
            raise ValueError(f"{source}: not a prediction file of this project (missing columns: {', '.join(missing) or 'p_<class>'})")
        rows: dict[str, tuple[str, str, np.ndarray]] = {}
        for line, row in enumerate(reader, start=2):
            if row["path"] in rows:
                raise ValueError(f"{source}, line {line}: {row['path']} is listed twice")
            if not row["label"]:
                raise ValueError(f"{source}, line {line}: no true label (a predict output?); compare needs labelled predictions "
                                 "(from train.py, --cv, --loso or evaluate)")
            try:
                probs = np.array([float(row[f"p_{c}"]) for c in classes])
            except ValueError:
                raise ValueError(f"{source}, line {line}: a probability is not a number") from None
            rows[row["path"]] = (row["group"], row["label"], probs)
    if not rows:
        raise ValueError(f"{source}: no predictions")
    return Predictions(source, classes, rows)


def compare(a: Predictions, b: Predictions, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of two prediction sets on the same images (see the module docstring)."""
    if a.classes != b.classes:
        raise ValueError(f"the two files score different classes: {a.classes} ({a.source}) vs {b.classes} ({b.source})")
    only_a, only_b = sorted(a.rows.keys() - b.rows.keys()), sorted(b.rows.keys() - a.rows.keys())
    if only_a or only_b:
        example = (only_a or only_b)[0]
        raise ValueError(f"the two files do not cover the same images: {len(only_a)} only in {a.source}, {len(only_b)} only in "
                         f"{b.source} (e.g. {example}); compare runs on the same data, with the same paths")
    paths = sorted(a.rows)
    disagree = [p for p in paths if a.rows[p][1] != b.rows[p][1]]
    if disagree:
        raise ValueError(f"the two files label {len(disagree)} images differently (e.g. {disagree[0]}: "
                         f"{a.rows[disagree[0]][1]} vs {b.rows[disagree[0]][1]})")
    unknown = sorted({a.rows[p][1] for p in paths} - set(a.classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the scored classes {a.classes}")
    y = [a.classes.index(a.rows[p][1]) for p in paths]
    groups = [a.rows[p][0] for p in paths]
    result = paired_difference(y, np.stack([a.rows[p][2] for p in paths]), np.stack([b.rows[p][2] for p in paths]),
                               groups=groups, n_resamples=n_resamples, seed=seed)
    return {"a": str(a.source), "b": str(b.source), "n": len(paths), "groups": len(set(groups)), "classes": a.classes, **result}


def report(result: dict, names: Sequence[str]) -> str:
    a, b = names
    lines = [f"{result['n']} images from {result['groups']} patients; A = {a} ({result['a']}), B = {b} ({result['b']})", "",
             "| metric | A | B | B - A | 95% paired interval (patients) | resamples with B ahead |", "|---|---|---|---|---|---|"]
    for key in ("roc_auc", "balanced_accuracy"):
        r = result[key]
        lines.append(f"| {key} | {r['a']:.3f} | {r['b']:.3f} | {r['difference']:+.3f} | [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {r['share_b_better']:.0%} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thyroid_classifier.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="prediction file or folder of the baseline (A)")
    parser.add_argument("b", help="prediction file or folder of the challenger (B)")
    parser.add_argument("--names", nargs=2, metavar=("A_NAME", "B_NAME"), default=("A", "B"))
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired resamples of patients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    try:
        result = compare(read_predictions(args.a), read_predictions(args.b), args.bootstrap, args.seed)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["names"] = list(args.names)
    print(report(result, args.names))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
