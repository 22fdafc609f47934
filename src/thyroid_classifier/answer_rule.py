"""The one rule that decides what an answer says: a label, "cannot tell", or "not reliable".

Every face of a model (the ``Predictor`` and so the app, the batch CSV, ``evaluate``; the run's own
test-split predictions; a Hub user's ``pipeline(..., trust_remote_code=True)``) decides with
:func:`decide`, from the state a model folder keeps in ``reliability.json``.

An answer is decided under a *regime*: where the frame comes from, as far as anyone knows.

* ``unseen`` (the default: a frame from a hospital or scanner the model never saw). Its prediction
  sets and its headline threshold are fitted on leave-one-source-out scores: every frame scored by a
  model that never saw its source. The threshold keeps the error among headlined answers under a
  bound *for every class*, so the promise does not depend on the new hospital's mix of benign and
  malignant. A model with no such evidence (trained without ``--loso``) headlines no label here.
* ``in_source`` (the person says the frame comes from one of the model's training sources). Sets and
  threshold fitted on held-out validation frames of those sources.

A label is headlined only when the guard does not flag the image, the regime's prediction set holds
that one class, and its probability reaches the regime's headline threshold. Otherwise the answer
says why, in one line.

Self-contained on purpose (numpy only): it is copied into every model folder and runs there as
remote code without the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

UNSEEN = "unseen"
IN_SOURCE = "in_source"
REGIMES = (UNSEEN, IN_SOURCE)


@dataclass
class Regime:
    """How answers are decided for frames of one origin; saved in ``reliability.json``."""

    #: class-conditional conformal thresholds on ``1 - p(class)`` (inf: the class is always in the set)
    thresholds: list[float]
    alpha: float
    #: the top class's probability needed to headline it (inf: never)
    headline_threshold: float
    #: the error among headlined answers the threshold keeps under (per class when ``per_class``)
    max_error: float
    per_class: bool
    #: what it was fitted on, in words a person reads ("sources it never saw (leave-one-source-out), 830 frames")
    evidence: str
    n: int = 0
    #: what it measured where it was fitted: share headlined, error among headlined (per class), coverage
    measured: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": [_finite_or_none(t) for t in self.thresholds], "alpha": self.alpha,
                "headline_threshold": _finite_or_none(self.headline_threshold), "max_error": self.max_error,
                "per_class": self.per_class, "evidence": self.evidence, "n": self.n, "measured": self.measured}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Regime:
        return cls(thresholds=[_inf_if_none(t) for t in d["thresholds"]], alpha=float(d["alpha"]),
                   headline_threshold=_inf_if_none(d.get("headline_threshold")), max_error=float(d["max_error"]),
                   per_class=bool(d.get("per_class", False)), evidence=str(d.get("evidence", "")), n=int(d.get("n", 0)),
                   measured=dict(d.get("measured") or {}))


def regime_of(source: str | None, training_sources: list[str]) -> str:
    """The regime of a frame said to come from ``source``: ``in_source`` for one of the training sources,
    ``unseen`` for None (not said) or the word "unseen"; anything else is refused."""
    if source is None or source == UNSEEN:
        return UNSEEN
    if source == IN_SOURCE or source in training_sources:
        return IN_SOURCE
    raise ValueError(f"unknown source {source!r}: say one of the model's training sources ({', '.join(training_sources) or 'none recorded'}) "
                     "or leave it out (a source the model never saw)")


def _finite_or_none(value: float) -> float | None:
    return None if value is None or math.isinf(value) else float(value)


def _inf_if_none(value: Any) -> float:
    return math.inf if value is None else float(value)


def set_members(probs: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """Boolean (n, classes): the classes each image's conformal set holds (never empty: the top class
    is added when no class passes)."""
    p = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    member = (1.0 - p) <= np.asarray(thresholds, dtype=np.float64)[None, :]
    empty = ~member.any(1)
    member[empty, p[empty].argmax(1)] = True
    return member


def headlined(probs: np.ndarray, member: np.ndarray, headline_threshold: float, flagged: np.ndarray | None = None) -> np.ndarray:
    """Which answers headline their top class: a single-class set, that class's probability at or above
    the threshold, not flagged."""
    p = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    member = np.atleast_2d(np.asarray(member, dtype=bool))
    top = p.argmax(1)
    ok = (member.sum(1) == 1) & member[np.arange(len(p)), top] & (p.max(1) >= headline_threshold)
    if flagged is not None:
        ok &= ~np.asarray(flagged, dtype=bool)
    return ok


def guard_score(features: np.ndarray, mean: np.ndarray, components: np.ndarray, variances: np.ndarray, residual_variance: float) -> np.ndarray:
    """The in-domain guard's score of each image's features (larger: further from the training images):
    Hotelling's T² in the training features' top principal directions plus the residual Q statistic,
    averaged so that neither dominates by its size (both are about k and 1 on training images)."""
    z = np.atleast_2d(np.asarray(features, dtype=np.float64)) - mean
    projected = z @ components.T
    t2 = (projected**2 / variances).sum(1)
    residual = z - projected @ components
    q = (residual**2).mean(1) / residual_variance
    return (t2 + q) / (len(variances) + 1)


def set_text(members: list[str]) -> str:
    """How a prediction set reads to a person."""
    if len(members) == 1:
        return members[0]
    return " or ".join(members) + ": cannot tell"


@dataclass
class Answer:
    """What every face says about one image."""

    headline: str  # a label only when headlined; else "Not reliable" / "A or B: cannot tell" / "Cannot tell"
    headlined: bool
    reason: str  # one line: why this headline, and where its promise holds
    prediction_set: list[str]
    regime: str


def decide(probs: np.ndarray, labels: list[str], regime: Regime | None, flagged: bool, regime_name: str = UNSEEN,
           training_sources: list[str] | None = None) -> Answer:
    """The answer for one image's calibrated probabilities under ``regime`` (None: no evidence for it)."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    top = int(p.argmax())
    if regime is None:
        members: list[str] = list(labels)
    else:
        members = [labels[k] for k in np.flatnonzero(set_members(p, regime.thresholds)[0])]
    if flagged:
        return Answer("Not reliable", False, "Not reliable: this image is unlike the images the model learned from "
                      "(another scanner, site or kind of image).", members, regime_name)
    if regime is None:
        if regime_name == UNSEEN:
            sources = f" ({', '.join(training_sources)})" if training_sources else ""
            reason = ("Cannot tell: this model was never measured on a source it did not see, so it states no label for a frame "
                      f"from another hospital or scanner. Only for a frame from its own training sources{sources} can it say more.")
        else:
            reason = "Cannot tell: this model has no held-out calibration for its own sources, so it states no label."
        return Answer("Cannot tell", False, reason, members, regime_name)
    where = regime.evidence
    bound = f"{regime.max_error:.0%}" + (" for each true class" if regime.per_class else "")
    if len(members) > 1:
        headline = set_text(members)
        reason = (f"It cannot rule out {' or '.join(members)} at {1 - regime.alpha:.0%} coverage, "
                  f"as measured on {where}; the highest score is not an answer.")
        return Answer(headline, False, reason, members, regime_name)
    if math.isinf(regime.headline_threshold):
        reason = (f"Cannot tell: on {where} no confidence level kept its wrong answers under {bound}, "
                  f"so it states no label (it leans to {labels[top]}).")
        return Answer("Cannot tell", False, reason, members, regime_name)
    if p[top] < regime.headline_threshold:
        reason = (f"Cannot tell: it leans to {labels[top]} ({p[top]:.0%}), below the {regime.headline_threshold:.0%} that "
                  f"kept wrong answers under {bound} on {where}.")
        return Answer("Cannot tell", False, reason, members, regime_name)
    m = regime.measured or {}
    seen = (f"{m['n_wrong_headlined']} of {m['n_headlined']} were wrong, " if "n_headlined" in m and "n_wrong_headlined" in m else "")
    reason = (f"{labels[top]}: among answers at least this confident ({regime.headline_threshold:.0%}) on {where}, {seen}"
              f"at most {bound} at 95% confidence. Not a diagnosis.")
    return Answer(labels[top], True, reason, members, regime_name)


def tirads_level(points: float) -> str:
    """ACR TI-RADS level of a points total (TR1 0, TR2 2, TR3 3, TR4 4-6, TR5 7 or more; 1 point is TR2 too)."""
    p = round(points)
    return "TR1" if p <= 0 else "TR2" if p <= 2 else "TR3" if p == 3 else "TR4" if p <= 6 else "TR5"
