"""Every statement of the model card follows the run's settings: a card rendered for a pretrained, a
random-init, a Hub-checkpoint and a cross-validated run says what each run did, and nothing else."""

from __future__ import annotations

import json
import shutil

import pytest

from thyroid_classifier.card import render_card


def _variant(short_run, tmp_path, name: str, edit) -> object:
    folder = shutil.copytree(short_run[0] / "tiny-resnet", tmp_path / name, ignore=shutil.ignore_patterns("checkpoints"))
    metrics = json.loads((folder / "metrics.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    edit(metrics, config)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.json").write_text(json.dumps(config))
    return render_card(folder)


def test_card_statements_follow_the_run(short_run, tmp_path):
    from importlib.metadata import version

    out, _ = short_run
    metrics = json.loads((out / "tiny-resnet" / "metrics.json").read_text())
    card = render_card(out / "tiny-resnet")
    text, data = card.content, card.data

    # Pretrained from a local checkpoint: fine-tuned from it, named by its folder; no Hub base_model to claim.
    assert metrics["init"] == "pretrained"
    assert "fine-tuned" in text and "from the\npretrained weights of `tiny-resnet`" in text and "randomly initialised" not in text
    assert data.base_model is None
    assert data.datasets == ["synthetic-sample"]  # the built-in sample, by its short name
    args = {r.metric_type: r.metric_args for r in data.eval_results}
    assert args["roc_auc"] == {"average": "macro", "multi_class": "ovr"} and args["f1"] == {"average": "macro"} and args["accuracy"] is None
    assert f"transformers {version('transformers')}" in text and f"torch {version('torch')}" in text  # the versions it ran with
    # Install and load: an install line, the pipeline with the crop, the package's way without remote code.
    assert 'pip install "transformers>=5"' in text and "trust_remote_code=True" in text and "UltrasoundImageProcessor.from_pretrained" in text
    assert "The temperature is in\nthe saved classifier weights" in text  # config.json says temperature_in_weights
    assert "**This model was not measured on any unseen source.**" in text  # no --loso run
    assert "Cross-validation:" not in text  # no --cv run

    random = _variant(short_run, tmp_path, "random", lambda m, c: (m.update(init="random"), m["training"].update(init="random")))
    assert "trained to classify" in random.content and "from randomly initialised weights (`--init random`)" in random.content
    assert "fine-tuned" not in random.content.split("## Intended use")[0] and random.data.base_model is None

    hub = _variant(short_run, tmp_path, "hub", lambda m, c: m.update(checkpoint="microsoft/resnet-50"))
    assert hub.data.base_model == "microsoft/resnet-50" and "pretrained weights of `microsoft/resnet-50`" in hub.content

    pooled = {"roc_auc": {"value": 0.812, "ci": [0.75, 0.86]}, "balanced_accuracy": {"value": 0.7, "ci": [0.65, 0.74]}}
    cv = _variant(short_run, tmp_path, "cv", lambda m, c: m.update(cross_validation={"k": 5, "pooled": pooled}))
    assert "Cross-validation: 5-fold, grouped by patient, pooled out-of-fold macro ROC AUC 0.812 [0.750, 0.860]" in cv.content

    # A folder written before the temperature went into the weights: the card says pipeline() is uncalibrated.
    old = _variant(short_run, tmp_path, "old", lambda m, c: c.pop("temperature_in_weights"))
    assert "`pipeline()` does not." in old.content and "in\nthe saved classifier weights" not in old.content
    assert "\nTrained with thyroid-classifier" in text
    assert "\nTrained with thyroid-classifier" not in _variant(short_run, tmp_path, "nover", lambda m, c: m["training"].pop("versions")).content


@pytest.mark.parametrize("split_views", [False, True])
def test_card_preprocessing_statement_follows_split_views(short_run, tmp_path, split_views):
    card = _variant(short_run, tmp_path, f"views{split_views}", lambda m, c: m["training"]["preprocessing"].update(split_views=split_views))
    assert ("split into its views" in card.content) is split_views
    assert ("where the project's `Predictor` averages its two views" in card.content) is split_views
