"""Patient-grouped cross-validation and external validation."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import write_image
from thyroid_classifier.data import cv_folds
from thyroid_classifier.evaluate import main as evaluate_main
from thyroid_classifier.metrics import bootstrap_intervals, classification_metrics
from thyroid_classifier.training import DataArguments, ModelArguments, RunArguments, run


def test_folds_never_share_a_group_and_cover_every_example_once():
    rng = np.random.default_rng(0)
    groups = [f"p{i}" for i in rng.integers(0, 60, 200)]
    labels = [int(g[1:]) % 3 for g in groups]  # the label is a property of the patient
    for seed in range(30):
        folds = cv_folds(labels, groups, 5, seed)
        held = np.concatenate([h for _, h in folds])
        assert sorted(held.tolist()) == list(range(200))  # each example held out exactly once
        for train, test in folds:
            assert not {groups[i] for i in train} & {groups[i] for i in test}
            assert {labels[i] for i in test} == {0, 1, 2}  # stratified


@pytest.fixture(scope="module")
def cv_run(tiny_models, sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv")
    results = run(
        DataArguments(data_dir=str(sample_dir)),
        ModelArguments(model=[str(tiny_models["tiny-resnet"])], image_size=32),
        RunArguments(output_dir=str(out), num_train_epochs=1, cv=3, bootstrap_resamples=50, per_device_train_batch_size=8),
    )
    return out, results


@pytest.mark.slow
def test_cv_writes_pooled_metrics_equal_to_a_manual_computation(cv_run, sample_dir):
    out, results = cv_run
    cv = json.loads((out / "tiny-resnet" / "cv_metrics.json").read_text())
    assert cv == json.loads(json.dumps(results["tiny-resnet"], default=float))
    assert cv["k"] == 3 and len(cv["per_fold"]) == 3 and cv["n"] == 36
    assert (out / "tiny-resnet" / "cv_roc.png").is_file()
    rows = list(csv.DictReader((out / "tiny-resnet" / "cv_predictions.csv").open()))
    assert len(rows) == 36 and len({r["path"] for r in rows}) == 36
    by_fold = {}
    for r in rows:
        by_fold.setdefault(r["fold"], set()).add(r["group"])
    folds = list(by_fold.values())
    for i, a in enumerate(folds):  # pairwise: no patient in any two folds (not only in all of them at once)
        for b in folds[i + 1 :]:
            assert not a & b
    labels = cv["labels"]
    y = [labels.index(r["label"]) for r in rows]
    probs = np.array([[float(r[f"p_{c}"]) for c in labels] for r in rows])
    manual = classification_metrics(y, probs, labels)
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "ece"):
        assert cv["pooled"][key]["value"] == pytest.approx(manual[key], abs=1e-5)
    assert cv["pooled"]["per_class"]["benign"]["recall"] == pytest.approx(manual["per_class"]["benign"]["recall"])
    ci = bootstrap_intervals(y, probs, labels, groups=[r["group"] for r in rows], n_resamples=50, seed=42)
    assert cv["pooled"]["roc_auc"]["ci"] == pytest.approx(ci["roc_auc"], abs=1e-3)  # resampled by patient
    assert cv["spread"]["roc_auc"]["min"] <= cv["spread"]["roc_auc"]["mean"] <= cv["spread"]["roc_auc"]["max"]
    # The layout report: the sample's split screens (manifest) and AUCs recomputed by hand.
    layout = {r["file"].split("/")[-1]: r["layout"] for r in csv.DictReader((sample_dir / "manifest.csv").open())}
    split = np.array([layout[r["path"].split("/")[-1]] == "split" for r in rows])
    by_layout = cv["by_layout"]
    assert by_layout["split_screen"]["n"] == split.sum() == 18 and by_layout["single_view"]["n"] == 18
    y = np.array(y)
    assert by_layout["single_view"]["roc_auc"] == pytest.approx(classification_metrics(y[~split], probs[~split], labels)["roc_auc"], abs=1e-6)
    k = labels.index("malignant")
    assert by_layout["layout_auc"]["malignant"] == pytest.approx(roc_auc_score(split[y == k], probs[y == k, k]), abs=1e-6)


def test_external_evaluation_flags_shared_images_and_unknown_classes(short_run, sample_dir, tmp_path, capsys):
    out, _ = short_run
    external = tmp_path / "hospital_b"
    for label in ("benign", "malignant", "normal"):
        for i in range(4):
            write_image(external / label / f"b{label}{i}_1.png", seed=1000 + i + 10 * len(label), size=(96, 128))
    shutil.copy(sample_dir / "malignant" / "3001_1.png", external / "malignant" / "shared_1.png")  # from the training data
    for i in range(2):
        write_image(external / "cyst" / f"c{i}_1.png", seed=77 + i)
    assert evaluate_main([str(out / "tiny-resnet"), str(external), "--out", str(tmp_path / "eval"), "--bootstrap", "50", "--quiet"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n"] == 13
    assert [o["path"].rsplit("/", 1)[1] for o in report["training_overlap"]] == ["shared_1.png"]
    assert report["training_overlap"][0]["kind"] == "exact"
    assert report["unknown_classes"] == {"cyst": 2}
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "ece"):
        assert set(report["external"][key]) == {"value", "ci"}
    text = capsys.readouterr().out
    assert "LEAKAGE" in text and "cyst" in text
    assert len(list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))) == 13


def test_external_evaluation_scores_simulated_machine_shifts(short_run, sample_dir, tmp_path):
    from thyroid_classifier.augment import device_shifts, shift_image
    from thyroid_classifier.predict import Predictor
    from thyroid_classifier.preprocess import open_image

    out, _ = short_run
    external = tmp_path / "hospital_c"
    for label in ("benign", "malignant"):
        for i in range(5):
            write_image(external / label / f"c{label}{i}_1.png", seed=500 + i + 10 * len(label), size=(96, 128))
    assert evaluate_main([str(out / "tiny-resnet"), str(external), "--out", str(tmp_path / "eval"), "--bootstrap", "20", "--quiet", "--shifts"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    shifts = device_shifts(0)
    assert list(report["device_shifts"]) == list(shifts)
    # One shift recomputed by hand: the same images, shifted, through the same predictor.
    predictor = Predictor.from_pretrained(out / "tiny-resnet")
    rows = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    name = "lower resolution (x0.4)"
    results = predictor.predict([shift_image(open_image(r["path"]), shifts[name]) for r in rows], explain=False)
    y = [predictor.labels.index(r["label"]) for r in rows]
    probs = np.array([[res.probabilities[c] for c in predictor.labels] for res in results])
    assert report["device_shifts"][name]["roc_auc"] == pytest.approx(classification_metrics(y, probs, predictor.labels)["roc_auc"], abs=1e-6)
    assert "Simulated machine differences" in (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.slow
def test_cv_final_model_carries_the_cv_numbers_into_its_card(tiny_models, sample_dir, tmp_path):
    """--cv_final: a model trained on all the data whose card states the cross-validation numbers,
    the layout report included (the sample has split screens)."""
    run(
        DataArguments(data_dir=str(sample_dir)),
        ModelArguments(model=[str(tiny_models["tiny-resnet"])], image_size=32),
        RunArguments(output_dir=str(tmp_path), num_train_epochs=1, cv=2, cv_final=True, bootstrap_resamples=20, per_device_train_batch_size=8),
    )
    cv = json.loads((tmp_path / "tiny-resnet" / "cv_metrics.json").read_text())
    metrics = json.loads((tmp_path / "tiny-resnet" / "metrics.json").read_text())
    assert metrics["cross_validation"]["pooled"] == cv["pooled"] and metrics["cross_validation"]["by_layout"] == cv["by_layout"]
    card = (tmp_path / "tiny-resnet" / "README.md").read_text()
    auc = cv["pooled"]["roc_auc"]
    assert f"2-fold, grouped by patient, pooled out-of-fold macro ROC AUC {auc['value']:.3f} [{auc['ci'][0]:.3f}, {auc['ci'][1]:.3f}]" in card
    assert f"On single-view frames alone (n = {cv['by_layout']['single_view']['n']})" in card
