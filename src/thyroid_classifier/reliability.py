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

* :func:`fit_regime` — the sets and the headline threshold of one *regime* of
  :mod:`answer_rule` (``in_source`` from validation; ``unseen`` from leave-one-source-out scores),
  and :func:`regime_report`, what a regime does on labelled frames.

All are fitted at training time and saved in the model folder (``guard.safetensors``, arrays; and
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

from .folder_files import GUARD_FILE, RELIABILITY_FILE
from .answer_rule import IN_SOURCE, REGIMES, UNSEEN, Regime, decide, guard_score, headlined, regime_of, set_members, set_text  # noqa: F401 - set_text: re-exported

logger = logging.getLogger(__name__)

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
        return guard_score(features, self.mean, self.components, self.variances, self.residual_variance)

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
        return set_members(probs, self.thresholds)

    @classmethod
    def fit_worst_case(cls, probs: np.ndarray, labels: Sequence[int], groups: Sequence[str], alpha: float = DEFAULT_CONFORMAL_ALPHA) -> ConformalSets:
        """Mondrian over ``groups`` (sources): each class's threshold is the largest of the groups', so the
        level holds on each group seen, not only on their mix."""
        groups = np.asarray(groups)
        parts = [cls.fit(np.asarray(probs)[groups == g], np.asarray(labels)[groups == g], alpha) for g in sorted(set(groups.tolist()))]
        n_classes = np.asarray(probs).shape[1]
        return cls(alpha=alpha, thresholds=[max(part.thresholds[k] for part in parts) for k in range(n_classes)],
                   n_calibration=[sum(part.n_calibration[k] for part in parts) for k in range(n_classes)])


@dataclass
class Reliability:
    """What a model folder says about when to trust an answer; either part may be absent."""

    guard: DomainGuard | None = None
    conformal: ConformalSets | None = None
    facts: dict = field(default_factory=dict)  # what they were fitted on, and measured numbers
    #: how answers are decided (:mod:`answer_rule`): ``in_source`` and, with leave-one-source-out evidence, ``unseen``
    regimes: dict[str, Regime] = field(default_factory=dict)
    #: the model's training sources: a person may say a frame comes from one of them (the in-source regime)
    training_sources: list[str] = field(default_factory=list)
    #: the guard's layer, as ``model.get_submodule`` names it (the pipeline code finds it by this name)
    guard_layer: str | None = None

    def regime_for(self, source: str | None) -> str:
        """The regime of a frame said to come from ``source``: ``in_source`` for one of the training
        sources, ``unseen`` for None (not said) or the word "unseen"; anything else is refused."""
        return regime_of(source, self.training_sources)

    def regime_sets(self, regime: str, probs: np.ndarray) -> np.ndarray:
        """Boolean (n, classes): each image's prediction set under ``regime`` (every class without one)."""
        p = np.atleast_2d(np.asarray(probs, dtype=np.float64))
        r = self.regimes.get(regime)
        if r is None:
            return np.ones_like(p, dtype=bool)
        return set_members(p, r.thresholds)

    def answer(self, probs: np.ndarray, labels: Sequence[str], flagged: bool, regime: str = UNSEEN):
        """One image's :class:`~thyroid_classifier.answer_rule.Answer` under ``regime``."""
        return decide(probs, list(labels), self.regimes.get(regime), flagged, regime, self.training_sources)

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
        if self.guard is not None and self.guard_layer:
            payload["guard"]["layer"] = self.guard_layer
        payload["regimes"] = {name: regime.to_dict() for name, regime in self.regimes.items()}
        payload["training_sources"] = list(self.training_sources)
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
        regimes = {name: Regime.from_dict(r) for name, r in (payload.get("regimes") or {}).items() if name in REGIMES}
        return cls(guard=guard, conformal=conformal, facts=payload.get("facts", {}), regimes=regimes,
                   training_sources=list(payload.get("training_sources") or []), guard_layer=(payload.get("guard") or {}).get("layer"))


def _json_float(value):
    return float(value)


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


# --------------------------------------------------------------------------------------------
# The headline rule's regimes: fitted, and measured

#: The error among headlined answers a regime's threshold keeps under (its 95% upper bound).
DEFAULT_MAX_ERROR = 0.20
#: The confidence of that bound (1 - the chance that a fitted threshold breaks it on its own data).
BOUND_CONFIDENCE = 0.95
#: The candidate headline thresholds, fixed in advance (learn-then-test); those at or below chance (1 / classes) are not tried.
THRESHOLD_GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def error_upper_bound(errors: int, n: int, confidence: float = BOUND_CONFIDENCE) -> float:
    """Clopper-Pearson one-sided upper bound on an error rate seen as ``errors`` of ``n`` (1 when n = 0)."""
    from scipy.stats import beta

    if n <= 0:
        return 1.0
    if errors >= n:
        return 1.0
    return float(beta.ppf(confidence, errors + 1, n - errors))


def _bounds(y: np.ndarray, top: np.ndarray, chosen: np.ndarray, n_classes: int, per_class: bool, confidence: float) -> list[float]:
    """The upper bounds a threshold must keep under the target, each at ``confidence``: one for all
    headlined answers, or one per true class."""
    wrong = top != y
    if not per_class:
        return [error_upper_bound(int((chosen & wrong).sum()), int(chosen.sum()), confidence)]
    return [error_upper_bound(int((chosen & wrong & (y == k)).sum()), int((chosen & (y == k)).sum()), confidence)
            for k in range(n_classes) if (chosen & (y == k)).any()]


def fit_headline_threshold(probs: np.ndarray, y: Sequence[int], member: np.ndarray, max_error: float = DEFAULT_MAX_ERROR,
                           per_class: bool = False, confidence: float = BOUND_CONFIDENCE) -> float:
    """The loosest threshold of :data:`THRESHOLD_GRID` on the top class's probability at which the
    headlined answers' error stays under ``max_error`` with ``confidence`` (learn-then-test: each
    threshold tested with a Clopper-Pearson bound, Bonferroni-corrected over the thresholds tried and,
    with ``per_class``, over the classes, so the chance that any chosen threshold breaks its promise
    on these frames is at most 1 - ``confidence``). ``per_class``: the bound holds for each true class,
    so whatever a new source's mix of classes, the error among its headlined answers stays under it.
    inf: no threshold qualifies (or no frame is headlined by any)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    top = p.argmax(1)
    grid = [t for t in THRESHOLD_GRID if t > 1 / p.shape[1]]
    tests = len(grid) * (p.shape[1] if per_class else 1)
    level = 1 - (1 - confidence) / tests
    passing = [t for t in grid if (chosen := headlined(p, member, t)).any()
               and max(_bounds(y, top, chosen, p.shape[1], per_class, level)) <= max_error]
    return min(passing) if passing else math.inf


def fit_regime(probs: np.ndarray, y: Sequence[int], evidence: str, *, alpha: float = DEFAULT_CONFORMAL_ALPHA,
               max_error: float = DEFAULT_MAX_ERROR, per_class: bool = False, sources: Sequence[str] | None = None,
               at_least: Sequence[float] | None = None) -> Regime:
    """A regime of the headline rule fitted on labelled, calibrated probabilities: class-conditional
    sets (the largest threshold over ``sources`` when given: Mondrian; never below ``at_least``, so its
    sets hold at least every class those thresholds keep), then the headline threshold."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if sources is not None and len(set(sources)) > 1:
        conformal = ConformalSets.fit_worst_case(p, y, sources, alpha)
    else:
        conformal = ConformalSets.fit(p, y, alpha)
    thresholds = list(conformal.thresholds) if at_least is None else [max(a, b) for a, b in zip(conformal.thresholds, at_least, strict=True)]
    member = set_members(p, thresholds)
    threshold = fit_headline_threshold(p, y, member, max_error, per_class)
    regime = Regime(thresholds=thresholds, alpha=alpha, headline_threshold=threshold, max_error=max_error,
                    per_class=per_class, evidence=evidence, n=int(len(y)))
    regime.measured = regime_report(y, p, member, headlined(p, member, threshold))
    return regime


def regime_report(y: Sequence[int], probs: np.ndarray, member: np.ndarray, chosen: np.ndarray, groups: Sequence[str] | None = None,
                  n_resamples: int = 0, seed: int = 0, labels: Sequence[str] | None = None) -> dict:
    """What a rule does on labelled frames: set coverage and mean size, share headlined, error among
    headlined (overall and per true class), each with a 95% interval resampling ``groups`` (patients)
    when ``n_resamples``; the error's one-sided 95% Clopper-Pearson bound."""
    from .metrics import group_resamples

    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    member = np.asarray(member, dtype=bool)
    chosen = np.asarray(chosen, dtype=bool)
    wrong = p.argmax(1) != y

    def values(idx: np.ndarray) -> dict[str, float]:
        yi, ci, wi = y[idx], chosen[idx], wrong[idx]
        return {"coverage": float(member[idx, yi].mean()) if len(idx) else math.nan,
                "mean_set_size": float(member[idx].sum(1).mean()) if len(idx) else math.nan,
                "share_headlined": float(ci.mean()) if len(idx) else math.nan,
                "error_headlined": float(wi[ci].mean()) if ci.any() else math.nan}

    out: dict = {"n": int(len(y)), "n_headlined": int(chosen.sum()), "n_wrong_headlined": int((chosen & wrong).sum())}
    point = values(np.arange(len(y)))
    samples = [values(idx) for idx in group_resamples(len(y), groups, n_resamples, seed)] if n_resamples else []
    for key, value in point.items():
        got = [s[key] for s in samples if not math.isnan(s[key])]
        out[key] = {"value": value, "ci": [float(np.quantile(got, 0.025)), float(np.quantile(got, 0.975))] if got else [math.nan, math.nan]}
    out["error_headlined_upper_95"] = error_upper_bound(out["n_wrong_headlined"], out["n_headlined"])
    names = list(labels) if labels is not None else [str(k) for k in range(p.shape[1])]
    out["per_class"] = {names[k]: {"n": int((y == k).sum()), "headlined": int((chosen & (y == k)).sum()),
                                   "wrong": int((chosen & wrong & (y == k)).sum())} for k in range(p.shape[1])}
    return out
