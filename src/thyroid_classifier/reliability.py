"""Saying when an answer cannot be trusted: an in-domain guard and conformal prediction sets.

* :class:`DomainGuard` — how unlike the training images an image is, from the per-channel mean and
  standard deviation of one of the model's early stages (``models.guard_features``: the same forward
  pass that gives the probabilities; statistics of how an image looks, the scanner's gain, speckle
  and resolution, more than of what it shows). The
  training features are summarised by their mean and top principal directions; an image's score is
  its Mahalanobis distance in that subspace plus its distance from the subspace (Hotelling's T² and
  the residual Q statistic of process monitoring), so both "an unusual mix of familiar features" and
  "features the training images never had" raise it. The threshold is the ``coverage`` quantile of
  held-out in-source images (validation), so about that share of images like the training ones pass.
* :class:`ConformalSets` — class-conditional split-conformal prediction sets: for each class, the
  threshold on ``1 - p(class)`` below which ``1 - alpha`` of that class's validation images fall. A
  set holds every class whose score passes; when the model cannot tell, it holds several.

Both are fitted at training time and saved in the model folder (``guard.safetensors``, arrays; and
``reliability.json``, thresholds and what they were fitted on); :class:`Reliability` reads them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

GUARD_FILE = "guard.safetensors"
RELIABILITY_FILE = "reliability.json"
#: Share of held-out in-source images the guard's threshold lets through.
DEFAULT_GUARD_COVERAGE = 0.95
#: 1 - the coverage the prediction sets aim for.
DEFAULT_CONFORMAL_ALPHA = 0.10
#: At most this many principal directions describe the training features.
MAX_COMPONENTS = 64
#: What the guard's features are (``models.guard_features``); a folder whose guard was fitted on
#: other features (older versions: the pooled features before the classifier) is not used.
GUARD_FEATURES = "early-stage channel mean and std"


@dataclass
class DomainGuard:
    """Distance of pooled features from the training images' (PCA Mahalanobis + residual)."""

    mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d), orthonormal rows
    variances: np.ndarray  # (k,), variance along each component
    residual_variance: float  # mean squared residual per dimension, on the training features
    threshold: float = math.inf  # scores above it are flagged
    coverage: float = DEFAULT_GUARD_COVERAGE

    @classmethod
    def fit(cls, features: np.ndarray, max_components: int = MAX_COMPONENTS) -> DomainGuard:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 3:
            raise ValueError(f"the guard needs at least 3 training feature vectors, got shape {x.shape}")
        mean = x.mean(0)
        z = x - mean
        # Few images, many dimensions: keep the directions the training images actually vary in.
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        k = int(min(max_components, len(x) - 1, vt.shape[0]))
        variances = s[:k] ** 2 / max(len(x) - 1, 1)
        keep = variances > variances[0] * 1e-8 if k else np.zeros(0, dtype=bool)
        components, variances = vt[:k][keep], variances[keep]
        residual = z - (z @ components.T) @ components
        residual_variance = float(max((residual**2).mean(), 1e-12))
        return cls(mean=mean, components=components, variances=variances, residual_variance=residual_variance)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Per image: (T² + Q) / (k + 1)-ish scale; larger is further from the training images."""
        z = np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean
        projected = z @ self.components.T
        t2 = (projected**2 / self.variances).sum(1)
        residual = z - projected @ self.components
        q = (residual**2).mean(1) / self.residual_variance
        # Both terms are ~k and ~1 on training images: average so neither dominates by its size.
        return (t2 + q) / (len(self.variances) + 1)

    def calibrate(self, held_out_features: np.ndarray, coverage: float = DEFAULT_GUARD_COVERAGE) -> DomainGuard:
        """Set the threshold so that ``coverage`` of these (in-source, not trained on) images pass."""
        if not 0 < coverage < 1:
            raise ValueError(f"guard coverage must be in (0, 1), not {coverage}")
        scores = self.score(held_out_features)
        n = len(scores)
        # The conformal quantile: with n exchangeable in-source images, >= coverage pass in expectation.
        rank = min(n, math.ceil((n + 1) * coverage))
        self.threshold = float(np.sort(scores)[rank - 1]) if n else math.inf
        self.coverage = coverage
        return self

    def flags(self, features: np.ndarray) -> np.ndarray:
        return self.score(features) > self.threshold

    def tensors(self) -> dict[str, np.ndarray]:
        # float64: the score divides by small variances, float32 rounding would move it (<= 64 x d values: small)
        return {"mean": self.mean.astype(np.float64), "components": self.components.astype(np.float64),
                "variances": self.variances.astype(np.float64)}


@dataclass
class ConformalSets:
    """Class-conditional split conformal sets at level ``1 - alpha`` (thresholds on 1 - p(class))."""

    alpha: float
    thresholds: list[float]  # one per class; inf: that class is always in the set (too few examples)
    n_calibration: list[int] = field(default_factory=list)

    @classmethod
    def fit(cls, probs: np.ndarray, labels: Sequence[int], alpha: float = DEFAULT_CONFORMAL_ALPHA) -> ConformalSets:
        if not 0 < alpha < 1:
            raise ValueError(f"--conformal_alpha must be in (0, 1), not {alpha}")
        p = np.asarray(probs, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        thresholds, counts = [], []
        for k in range(p.shape[1]):
            scores = np.sort(1.0 - p[y == k, k])
            n = len(scores)
            rank = math.ceil((n + 1) * (1 - alpha))
            # Too few calibration images of a class for this level: include it always (honest, not small).
            thresholds.append(float(scores[rank - 1]) if 0 < rank <= n else math.inf)
            counts.append(n)
        return cls(alpha=alpha, thresholds=thresholds, n_calibration=counts)

    def sets(self, probs: np.ndarray) -> np.ndarray:
        """Boolean (n, classes): which classes each image's set holds (never empty: the top class
        is added when no class passes)."""
        p = np.atleast_2d(np.asarray(probs, dtype=np.float64))
        member = (1.0 - p) <= np.asarray(self.thresholds)[None, :]
        empty = ~member.any(1)
        member[empty, p[empty].argmax(1)] = True
        return member


@dataclass
class Reliability:
    """What a model folder says about when to trust an answer; either part may be absent."""

    guard: DomainGuard | None = None
    conformal: ConformalSets | None = None
    facts: dict = field(default_factory=dict)  # what they were fitted on, and measured numbers

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.numpy import save_file

        folder = Path(folder)
        payload: dict = {"facts": self.facts}
        if self.guard is not None:
            save_file(self.guard.tensors(), str(folder / GUARD_FILE))
            payload["guard"] = {"features": GUARD_FEATURES, "threshold": self.guard.threshold, "coverage": self.guard.coverage,
                                "residual_variance": self.guard.residual_variance, "components": int(len(self.guard.variances))}
        if self.conformal is not None:
            payload["conformal"] = {"alpha": self.conformal.alpha, "thresholds": self.conformal.thresholds,
                                    "n_calibration": self.conformal.n_calibration}
        (folder / RELIABILITY_FILE).write_text(json.dumps(payload, indent=2, default=_json_float) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path | None) -> Reliability:
        """Read a folder's reliability state; a folder without it (older, or a plain Hub model) gets none."""
        if folder is None or not (Path(folder) / RELIABILITY_FILE).is_file():
            return cls()
        folder = Path(folder)
        payload = json.loads((folder / RELIABILITY_FILE).read_text())
        guard = None
        if "guard" in payload and payload["guard"].get("features") != GUARD_FEATURES:
            logger.warning("%s: its in-domain guard was fitted on other features (%s); answers are not flagged",
                           folder, payload["guard"].get("features", "the pooled features of an older version"))
        elif "guard" in payload and (folder / GUARD_FILE).is_file():
            from safetensors.numpy import load_file

            arrays = load_file(str(folder / GUARD_FILE))
            g = payload["guard"]
            guard = DomainGuard(mean=arrays["mean"].astype(np.float64), components=arrays["components"].astype(np.float64),
                                variances=arrays["variances"].astype(np.float64), residual_variance=float(g["residual_variance"]),
                                threshold=float(g["threshold"]), coverage=float(g["coverage"]))
        conformal = None
        if "conformal" in payload:
            c = payload["conformal"]
            conformal = ConformalSets(alpha=float(c["alpha"]), thresholds=[float(t) for t in c["thresholds"]],
                                      n_calibration=list(c.get("n_calibration", [])))
        return cls(guard=guard, conformal=conformal, facts=payload.get("facts", {}))


def _json_float(value):
    return float(value)


def set_text(members: Sequence[str]) -> str:
    """How a prediction set reads to a person."""
    if len(members) == 1:
        return members[0]
    return " or ".join(members) + ": cannot tell"


def coverage_report(y: Sequence[int], member: np.ndarray) -> dict:
    """Empirical coverage (share of images whose set holds the true class) and mean set size."""
    y = np.asarray(y, dtype=np.int64)
    member = np.asarray(member, dtype=bool)
    if not len(y):
        return {"n": 0, "coverage": math.nan, "mean_set_size": math.nan, "share_singletons": math.nan}
    return {"n": int(len(y)), "coverage": float(member[np.arange(len(y)), y].mean()),
            "mean_set_size": float(member.sum(1).mean()), "share_singletons": float((member.sum(1) == 1).mean())}


def guard_report(y: Sequence[int], probs: np.ndarray, flagged: np.ndarray) -> dict:
    """The share of images the guard flagged, and the macro ROC AUC on those it accepted and on
    those it flagged (NaN where a part is empty or holds one class): is the guard flagging the
    images the model gets wrong?"""
    from .metrics import macro_auc

    y, p, flagged = np.asarray(y), np.asarray(probs), np.asarray(flagged, dtype=bool)

    def auc(mask: np.ndarray) -> float:
        return macro_auc(y[mask], p[mask]) if len(set(y[mask].tolist())) > 1 else math.nan

    return {"n": int(len(y)), "share_flagged": float(flagged.mean()) if len(y) else math.nan,
            "roc_auc_accepted": auc(~flagged), "n_accepted": int((~flagged).sum()),
            "roc_auc_flagged": auc(flagged), "n_flagged": int(flagged.sum())}
