"""Render the several-sources result tables of docs/results-sources.md from the runs' own files.

    python scripts/results_sources.py --loso NAME=OUTPUT_DIR/<model> [NAME=...] [--cv OUTPUT_DIR/<model>] [--probes DIR --reference CSV]

Every number in the tables is read from ``loso_metrics.json`` / ``cv_metrics.json`` (or recomputed
from ``loso_predictions``-style CSVs for ``--probes``), so prose cannot drift from the runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

from thyroid_classifier.metrics import macro_auc, paired_difference


def _ci(m: dict) -> str:
    return "n/a" if math.isnan(m["value"]) else f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"


def loso_rows(runs: dict[str, Path]) -> list[str]:
    lines = ["| recipe | unseen source (trained on) | n | macro ROC AUC | balanced accuracy | ECE | recall per class | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for name, folder in runs.items():
        loso = json.loads((folder / "loso_metrics.json").read_text())
        for source, r in loso["held_out"].items():
            m = r["metrics"]
            recall = ", ".join(f"{label} {v['recall']:.2f}" for label, v in m["per_class"].items())
            lines.append(f"| {name} | {source} ({'+'.join(r['trained_on'])}) | {r['n']} | {_ci(m['roc_auc'])} | {_ci(m['balanced_accuracy'])} | "
                         f"{_ci(m['ece'])} | {recall} | {r['wall_seconds'] / 60:.1f} min |")
    return lines


def reliability_rows(runs: dict[str, Path]) -> list[str]:
    lines = ["| recipe | unseen source | guard AUROC (unseen vs in-source held-out) | in-source validation passed | unseen flagged | "
             "AUC on accepted (n) | AUC on flagged (n) | set coverage | mean set size |", "|---|---|---|---|---|---|---|---|---|"]
    for name, folder in runs.items():
        loso = json.loads((folder / "loso_metrics.json").read_text())
        for source, r in loso["held_out"].items():
            g, c = r.get("guard") or {}, r.get("conformal") or {}
            if not g:
                continue
            lines.append(f"| {name} | {source} | {g['auroc_unseen_vs_in_source']:.3f} | {g['in_source_validation_passed']:.0%} | {g['share_flagged']:.0%} | "
                         f"{g['roc_auc_accepted']:.3f} ({g['n_accepted']}) | {g['roc_auc_flagged']:.3f} ({g['n_flagged']}) | "
                         f"{c.get('coverage', math.nan):.3f} | {c.get('mean_set_size', math.nan):.2f} |")
    return lines


def cv_rows(folder: Path) -> list[str]:
    cv = json.loads((folder / "cv_metrics.json").read_text())
    lines = [f"{cv['k']}-fold, grouped by patient, stratified by source x class, {cv['n']} frames, {cv['wall_seconds'] / 60:.1f} min:", "",
             "| part | n | macro ROC AUC | balanced accuracy | ECE |", "|---|---|---|---|---|",
             f"| pooled | {cv['n']} | {_ci(cv['pooled']['roc_auc'])} | {_ci(cv['pooled']['balanced_accuracy'])} | {_ci(cv['pooled']['ece'])} |"]
    for source, m in cv.get("by_source", {}).items():
        lines.append(f"| {source} (in-source) | {m['n']} | {_ci(m['roc_auc'])} | {_ci(m['balanced_accuracy'])} | {_ci(m['ece'])} |")
    return lines


def _read(path: Path) -> dict[str, tuple[str, str, str, np.ndarray]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        classes = [c.removeprefix("p_") for c in reader.fieldnames if c.startswith("p_")]
        return {r["path"]: (r["group"], r["source"], r["label"], np.array([float(r[f"p_{c}"]) for c in classes])) for r in reader}, classes


def probe_rows(folder: Path, reference: Path, resamples: int) -> list[str]:
    ref, classes = _read(reference)
    lines = ["| recipe | unseen source | macro ROC AUC | minus the reference, paired over patients [95%] |", "|---|---|---|---|"]
    for path in sorted(folder.glob("*.csv")):
        rows, _ = _read(path)
        keys = sorted(rows)
        if set(keys) != set(ref):
            raise SystemExit(f"{path} and {reference} cover other images")
        sources = np.array([rows[k][1] for k in keys])
        y = np.array([classes.index(rows[k][2]) for k in keys])
        p = np.stack([rows[k][3] for k in keys])
        a = np.stack([ref[k][3] for k in keys])
        groups = [rows[k][0] for k in keys]
        for s in sorted(set(sources.tolist())):
            m = sources == s
            d = paired_difference(y[m], a[m], p[m], [g for g, keep in zip(groups, m, strict=True) if keep], n_resamples=resamples)["roc_auc"]
            lines.append(f"| {path.stem} | {s} | {macro_auc(y[m], p[m]):.3f} | {d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loso", nargs="*", default=[], help="NAME=FOLDER holding loso_metrics.json")
    p.add_argument("--cv", type=Path, default=None, help="a folder holding cv_metrics.json")
    p.add_argument("--probes", type=Path, default=None, help="research/loso_probes.py's --out folder")
    p.add_argument("--reference", type=Path, default=None, help="the loso_predictions.csv the probes are paired with")
    p.add_argument("--resamples", type=int, default=1000)
    a = p.parse_args(argv)
    runs = {item.split("=", 1)[0]: Path(item.split("=", 1)[1]) for item in a.loso}
    if runs:
        print("\n".join(loso_rows(runs)), end="\n\n")
        print("\n".join(reliability_rows(runs)), end="\n\n")
    if a.cv:
        print("\n".join(cv_rows(a.cv)), end="\n\n")
    if a.probes and a.reference:
        print("\n".join(probe_rows(a.probes, a.reference, a.resamples)))


if __name__ == "__main__":
    main()
