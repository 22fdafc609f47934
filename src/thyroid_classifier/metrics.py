"""Every number the project reports, computed offline with scikit-learn.

* :func:`classification_metrics` — accuracy, balanced accuracy, macro one-vs-rest ROC AUC, macro
  F1, per-class precision / recall / F1 / AUC, confusion matrix, expected calibration error.
* :func:`bootstrap_intervals` — 95% percentile intervals; resamples *groups* (patients) when given,
  since frames of one patient are not independent.
* :func:`paired_difference` — how much better model B is than model A on the same examples, with
  a paired bootstrap interval over patients.
* :func:`fit_temperature` — temperature scaling on validation logits.
* :class:`ThyroidMetrics` — the same numbers behind the ``evaluate.Metric`` interface (no
  ``evaluate.load``, which needs the Hub).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

HEADLINE = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "ece")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def frame_logits(view_logits: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """A frame's logits from its views': the log of the views' mean probability, so that softmax
    gives the average (the Predictor does the same)."""
    z = np.asarray(view_logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    log_p = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))  # log-softmax, stable
    total = np.full((n, z.shape[1]), -np.inf)
    np.logaddexp.at(total, owner, log_p)  # log of the sum of each frame's view probabilities
    return total - np.log(np.bincount(owner, minlength=n))[:, None]


def frame_mean(view_values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """A frame's row from its views' rows: their mean (the guard's features of a split screen)."""
    values = np.asarray(view_values, dtype=np.float64)
    summed = np.zeros((n, values.shape[1]))
    np.add.at(summed, owner, values)
    return summed / np.bincount(owner, minlength=n)[:, None]


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def per_class_auc(y_true: np.ndarray, probs: np.ndarray) -> list[float]:
    """One-vs-rest AUC of each class (NaN where the class is absent or is everything)."""
    out = []
    for k in range(probs.shape[1]):
        positive = y_true == k
        out.append(float(roc_auc_score(positive, probs[:, k])) if 0 < positive.sum() < len(y_true) else math.nan)
    return out


def macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present; for two classes, the plain AUC."""
    if probs.shape[1] == 2:
        return per_class_auc(y_true, probs)[1]
    aucs = [a for a in per_class_auc(y_true, probs) if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def layout_breakdown(y_true: Sequence[int], probs: np.ndarray, split: np.ndarray, label_names: Sequence[str]) -> dict:
    """Does the score follow the screen layout? Macro AUC on single-view frames and on split screens
    alone, and, within each class, how well that class's probability tells split screens from
    single views (AUC; 0.5: not at all, a model that scores the nodule only stays near it)."""
    y, p, split = np.asarray(y_true), np.asarray(probs, dtype=np.float64), np.asarray(split, dtype=bool)
    out: dict = {}
    for name, part in (("single_view", ~split), ("split_screen", split)):
        out[name] = {"n": int(part.sum()), "roc_auc": macro_auc(y[part], p[part]) if len(set(y[part].tolist())) > 1 else math.nan}
    out["layout_auc"] = {}
    for k, label in enumerate(label_names):
        mine = y == k
        if len(set(split[mine].tolist())) == 2:
            out["layout_auc"][label] = float(roc_auc_score(split[mine], p[mine, k]))
    return out


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, label_names: Sequence[str]) -> dict:
    """All point estimates for one set of predictions (``probs``: n x classes, rows sum to 1)."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    pred = p.argmax(axis=1)
    classes = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    aucs = per_class_auc(y, p)
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(set(y)) > 1 else math.nan,
        "roc_auc": macro_auc(y, p),
        "f1_macro": float(f1_score(y, pred, labels=classes, average="macro", zero_division=0)),
        "ece": expected_calibration_error(y, p),
        "per_class": {
            name: {
                "precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                "support": int(support[k]), "roc_auc": aucs[k],
            }
            for k, name in enumerate(label_names)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=classes).tolist(),
    }


def group_resamples(n: int, groups: Sequence[str] | None, n_resamples: int, seed: int):
    """Index arrays of bootstrap resamples of ``n`` rows that draw whole groups with replacement
    (every row its own group when ``groups`` is None)."""
    if groups is None:
        members = [np.array([i]) for i in range(n)]
    else:
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        members = [np.array(v) for v in by_group.values()]
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        pick = rng.integers(0, len(members), len(members))
        yield np.concatenate([members[j] for j in pick])


def bootstrap_intervals(
    y_true: Sequence[int],
    probs: np.ndarray,
    label_names: Sequence[str],
    groups: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, list[float]]:
    """95% percentile bootstrap intervals of the headline metrics.

    With ``groups`` the resampling draws whole groups (patients) with replacement, so correlated
    frames of one patient do not make the interval look tighter than the data allow.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    samples: dict[str, list[float]] = {k: [] for k in HEADLINE}
    for idx in group_resamples(len(y), groups, n_resamples, seed):
        yb, pb = y[idx], p[idx]
        predb = pb.argmax(axis=1)
        samples["accuracy"].append(float((predb == yb).mean()))
        samples["ece"].append(expected_calibration_error(yb, pb))
        if len(set(yb)) < 2:
            continue  # the class-balanced numbers are undefined on a one-class resample
        samples["balanced_accuracy"].append(float(balanced_accuracy_score(yb, predb)))
        samples["roc_auc"].append(macro_auc(yb, pb))
        samples["f1_macro"].append(float(f1_score(yb, predb, labels=list(range(len(label_names))), average="macro", zero_division=0)))
    out = {}
    for key, values in samples.items():
        values = [v for v in values if not math.isnan(v)]
        out[key] = [float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))] if values else [math.nan, math.nan]
    return out


def paired_difference(
    y_true: Sequence[int],
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    groups: Sequence[str] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict]:
    """B minus A on the same examples, for macro ROC AUC and balanced accuracy, with a paired
    bootstrap interval: each resample draws patients once and scores both models on them, so the
    patients both models find hard do not widen the interval of the difference (two separate
    intervals overlap far more than the difference is uncertain)."""
    y = np.asarray(y_true, dtype=np.int64)
    a, b = np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)
    if a.shape != b.shape or len(a) != len(y):
        raise ValueError(f"the two prediction sets differ in shape ({a.shape} vs {b.shape}, {len(y)} labels)")
    scores = {"roc_auc": macro_auc, "balanced_accuracy": lambda yy, pp: float(balanced_accuracy_score(yy, pp.argmax(axis=1)))}
    diffs: dict[str, list[float]] = {k: [] for k in scores}
    for idx in group_resamples(len(y), groups, n_resamples, seed):
        if len(set(y[idx])) < 2:
            continue  # both numbers are undefined on a one-class resample
        for key, score in scores.items():
            d = score(y[idx], b[idx]) - score(y[idx], a[idx])
            if not math.isnan(d):
                diffs[key].append(d)
    out = {}
    for key, score in scores.items():
        va, vb, ds = score(y, a), score(y, b), np.asarray(diffs[key])
        out[key] = {"a": va, "b": vb, "difference": vb - va,
                    "ci": [float(np.quantile(ds, alpha / 2)), float(np.quantile(ds, 1 - alpha / 2))] if len(ds) else [math.nan, math.nan],
                    "share_b_better": float((ds > 0).mean()) if len(ds) else math.nan, "resamples": int(len(ds))}
    return out


def with_intervals(metrics: dict, intervals: dict[str, list[float]]) -> dict:
    """Headline metrics as ``{"value": x, "ci": [low, high]}``; everything else unchanged."""
    out = dict(metrics)
    for key in HEADLINE:
        out[key] = {"value": metrics[key], "ci": intervals[key]}
    return out


def fit_temperature(logits: np.ndarray, y_true: Sequence[int]) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)

    def nll(log_t: float) -> float:
        p = softmax(z, math.exp(log_t))
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


def _evaluate_metric_base():
    import evaluate

    return evaluate.Metric


class ThyroidMetrics(_evaluate_metric_base()):
    """``evaluate.Metric`` for image classification: ``compute(predictions=probs, references=labels)``."""

    def __init__(self, label_names: Sequence[str], **kwargs) -> None:
        kwargs.setdefault("keep_in_memory", True)  # no cache files: safe under several processes
        super().__init__(**kwargs)
        self.label_names = list(label_names)

    def _info(self):
        import datasets
        import evaluate

        return evaluate.MetricInfo(
            description="Accuracy, balanced accuracy, macro ROC AUC, macro F1, per-class numbers, ECE.",
            citation="",
            inputs_description="predictions: class probabilities (n x k); references: class ids (n)",
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Value("int64"),
            }),
        )

    def _compute(self, predictions, references):
        return classification_metrics(references, np.asarray(predictions), self.label_names)


def scored(y_true: Sequence[int], probs: np.ndarray, label_names: Sequence[str], groups: Sequence[str] | None = None,
           n_resamples: int = 1000, seed: int = 0) -> dict:
    """Every metric of one prediction set with its 95% interval (patients resampled when ``groups``)."""
    metrics = classification_metrics(y_true, probs, label_names)
    return with_intervals(metrics, bootstrap_intervals(y_true, probs, label_names, groups=groups, n_resamples=n_resamples, seed=seed))


def by_source(y_true: Sequence[int], probs: np.ndarray, label_names: Sequence[str], groups: Sequence[str], sources: Sequence[str],
              n_resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
    """:func:`scored` for each source's examples alone (empty when there is only one source): a
    pooled number can hide a source the model fails on, or one it wins on by recognising the scanner."""
    sources = np.asarray(sources)
    names = sorted(set(sources.tolist()))
    if len(names) < 2:
        return {}
    y, p, g = np.asarray(y_true), np.asarray(probs), np.asarray(groups)
    return {name: scored(y[sources == name], p[sources == name], label_names, list(g[sources == name]), n_resamples, seed)
            for name in names}


def separation_auc(in_scores: Sequence[float], out_scores: Sequence[float]) -> float:
    """How well a score (higher: more unusual) tells ``out`` images from ``in`` ones (ROC AUC)."""
    a, b = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if not len(a) or not len(b):
        return math.nan
    return float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))
