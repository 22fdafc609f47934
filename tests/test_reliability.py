"""The guard and the prediction sets against independent computations: exact values, not just
"the shifted source is flagged more" (mutation testing found 146 of 460 changes to reliability.py
that no test noticed; benchmarks/mutation.py)."""

import logging
import math

import numpy as np
import pytest

from thyroid_classifier.reliability import ConformalSets, DomainGuard, Reliability, coverage_report, guard_report, set_text


def reference_scores(train: np.ndarray, new: np.ndarray, k: int) -> np.ndarray:
    """PCA Mahalanobis (T²) + residual (Q), written out from the covariance's eigenvectors."""
    mean = train.mean(0)
    cov = np.cov(train - mean, rowvar=False)  # divides by n - 1
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:k]
    values, vectors = values[order], vectors[:, order]
    z_train, z = train - mean, new - mean
    residual_variance = ((z_train - z_train @ vectors @ vectors.T) ** 2).mean()
    t2 = ((z @ vectors) ** 2 / values).sum(1)
    q = ((z - z @ vectors @ vectors.T) ** 2).mean(1) / residual_variance
    return (t2 + q) / (k + 1)


def test_guard_scores_equal_a_written_out_pca_mahalanobis():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.2]) + 1.5
    new = rng.normal(size=(7, 6)) * 2
    for k in (1, 3, 5):
        guard = DomainGuard.fit(train, max_components=k)
        assert len(guard.variances) == k and guard.components.shape == (k, 6)
        assert np.allclose(guard.score(new), reference_scores(train, new, k), rtol=1e-8)
    assert np.allclose(guard.mean, train.mean(0))
    # More components than images allow: at most n - 1.
    assert len(DomainGuard.fit(train[:4], max_components=64).variances) == 3
    assert len(DomainGuard.fit(train[:3]).variances) == 2  # three images: the fewest it accepts
    with pytest.raises(ValueError, match="at least 3"):
        DomainGuard.fit(train[:2])


def test_guard_drops_directions_the_training_images_do_not_vary_in():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(30, 2))
    train = np.concatenate([base, base[:, :1] * 2, np.zeros((30, 1))], axis=1)  # rank 2 in 4 dimensions
    guard = DomainGuard.fit(train)
    assert len(guard.variances) == 2 and np.all(guard.variances > 1e-6)
    # Off the training plane: the residual term grows, the score with it.
    on_plane, off_plane = train[:1], train[:1] + np.array([[0.0, 0.0, 0.0, 3.0]])
    assert guard.score(off_plane)[0] > 100 * guard.score(on_plane)[0]
    assert guard.residual_variance == pytest.approx(1e-12)  # nothing left off the plane: the floor, not a division by 0


def test_guard_threshold_is_the_conformal_quantile():
    rng = np.random.default_rng(2)
    guard = DomainGuard.fit(rng.normal(size=(50, 3)))
    held = rng.normal(size=(19, 3))
    scores = np.sort(guard.score(held))
    guard.calibrate(held, coverage=0.9)
    assert guard.threshold == scores[math.ceil(20 * 0.9) - 1] and guard.coverage == 0.9
    assert guard.flags(held).sum() == 19 - math.ceil(20 * 0.9)  # exactly the ones above the quantile
    guard.calibrate(held, coverage=0.99)  # (n + 1) * 0.99 > n: the largest score
    assert guard.threshold == scores[-1] and not guard.flags(held).any()
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="coverage"):
            guard.calibrate(held, coverage=bad)


def test_conformal_thresholds_are_class_conditional_quantiles():
    # Class 0: 9 calibration images, class 1: 3 (too few for 90%: always in the set).
    p0 = np.linspace(0.1, 0.9, 9)
    probs = np.concatenate([np.stack([p0, 1 - p0], 1), np.array([[0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])])
    labels = [0] * 9 + [1] * 3
    sets = ConformalSets.fit(probs, labels, alpha=0.1)
    expected0 = np.sort(1 - p0)[math.ceil(10 * 0.9) - 1]
    assert sets.thresholds[0] == pytest.approx(expected0) and sets.thresholds[1] == math.inf
    assert sets.n_calibration == [9, 3] and sets.alpha == 0.1
    loose = ConformalSets.fit(probs, labels, alpha=0.5)
    assert loose.thresholds[1] == pytest.approx(np.sort([0.3, 0.2, 0.6])[math.ceil(4 * 0.5) - 1])
    member = sets.sets(np.array([[0.95, 0.05], [0.05, 0.95]]))
    assert member.tolist() == [[True, True], [False, True]]  # class 1 always; class 0 only when likely enough
    strict = ConformalSets(alpha=0.1, thresholds=[-1.0, -1.0])  # nothing passes: the top class alone
    assert strict.sets(np.array([[0.3, 0.7], [0.8, 0.2]])).tolist() == [[False, True], [True, False]]
    with pytest.raises(ValueError, match="conformal_alpha"):
        ConformalSets.fit(probs, labels, alpha=1.0)


def test_coverage_and_guard_reports_by_hand():
    member = np.array([[True, False, False], [True, True, False], [False, False, True], [False, True, True]])
    report = coverage_report([0, 1, 0, 2], member)
    assert report == {"n": 4, "coverage": 0.75, "mean_set_size": 1.5, "share_singletons": 0.5}
    assert math.isnan(coverage_report([], np.zeros((0, 3), bool))["coverage"])
    y = np.array([0, 1, 0, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.4, 0.6], [0.45, 0.55]])
    flagged = np.array([False, False, False, False, True, True])
    g = guard_report(y, probs, flagged)
    assert g["share_flagged"] == pytest.approx(1 / 3) and g["n_accepted"] == 4 and g["n_flagged"] == 2 and g["n"] == 6
    assert g["roc_auc_accepted"] == 1.0 and g["roc_auc_flagged"] == 0.0  # the flagged two are ranked the wrong way round
    assert math.isnan(guard_report(y[:2], probs[:2], np.array([True, False]))["roc_auc_flagged"])  # one class: undefined
    assert set_text(["benign"]) == "benign" and set_text(["benign", "malignant"]) == "benign or malignant: cannot tell"


def test_reliability_round_trips_exactly(tmp_path, caplog):
    rng = np.random.default_rng(3)
    guard = DomainGuard.fit(rng.normal(size=(20, 5))).calibrate(rng.normal(size=(10, 5)), coverage=0.8)
    sets = ConformalSets(alpha=0.2, thresholds=[0.4, math.inf, 0.7], n_calibration=[5, 1, 6])
    Reliability(guard=guard, conformal=sets, facts={"fitted_on": "x"}).save_pretrained(tmp_path)
    back = Reliability.from_pretrained(tmp_path)
    for name in ("mean", "components", "variances"):
        assert np.array_equal(getattr(back.guard, name), getattr(guard, name))
    assert (back.guard.threshold, back.guard.coverage, back.guard.residual_variance) == (guard.threshold, 0.8, guard.residual_variance)
    probe = rng.normal(size=(4, 5))
    assert np.array_equal(back.guard.score(probe), guard.score(probe))
    assert back.conformal == sets and back.facts == {"fitted_on": "x"}
    assert Reliability.from_pretrained(None).guard is None and Reliability.from_pretrained(tmp_path / "none").conformal is None
    # Only the sets: the guard's files are absent and nothing is flagged.
    only = tmp_path / "only"
    only.mkdir()
    Reliability(conformal=sets).save_pretrained(only)
    loaded = Reliability.from_pretrained(only)
    assert loaded.guard is None and loaded.conformal == sets and not (only / "guard.safetensors").exists()
    # A guard fitted on other features is ignored, with a warning that names the folder.
    import json

    payload = json.loads((tmp_path / "reliability.json").read_text())
    payload["guard"]["features"] = "penultimate"
    (tmp_path / "reliability.json").write_text(json.dumps(payload))
    with caplog.at_level(logging.WARNING, logger="thyroid_classifier.reliability"):
        assert Reliability.from_pretrained(tmp_path).guard is None
    assert str(tmp_path) in caplog.text and "penultimate" in caplog.text
