"""A site adapting a trained model (``train.py --model MODEL_FOLDER --data_dir SITE``): the run keeps the
model's head, labels, preprocessing and size, refits what it fits on data, and says what it was adapted
from and on how many of the site's frames."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from thyroid_classifier.adaptation import StartingModel, align_labels


@pytest.fixture(scope="module")
def start(short_run) -> Path:
    """A model this project trained (the tiny ResNet of ``short_run``: 32 px, split views, temperature in its weights)."""
    return short_run[0] / "tiny-resnet"


@pytest.fixture(scope="module")
def adapted(start, two_sources, tmp_path_factory):
    """``start`` adapted to ``site_b`` (a source it never saw) alone, through train.py's ``main``."""
    from thyroid_classifier.training import main

    out = tmp_path_factory.mktemp("adapted")
    code = main(["--model", str(start), "--data_dir", str(two_sources[1]), "--output_dir", str(out), "--num_train_epochs", "1",
                 "--per_device_train_batch_size", "8", "--bootstrap_resamples", "20", "--learning_rate", "1e-4"])
    assert code == 0
    return out / "tiny-resnet"


def test_a_trained_folder_is_a_starting_point_and_a_plain_checkpoint_is_not(start, tiny_models):
    found = StartingModel.read(str(start))
    assert found is not None and found.labels == json.loads((start / "metrics.json").read_text())["labels"]
    assert found.image_size == 32 and found.preprocessor.split_views  # as short_run trained it, not the defaults
    assert StartingModel.read(str(tiny_models["tiny-resnet"])) is None  # no metrics: a new model is built from it
    assert StartingModel.read("resnet50") is None


def test_the_run_starts_from_the_trained_head_with_its_temperature_taken_out(start):
    """The saved weights give logits / T (for pipeline() users); training must go on from the logits the model was
    trained to give, with the trained head (a fresh head, or the calibrated copy, would fail this)."""
    from transformers import AutoModelForImageClassification

    found = StartingModel.read(str(start))
    temperature = json.loads((start / "config.json").read_text())["calibration_temperature"]
    assert abs(temperature - 1) > 0.01, "the check needs a temperature other than 1"
    built, processor = found.build(found.labels)
    saved = AutoModelForImageClassification.from_pretrained(start).eval()
    built.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(built(pixel_values=x).logits, saved(pixel_values=x).logits * temperature, atol=1e-5)
    assert processor.size["height"] == 32
    assert list(built.config.id2label.values()) == found.labels


def test_an_adapted_folder_keeps_the_models_preprocessing_and_says_what_it_was_adapted_from(adapted, start, two_sources):
    metrics = json.loads((adapted / "metrics.json").read_text())
    start_metrics = json.loads((start / "metrics.json").read_text())
    # Kept: labels, preprocessing (split views on, though the flags' default is off) and size (no --image_size given).
    assert metrics["labels"] == start_metrics["labels"]
    assert json.loads((adapted / "ultrasound_preprocessing.json").read_text()) == json.loads((start / "ultrasound_preprocessing.json").read_text())
    processor, start_processor = (json.loads((f / "preprocessor_config.json").read_text()) for f in (adapted, start))
    assert processor["size"] == {"height": 32, "width": 32}
    assert (processor["image_mean"], processor["image_std"]) == (start_processor["image_mean"], start_processor["image_std"]) != ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    record = metrics["adapted_from"]
    assert record["model"] == str(start) and record["trained_on"] == json.loads((start / "reliability.json").read_text())["training_sources"]
    counts = metrics["data"]["counts"]
    site = {"labelled": sum(counts["train"].values()) + sum(counts["validation"].values()), "train": sum(counts["train"].values()),
            "validation": sum(counts["validation"].values()), "measured_on": sum(counts["test"].values())}
    assert record["sites"] == {"site_b": site}
    # Refitted on the site: the in-source regime is the site's, not the start's sources.
    assert json.loads((adapted / "reliability.json").read_text())["training_sources"] == ["site_b"]
    card = (adapted / "README.md").read_text()
    auc = metrics["test"]["roc_auc"]["value"]
    assert f"Adapted to site_b with {site['labelled']} labelled frames" in card and f"on its other {site['measured_on']} frames" in card
    assert f"macro ROC AUC {auc:.2f}" in card and f"adapted from {start}" in card
    assert "from a model\nit trained before" in card and "pretrained weights of" not in card  # not "ImageNet weights of a folder"


def test_the_page_says_the_model_was_adapted_and_on_how_many_frames(adapted):
    from thyroid_classifier.app import notice
    from thyroid_classifier.predict import Predictor

    text = notice(Predictor.from_pretrained(str(adapted)).info)
    metrics = json.loads((adapted / "metrics.json").read_text())
    assert f"Adapted to site_b with {metrics['adapted_from']['sites']['site_b']['labelled']} labelled frames" in text


def test_labels_are_matched_to_the_head_by_name_and_a_missing_or_new_class_is_refused():
    from datasets import ClassLabel, Dataset, DatasetDict

    rows = {"label": [0, 1, 1], "path": ["a", "b", "c"]}
    data = DatasetDict({"train": Dataset.from_dict(rows).cast_column("label", ClassLabel(names=["benign", "malignant"]))})
    same = align_labels(data, ["benign", "malignant"], "m")
    assert same is data
    flipped = align_labels(data, ["malignant", "benign"], "m")
    names = flipped["train"].features["label"].names
    assert [names[y] for y in flipped["train"]["label"]] == ["benign", "malignant", "malignant"]  # each frame keeps its class
    with pytest.raises(ValueError, match=r"no images of: \['normal'\]"):
        align_labels(data, ["normal", "benign", "malignant"], "m")
    with pytest.raises(ValueError, match=r"does not know: \['malignant'\]"):
        align_labels(data, ["benign", "normal"], "m")


@pytest.mark.parametrize("flags, message", [(["--loso"], "--cv and --loso"), (["--init", "random"], "throw its weights away")])
def test_settings_that_would_lose_the_start_are_refused_before_training(start, two_sources, tmp_path, flags, message, capsys):
    from thyroid_classifier.training import main

    data = [str(two_sources[0]), str(two_sources[1])]
    assert main(["--model", str(start), "--data_dir", *data, "--output_dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_hub_id_that_cannot_be_reached_fails_at_once_with_what_to_do(sample_dir, tmp_path, capsys, monkeypatch):
    from thyroid_classifier.training import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--model", "someone/thyroid-efficientnet", "--data_dir", str(sample_dir), "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "someone/thyroid-efficientnet" in err and "--model /path/to/checkpoint" in err
    assert not any(tmp_path.iterdir())


def test_a_model_whose_labels_are_in_another_order_keeps_its_order_and_each_frame_its_class(start, two_sources, tmp_path):
    """A Hub model may list its classes in another order than the data's folders sort: the head's rows keep their meaning,
    the data's labels are matched to them by name (a run that trusted the data's order would relabel the head)."""
    from thyroid_classifier.training import main

    reordered = tmp_path / "start"
    shutil.copytree(start, reordered, ignore=shutil.ignore_patterns("checkpoints"))
    metrics = json.loads((reordered / "metrics.json").read_text())
    order = list(reversed(metrics["labels"]))
    metrics["labels"] = order
    (reordered / "metrics.json").write_text(json.dumps(metrics))
    config = json.loads((reordered / "config.json").read_text())
    config["id2label"] = {str(i): name for i, name in enumerate(order)}
    config["label2id"] = {name: i for i, name in enumerate(order)}
    (reordered / "config.json").write_text(json.dumps(config))
    assert main(["--model", str(reordered), "--data_dir", str(two_sources[1]), "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "1",
                 "--bootstrap_resamples", "10"]) == 0
    adapted = tmp_path / "out" / "start"
    assert json.loads((adapted / "metrics.json").read_text())["labels"] == order
    assert list(json.loads((adapted / "config.json").read_text())["id2label"].values()) == order
    import csv

    with (adapted / "predictions_test.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(Path(r["path"]).parent.name == r["label"] for r in rows)


def test_a_timm_models_start_keeps_its_saved_normalisation(short_run):
    """transformers >= 5.25 reads a local timm folder's image processor from config.json: the start must still be
    normalised as the folder's preprocessor_config.json says (here std 0.25, not a default 0.5)."""
    folder = short_run[0] / "tiny-vgg"
    found = StartingModel.read(str(folder))
    _, processor = found.build(found.labels)
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert list(processor.image_std) == saved["image_std"] == [0.25, 0.25, 0.25] and processor.size["height"] == 32
