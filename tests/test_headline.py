"""The headline rule (answer_rule, reliability.fit_regime): a label is stated only where the evidence
supports it, for sources the model never saw as for its own; the same answer on every face."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from thyroid_classifier.answer_rule import IN_SOURCE, UNSEEN, Regime, decide, headlined, set_members
from thyroid_classifier.reliability import (
    ConformalSets,
    Reliability,
    error_upper_bound,
    fit_headline_threshold,
    fit_regime,
    regime_report,
)

LABELS = ["benign", "malignant"]


def _scores(n: int, accuracy_by_class: tuple[float, float], prevalence: float, seed: int, confident: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Two-class probabilities: each frame's top class is right with its class's accuracy; the top probability
    is drawn around ``confident`` whether right or wrong (an overconfident model on an unseen source)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    right = rng.random(n) < np.where(y == 1, accuracy_by_class[1], accuracy_by_class[0])
    top = np.where(right, y, 1 - y)
    conf = np.clip(rng.normal(confident, 0.05, n), 0.5, 0.999)
    probs = np.zeros((n, 2))
    probs[np.arange(n), top] = conf
    probs[np.arange(n), 1 - top] = 1 - conf
    return probs, y


def test_error_bound_is_clopper_pearson():
    assert error_upper_bound(0, 14) == pytest.approx(1 - 0.05 ** (1 / 14), abs=1e-9)  # 0 of n: 1 - 0.05^(1/n)
    assert error_upper_bound(0, 13) > 0.2 > error_upper_bound(0, 14)
    assert error_upper_bound(0, 0) == 1.0 and error_upper_bound(5, 5) == 1.0
    assert error_upper_bound(10, 100) > 0.10


def test_a_model_at_chance_headlines_nothing():
    probs, y = _scores(400, (0.5, 0.5), 0.5, seed=0)
    member = np.ones_like(probs, dtype=bool) & False
    member[np.arange(len(y)), probs.argmax(1)] = True  # single-class sets everywhere: only the threshold can refuse
    assert math.isinf(fit_headline_threshold(probs, y, member, max_error=0.2))


def test_an_accurate_model_headlines_and_its_error_holds_on_fresh_frames():
    probs, y = _scores(300, (0.95, 0.95), 0.5, seed=1)
    member = np.zeros_like(probs, dtype=bool)
    member[np.arange(len(y)), probs.argmax(1)] = True
    threshold = fit_headline_threshold(probs, y, member, max_error=0.2)
    assert threshold < 0.9  # most frames headlined
    fresh, yf = _scores(2000, (0.95, 0.95), 0.5, seed=2)
    chosen = headlined(fresh, np.ones_like(fresh, dtype=bool) & (fresh == fresh.max(1, keepdims=True)), threshold)
    assert chosen.mean() > 0.5 and (fresh.argmax(1) != yf)[chosen].mean() <= 0.2


def test_the_per_class_bound_holds_whatever_the_new_sources_mix():
    """On the calibration source 90% of frames are malignant and every benign frame is called malignant:
    errors among all headlined answers look fine (10%), but a source with half benign frames would get
    50% wrong. The per-class bound refuses; the pooled one does not."""
    probs, y = _scores(400, (0.0, 1.0), 0.9, seed=3)
    member = np.zeros_like(probs, dtype=bool)
    member[np.arange(len(y)), probs.argmax(1)] = True
    pooled = fit_headline_threshold(probs, y, member, max_error=0.2, per_class=False)
    assert not math.isinf(pooled)
    assert math.isinf(fit_headline_threshold(probs, y, member, max_error=0.2, per_class=True))
    other, y2 = _scores(400, (0.0, 1.0), 0.5, seed=4)
    chosen = headlined(other, np.eye(2, dtype=bool)[other.argmax(1)], pooled)
    assert (other.argmax(1) != y2)[chosen].mean() > 0.35  # what the pooled bound would have promised wrongly


def test_the_bound_is_corrected_for_every_threshold_and_class_tried():
    """100 frames headlined at every threshold, 12 wrong: the plain 95% bound passes 20%, the bound
    corrected for the thresholds tried does not, so no threshold may be chosen."""
    from thyroid_classifier.reliability import BOUND_CONFIDENCE, THRESHOLD_GRID

    conf = np.full(100, 0.97)
    y = np.array([0] * 12 + [1] * 88)
    probs = np.stack([1 - conf, conf], 1)
    member = np.zeros_like(probs, dtype=bool)
    member[:, 1] = True
    tried = len([t for t in THRESHOLD_GRID if t > 0.5])
    assert error_upper_bound(12, 100) <= 0.2 < error_upper_bound(12, 100, 1 - (1 - BOUND_CONFIDENCE) / tried)
    assert math.isinf(fit_headline_threshold(probs, y, member, max_error=0.2))
    # Per class: the malignant frames are all right, the benign ones all wrong -> refused either way;
    # with 6 wrong of 100 the pooled bound passes at the loosest threshold that headlines them.
    y6 = np.array([0] * 6 + [1] * 94)
    assert fit_headline_threshold(probs, y6, member, max_error=0.2) == min(t for t in THRESHOLD_GRID if t > 0.5)


def test_sets_fitted_per_source_cover_each_source():
    a, ya = _scores(300, (0.9, 0.9), 0.5, seed=5)
    b, yb = _scores(300, (0.55, 0.55), 0.5, seed=6)
    probs, y = np.concatenate([a, b]), np.concatenate([ya, yb])
    sources = ["a"] * 300 + ["b"] * 300
    worst = ConformalSets.fit_worst_case(probs, y, sources, alpha=0.1)
    assert worst.thresholds == [max(ConformalSets.fit(p, t, 0.1).thresholds[k] for p, t in ((a, ya), (b, yb))) for k in range(2)]
    for p, t in ((a, ya), (b, yb)):
        member = worst.sets(p)
        assert member[np.arange(len(t)), t].mean() >= 0.88


def test_decide_says_why_for_every_kind_of_answer():
    regime = Regime(thresholds=[0.6, 0.6], alpha=0.1, headline_threshold=0.8, max_error=0.2, per_class=True, evidence="unseen frames (100)")
    said = decide(np.array([0.1, 0.9]), LABELS, regime, False)
    assert said.headlined and said.headline == "malignant" and said.prediction_set == ["malignant"]
    assert "at most 20% for each true class at 95% confidence" in said.reason and "unseen frames (100)" in said.reason
    counted = Regime([0.6, 0.6], 0.1, 0.8, 0.2, True, "unseen frames (100)", measured={"n_headlined": 40, "n_wrong_headlined": 3})
    assert "3 of 40 were wrong" in decide(np.array([0.1, 0.9]), LABELS, counted, False).reason
    low = decide(np.array([0.25, 0.75]), LABELS, regime, False)
    assert not low.headlined and low.headline == "Cannot tell" and "leans to malignant" in low.reason
    both = decide(np.array([0.45, 0.55]), LABELS, regime, False)
    assert not both.headlined and both.headline == "benign or malignant: cannot tell" and both.prediction_set == LABELS
    flagged = decide(np.array([0.01, 0.99]), LABELS, regime, True)
    assert not flagged.headlined and flagged.headline == "Not reliable"
    never = decide(np.array([0.01, 0.99]), LABELS, Regime([0.5, 0.5], 0.1, math.inf, 0.2, True, "x"), False)
    assert not never.headlined and "no confidence level" in never.reason
    missing = decide(np.array([0.01, 0.99]), LABELS, None, False, UNSEEN, ["ddti", "les3bdd"])
    assert not missing.headlined and "never measured on a source it did not see" in missing.reason and "ddti, les3bdd" in missing.reason


def test_regimes_are_saved_and_read_back(tmp_path):
    unseen = Regime([0.3, math.inf], 0.1, math.inf, 0.2, True, "sources it never saw", n=10, measured={"n": 10})
    own = Regime([0.4, 0.6], 0.1, 0.75, 0.2, False, "validation", n=5)
    Reliability(regimes={UNSEEN: unseen, IN_SOURCE: own}, training_sources=["a", "b"]).save_pretrained(tmp_path)
    json.loads((tmp_path / "reliability.json").read_text())  # strict JSON: no Infinity
    assert "Infinity" not in (tmp_path / "reliability.json").read_text()
    back = Reliability.from_pretrained(tmp_path)
    assert back.regimes[UNSEEN] == unseen and back.regimes[IN_SOURCE] == own and back.training_sources == ["a", "b"]
    assert back.regime_for(None) == UNSEEN and back.regime_for("a") == IN_SOURCE
    with pytest.raises(ValueError, match="unknown source 'c'"):
        back.regime_for("c")


def test_fit_regime_measures_what_it_promises():
    probs, y = _scores(300, (0.9, 0.9), 0.5, seed=7)
    regime = fit_regime(probs, y, "validation (300)", alpha=0.1, max_error=0.2)
    member = set_members(probs, regime.thresholds)
    chosen = headlined(probs, member, regime.headline_threshold)
    report = regime_report(y, probs, member, chosen, [str(i // 2) for i in range(300)], n_resamples=50, labels=LABELS)
    assert regime.measured["n_headlined"] == report["n_headlined"] == int(chosen.sum()) > 0
    assert report["error_headlined_upper_95"] <= 0.2
    assert report["error_headlined"]["ci"][0] <= report["error_headlined"]["value"] <= report["error_headlined"]["ci"][1]
    assert sum(c["headlined"] for c in report["per_class"].values()) == report["n_headlined"]


def test_the_predictor_decides_under_the_regime_of_the_frames_source(saved_folder, sample_dir):
    """Said to come from a training source, a frame is answered under the in-source regime; otherwise
    (nothing said) under the unseen one; a source the model does not know is refused before any work."""
    from PIL import Image

    from thyroid_classifier.predict import Predictor

    predictor = Predictor.from_pretrained(str(saved_folder))
    frames = [Image.open(p).convert("RGB") for p in sorted(sample_dir.rglob("*.png"))[:6]]
    every = Regime([math.inf] * 3, 0.1, 0.0, 0.2, True, "unseen frames")  # no class ruled out: never a label
    own = Regime([-1.0] * 3, 0.1, 0.0, 0.2, False, "validation frames")  # no class passes: the top class alone, headlined
    predictor.reliability = Reliability(regimes={UNSEEN: every, IN_SOURCE: own}, training_sources=["sample"])
    unseen = predictor.predict(frames, explain=False)
    assert all(r.regime == UNSEEN and not r.headlined and r.prediction_set == predictor.labels for r in unseen)
    mine = predictor.predict(frames, explain=False, source="sample")
    assert all(r.regime == IN_SOURCE and r.headlined and r.headline == r.label and r.prediction_set == [r.label] for r in mine)
    assert all("validation frames" in r.reason for r in mine)
    with pytest.raises(ValueError, match="unknown source 'elsewhere'"):
        predictor.predict(frames, explain=False, source="elsewhere")


def test_the_notice_says_what_the_model_was_trained_on():
    """The page's sentence about the training data comes from the model's metrics.json, not fixed text."""
    from thyroid_classifier.answer_text import training_notice
    from thyroid_classifier.app import notice
    from thyroid_classifier.known_data import KNOWN_DATASETS

    synthetic = {"data": {"dataset": {"name": "the built-in SYNTHETIC sample", "type": "synthetic-sample", "tirads_labels": False}}}
    assert "SYNTHETIC" in training_notice(synthetic) and "mean nothing" in training_notice(synthetic)
    assert "not a diagnosis" in notice(synthetic) and "SYNTHETIC" in notice(synthetic)
    public = {"data": {"sources": {"ddti": {"dataset": KNOWN_DATASETS["ddti"]}, "les3bdd": {"dataset": KNOWN_DATASETS["les3bdd"]}}}}
    text = training_notice(public)
    assert "DDTI" in text and "TI-RADS risk categories, not pathology" in text and text.count("unknown provenance") == 1
    older = {"data": {"sources": {"les3bdd": {"dataset": {**KNOWN_DATASETS["les3bdd"], "name": "LES3BDD (three merged public collections, labels of unknown provenance)"}}}}}
    assert training_notice(older).count("unknown provenance") == 1  # a folder trained before the name changed says it once too
    assert "SYNTHETIC" not in text
    own = {"data": {"dataset": {"name": "hospital_a", "type": "hospital-a", "tirads_labels": False}}}
    assert "hospital_a: labels as given" in training_notice(own) and "TI-RADS" not in training_notice(own)
    assert "Nothing is recorded" in training_notice({})


def test_what_is_measured_is_what_every_face_says():
    """``headlined`` (which fits and measures the rule) agrees with ``decide`` (which every face shows),
    frame by frame: a multi-class set, a low probability or a flag is never counted as a headline."""
    rng = np.random.default_rng(8)
    probs = rng.dirichlet([1, 1, 1], 500)
    flagged = rng.random(500) < 0.1
    regime = Regime([0.55, 0.6, 0.7], 0.1, 0.6, 0.2, True, "x")
    member = set_members(probs, regime.thresholds)
    counted = headlined(probs, member, regime.headline_threshold, flagged)
    shown = [decide(p, ["normal", "benign", "malignant"], regime, bool(f)).headlined for p, f in zip(probs, flagged)]
    assert counted.tolist() == shown
    assert 0 < counted.sum() < 500 and (member.sum(1) > 1).any()
