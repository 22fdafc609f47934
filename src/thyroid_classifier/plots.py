"""Figures from metrics and training histories (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from .metrics import HEADLINE  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(history: Sequence[Mapping], path: Path, title: str = "") -> Path:
    """Training and validation loss per epoch (from ``Trainer.state.log_history``)."""
    train = [(h["epoch"], h["loss"]) for h in history if "loss" in h]
    val = [(h["epoch"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if train:
        ax.plot(*zip(*train, strict=True), marker="o", label="train")
    if val:
        ax.plot(*zip(*val, strict=True), marker="s", label="validation")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title=f"Loss {title}".strip())
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_auc(history: Sequence[Mapping], path: Path, title: str = "") -> Path:
    """Validation macro ROC AUC per epoch."""
    points = [(h["epoch"], h["eval_roc_auc"]) for h in history if "eval_roc_auc" in h]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if points:
        ax.plot(*zip(*points, strict=True), marker="o", color="tab:green")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set(xlabel="epoch", ylabel="macro ROC AUC (validation)", ylim=(0, 1.02), title=f"AUC {title}".strip())
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_roc(y_true: Sequence[int], probs: np.ndarray, labels: Sequence[str], path: Path, title: str = "") -> Path:
    """One-vs-rest ROC curve per class."""
    y = np.asarray(y_true)
    fig, ax = plt.subplots(figsize=(5, 5))
    for k, name in enumerate(labels):
        positive = y == k
        if 0 < positive.sum() < len(y):
            fpr, tpr, _ = roc_curve(positive, probs[:, k])
            ax.plot(fpr, tpr, label=f"{name} (n={int(positive.sum())})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC {title}".strip(), aspect="equal")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_cv_roc(y_true: Sequence[int], probs: np.ndarray, folds: Sequence[int], labels: Sequence[str], path: Path, title: str = "") -> Path:
    """Cross-validation ROC: pooled out-of-fold curve (bold) and each fold's (thin), for the last
    class (malignant when present) against the rest."""
    y = np.asarray(y_true)
    folds = np.asarray(folds)
    k = len(labels) - 1
    fig, ax = plt.subplots(figsize=(5, 5))
    for fold in sorted(set(folds.tolist())):
        sel = folds == fold
        positive = y[sel] == k
        if 0 < positive.sum() < sel.sum():
            fpr, tpr, _ = roc_curve(positive, probs[sel, k])
            ax.plot(fpr, tpr, linewidth=1, alpha=0.6, label=f"fold {fold}")
    fpr, tpr, _ = roc_curve(y == k, probs[:, k])
    ax.plot(fpr, tpr, linewidth=2.5, color="black", label="pooled")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel=f"true positive rate ({labels[k]})", title=f"ROC {title}".strip(), aspect="equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str = "") -> Path:
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2.5, 1.1 * len(labels) + 2))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="true", title=f"Confusion matrix {title}".strip())
    return _save(fig, path)


def plot_comparison(results: Mapping[str, Mapping], path: Path, split: str = "test") -> Path:
    """The models side by side: each headline metric with its 95% interval."""
    names = list(results)
    metrics = [m for m in HEADLINE]
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, name in enumerate(names):
        values = np.array([results[name][m]["value"] for m in metrics], dtype=float)
        ci = np.array([results[name][m]["ci"] for m in metrics], dtype=float)
        err = np.abs(np.stack([values - ci[:, 0], ci[:, 1] - values]))
        ax.bar(x + i * width - 0.4 + width / 2, values, width, yerr=np.nan_to_num(err), capsize=3, label=name)
    ax.set(xticks=x, xticklabels=[m.replace("_", " ") for m in metrics], ylim=(0, 1.05),
           title=f"{split} metrics with 95% bootstrap intervals (ECE: lower is better)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_guard_scores(scores: Sequence[float], threshold: float, path: Path, expected_flagged: float, title: str = "") -> Path:
    """A site's guard scores (log scale) against the model's threshold: what lies right of the line
    is flagged as unlike the training images (``expected_flagged`` of the model's own held-out frames were)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s) & (s > 0)]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if len(s):
        bins = np.geomspace(min(s.min(), threshold) * 0.9, max(s.max(), threshold) * 1.1, 40)
        ax.hist(s, bins=bins, color="tab:blue", alpha=0.8, label=f"these frames (n = {len(s)}), {np.mean(s > threshold):.0%} flagged")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold ({expected_flagged:.0%} of its own held-out frames beyond)")
    ax.set_xscale("log")
    ax.set(xlabel="guard score (larger: further from the training images)", ylabel="frames", title=f"Guard scores {title}".strip())
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
