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
    assert all(not r.flagged and r.prediction_set == [] and r.in_domain_score is None and r.reliable for r in results)
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
