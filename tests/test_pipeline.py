"""A Hub user's ``pipeline("image-classification")`` answers as the Predictor (and so the app) does:
the crop ships as an image processor named in ``auto_map``, and the temperature is in the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from thyroid_classifier.predict import Predictor


def _pipeline_probs(classifier, images: list[Image.Image], labels: list[str]) -> np.ndarray:
    out = classifier(images, top_k=len(labels))
    out = [answer["scores"] if isinstance(answer, dict) else answer for answer in out]  # the folder's pipeline, or the plain one
    return np.asarray([[next(d["score"] for d in answer if d["label"] == label) for label in labels] for answer in out])


def _frames(sample_dir, n: int = 8) -> list[Image.Image]:
    """Single-view frames of every class, borders and all. (The fixture's run splits the sample's split
    screens into views and averages them, which only the project's own code does.)"""
    from thyroid_classifier.preprocess import UltrasoundPreprocessor

    views = UltrasoundPreprocessor(split_views=True).views
    frames = [Image.open(p).convert("RGB") for p in sorted(sample_dir.rglob("*.png"))]
    single = [f for f in frames if len(views(f)[0]) == 1]
    return single[:: max(1, len(single) // n)][:n]


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-vgg"])
def test_pipeline_with_remote_code_answers_as_the_predictor(short_run, sample_dir, name, monkeypatch):
    from transformers import pipeline

    folder = short_run[0] / name
    predictor = Predictor.from_pretrained(str(folder))
    # The run fitted a real temperature (far from 1 for a tiny model): the comparison checks calibration too.
    assert abs(predictor.model.config.calibration_temperature - 1) > 0.1
    frames = _frames(sample_dir)
    expected = np.asarray([[p.probabilities[label] for label in predictor.labels] for p in predictor.predict(frames, explain=False)])

    def no_prompt(*args, **kwargs):
        raise AssertionError("transformers asked whether to run remote code")

    monkeypatch.setattr("builtins.input", no_prompt)
    remote = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    assert type(remote.image_processor).__name__ == "UltrasoundImageProcessor"
    got = _pipeline_probs(remote, frames, predictor.labels)
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()

    # The folder's pipeline answers as the Predictor does, in both regimes: headline, whether it is one, why, set, flag.
    source = predictor.training_sources[0]
    for said in (None, source):
        mine = predictor.predict(frames, explain=False, source=said)
        theirs = remote(frames, **({"source": said} if said else {}))
        assert [(a["answer"], a["headlined"], a["reason"], a["prediction_set"], a["flagged"], a["regime"]) for a in theirs] == \
            [(r.headline, r.headlined, r.reason, r.prediction_set, r.flagged, r.regime) for r in mine]
        np.testing.assert_allclose([a["in_domain_score"] for a in theirs], [r.in_domain_score for r in mine], rtol=1e-4)
    assert {a["regime"] for a in remote(frames)} == {"unseen"} and {a["regime"] for a in remote(frames, source=source)} == {"in_source"}
    with pytest.raises(ValueError, match="unknown source"):
        remote(frames[0], source="another hospital")

    # Without the flag transformers refuses the folder's pipeline (bare scores are not an answer); asking for the
    # plain pipeline class still loads it, without a prompt, with the plain processor (no crop):
    # the same resize and normalisation on the whole frame.
    from transformers import ImageClassificationPipeline

    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("image-classification", model=str(folder))
    plain = pipeline("image-classification", model=str(folder), pipeline_class=ImageClassificationPipeline)
    assert type(plain.image_processor).__name__ == "ViTImageProcessor"
    full, cropped = (proc(frames[0], return_tensors="pt")["pixel_values"] for proc in (plain.image_processor, remote.image_processor))
    region = predictor.preprocessor(frames[0])
    assert region.size != frames[0].size  # the sample's frames have borders to crop
    assert torch.equal(cropped, plain.image_processor(region, return_tensors="pt")["pixel_values"])
    assert not torch.equal(full, cropped)


def test_installed_package_needs_no_remote_code(short_run, sample_dir):
    from transformers import pipeline

    from thyroid_classifier import UltrasoundImageProcessor

    folder = short_run[0] / "tiny-resnet"
    predictor = Predictor.from_pretrained(str(folder))
    frames = _frames(sample_dir, 4)
    expected = np.asarray([[p.probabilities[label] for label in predictor.labels] for p in predictor.predict(frames, explain=False)])
    from thyroid_classifier import ThyroidImageClassificationPipeline

    classifier = pipeline("image-classification", model=str(folder), image_processor=UltrasoundImageProcessor.from_pretrained(folder),
                          pipeline_class=ThyroidImageClassificationPipeline)
    assert np.abs(_pipeline_probs(classifier, frames, predictor.labels) - expected).max() <= 1e-4
    # The crop settings come from the folder: a processor told not to crop gives other pixels.
    uncropped = UltrasoundImageProcessor.from_pretrained(folder, ultrasound_crop=False)
    assert not torch.equal(uncropped(frames[0], return_tensors="pt")["pixel_values"],
                           classifier.image_processor(frames[0], return_tensors="pt")["pixel_values"])


def test_the_temperature_is_in_the_weights_and_restored(tiny_models):
    from transformers import AutoModelForImageClassification

    from thyroid_classifier.models import logit_layer, temperature_in_weights

    model = AutoModelForImageClassification.from_pretrained(tiny_models["tiny-vgg"]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw = model(pixel_values=x).logits
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with temperature_in_weights(model, 0.25):
            folded = model(pixel_values=x).logits
            assert model.config.temperature_in_weights and model.config.calibration_temperature == 0.25
        assert torch.allclose(folded, raw / 0.25, atol=1e-5)
        assert not model.config.temperature_in_weights
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # exactly restored
    assert logit_layer(model).out_features == model.config.num_labels


def test_predictor_reads_a_temperature_in_the_weights_both_ways(short_run, sample_dir):
    from thyroid_classifier.metrics import softmax

    folder = short_run[0] / "tiny-resnet"
    calibrated, raw = Predictor.from_pretrained(str(folder)), Predictor.from_pretrained(str(folder), calibrated=False)
    fitted = calibrated.model.config.calibration_temperature
    assert calibrated.model.config.temperature_in_weights and calibrated.calibrated and not raw.calibrated
    frames = _frames(sample_dir, 4)
    pixels, _, _ = calibrated.prepare(frames)
    logits = calibrated.logits(pixels).numpy()  # the trained model's
    with torch.inference_mode():
        saved = calibrated.model(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(saved * fitted, logits, rtol=1e-4, atol=1e-5)  # the weights give logits / T
    p_cal = np.asarray([[p.probabilities[k] for k in calibrated.labels] for p in calibrated.predict(frames, explain=False)])
    p_raw = np.asarray([[p.probabilities[k] for k in raw.labels] for p in raw.predict(frames, explain=False)])
    np.testing.assert_allclose(p_cal, softmax(logits, fitted), atol=1e-5)
    np.testing.assert_allclose(p_raw, softmax(logits), atol=1e-5)
    assert np.abs(p_cal - p_raw).max() > 1e-3
