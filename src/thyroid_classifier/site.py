"""Before anyone labels: how a new site's frames sit against a model's training sources.

    python -m thyroid_classifier.evaluate MODEL SITE_DIR --unlabelled [--out DIR]

For a folder of frames (any layout; labels, if any, are ignored), the model's answers as the page
would give them for a hospital it never saw (the unseen-source regime), set against what its folder
says about its own training sources:

- the share the guard flags as unlike the training images (on the model's own held-out frames it is
  ``1 - coverage`` by design) and where the scores lie relative to the threshold;
- the prediction sets' sizes and the share of frames that would get a label;
- the predicted class balance beside the training class balance;
- frames that are copies or near-copies of the model's training images (its fingerprints);

a histogram of the guard's scores and one paragraph a person can act on. Writes ``site_report.json``,
``site_report.md``, ``site_predictions.csv`` and ``site_guard_scores.png`` into the output folder.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .answer_rule import UNSEEN
from .audit import inspect_file, training_overlap
from .folder import ModelFolder, prediction_rows, write_predictions
from .plots import plot_guard_scores
from .predict import Predictor, list_files
from .preprocess import ImageError, open_image

REPORT_JSON, REPORT_MD, PREDICTIONS_CSV, SCORES_PNG = "site_report.json", "site_report.md", "site_predictions.csv", "site_guard_scores.png"
#: A predicted class share this far from the training share is worth a sentence.
BALANCE_GAP = 0.25


def training_balance(metrics: Mapping) -> dict[str, float]:
    """Each class's share of the model's training split (from its ``metrics.json``), or {} if unknown."""
    counts = ((metrics.get("data") or {}).get("counts") or {}).get("train") or {}
    total = sum(counts.values())
    return {label: n / total for label, n in counts.items()} if total else {}


def site_report(predictor: Predictor, fingerprints: Sequence[dict], site_dir: Path, out_dir: Path, batch_size: int = 8,
                progress: bool = True, model_name: str = "the model") -> dict:
    """Score every frame under ``site_dir`` (unlabelled) and write the report; returns it as data."""
    site_dir, out_dir = Path(site_dir), Path(out_dir)
    files = list_files(site_dir)
    if not files:
        raise ValueError(f"{site_dir}: no files found")
    out_dir.mkdir(parents=True, exist_ok=True)
    kept, results, infos, unreadable = [], [], [], []
    for start in tqdm(range(0, len(files), batch_size), desc="site", disable=not progress):
        images, paths = [], []
        for path in files[start : start + batch_size]:
            name = str(path.relative_to(site_dir))
            try:
                images.append(open_image(path, name=name))
                paths.append(path)
            except ImageError as exc:  # reported, never fatal
                unreadable.append({"path": name, "error": str(exc)})
        if images:
            results += predictor.predict(images, explain=False)  # no source said: the regime for a hospital it never saw
            kept += paths
            infos += [inspect_file(p, label="", split="site") for p in paths]
    labels = list(predictor.labels)
    guard = predictor.reliability.guard
    scores = np.array([np.nan if r.in_domain_score is None else r.in_domain_score for r in results], dtype=np.float64)
    flagged = np.array([r.flagged for r in results], dtype=bool)
    sizes = Counter(len(r.prediction_set) for r in results)
    predicted = Counter(r.label for r in results)
    n = len(results)
    overlap = training_overlap([i for i in infos if not i.error], fingerprints)
    for item in overlap:
        item["path"] = str(Path(item["path"]).relative_to(site_dir))
    report = {
        "model": model_name,
        "site": str(site_dir), "n": n, "unreadable": unreadable,
        "training_sources": list(predictor.training_sources),
        "guard": None if guard is None else {
            "threshold": guard.threshold, "expected_flagged_in_source": round(1 - guard.coverage, 4),
            "flagged": float(flagged.mean()) if n else float("nan"),
            "score_over_threshold_quantiles": {f"q{int(q * 100)}": float(np.nanquantile(scores / guard.threshold, q)) for q in (0.1, 0.5, 0.9)} if n else {},
        },
        "set_sizes": {str(k): sizes.get(k, 0) / n for k in range(1, len(labels) + 1)} if n else {},
        "headlined": float(np.mean([r.headlined for r in results])) if n else float("nan"),
        # without it (no --loso) the rule states no label for another hospital's frame, whatever the frame
        "measured_on_unseen_sources": UNSEEN in predictor.reliability.regimes,
        "predicted_balance": {label: predicted.get(label, 0) / n for label in labels} if n else {},
        "training_balance": training_balance(predictor.info),
        "training_overlap": overlap,
    }
    report["advice"] = advice(report)
    ModelFolder(out_dir).write_json(REPORT_JSON, report)
    (out_dir / REPORT_MD).write_text(report_markdown(report) + "\n")
    rows = prediction_rows([str(p.relative_to(site_dir)) for p in kept], labels, None,
                           np.array([[r.probabilities[c] for c in labels] for r in results]).reshape(n, len(labels)),
                           in_domain_score=scores.tolist(), flagged=flagged.tolist(), prediction_set=[r.prediction_set for r in results],
                           answer=[r.headline for r in results], headlined=[r.headlined for r in results])
    write_predictions(out_dir / PREDICTIONS_CSV, labels, rows)
    if guard is not None and n:
        plot_guard_scores(scores, guard.threshold, out_dir / SCORES_PNG, 1 - guard.coverage, title=f"of {site_dir.parent.name}/{site_dir.name}")
    return report


def advice(report: Mapping) -> str:
    """One paragraph from the report's numbers: what they mean for using or adapting the model here."""
    sentences: list[str] = []
    guard = report["guard"]
    if guard is not None:
        flagged, expected = guard["flagged"], guard["expected_flagged_in_source"]
        if flagged >= 0.5:
            sentences.append(f"Most of these frames ({flagged:.0%}) look unlike the images the model learned from (of its own held-out "
                             f"frames, {expected:.0%} did, by design): it answers \"Not reliable\" for them, so as it is it cannot be used here. "
                             "Labelling frames of this site and training with them as one more source is the way on.")
        elif flagged > 2 * expected + 0.05:
            sentences.append(f"{flagged:.0%} of these frames look unlike the training images, against {expected:.0%} of the model's own "
                             "held-out frames: this site differs from its training sources, and many answers will be \"Not reliable\".")
        else:
            sentences.append(f"As far as the guard can tell these frames look like the training images ({flagged:.0%} flagged, "
                             f"{expected:.0%} expected). That does not show that its answers hold here: label a sample and evaluate it.")
    else:
        sentences.append("The model carries no guard, so nothing here says how unlike its training images these frames are.")
    if report.get("measured_on_unseen_sources", True):
        sentences.append(f"For a hospital it never saw, it would state a label for {report['headlined']:.0%} of them.")
    else:
        sentences.append("It was never measured on a source it did not see (trained without --loso), so for frames from another "
                         "hospital it states no label at all.")
    gaps = {c: report["predicted_balance"].get(c, 0) - s for c, s in report["training_balance"].items()}
    if gaps and max(abs(g) for g in gaps.values()) >= BALANCE_GAP:
        shown = ", ".join(f"{c} {report['predicted_balance'].get(c, 0):.0%} (trained on {report['training_balance'][c]:.0%})" for c in gaps)
        sentences.append(f"Its predicted classes ({shown}) are far from its training balance: either this site sees other patients, "
                         "or the model reads something of these frames (the machine, the layout) as a class.")
    if report["training_overlap"]:
        sentences.append(f"{len(report['training_overlap'])} frame(s) are copies or near-copies of its training images: leave them out of any "
                         "evaluation of this model.")
    if report["unreadable"]:
        sentences.append(f"{len(report['unreadable'])} file(s) could not be read (listed in the report).")
    return " ".join(sentences)


def report_markdown(report: Mapping) -> str:
    lines = [f"# {report['site']} against {report['model']} (before labelling)", "",
             f"{report['n']} frames; the model was trained on {', '.join(report['training_sources']) or 'unnamed sources'}.", "",
             report["advice"], ""]
    guard = report["guard"]
    if guard is not None:
        q = guard["score_over_threshold_quantiles"]
        lines += [f"- Flagged as unlike the training images: {guard['flagged']:.0%} (its own held-out frames: {guard['expected_flagged_in_source']:.0%}); "
                  f"guard score / threshold: 10th percentile {q.get('q10', float('nan')):.2f}, median {q.get('q50', float('nan')):.2f}, "
                  f"90th {q.get('q90', float('nan')):.2f} ({SCORES_PNG})."]
    lines += ["- Prediction set sizes: " + ", ".join(f"{k} class(es) {v:.0%}" for k, v in report["set_sizes"].items()) + "; a label stated for "
              f"{report['headlined']:.0%}."]
    lines += ["- Predicted balance: " + ", ".join(f"{c} {v:.0%}" for c, v in report["predicted_balance"].items())
              + ("; training balance: " + ", ".join(f"{c} {v:.0%}" for c, v in report["training_balance"].items()) if report["training_balance"] else "") + "."]
    lines += [f"- Copies or near-copies of training images: {len(report['training_overlap'])}."]
    lines += [f"  - [{o['kind']}] {o['path']}" for o in report["training_overlap"][:20]]
    if report["unreadable"]:
        lines += [f"- Unreadable: {len(report['unreadable'])}."] + [f"  - {u['error']}" for u in report["unreadable"][:20]]
    return "\n".join(lines)
