"""Tests written against bugs that once passed the whole suite (issue 19): each fails on the bug named
in its docstring and passes on the correct code."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from thyroid_classifier.audit import AuditReport, ImageInfo
from thyroid_classifier.metrics import bootstrap_intervals, softmax
from thyroid_classifier.weighting import class_weights, make_loss


def _info(name: str, phash: int) -> ImageInfo:
    return ImageInfo(path=name, label="benign", split="all", sha256=name, phash=phash)


def test_near_duplicate_threshold_is_inclusive_at_its_edge():
    """Bug: ``distance <= threshold`` written as ``<`` (two images exactly at the threshold missed)."""
    t = 8
    base = 0
    images = [_info("base", base), _info("same", base), _info("edge", (1 << t) - 1), _info("beyond", (1 << (t + 1)) - 1 << 20)]
    report = AuditReport(root=".", images=images, near_threshold=t)
    pairs = {frozenset((a.path, b.path)) for a, b in report.near_pairs()}
    assert frozenset(("base", "same")) in pairs  # 0 bits
    assert frozenset(("base", "edge")) in pairs  # exactly t bits
    assert frozenset(("base", "beyond")) not in pairs  # t + 1 bits
    assert bin(((1 << (t + 1)) - 1 << 20) ^ base).count("1") == t + 1


def test_test_interval_resamples_patients(short_run):
    """Bug: the test split's interval computed without ``groups=`` (frames resampled, too narrow)."""
    out, results = short_run
    folder = out / "tiny-resnet"
    metrics = json.loads((folder / "metrics.json").read_text())
    with (folder / "predictions_test.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    labels = metrics["labels"]
    y = [labels.index(r["label"]) for r in rows]
    p = np.array([[float(r[f"p_{c}"]) for c in labels] for r in rows])
    groups = [r["group"] for r in rows]
    resamples = metrics["training"]["bootstrap_resamples"]
    by_patient = bootstrap_intervals(y, p, labels, groups=groups, n_resamples=resamples, seed=metrics["training"]["seed"])
    by_frame = bootstrap_intervals(y, p, labels, groups=None, n_resamples=resamples, seed=metrics["training"]["seed"])
    saved = metrics["test"]["roc_auc"]["ci"]
    assert saved == pytest.approx(by_patient["roc_auc"], abs=2e-6)  # the CSV rounds probabilities to 6 digits
    assert saved != pytest.approx(by_frame["roc_auc"], abs=1e-3)  # and the frame-level interval would differ


def test_class_weights_on_imbalanced_labels_and_the_loss():
    """Bugs: every class weight 1.0; the loss built without the weights."""
    labels = [0] * 6 + [1] * 3 + [2] * 1  # n = 10, k = 3
    w = class_weights(labels, 3)
    assert w.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert class_weights([0, 0, 1], 3)[2] == 0  # an absent class weighs nothing
    torch.manual_seed(0)
    logits, y = torch.randn(10, 3), torch.tensor(labels)
    loss = make_loss(w, 0.1)({"logits": logits}, y)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y, weight=w, label_smoothing=0.1).item(), rel=1e-6)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-3)


def test_predictor_applies_the_fitted_temperature(short_run, sample_dir):
    """Bug: the Predictor ignores the temperature fitted on validation."""
    from thyroid_classifier.predict import Predictor

    out, _ = short_run
    predictor = Predictor.from_pretrained(str(out / "tiny-resnet"))
    predictor.temperature = 0.5  # a clearly non-trivial temperature, as a real fit gives
    image = sample_dir / "malignant" / "3000_1.png"
    [result] = predictor.predict([image], explain=False)
    from thyroid_classifier.preprocess import open_image

    pixels, _, _ = predictor.prepare([open_image(image)])
    logits = predictor.logits(pixels).double().numpy()
    expected = softmax(logits, 0.5)[0]
    got = np.array([result.probabilities[c] for c in predictor.labels])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, softmax(logits)[0], atol=1e-3)


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-vgg"])
def test_gradcam_explains_the_class_asked_for(short_run, sample_dir, name):
    """Bug: Grad-CAM explains the argmax whatever class was asked (``targets=None``)."""
    from thyroid_classifier.explain import gradcam, standard_gradcam
    from thyroid_classifier.predict import Predictor

    out, _ = short_run
    predictor = Predictor.from_pretrained(str(out / name))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        top = predictor.model(pixel_values=x).logits.argmax(1).tolist()
    other = [(t + 1) % len(predictor.labels) for t in top]  # never the argmax
    result = gradcam(predictor.model, predictor.layer, x, other)
    assert result.targets == other
    np.testing.assert_allclose(result.maps, standard_gradcam(predictor.model, predictor.layer, x, other), atol=1e-4)
    if name == "tiny-resnet":  # the tiny VGG's maps are flat after two epochs: every class gives the same one
        argmax_maps = standard_gradcam(predictor.model, predictor.layer, x, top)
        assert not np.allclose(result.maps, argmax_maps, atol=1e-3)
