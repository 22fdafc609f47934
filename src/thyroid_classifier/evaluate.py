"""External validation: score a trained model on any labelled folder, with the same metrics.

    python -m thyroid_classifier.evaluate MODEL DATA_DIR [--out DIR] [--shifts]

Writes ``predictions.csv``, ``report.json`` / ``report.md`` (metrics with 95% intervals resampling
patients, per-class numbers, ROC and confusion plots) and the folder's audit. The audit includes a
check against the fingerprints (perceptual hashes, never images) of the model's training images, so
an "external" set that shares images with the training data is flagged as leakage. Labels are
matched by canonical name; a class the model does not know is reported, and left out of the
metrics rather than silently mapped. ``--shifts`` also scores the same images under simulated
machine differences (:func:`thyroid_classifier.augment.device_shifts`), to show which cues the model
leans on before a real second-site set is at hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .audit import DEFAULT_NEAR_THRESHOLD, audit_scan
from .augment import device_shifts, shift_image
from .data import DataError, resolve_groups, scan_folder
from .metrics import HEADLINE, bootstrap_intervals, classification_metrics, with_intervals
from .plots import plot_confusion, plot_roc
from .predict import Predictor
from .preprocess import ImageError, open_image


def training_overlap(report, fingerprints: Sequence[dict], near_threshold: int = DEFAULT_NEAR_THRESHOLD) -> list[dict]:
    """Images of ``report`` that match a training fingerprint: byte-identical or perceptually near."""
    if not fingerprints:
        return []
    shas = {f["sha256"] for f in fingerprints}
    hashes = np.array([int(f["phash"], 16) for f in fingerprints], dtype=np.uint64)
    found = []
    for info in report.readable:
        if info.sha256 in shas:
            found.append({"path": info.path, "kind": "exact", "distance": 0})
            continue
        distance = int(np.bitwise_count(hashes ^ np.uint64(info.phash)).min())
        if distance <= near_threshold:
            found.append({"path": info.path, "kind": "near", "distance": distance})
    return found


def evaluate_folder(predictor: Predictor, fingerprints: Sequence[dict], data_dir: Path, out_dir: Path,
                    batch_size: int = 8, bootstrap: int = 1000, seed: int = 0, progress: bool = True, shifts: bool = False) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    scan = scan_folder(data_dir)
    report = audit_scan(scan, progress=progress)
    report.save(out_dir / "audit.json")
    overlap = training_overlap(report, fingerprints, report.near_threshold)
    unreadable = {u["path"] for u in report.unreadable}
    groups, group_source = resolve_groups(scan)
    known = set(predictor.labels)
    unknown = Counter(e.label for e in scan.images if e.label not in known and str(e.path) not in unreadable)
    rows = [(e, g) for e, g in zip(scan.images, groups, strict=True) if e.label in known and str(e.path) not in unreadable]
    shift_fns = device_shifts(seed) if shifts else {}
    probs, y, kept_groups, paths, failed = [], [], [], [], []
    shifted: dict[str, list] = {name: [] for name in shift_fns}
    for start in tqdm(range(0, len(rows), batch_size), desc="evaluate", disable=not progress):
        chunk = rows[start : start + batch_size]
        images = []
        for entry, group in chunk:
            try:
                images.append((entry, group, open_image(entry.path)))
            except ImageError as exc:
                failed.append({"path": str(entry.path), "error": str(exc)})
        if not images:
            continue
        for (entry, group, _), result in zip(images, predictor.predict([im for _, _, im in images], explain=False), strict=True):
            probs.append([result.probabilities[label] for label in predictor.labels])
            y.append(predictor.labels.index(entry.label))
            kept_groups.append(group)
            paths.append(str(entry.path))
        for name, fn in shift_fns.items():  # the same images as another machine might show them
            results = predictor.predict([shift_image(im, fn) for _, _, im in images], explain=False)
            shifted[name] += [[r.probabilities[label] for label in predictor.labels] for r in results]
    if not y:
        raise DataError(f"{data_dir}: no image with a label the model knows ({', '.join(predictor.labels)}); found {dict(unknown)}")
    p = np.asarray(probs)
    metrics = classification_metrics(y, p, predictor.labels)
    intervals = bootstrap_intervals(y, p, predictor.labels, groups=kept_groups, n_resamples=bootstrap, seed=seed)
    result = {
        "model": predictor.source,
        "data_dir": str(data_dir),
        "n": len(y),
        "groups": len(set(kept_groups)),
        "group_source": group_source,
        "calibrated": predictor.temperature != 1.0,
        "external": with_intervals(metrics, intervals),
        "unknown_classes": dict(unknown),
        "unreadable": report.unreadable + failed,
        "training_overlap": overlap,
        "device_shifts": {name: {key: classification_metrics(y, np.asarray(v), predictor.labels)[key] for key in ("roc_auc", "balanced_accuracy")}
                          for name, v in shifted.items()},
        "audit": {k: v for k, v in report.to_dict().items() if k in ("counts", "exact_duplicates", "near_duplicates", "conflicts", "sizes", "modes", "split_screens", "class_cues")},
    }
    (out_dir / "report.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    with (out_dir / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "group", "label", "predicted", *[f"p_{label}" for label in predictor.labels]])
        for path, group, yi, pi in zip(paths, kept_groups, y, p, strict=True):
            writer.writerow([path, group, predictor.labels[yi], predictor.labels[int(np.argmax(pi))], *[f"{v:.6f}" for v in pi]])
    plot_roc(y, p, predictor.labels, out_dir / "roc.png", "external")
    plot_confusion(metrics["confusion_matrix"], predictor.labels, out_dir / "confusion_matrix.png", "external")
    (out_dir / "report.md").write_text(report_markdown(result) + "\n")
    return result


def report_markdown(result: dict) -> str:
    m = result["external"]
    lines = [f"# External evaluation of {result['model']}", "", f"Data: `{result['data_dir']}`, {result['n']} images from {result['groups']} groups ({result['group_source']}).", "",
             "| metric | value | 95% interval (resampling groups) |", "|---|---|---|"]
    lines += [f"| {k} | {m[k]['value']:.3f} | [{m[k]['ci'][0]:.3f}, {m[k]['ci'][1]:.3f}] |" for k in HEADLINE]
    lines += ["", "| class | recall | precision | n |", "|---|---|---|---|"]
    lines += [f"| {label} | {v['recall']:.3f} | {v['precision']:.3f} | {v['support']} |" for label, v in m["per_class"].items()]
    lines += [""]
    if result.get("device_shifts"):
        lines += ["Simulated machine differences (the same images, each shifted one way; a large drop means the model leans on that cue):", "",
                  "| shift | macro ROC AUC | change | balanced accuracy |", "|---|---|---|---|"]
        lines += [f"| {name} | {v['roc_auc']:.3f} | {v['roc_auc'] - m['roc_auc']['value']:+.3f} | {v['balanced_accuracy']:.3f} |"
                  for name, v in result["device_shifts"].items()]
        lines += [""]
    if result["training_overlap"]:
        lines.append(f"**LEAKAGE: {len(result['training_overlap'])} image(s) match the model's training images** (these numbers are not external):")
        lines += [f"- [{o['kind']}] {o['path']}" for o in result["training_overlap"]]
    else:
        lines.append("No image matches the model's training fingerprints.")
    if result["unknown_classes"]:
        lines.append(f"Classes the model does not know, left out of the metrics: {result['unknown_classes']}.")
    if result["unreadable"]:
        lines.append(f"{len(result['unreadable'])} unreadable file(s) skipped.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thyroid_classifier.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder written by train.py (or a Hub id)")
    parser.add_argument("data_dir", type=Path, help="DATA/<class>/* or DATA/{train,validation,test}/<class>/*")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: DATA_DIR's name under evaluations/)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--shifts", action="store_true", help="also score the images under simulated machine differences (gain, depth gain, resolution, speckle, aspect, burned-in marks)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or Path("evaluations") / args.data_dir.name
    try:
        predictor = Predictor.from_pretrained(args.model)
        fingerprints_path = Path(args.model) / "fingerprints.json"
        fingerprints = json.loads(fingerprints_path.read_text()) if fingerprints_path.is_file() else []
        if not fingerprints:
            print("warning: the model carries no training fingerprints; leakage against its training data cannot be checked", file=sys.stderr)
        result = evaluate_folder(predictor, fingerprints, args.data_dir, out, args.batch_size, args.bootstrap, progress=not args.quiet, shifts=args.shifts)
    except (DataError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report_markdown(result))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
