"""The Predictor's loading and calibration paths on a folder written by ``ModelFolder.save_model``
(untrained tiny model, temperature 0.5 in the weights): fast, so mutation testing can run them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from thyroid_classifier.metrics import softmax
from thyroid_classifier.predict import Predictor


def _frames(sample_dir, n=4):
    return [Image.open(p).convert("RGB") for p in sorted(sample_dir.rglob("*.png"))[:n]]


def _probs(results, labels):
    return np.asarray([[r.probabilities[k] for k in labels] for r in results])


def test_a_saved_folder_loads_calibrated_with_its_crop(saved_folder, sample_dir):
    predictor = Predictor.from_pretrained(str(saved_folder))
    assert predictor.labels == ["normal", "benign", "malignant"] and predictor.folder == saved_folder
    assert predictor.temperature == 0.5 and predictor.logit_scale == 0.5 and predictor.calibrated
    assert predictor.preprocessor.crop and not predictor.preprocessor.split_views
    assert predictor.reliability.guard is None and predictor.reliability.conformal is None
    frames = _frames(sample_dir)
    pixels, boxes, owner = predictor.prepare(frames)
    assert pixels.shape == (4, 3, 32, 32) and list(owner) == [0, 1, 2, 3]
    assert all(b != (0, 0, f.width, f.height) for b, f in zip(boxes, frames))  # cropped
    with torch.inference_mode():
        saved = predictor.model(pixel_values=pixels).logits.double().numpy()
    raw = predictor.logits(pixels).double().numpy()
    np.testing.assert_allclose(raw, saved * 0.5, rtol=1e-5, atol=1e-7)  # the weights give logits / T
    results = predictor.predict(frames, explain=False)
    got = _probs(results, predictor.labels)
    np.testing.assert_allclose(got, softmax(raw, 0.5), atol=1e-6)  # = softmax(saved): calibrated
    assert [r.label for r in results] == [predictor.labels[i] for i in got.argmax(1)]
    # No calibration state in the folder: no evidence for any regime, so nothing is headlined and no class is ruled out.
    assert all(not r.flagged and r.prediction_set == predictor.labels and r.in_domain_score is None for r in results)
    assert all(not r.reliable and not r.headlined and r.headline == "Cannot tell" and "never measured on a source" in r.reason for r in results)
    assert all(r.box is not None and len(r.views) == 1 and r.heatmap is None and r.overlay is None for r in results)


def test_uncalibrated_undoes_the_temperature_and_older_folders_still_load(saved_folder, sample_dir, tmp_path):
    frames = _frames(sample_dir)
    raw_predictor = Predictor.from_pretrained(str(saved_folder), calibrated=False)
    assert raw_predictor.temperature == 1.0 and raw_predictor.logit_scale == 0.5 and not raw_predictor.calibrated
    pixels, _, _ = raw_predictor.prepare(frames)
    raw = raw_predictor.logits(pixels).double().numpy()
    np.testing.assert_allclose(_probs(raw_predictor.predict(frames, explain=False), raw_predictor.labels), softmax(raw), atol=1e-6)

    # A folder written before the temperature went into the weights: T only in config.json.
    old = shutil.copytree(saved_folder, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    config.pop("temperature_in_weights")
    (old / "config.json").write_text(json.dumps(config))
    older = Predictor.from_pretrained(str(old))
    assert older.temperature == 0.5 and older.logit_scale == 1.0 and older.calibrated
    saved = older.logits(pixels).double().numpy()
    np.testing.assert_allclose(_probs(older.predict(frames, explain=False), older.labels), softmax(saved, 0.5), atol=1e-6)


def test_explained_prediction_of_a_chosen_class(saved_folder, sample_dir):
    predictor = Predictor.from_pretrained(str(saved_folder))
    frame = _frames(sample_dir, 1)[0]
    [plain] = predictor.predict([frame], explain=False)
    [chosen] = predictor.predict([frame], target="benign", opacity=None)
    assert chosen.explained == "benign" and chosen.heatmap.shape == (frame.height, frame.width) and chosen.overlay is None
    assert chosen.probabilities == pytest.approx(plain.probabilities, abs=1e-6)  # explaining changes no number
    [drawn] = predictor.predict([frame])
    assert drawn.explained == drawn.label and drawn.overlay.shape == (frame.height, frame.width, 3)
    with pytest.raises(ValueError):
        predictor.predict([frame], target="cyst")


def test_guard_scores_flags_and_prediction_sets_come_from_the_same_pass(saved_folder, sample_dir):
    """Each image's in-domain score is the guard's score of its views' mean features (captured in the
    pass that scored it), flagged above the threshold; its set is the conformal set of its probabilities."""
    from dataclasses import replace

    from thyroid_classifier.inference import frame_probabilities
    from thyroid_classifier.metrics import frame_mean
    from thyroid_classifier.models import guard_features
    from thyroid_classifier.answer_rule import UNSEEN, Regime
    from thyroid_classifier.reliability import ConformalSets, DomainGuard, Reliability

    predictor = Predictor.from_pretrained(str(saved_folder))
    predictor.preprocessor = replace(predictor.preprocessor, split_views=True)  # split screens: two views, one score
    frames = _frames(sample_dir, 12)
    pixels, _, owner = predictor.prepare(frames)
    assert len(owner) > len(frames)  # some frames are split screens
    with guard_features(predictor.model) as captured:
        raw = predictor.logits(pixels).double().numpy()
    features = frame_mean(torch.cat(captured).numpy().astype(np.float64), owner, len(frames))
    guard = DomainGuard.fit(features[:8]).calibrate(features[8:], coverage=0.5)
    probs = frame_probabilities(raw, owner, len(frames), predictor.temperature)
    conformal = ConformalSets.fit(probs, [i % 3 for i in range(len(frames))], alpha=0.3)
    # The sets of the unseen regime (the default: the frames' source is not said); a threshold of 0 headlines any single-class set.
    unseen = Regime(thresholds=conformal.thresholds, alpha=0.3, headline_threshold=0.0, max_error=0.2, per_class=True, evidence="test frames")
    predictor.reliability = Reliability(guard=guard, conformal=conformal, regimes={UNSEEN: unseen})

    for explain in (False, True):
        results = predictor.predict(frames, explain=explain, opacity=None)
        scores = np.array([r.in_domain_score for r in results])
        np.testing.assert_allclose(scores, guard.score(features), rtol=1e-5)
        assert [r.flagged for r in results] == list(guard.score(features) > guard.threshold)
        assert any(r.flagged for r in results) and not all(r.flagged for r in results)
        member = conformal.sets(probs)
        assert [r.prediction_set for r in results] == [[k for j, k in enumerate(predictor.labels) if member[i, j]] for i in range(len(frames))]
        assert [r.reliable for r in results] == [not r.flagged and len(r.prediction_set) == 1 for r in results]
        assert all(r.headline == (r.label if r.reliable else "Not reliable" if r.flagged else r.headline) for r in results)
