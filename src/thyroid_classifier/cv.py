"""Leave-K-folds-out: every split pooled, K folds stratified by source x class and grouped by
patient, the same recipe trained on each, pooled out-of-fold metrics (``--cv``)."""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .arguments import DataArguments, ModelArguments, RunArguments, recipe
from .descriptors import descriptor_report, frame_labels, frame_nodule_boxes, nodule_report, predicted_report
from .fit import distributed_state, train_one
from .folder import CV_METRICS, CV_PREDICTIONS, ModelFolder, prediction_rows, write_predictions
from .known_data import sources_facts
from .metrics import HEADLINE, bootstrap_intervals, by_source, classification_metrics, layout_breakdown, softmax, with_intervals
from .models import ModelSpec
from .plots import plot_cv_roc

logger = logging.getLogger(__name__)


@dataclass
class PooledFolds:
    """Every split of a data set pooled into one, with K folds stratified by class and grouped by
    patient: what ``--cv`` trains on, and what the benchmarks reuse to score on the same folds."""

    full: object  # datasets.Dataset
    labels: list[str]
    y: np.ndarray
    groups: list[str]
    paths: list[str]
    folds: list[tuple[np.ndarray, np.ndarray]]
    sources: list[str] = field(default_factory=list)

    @property
    def fold_of(self) -> np.ndarray:
        """The fold (1..K) in which each example is held out."""
        out = np.zeros(len(self.y), dtype=int)
        for k, (_, held) in enumerate(self.folds, start=1):
            out[held] = k
        return out


def pooled(dataset) -> PooledFolds:
    """``dataset`` (a DatasetDict) pooled into one, without folds (leave-one-source-out splits by source)."""
    from datasets import concatenate_datasets

    full = concatenate_datasets(list(dataset.values())) if len(dataset) > 1 else dataset["train"]
    raw = full.with_format(None)
    y = np.array([int(v) for v in raw["label"]])
    sources = list(raw["source"]) if "source" in raw.column_names else [""] * len(y)
    return PooledFolds(full, full.features["label"].names, y, list(raw["group"]), list(raw["path"]), [], sources)


def pooled_folds(dataset, k: int, seed: int) -> PooledFolds:
    """``dataset`` (a DatasetDict) pooled, with ``data.cv_folds`` stratified by source x class."""
    from .data import cv_folds, strata

    pool = pooled(dataset)
    pool.folds = cv_folds(strata(pool.y, pool.sources), pool.groups, k, seed)
    return pool


def cross_validate(
    spec: ModelSpec,
    dataset,
    report,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_args: RunArguments,
    callbacks: Sequence = (),
) -> dict:
    """K-fold cross-validation grouped by patient and stratified by class, same recipe every fold.

    Each fold's training part gives up a group-aware validation share (the temperature, the
    validation curves, and early stopping with ``--select_best``); the held-out fold is predicted once. Pooled out-of-fold predictions give the
    headline numbers, with bootstrap intervals that resample patients.
    """
    state = distributed_state()
    out = Path(run_args.output_dir) / spec.name
    folder = ModelFolder(out)
    cv_set = pooled_folds(dataset, run_args.cv, run_args.seed)
    full, labels, y, groups, paths, folds = cv_set.full, cv_set.labels, cv_set.y, cv_set.groups, cv_set.paths, cv_set.folds
    oof = np.full((len(y), len(labels)), np.nan)
    oof_descriptors: dict[str, np.ndarray] = {}  # descriptor -> out-of-fold logits (a model with descriptor heads)
    oof_nodules: dict[str, np.ndarray] = {}  # the same read from each frame's nodule box (NaN: no outline)
    oof_predicted: dict[str, np.ndarray] = {}  # the same read as without a box (an outline head's predicted nodule, else the frame)
    oof_found = np.full((len(y), 4), np.nan)  # the nodule boxes the outline head predicted (NaN: none)
    per_fold = []
    cache: dict = {}
    started = time.time()
    for k, (pool, held) in enumerate(folds, start=1):
        fold_data = with_validation(full.select([int(i) for i in pool]), data_args, run_args.seed + k)
        fold_data["test"] = full.select([int(i) for i in held])
        logger.info("%s fold %d/%d: train %d, validation %d, test %d", spec.name, k, run_args.cv,
                    len(fold_data["train"]), len(fold_data["validation"]), len(fold_data["test"]))
        fold_dir = out / "cv" / f"fold-{k}"
        result = train_one(spec, fold_data, report, data_args, model_args, run_args, callbacks, out=fold_dir, write=False, cache=cache)
        oof[held] = result.probs
        for name, logits in (result.descriptor_logits or {}).items():
            oof_descriptors.setdefault(name, np.full((len(y), logits.shape[1]), np.nan))[held] = logits
        for name, logits in (result.nodule_descriptor_logits or {}).items():
            oof_nodules.setdefault(name, np.full((len(y), logits.shape[1]), np.nan))[held] = logits
        for name, logits in (result.predicted_descriptor_logits or {}).items():
            oof_predicted.setdefault(name, np.full((len(y), logits.shape[1]), np.nan))[held] = logits
        if result.predicted_nodule_boxes is not None:
            oof_found[held] = result.predicted_nodule_boxes
        m = result.metrics["test"]
        per_fold.append({"fold": k, "n": m["n"], **{key: m[key]["value"] for key in HEADLINE},
                         "recall": {label: v["recall"] for label, v in m["per_class"].items()},
                         "epochs_run": result.metrics["training"]["epochs_run"], "temperature": result.metrics["calibration"]["temperature"]})
        if state.is_main_process:
            print(f"{spec.name} fold {k}/{run_args.cv}: held-out macro ROC AUC {m['roc_auc']['value']:.3f}, n={m['n']}, "
                  f"{result.metrics['training']['epochs_run']:.0f} epochs", flush=True)
            shutil.rmtree(fold_dir / "checkpoints", ignore_errors=True)  # optimizer state of a fold is not needed again
    wall = time.time() - started
    fold_of = cv_set.fold_of
    pooled = classification_metrics(y, oof, labels)
    intervals = bootstrap_intervals(y, oof, labels, groups=groups, n_resamples=run_args.bootstrap_resamples, seed=run_args.seed)
    spread = {key: {"mean": float(np.nanmean([f[key] for f in per_fold])), "sd": float(np.nanstd([f[key] for f in per_fold], ddof=1)),
                    "min": float(np.nanmin([f[key] for f in per_fold])), "max": float(np.nanmax([f[key] for f in per_fold]))} for key in HEADLINE}
    cv = {
        "model": spec.name, "checkpoint": spec.checkpoint, "init": model_args.init, "k": run_args.cv, "labels": labels,
        "n": int(len(y)), "groups": len(set(groups)), "wall_seconds": round(wall, 1),
        "pooled": with_intervals(pooled, intervals),
        "by_source": by_source(y, oof, labels, groups, cv_set.sources, run_args.bootstrap_resamples, run_args.seed),
        "per_fold": per_fold, "spread": spread,
        "data": {"data_dir": " + ".join(report.sources.values()) if len(report.sources) > 1 else report.root,
                 "dataset": sources_facts(report.sources or {"": report.root}), "counts": dict(Counter(labels[i] for i in y))},
        "recipe": {"image_size": model_args.image_size, **recipe(run_args),
                   "preprocessing": asdict(data_args.preprocessor())},
    }
    if oof_descriptors and all(not np.isnan(v).any() for v in oof_descriptors.values()):
        # Pooled out-of-fold agreement with the radiologist, per descriptor (the folds' own are on a few dozen frames each).
        targets = frame_labels(paths, cv_set.sources, report.sources or {}, str(report.root))
        cv["descriptors"] = descriptor_report({name: softmax(v) for name, v in oof_descriptors.items()}, targets, groups, y, labels, run_args.bootstrap_resamples, run_args.seed)
        cv["descriptors"]["split"] = "pooled out-of-fold"
        cv["descriptors"]["read_from"] = "frame"
        from_box = nodule_report(oof_nodules, targets, groups, y, labels, run_args.bootstrap_resamples, run_args.seed) if oof_nodules else None
        if from_box:
            cv["descriptors"]["from_nodule_box"] = {**from_box, "split": "pooled out-of-fold"}
        if oof_predicted and all(not np.isnan(v).any() for v in oof_predicted.values()):
            true_boxes = frame_nodule_boxes(paths, cv_set.sources, report.sources or {}, str(report.root))
            cv["descriptors"]["from_predicted_nodule"] = {**predicted_report(oof_predicted, oof_found, true_boxes, targets, groups, y, labels,
                                                                             run_args.bootstrap_resamples, run_args.seed), "split": "pooled out-of-fold"}
    # Split screens can stand in for the label (on DDTI they do): report how the score follows them.
    split = report.split_screens(paths)
    if split.any() and not split.all():
        cv["by_layout"] = layout_breakdown(y, oof, split, labels)
    if state.is_main_process:
        folder.write_json(CV_METRICS, cv)
        plot_cv_roc(y, oof, fold_of, labels, out / "cv_roc.png", f"{spec.name}, {run_args.cv}-fold CV")
        write_predictions(folder.file(CV_PREDICTIONS), labels, prediction_rows(paths, labels, y, oof, group=groups, source=cv_set.sources, fold=fold_of.tolist()))
        a = cv["pooled"]["roc_auc"]
        print(f"{spec.name}: {run_args.cv}-fold CV pooled macro ROC AUC {a['value']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] "
              f"(folds {spread['roc_auc']['mean']:.3f} ± {spread['roc_auc']['sd']:.3f}), balanced accuracy "
              f"{cv['pooled']['balanced_accuracy']['value']:.3f}, n={len(y)}, {wall / 60:.1f} min -> {folder.file(CV_METRICS)}")
        for name, m in cv["by_source"].items():
            print(f"{spec.name}: source {name}: pooled out-of-fold macro ROC AUC {m['roc_auc']['value']:.3f} "
                  f"[{m['roc_auc']['ci'][0]:.3f}, {m['roc_auc']['ci'][1]:.3f}], balanced accuracy {m['balanced_accuracy']['value']:.3f}, n={m['n']} (in-source)")
        described = cv.get("descriptors") or {}
        for part, where in ((described, "the whole frame"), (described.get("from_nodule_box") or {}, "the radiologist's nodule box"),
                            (described.get("from_predicted_nodule") or {}, "the predicted nodule (else the whole frame)")):
            for name, r in part.get("per_descriptor", {}).items():
                k = r["kappa"]
                print(f"{spec.name}: descriptor {name} read from {where}: pooled out-of-fold Cohen's kappa {k['value']:.3f} "
                      f"[{k['ci'][0]:.3f}, {k['ci'][1]:.3f}], n={k['n']} frames, {k['patients']} patients (in-source)")
            if "route" in part:
                a = part["route"]["auc_malignant"]
                print(f"{spec.name}: descriptor route (expected ACR points) read from {where}: malignant AUC {a['value']:.3f} "
                      f"[{a['ci'][0]:.3f}, {a['ci'][1]:.3f}], n={part['route']['n']}")
            if "localisation" in part:
                loc = part["localisation"]
                print(f"{spec.name}: predicted nodule boxes: found on {part['found']} of {part['frames']} frames; median IoU with the radiologist's "
                      f"{loc['iou_median']:.2f}; IoU >= 0.5 on {loc['iou_at_least_half']:.0%} of {loc['outlined']} outlined frames")
        if "by_layout" in cv:
            b = cv["by_layout"]
            print(f"{spec.name}: split screens {b['split_screen']['n']} of {len(y)} frames; AUC on single-view frames {b['single_view']['roc_auc']:.3f}, "
                  f"on split screens {b['split_screen']['roc_auc']:.3f}; within each class the score tells split screens from single views with AUC "
                  + ", ".join(f"{label} {v:.2f}" for label, v in b["layout_auc"].items()) + " (0.5: it does not)")
    if run_args.cv_final:
        final_data = with_validation(full, data_args, run_args.seed)
        result = train_one(spec, final_data, report, data_args, model_args, run_args, callbacks, cache=cache)
        if state.is_main_process:
            # The final model's folder carries the CV numbers; its card is re-rendered with them.
            folder.update_metrics(cross_validation={k: cv[k] for k in ("k", "n", "groups", "pooled", "by_source", "spread", "by_layout", "descriptors") if k in cv})
        del result
    return cv


def with_validation(pool, data_args: DataArguments, seed: int):
    """``pool`` as train and validation (a group-aware share, at least 10%, for the temperature,
    the validation curves and, with ``--select_best``, early stopping): a cross-validation fold's training part, or all the data for a final model."""
    from datasets import DatasetDict

    from .data import group_holdout, strata

    raw = pool.with_format(None)
    sources = list(raw["source"]) if "source" in raw.column_names else [""] * len(raw)
    mask = group_holdout(strata([int(v) for v in raw["label"]], sources), list(raw["group"]), max(0.1, data_args.validation_size), seed)
    return DatasetDict({
        "train": pool.select([i for i, v in enumerate(mask) if not v]),
        "validation": pool.select([i for i, v in enumerate(mask) if v]),
    })

