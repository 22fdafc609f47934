"""Metrics, intervals and calibration against written-out computations: the numbers every card, table and
app page shows, so a silent change here misstates a model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from thyroid_classifier.metrics import (
    HEADLINE,
    by_source,
    fit_temperature,
    frame_logits,
    layout_breakdown,
    macro_auc,
    scored,
    separation_auc,
    softmax,
    with_intervals,
)

LABELS = ["normal", "benign", "malignant"]


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    return y, logits, softmax(logits)


def test_temperature_minimises_the_nll_within_its_bounds():
    y, logits, _ = _data()

    def nll(t):
        p = softmax(logits, t)
        return -np.log(p[np.arange(len(y)), y]).mean()

    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 4001))
    best = grid[np.argmin([nll(t) for t in grid])]
    t = fit_temperature(logits, y)
    assert t == pytest.approx(best, rel=2e-3) and nll(t) <= nll(best) + 1e-6
    assert fit_temperature(logits * 3, y) == pytest.approx(3 * t, rel=5e-3)  # over-confident logits: T scales with them
    # Bounds: a hopeless model is not sent to T = infinity, nor a perfect one to 0.
    assert fit_temperature(-50 * np.eye(3)[y], y) == pytest.approx(20.0, rel=1e-3)
    assert fit_temperature(0.01 * np.eye(3)[y], y) == pytest.approx(0.05, rel=1e-3)


def test_softmax_and_frame_logits_written_out():
    z = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    e = np.exp(z / 2)
    np.testing.assert_allclose(softmax(z, 2.0), e / e.sum(1, keepdims=True))
    # A frame's logits: the log of its views' mean probability (softmax of them gives that mean).
    views = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    owner = np.array([0, 0, 1])
    expected = np.vstack([softmax(views[:2]).mean(0), softmax(views[2:])[0]])
    np.testing.assert_allclose(softmax(frame_logits(views, owner, 2)), expected, atol=1e-12)


def test_layout_breakdown_by_hand():
    y = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    split = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    p1 = np.array([0.2, 0.3, 0.7, 0.6, 0.9, 0.4, 0.8, 0.95])
    probs = np.c_[1 - p1, p1]
    out = layout_breakdown(y, probs, split, ["benign", "malignant"])
    assert out["single_view"] == {"n": 4, "roc_auc": pytest.approx(macro_auc(y[:4], probs[:4]))}
    assert out["split_screen"]["n"] == 4 and out["split_screen"]["roc_auc"] == pytest.approx(macro_auc(y[4:], probs[4:]))
    assert out["single_view"]["roc_auc"] == pytest.approx(1.0)
    # Within benign (class 0): does P(benign) tell the layouts apart? split benign frames have 0.1 and 0.6.
    assert out["layout_auc"]["benign"] == pytest.approx(roc_auc_score([0, 0, 1, 1], [0.8, 0.7, 0.1, 0.6]))
    assert out["layout_auc"]["malignant"] == pytest.approx(roc_auc_score([0, 0, 1, 1], [0.7, 0.6, 0.8, 0.95]))
    one = layout_breakdown(y[:4], probs[:4], split[:4], ["benign", "malignant"])
    assert one["layout_auc"] == {} and one["split_screen"]["n"] == 0 and math.isnan(one["split_screen"]["roc_auc"])


def test_scored_and_by_source():
    y, _, probs = _data(60)
    groups = [f"p{i // 2}" for i in range(60)]
    sources = np.array(["north"] * 30 + ["south"] * 30)
    s = scored(y, probs, LABELS, groups, n_resamples=50, seed=1)
    for key in HEADLINE:
        assert set(s[key]) == {"value", "ci"} and s[key]["ci"][0] <= s[key]["value"] <= s[key]["ci"][1] + 1e-12
    assert s["roc_auc"]["value"] == pytest.approx(macro_auc(y, probs))
    per = by_source(y, probs, LABELS, groups, sources, n_resamples=50, seed=1)
    assert set(per) == {"north", "south"}
    assert per["south"]["n"] == 30 and per["south"]["roc_auc"]["value"] == pytest.approx(macro_auc(y[30:], probs[30:]))
    assert per["north"] == scored(y[:30], probs[:30], LABELS, groups[:30], 50, 1)
    assert by_source(y, probs, LABELS, groups, ["north"] * 60) == {}


def test_with_intervals_and_separation():
    metrics = {key: 0.5 for key in HEADLINE} | {"n": 3, "per_class": {}}
    out = with_intervals(metrics, {key: [0.1, 0.9] for key in HEADLINE})
    assert all(out[key] == {"value": 0.5, "ci": [0.1, 0.9]} for key in HEADLINE) and out["n"] == 3 and metrics["accuracy"] == 0.5
    assert separation_auc([0.1, 0.2], [0.3, 0.4]) == 1.0 and separation_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert separation_auc([0.1, 0.3], [0.2, 0.4]) == pytest.approx(0.75)
    assert math.isnan(separation_auc([], [0.1])) and math.isnan(separation_auc([0.1], []))
