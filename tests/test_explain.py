"""Grad-CAM in one pass, overlays at the upload's size, the batch CLI, localisation and the sanity check."""

from __future__ import annotations

import csv
import gc
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from thyroid_classifier.compare import read_predictions
from thyroid_classifier.known_data import ddti_outlines, frame_outline
from thyroid_classifier.explain import (
    centred_gaussian,
    energy_inside,
    freeze,
    gradcam,
    outline_mask,
    pointing_hit,
    randomization_check,
    standard_gradcam,
    to_original,
)
from thyroid_classifier.localize import main as localize_main
from thyroid_classifier.models import target_layer
from thyroid_classifier.predict import Predictor, main as predict_main


@pytest.fixture(scope="module")
def predictors(tiny_models):
    """The tiny models as Predictors with the sample's preprocessing (crop, split screens as views), untrained:
    Grad-CAM's mechanics do not need trained weights, and the fixture costs a second, not a training run."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from thyroid_classifier.preprocess import UltrasoundPreprocessor

    out = {}
    for name, path in tiny_models.items():
        torch.manual_seed(0)
        model = AutoModelForImageClassification.from_pretrained(path, id2label={0: "normal", 1: "benign", 2: "malignant"},
                                                                label2id={"normal": 0, "benign": 1, "malignant": 2}, num_labels=3,
                                                                ignore_mismatched_sizes=True)
        processor = AutoImageProcessor.from_pretrained(path, image_processor_filename="preprocessor_config.json")
        out[name] = Predictor(model, processor, UltrasoundPreprocessor(split_views=True), source=str(path))
    return out


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-vgg"])
@pytest.mark.parametrize("batch", [1, 4])
def test_heatmap_shape_range_and_equal_to_standard_gradcam(predictors, name, batch):
    predictor = predictors[name]
    x = torch.randn(batch, 3, 32, 32)
    result = gradcam(predictor.model, predictor.layer, x)
    assert result.maps.shape == (batch, 32, 32)
    assert result.maps.min() >= 0 and result.maps.max() <= 1 + 1e-6
    assert result.logits.shape == (batch, 3)
    with torch.inference_mode():
        plain = predictor.model(pixel_values=x).logits
    torch.testing.assert_close(result.logits, plain, atol=1e-5, rtol=1e-5)  # the same forward pass
    # The backbone's parameters got no gradient: the backward pass stopped at the target layer.
    assert all(p.grad is None for p in predictor.model.parameters())
    reference = standard_gradcam(predictor.model, predictor.layer, x, result.targets)
    np.testing.assert_allclose(result.maps, reference, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-vgg"])
def test_split_screen_is_the_mean_of_its_views(predictors, sample_dir, name):
    """A split-screen frame is predicted view by view: its probabilities are the mean of the views'
    (computed here by hand from the same model), and its heatmap is each view's Grad-CAM of the
    frame's class, placed where the view is."""
    predictor = predictors[name]
    image = Image.open(sample_dir / "malignant" / "3001_1.png").convert("RGB")  # a split screen (conftest)
    views, boxes = predictor.preprocessor.views(image)
    assert len(views) == 2
    pixels = predictor.processor(views, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        by_hand = predictor.model(pixel_values=pixels).logits.float().softmax(-1).mean(0).numpy()
    uncalibrated = Predictor(predictor.model, predictor.processor, predictor.preprocessor)
    for explain in (False, True):
        [result] = uncalibrated.predict([image], explain=explain)
        np.testing.assert_allclose([result.probabilities[label] for label in predictor.labels], by_hand, atol=1e-5)
        assert result.views == boxes and result.box == (boxes[0][0], boxes[0][1], boxes[1][2], boxes[1][3])
    assert result.explained == max(result.probabilities, key=result.probabilities.get)
    maps = gradcam(predictor.model, predictor.layer, pixels, [predictor.labels.index(result.explained)] * 2).maps
    np.testing.assert_allclose(result.heatmap, np.maximum(*(to_original(m, b, image.size) for m, b in zip(maps, boxes))), atol=1e-5)


def test_target_layers_come_from_the_specs(predictors):
    assert target_layer(predictors["tiny-resnet"].model) is predictors["tiny-resnet"].model.resnet.encoder.stages[-1]
    assert target_layer(predictors["tiny-vgg"].model) is predictors["tiny-vgg"].model.timm_model.features[-1]


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-vgg"])
def test_overlay_has_the_original_size_and_follows_the_crop(predictors, sample_dir, name):
    image = Image.open(sample_dir / "malignant" / "3000_1.png").convert("RGB")
    image = image.resize((301, 227))  # an odd size: nothing may assume a square or the model's size
    [result] = predictors[name].predict([image], target="malignant")
    assert result.overlay.shape == (227, 301, 3) and result.overlay.dtype == np.uint8
    assert result.heatmap.shape == (227, 301)
    left, top, right, bottom = result.box
    outside = np.ones_like(result.heatmap, dtype=bool)
    outside[top:bottom, left:right] = False
    assert result.heatmap[outside].max() == 0  # nothing painted on the border or the text panel
    assert result.explained == "malignant"
    assert sum(result.probabilities.values()) == pytest.approx(1.0)


def test_many_calls_release_hooks_and_keep_memory_flat(predictors, sample_dir):
    import resource

    predictor = predictors["tiny-resnet"]
    image = Image.open(sample_dir / "benign" / "2000_1.png")
    for _ in range(5):
        predictor.predict([image])
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(60):
        predictor.predict([image, image])
    gc.collect()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert not predictor.layer._forward_hooks and not predictor.layer._backward_hooks
    assert not any(m._forward_hooks for m in predictor.model.modules())
    assert grown_mb < 30, f"peak memory grew by {grown_mb:.1f} MB over 60 calls"


def test_batch_cli_with_a_corrupt_file(short_run, sample_dir, tmp_path):
    out, _ = short_run
    images = tmp_path / "images"
    images.mkdir()
    for name in ("benign/2000_1.png", "malignant/3001_2.png", "normal/1002_1.png"):
        shutil.copy(sample_dir / name, images / name.replace("/", "_"))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "notes.txt").write_text("hello")
    assert predict_main([str(out / "tiny-resnet"), str(images), "--out", str(tmp_path / "pred"), "--batch_size", "2"]) == 0
    rows = {r["path"]: r for r in csv.DictReader((tmp_path / "pred" / "predictions.csv").open())}
    assert set(rows) == {"benign_2000_1.png", "malignant_3001_2.png", "normal_1002_1.png", "broken.jpg", "notes.txt"}
    assert "broken.jpg" in rows["broken.jpg"]["error"] and rows["broken.jpg"]["predicted"] == ""
    assert "not an image" in rows["notes.txt"]["error"]
    good = rows["benign_2000_1.png"]
    assert good["error"] == "" and good["predicted"] in {"normal", "benign", "malignant"}
    assert good["label"] == ""  # predict knows no true label: compare refuses the file and says why
    with pytest.raises(ValueError, match="no true label"):
        read_predictions(tmp_path / "pred" / "predictions.csv")
    assert sum(float(good[f"p_{c}"]) for c in ("normal", "benign", "malignant")) == pytest.approx(1.0, abs=1e-4)
    overlay = Image.open(tmp_path / "pred" / "overlays" / "benign_2000_1.png")
    assert overlay.size == Image.open(images / "benign_2000_1.png").size
    assert not (tmp_path / "pred" / "overlays" / "broken.png").exists()


def test_heatmaps_change_when_weights_are_randomised(short_run, sample_dir):
    """Adebayo et al. (2018): an explanation that survives weight randomisation explains nothing."""
    predictor = Predictor.from_pretrained(str(short_run[0] / "tiny-resnet"))  # trained: what the sanity check is about
    images = [Image.open(p) for p in sorted((sample_dir / "malignant").glob("*.png"))[:6]]
    pixels, _, _ = predictor.prepare(images)
    rho = randomization_check(predictor.model, predictor.layer, pixels)
    assert len(rho) == len(pixels) >= 6  # one per view
    assert np.nanmean(np.abs(rho)) < 0.5, rho
    # The original model is untouched by the check.
    assert all(not p.requires_grad for p in predictor.model.parameters())


def test_localisation_functions():
    mask = outline_mask([[(10, 10), (30, 10), (30, 30), (10, 30)]], (64, 48))
    assert mask.shape == (48, 64) and mask[20, 20] and not mask[5, 5]
    peak = np.zeros((48, 64), np.float32)
    peak[20, 20] = 1.0
    assert pointing_hit(peak, mask) and energy_inside(peak, mask) == pytest.approx(1.0)
    gauss = centred_gaussian((64, 48))
    assert not pointing_hit(gauss, mask)  # the peak is at the centre (32, 24), outside the square
    assert 0 < energy_inside(gauss, mask) < 1


def test_gradcam_explains_the_given_class_in_float32(predictors):
    """A class other than the predicted one: the one-pass map equals standard Grad-CAM's for that class
    (not the argmax's), and the explanation says which class it explains. (The untrained tiny VGG's maps
    are all zero; test_bite checks both trained models.)"""
    predictor = predictors["tiny-resnet"]
    torch.manual_seed(3)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        top = predictor.model(pixel_values=x).logits.argmax(1).tolist()
    other = [(t + 1) % 3 for t in top]
    result = gradcam(predictor.model, predictor.layer, x, other)
    assert result.targets == other and result.maps.dtype == np.float32 and result.maps.max() > 0
    np.testing.assert_allclose(result.maps, standard_gradcam(predictor.model, predictor.layer, x, other), atol=1e-4)
    argmax = gradcam(predictor.model, predictor.layer, x)
    assert argmax.targets == top and not np.allclose(argmax.maps, result.maps, atol=1e-3)
    assert standard_gradcam(predictor.model, predictor.layer, x, other).dtype == np.float32


def test_overlay_blends_by_the_map_exactly():
    """Cold pixels keep the grey image, hot ones take the colour map's colour, weighted by
    opacity x sqrt(heat); the result is uint8 RGB of the image's size."""
    import cv2

    from thyroid_classifier.explain import overlay

    image = Image.new("L", (8, 4), 100)
    heat = np.zeros((4, 8), np.float32)
    heat[0, 0], heat[1, 1], heat[2, 2] = 1.0, 0.25, 2.0  # 2.0 is clipped to 1
    out = overlay(image, heat, opacity=0.5)
    assert out.dtype == np.uint8 and out.shape == (4, 8, 3)
    assert (out[3] == 100).all() and (out[0, 1:] == 100).all()  # no heat: the image as it was
    jet = lambda v: cv2.cvtColor(cv2.applyColorMap(np.uint8([[v]]), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)[0, 0].astype(np.float32)  # noqa: E731
    np.testing.assert_allclose(out[0, 0], np.uint8(100 * 0.5 + jet(255) * 0.5), atol=1)
    np.testing.assert_allclose(out[1, 1], np.uint8(100 * 0.75 + jet(63) * 0.25), atol=1)  # alpha = 0.5 * sqrt(0.25)
    np.testing.assert_array_equal(out[2, 2], out[0, 0])
    np.testing.assert_array_equal(overlay(image, heat, opacity=0.0), np.full((4, 8, 3), 100, np.uint8))


def test_localisation_baseline_and_masks_exactly():
    """The numbers behind the card's localisation table, against written-out computations: the centred
    Gaussian baseline, the outline mask (its edge included), the heatmap mapped back into its box."""
    # Gaussian centred on the box, sigma a quarter of each side: 1 at the centre, exp(-1/2) one sigma away.
    box = (8, 4, 48, 36)  # 40 x 32, centre (28, 20), sigma (10, 8)
    g = centred_gaussian((64, 48), box)
    assert g.shape == (48, 64) and g[20, 28] == pytest.approx(1.0)
    assert g[20, 38] == pytest.approx(np.exp(-0.5), rel=1e-5) and g[20, 18] == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert g[28, 28] == pytest.approx(np.exp(-0.5), rel=1e-5) and g[12, 28] == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert g[28, 38] == pytest.approx(np.exp(-1.0), rel=1e-5)
    yy, xx = np.mgrid[0:48, 0:64]
    np.testing.assert_allclose(centred_gaussian((64, 48), sigma=0.5), np.exp(-(((xx - 32) / 32) ** 2 + ((yy - 24) / 24) ** 2) / 2), rtol=1e-5)
    # A square outline: filled, its edge pixels included, nothing else.
    mask = outline_mask([[(10, 10), (30, 10), (30, 30), (10, 30)]], (64, 48))
    assert mask.dtype == bool and mask.sum() == 21 * 21 and mask[10, 10] and mask[30, 30] and not mask[31, 30]
    assert outline_mask([], (64, 48)).sum() == 0
    # Energy: the share of the map's sum inside the mask; an empty map has none.
    heat = np.zeros((48, 64), np.float32)
    heat[20, 20], heat[0, 0] = 3.0, 1.0
    assert energy_inside(heat, mask) == pytest.approx(0.75) and energy_inside(np.zeros((48, 64)), mask) == 0.0
    # A view's map back onto the image: resized into its box, zero outside, float32.
    small = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    full = to_original(small, (10, 5, 30, 25), (64, 48))
    assert full.dtype == np.float32 and full.shape == (48, 64)
    assert full[:5].sum() == 0 and full[:, :10].sum() == 0 and full[25:].sum() == 0 and full[:, 30:].sum() == 0
    assert full[5, 10] == pytest.approx(0.0) and full[5, 29] == pytest.approx(1.0) and full[24, 10] == pytest.approx(1.0)
    assert 0 < full[15, 20] < 1  # interpolated, not blocky
    assert to_original(np.ones((4, 4), np.float32), (10, 5, 30, 25), (64, 48))[5:25, 10:30].min() == pytest.approx(1.0)


def test_ddti_outlines_and_localize_cli(ddti_dir, short_run, tmp_path, capsys):
    outlines = ddti_outlines(ddti_dir / "xml" / "100.xml")
    assert 1 in outlines and len(outlines[1]) == 2  # a dual-view frame: one outline per view
    assert frame_outline(ddti_dir / "images" / "malignant" / "100_1.jpg", ddti_dir / "xml") == outlines[1]
    assert frame_outline(tmp_path / "100_99.jpg", ddti_dir / "xml") is None  # no such frame in the case
    assert frame_outline(tmp_path / "no-frame-number.jpg", ddti_dir / "xml") is None
    assert frame_outline(tmp_path / "100_1.jpg", tmp_path) is None  # no case file
    images = tmp_path / "frames"
    images.mkdir()
    for name in ("100_1.jpg", "101_1.jpg", "102_1.jpg"):
        shutil.copy(ddti_dir / "images" / "malignant" / name, images / name)
    out, _ = short_run
    model = tmp_path / "model"  # a copy: --update_metrics writes into the folder, and short_run is shared
    shutil.copytree(out / "tiny-resnet", model, ignore=shutil.ignore_patterns("checkpoints"))
    assert "outlined frames" not in (model / "README.md").read_text()
    json_path = tmp_path / "loc.json"
    assert localize_main([str(model), str(images), "--xml", str(ddti_dir / "xml"), "--json", str(json_path), "--update_metrics"]) == 0
    text = capsys.readouterr().out
    assert "pointing game" in text and "centred Gaussian" in text
    import json

    result = json.loads(json_path.read_text())
    assert result["n"] == 3
    for who in ("model", "centred_gaussian"):
        assert 0 <= result[who]["pointing_game"]["value"] <= 1
    assert json.loads((model / "metrics.json").read_text())["localization"]["n"] == 3
    # The card follows the folder: localize re-rendered it with the pointing-game number.
    card = (model / "README.md").read_text()
    assert "3 outlined frames" in card and f"| this model | {result['model']['pointing_game']['value']:.3f}" in card
    assert "localization" not in json.loads((out / "tiny-resnet" / "metrics.json").read_text())


def test_freeze_makes_no_parameter_trainable(predictors):
    model = freeze(predictors["tiny-vgg"].model)
    assert not any(p.requires_grad for p in model.parameters())


def test_full_kernel_convolution_runs_as_a_matrix_product_with_the_same_numbers():
    from thyroid_classifier.explain import linearize_full_kernel_convs

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 5))
    x = torch.randn(3, 8, 5, 5)
    expected = net(x)
    linearize_full_kernel_convs(net)
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    assert net[2]._linearized and not getattr(net[0], "_linearized", False)  # padded convs keep their path
    assert net(torch.randn(1, 8, 9, 9)).shape == (1, 32, 5, 5)  # larger inputs still convolve
