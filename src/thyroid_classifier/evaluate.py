"""External validation: score a trained model on any labelled folder, with the same metrics.

    python -m thyroid_classifier.evaluate MODEL DATA_DIR [DATA_DIR ...] [--out DIR] [--shifts]
    python -m thyroid_classifier.evaluate MODEL SITE_DIR --unlabelled [--out DIR]   # before labelling: thyroid_classifier.site

Writes ``predictions.csv``, ``report.json`` / ``report.md`` (metrics with 95% intervals resampling
patients, per-class numbers, ROC and confusion plots) and the folder's audit. The audit includes a
check against the fingerprints (perceptual hashes, never images) of the model's training images, so
an "external" set that shares images with the training data is flagged as leakage. Labels are
matched by canonical name; a class the model does not know is reported, and left out of the
metrics rather than silently mapped. ``--shifts`` also scores the same images under simulated
machine differences (:func:`thyroid_classifier.augment.device_shifts`), to show which cues the model
leans on before a real second-site set is at hand. Several folders are several sources: every
number is also given per source. When the model carries a reliability guard and prediction sets,
the report gives the share of images flagged as unlike the training images, the metrics on the
accepted and on the flagged ones, and the sets' empirical coverage and mean size per source.
"""

from __future__ import annotations

import argparse
from functools import partial
import json
import math
import sys
import types
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .audit import audit_scan, training_overlap
from .augment import device_shifts, shift_image
from .descriptors import CLASSES, descriptor_report, frame_labels, frame_nodule_boxes, nodule_report, one_line, predicted_report, read_outlined
from .data import DataError, as_dirs, resolve_groups, scan_sources, source_name
from .folder import AUDIT, PREDICTIONS, ModelFolder, prediction_rows, write_predictions
from .metrics import HEADLINE, bootstrap_intervals, by_source, classification_metrics, with_intervals
from .reliability import coverage_report, guard_report, regime_report
from .plots import plot_confusion, plot_roc
from .predict import Predictor
from .preprocess import ImageError, open_image


def evaluate_folder(predictor: Predictor, fingerprints: Sequence[dict], data_dir: Path | Sequence[Path], out_dir: Path,
                    batch_size: int = 8, bootstrap: int = 1000, seed: int = 0, progress: bool = True, shifts: bool = False,
                    source_names: Sequence[str] | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    scan = scan_sources(data_dir, source_names)
    report = audit_scan(scan, progress=progress)
    report.save(out_dir / AUDIT)
    overlap = training_overlap(report.readable, fingerprints, report.near_threshold)
    unreadable = {u["path"] for u in report.unreadable}
    groups, group_source = resolve_groups(scan)
    known = set(predictor.labels)
    unknown = Counter(e.label for e in scan.images if e.label not in known and str(e.path) not in unreadable)
    rows = [(e, g) for e, g in zip(scan.images, groups, strict=True) if e.label in known and str(e.path) not in unreadable]
    shift_fns = device_shifts(seed) if shifts else {}
    probs, y, kept_groups, paths, failed, sources, scores, flagged, sets, answers = [], [], [], [], [], [], [], [], [], []
    described: list = []  # the descriptor heads' answers (a model with heads), as a frame without a box is read
    whole: list = []  # the same read from the whole frame (a model with an outline head reads its predicted nodule above)
    found: list = []  # the nodule box each frame's descriptors were read from (None: the whole frame)
    outlining = predictor.descriptors is not None and predictor.descriptors.heads.outline is not None
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
            sources.append(entry.source)
            scores.append(math.nan if result.in_domain_score is None else result.in_domain_score)
            flagged.append(result.flagged)
            sets.append([label in result.prediction_set for label in predictor.labels])
            answers.append((result.headline, result.headlined))
            described.append(result.descriptors)
            found.append(result.nodule_box)
        if outlining:
            whole += [r.descriptors for r in predictor.predict([im for _, _, im in images], explain=False, outline=False)]
        for name, fn in shift_fns.items():  # the same images as another machine might show them
            # Stage 3 of the one inference path: each cropped view as another machine might show it.
            results = predictor.predict([im for _, _, im in images], explain=False, view_transform=partial(shift_image, shift=fn))
            shifted[name] += [[r.probabilities[label] for label in predictor.labels] for r in results]
    if not y:
        raise DataError(f"{data_dir}: no image with a label the model knows ({', '.join(predictor.labels)}); found {dict(unknown)}")
    p = np.asarray(probs)
    metrics = classification_metrics(y, p, predictor.labels)
    intervals = bootstrap_intervals(y, p, predictor.labels, groups=kept_groups, n_resamples=bootstrap, seed=seed)
    result = {
        "model": predictor.source,
        "data_dir": ", ".join(str(d) for d in as_dirs(data_dir)),
        "sources": {name: str(root) for name, root in scan.roots.items()},
        "n": len(y),
        "groups": len(set(kept_groups)),
        "group_source": group_source,
        "calibrated": predictor.calibrated,
        "external": with_intervals(metrics, intervals),
        "by_source": by_source(y, p, predictor.labels, kept_groups, sources, bootstrap, seed),
        "reliability": reliability_report(predictor, y, p, sources, np.asarray(scores), np.asarray(flagged, dtype=bool), np.asarray(sets, dtype=bool),
                                          np.asarray([h for _, h in answers], dtype=bool)),
        "unknown_classes": dict(unknown),
        "unreadable": report.unreadable + failed,
        "training_overlap": overlap,
        "device_shifts": {name: {key: classification_metrics(y, np.asarray(v), predictor.labels)[key] for key in ("roc_auc", "balanced_accuracy")}
                          for name, v in shifted.items()},
        "audit": {k: v for k, v in report.to_dict().items() if k in ("counts", "exact_duplicates", "near_duplicates", "conflicts", "sizes", "modes", "split_screens", "class_cues")},
    }
    if described and all(d is not None for d in described):
        # Agreement with the radiologist where the data's case files give descriptors (DDTI), and the descriptor route's risk.
        def probabilities(rows: list) -> dict[str, np.ndarray]:
            return {name: np.array([[d[name]["probabilities"][t] for t, _ in CLASSES[name]] for d in rows]) for name in rows[0] if name in CLASSES}

        folders = {name: str(root) for name, root in scan.roots.items()}
        targets = frame_labels(paths, sources, folders)
        outlines = frame_nodule_boxes(paths, sources, folders)
        result["descriptors"] = {**descriptor_report(probabilities(whole or described), targets, kept_groups, y, predictor.labels, bootstrap, seed),
                                 "read_from": "frame"}
        # The same heads read from each frame's nodule box where the case files outline it: what a person drawing the box gets.
        logits = read_outlined(predictor.model, predictor.descriptors.heads, predictor.processor, paths, outlines)
        if logits is not None:
            result["descriptors"]["from_nodule_box"] = nodule_report(logits, targets, kept_groups, y, predictor.labels, bootstrap, seed)
        if outlining:  # as the frames were read without a box: the nodule the outline head predicted, where it found one
            boxes = np.array([b if b is not None else (np.nan,) * 4 for b in found], dtype=np.float64)
            result["descriptors"]["from_predicted_nodule"] = predicted_report(
                {name: np.log(np.clip(v, 1e-12, None)) for name, v in probabilities(described).items()}, boxes, outlines, targets, kept_groups, y,
                predictor.labels, bootstrap, seed)
    (out_dir / "report.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    sets_named = [[label for label, inside in zip(predictor.labels, row, strict=True) if inside] for row in sets]
    write_predictions(out_dir / PREDICTIONS, predictor.labels, prediction_rows(paths, predictor.labels, y, np.asarray(p), group=kept_groups, source=sources,
                                                                                 in_domain_score=scores, flagged=flagged, prediction_set=sets_named,
                                                                                 answer=[a for a, _ in answers], headlined=[h for _, h in answers],
                                                                                 tirads_descriptors=[one_line(d) for d in described]))
    plot_roc(y, p, predictor.labels, out_dir / "roc.png", "external")
    plot_confusion(metrics["confusion_matrix"], predictor.labels, out_dir / "confusion_matrix.png", "external")
    (out_dir / "report.md").write_text(report_markdown(result) + "\n")
    return result


def evaluate_model(model: str, data_dir: str | Sequence[str], out_dir: str | None = None, **kwargs) -> dict:
    """Score a trained model (folder or Hub id) on labelled folders it never saw (one source each):
    :func:`thyroid_classifier.evaluate` (the public verb) is this."""
    from .data import source_name

    dirs = [Path(data_dir)] if isinstance(data_dir, str | Path) else [Path(d) for d in data_dir]
    out = Path(out_dir) if out_dir else Path("evaluations") / "+".join(source_name(d) for d in dirs)
    predictor = Predictor.from_pretrained(model)
    return evaluate_folder(predictor, ModelFolder(predictor.folder).fingerprints() if predictor.folder else [], dirs, out, **kwargs)


def reliability_report(predictor: Predictor, y: Sequence[int], probs: np.ndarray, sources: Sequence[str], scores: np.ndarray,
                       flagged: np.ndarray, member: np.ndarray, chosen: np.ndarray | None = None) -> dict:
    """Guard, prediction sets and headlines (the answers given as a source the model never saw) on these
    images, overall and per source (empty parts when the model has none)."""
    y, sources = np.asarray(y), np.asarray(sources)
    out: dict = {}
    names = sorted(set(sources.tolist()))
    parts = {"all": np.ones(len(y), dtype=bool), **({n: sources == n for n in names} if len(names) > 1 else {})}

    if predictor.reliability.guard is not None:
        out["guard"] = {"threshold": predictor.reliability.guard.threshold,
                        **{name: guard_report(y[m], probs[m], flagged[m]) for name, m in parts.items()}}
    if predictor.reliability.conformal is not None:
        out["conformal"] = {"alpha": predictor.reliability.conformal.alpha,
                            **{name: coverage_report(y[m], member[m]) for name, m in parts.items()}}
    if chosen is not None:
        out["headline"] = {name: regime_report(y[m], probs[m], member[m], chosen[m], labels=predictor.labels) for name, m in parts.items()}
    return out


def reliability_lines(rel: dict) -> list[str]:
    lines = []
    if "guard" in rel:
        lines += ["In-domain guard (an image is flagged when it is unlike the model's training images):", "",
                  "| part | n | flagged | macro ROC AUC on accepted | on flagged |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {g['n']} | {g['share_flagged']:.0%} | {g['roc_auc_accepted']:.3f} (n={g['n_accepted']}) | {g['roc_auc_flagged']:.3f} (n={g['n_flagged']}) |"
                  for name, g in rel["guard"].items() if name != "threshold"]
        lines += [""]
    if "conformal" in rel:
        c = rel["conformal"]
        lines += [f"Prediction sets (aimed at {1 - c['alpha']:.0%} coverage on images like the validation images):", "",
                  "| part | n | coverage | mean set size | single-label sets |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {v['n']} | {v['coverage']:.3f} | {v['mean_set_size']:.2f} | {v['share_singletons']:.0%} |"
                  for name, v in c.items() if name != "alpha"]
        lines += [""]
    if "headline" in rel:
        lines += ["Headlined answers (as for a source the model never saw: the default of every face):", "",
                  "| part | n | headlined | wrong among headlined (95% upper bound) | set coverage |", "|---|---|---|---|---|"]
        for name, h in rel["headline"].items():
            err = h["error_headlined"]["value"]
            lines.append(f"| {name} | {h['n']} | {h['n_headlined']} ({h['share_headlined']['value']:.0%}) | "
                         f"{'n/a' if err != err else f'{err:.0%}'} ({h['error_headlined_upper_95']:.0%}) | {h['coverage']['value']:.3f} |")
        lines += [""]
    return lines


def descriptor_report_lines(report: dict | None, external: dict) -> list[str]:
    """The TI-RADS descriptor heads on this data: agreement with the radiologist where case files give descriptors, and
    the descriptor route's risk beside the class head's."""
    if not report:
        return []
    lines = []
    for part, where in ((report, "read from the whole frame"), (report.get("from_nodule_box"), "read from the radiologist's nodule box (outline)"),
                        (report.get("from_predicted_nodule"), "read from the nodule the model located (its outline head), else the whole frame")):
        if not part:
            continue
        lines += [f"TI-RADS descriptors {where} (Cohen's kappa against the radiologist's descriptors, on the frames that have them; "
                  "95% interval over patients):", "", "| descriptor | kappa | 95% interval | frames |", "|---|---|---|---|"]
        for name, r in part["per_descriptor"].items():
            k = r["kappa"]
            lines.append(f"| {name} | {k['value']:.3f} | [{k['ci'][0]:.3f}, {k['ci'][1]:.3f}] | {k['n']} |" if k["n"] else f"| {name} | n/a (no descriptors in this data) | | 0 |")
        route = part.get("route")
        if route:
            a = route["auc_malignant"]
            lines += ["", f"Descriptor route (expected ACR points as a malignancy score) {where}: ROC AUC {a['value']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] "
                      f"on {route['n']} frames; the class head's macro ROC AUC on all {external['n']} frames: {external['roc_auc']['value']:.3f}."]
        loc = part.get("localisation")
        if loc:
            checked = (f"; where the radiologist outlined one ({loc['outlined']} frames) the located box overlaps theirs by at least half (IoU >= 0.5) "
                       f"on {loc['iou_at_least_half']:.0%} (median IoU {loc['iou_median']:.2f} over {loc['found_and_outlined']} frames with both)"
                       if loc["outlined"] else " (no radiologist's outline here to check them against)")
            lines += ["", f"Located a nodule on {part['found']} of {part['frames']} frames{checked}."]
        lines.append("")
    return lines


def report_markdown(result: dict) -> str:
    m = result["external"]
    lines = [f"# External evaluation of {result['model']}", "", f"Data: `{result['data_dir']}`, {result['n']} images from {result['groups']} groups ({result['group_source']}).", "",
             "| metric | value | 95% interval (resampling groups) |", "|---|---|---|"]
    lines += [f"| {k} | {m[k]['value']:.3f} | [{m[k]['ci'][0]:.3f}, {m[k]['ci'][1]:.3f}] |" for k in HEADLINE]
    lines += ["", "| class | recall | precision | n |", "|---|---|---|---|"]
    lines += [f"| {label} | {v['recall']:.3f} | {v['precision']:.3f} | {v['support']} |" for label, v in m["per_class"].items()]
    lines += [""]
    if result.get("by_source"):
        lines += ["Per source:", "", "| source | n | macro ROC AUC | balanced accuracy |", "|---|---|---|---|"]
        lines += [f"| {name} | {v['n']} | {v['roc_auc']['value']:.3f} [{v['roc_auc']['ci'][0]:.3f}, {v['roc_auc']['ci'][1]:.3f}] | "
                  f"{v['balanced_accuracy']['value']:.3f} |" for name, v in result["by_source"].items()]
        lines += [""]
    lines += reliability_lines(result.get("reliability") or {})
    lines += descriptor_report_lines(result.get("descriptors"), m)
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
    parser.add_argument("data_dir", type=Path, nargs="+", help="DATA/<class>/* or DATA/{train,validation,test}/<class>/*; several folders: one source each")
    parser.add_argument("--source_names", nargs="+", default=None, help="a name per data folder (default: the folder's name)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: DATA_DIR's name under evaluations/)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--shifts", action="store_true", help="also score the images under simulated machine differences (gain, depth gain, resolution, speckle, aspect, burned-in marks)")
    parser.add_argument("--unlabelled", action="store_true", help="DATA_DIR is a new site's frames, labelled or not (labels are ignored): "
                        "report how they sit against the model's training sources before anyone labels them (thyroid_classifier.site)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or Path("evaluations") / "+".join(source_name(d) for d in args.data_dir)
    if args.unlabelled and len(args.data_dir) != 1:
        print("error: --unlabelled takes one site folder", file=sys.stderr)
        return 2
    try:
        predictor = Predictor.from_pretrained(args.model)
        fingerprints = ModelFolder(predictor.folder).fingerprints() if predictor.folder else []  # a Hub model's: downloaded
        if not fingerprints:
            print("warning: the model carries no training fingerprints; leakage against its training data cannot be checked", file=sys.stderr)
        if args.unlabelled:  # before labelling: thyroid_classifier.site
            from .site import site_report

            report = site_report(predictor, fingerprints, args.data_dir[0], out, args.batch_size, progress=not args.quiet, model_name=args.model)
        else:
            result = evaluate_folder(predictor, fingerprints, args.data_dir, out, args.batch_size, args.bootstrap, progress=not args.quiet,
                                     shifts=args.shifts, source_names=args.source_names)
    except (DataError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report["advice"] if args.unlabelled else report_markdown(result))
    print(f"\nwritten to {out}")
    return 0


class _CallableModule(types.ModuleType):
    """Importing this module makes it the package's ``evaluate`` attribute (Python's import system
    does that), shadowing the public ``thyroid_classifier.evaluate`` function: calling the module
    calls that function, so ``from thyroid_classifier import evaluate; evaluate(model, data)`` works
    either way."""

    def __call__(self, *args, **kwargs) -> dict:
        return evaluate_model(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    raise SystemExit(main())
