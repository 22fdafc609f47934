"""Training end to end on tiny random models (local checkpoint folders; nothing is downloaded)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score
from transformers import TrainerCallback

from conftest import REPO
from thyroid_classifier.metrics import (
    ThyroidMetrics,
    bootstrap_intervals,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    softmax,
)
from thyroid_classifier.models import REGISTRY, build_model, target_layer
from thyroid_classifier.training import DataArguments, ModelArguments, RunArguments, main, parse_args, run

ARTIFACTS = (
    "model.safetensors", "config.json", "preprocessor_config.json", "ultrasound_preprocessing.json",
    "metrics.json", "loss.png", "auc.png", "roc.png", "confusion_matrix.png", "audit.json", "predictions_test.csv",
)


def _args(data_dir, models, out, **run_kwargs):
    run_defaults = dict(output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=8, bootstrap_resamples=50, early_stopping_patience=0)
    run_defaults.update(run_kwargs)
    return DataArguments(data_dir=str(data_dir)), ModelArguments(model=[str(m) for m in models], image_size=32), RunArguments(**run_defaults)


def test_short_run_writes_every_artifact(short_run, sample_dir):
    out, results = short_run
    assert set(results) == {"tiny-resnet", "tiny-vgg"}
    for name in results:
        for artifact in ARTIFACTS:
            assert (out / name / artifact).is_file(), f"{name}/{artifact} missing"
        metrics = json.loads((out / name / "metrics.json").read_text())
        test = metrics["test"]
        for key in ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "ece"):
            low, high = test[key]["ci"]
            assert 0 <= test[key]["value"] <= 1 and low <= high
        assert test["split"] == "test" and metrics["split"] == "test"
        assert test["n"] == metrics["n"] == sum(metrics["data"]["counts"]["test"].values())
        assert set(test["per_class"]) == {"normal", "benign", "malignant"}
        assert np.asarray(test["confusion_matrix"]).sum() == test["n"]
        assert metrics["calibration"]["temperature"] > 0
        assert [h["epoch"] for h in metrics["history"]] == [1, 2]
        assert all("loss" in h and "eval_loss" in h for h in metrics["history"])
        config = json.loads((out / name / "config.json").read_text())
        labels = config.get("id2label") or dict(enumerate(config["label_names"]))
        assert list(labels.values()) == ["normal", "benign", "malignant"]
    assert (out / "comparison.png").is_file()
    table = (out / "comparison.md").read_text()
    assert "tiny-resnet" in table and "tiny-vgg" in table and "roc_auc" in table


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-vgg"])
def test_result_loads_with_pipeline(short_run, sample_dir, name):
    from PIL import Image
    from transformers import ImageClassificationPipeline, pipeline

    out, _ = short_run
    # The plain class, asked for explicitly (without it the folder's own pipeline needs trust_remote_code).
    classifier = pipeline("image-classification", model=str(out / name), device="cpu", pipeline_class=ImageClassificationPipeline)
    image = Image.open(sample_dir / "benign" / "2000_1.png")
    predictions = classifier(image, top_k=3)
    assert {p["label"] for p in predictions} == {"normal", "benign", "malignant"}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)
    # The pipeline's processor (for a local timm folder: built from config.json) gives the pixels
    # of the processor saved with the model, which training used.
    from transformers import AutoImageProcessor

    saved = AutoImageProcessor.from_pretrained(out / name, image_processor_filename="preprocessor_config.json")
    pipeline_pixels = classifier.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    saved_pixels = saved(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    assert pipeline_pixels.shape == saved_pixels.shape
    assert float((pipeline_pixels - saved_pixels).abs().mean()) < 0.01


class _Interrupt(TrainerCallback):
    """Simulates a crash right after the first epoch's checkpoint is written."""

    def on_save(self, args, state, control, **kwargs):
        if state.epoch and state.epoch >= 1:
            raise KeyboardInterrupt("simulated crash")


class _StepCounter(TrainerCallback):
    """Records the global step after every optimizer step this run takes."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.slow
def test_interrupted_run_resumes(tiny_models, sample_dir, tmp_path):
    args = _args(sample_dir, [tiny_models["tiny-resnet"]], tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(*args, callbacks=[_Interrupt()])
    checkpoints = list((tmp_path / "tiny-resnet" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    first_epoch = json.loads((checkpoints[0] / "trainer_state.json").read_text())["log_history"]
    data_args, model_args, run_args = args
    run_args.resume = True
    counter = _StepCounter()
    results = run(data_args, model_args, run_args, callbacks=[counter])
    history = results["tiny-resnet"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    # Epoch 1 is not re-run: its validation loss is the one the interrupted run logged.
    logged = next(e["eval_loss"] for e in first_epoch if "eval_loss" in e)
    assert history[0]["eval_loss"] == pytest.approx(logged)
    # The resumed run started at the checkpoint's step and did only the steps left (a run restarted
    # from scratch would do every step again), ending where an uninterrupted run ends, with its weights.
    start = json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"]
    final = json.loads((tmp_path / "tiny-resnet" / "checkpoints" / "checkpoint-{}".format(2 * start) / "trainer_state.json").read_text())
    assert final["global_step"] == 2 * start
    # The optimizer steps this run took: only those after the checkpoint (a fresh start takes them all).
    assert counter.steps[0] == start + 1 and len(counter.steps) == final["global_step"] - start
    straight = tmp_path / "straight"
    run(*_args(sample_dir, [tiny_models["tiny-resnet"]], straight))
    uninterrupted = json.loads(next((straight / "tiny-resnet" / "checkpoints").glob(f"checkpoint-{2 * start}")).joinpath("trainer_state.json").read_text())
    assert uninterrupted["global_step"] == final["global_step"]
    from safetensors.torch import load_file

    resumed_w, straight_w = load_file(tmp_path / "tiny-resnet" / "model.safetensors"), load_file(straight / "tiny-resnet" / "model.safetensors")
    for key, value in straight_w.items():
        torch.testing.assert_close(resumed_w[key], value, atol=1e-5, rtol=1e-4)


def test_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    probs = softmax(rng.normal(size=(200, 3)) + np.eye(3)[y] * 1.5)
    ours = classification_metrics(y, probs, ["normal", "benign", "malignant"])
    pred = probs.argmax(1)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert ours["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert ours["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert ours["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert ours["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert ours["per_class"]["benign"]["recall"] == pytest.approx(((pred == 1) & (y == 1)).sum() / (y == 1).sum())
    # Binary: the macro AUC is the plain AUC of the positive class.
    yb = (y == 2).astype(int)
    pb = np.stack([1 - probs[:, 2], probs[:, 2]], 1)
    assert classification_metrics(yb, pb, ["benign", "malignant"])["roc_auc"] == pytest.approx(roc_auc_score(yb, pb[:, 1]))
    # The evaluate.Metric face gives the same numbers.
    assert ThyroidMetrics(["normal", "benign", "malignant"]).compute(predictions=probs, references=y)["roc_auc"] == pytest.approx(ours["roc_auc"])


def test_frame_logits_average_view_probabilities():
    from thyroid_classifier.metrics import frame_logits

    z = np.random.default_rng(0).normal(size=(5, 3)) * 20  # very confident views too
    owner = np.array([0, 1, 1, 2, 3])
    frames = frame_logits(z, owner, 4)
    p = softmax(z)
    np.testing.assert_allclose(softmax(frames), np.stack([p[0], (p[1] + p[2]) / 2, p[3], p[4]]), atol=1e-12)
    # One view per frame: the same probabilities at any temperature (a per-row shift of the logits).
    np.testing.assert_allclose(softmax(frames[[0, 2, 3]], 2.5), softmax(z[[0, 3, 4]], 2.5), atol=1e-12)


def test_ece_and_temperature():
    # Perfectly calibrated by construction: confidence 0.8 and 80% correct -> ECE 0.
    y = np.array([0] * 8 + [1] * 2)
    probs = np.tile([0.8, 0.2], (10, 1))
    assert expected_calibration_error(y, probs) == pytest.approx(0.0)
    assert expected_calibration_error(np.zeros(10, int), np.tile([0.6, 0.4], (10, 1))) == pytest.approx(0.4)
    # Over-confident logits: the fitted temperature is > 1 and lowers ECE.
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    logits = rng.normal(size=(2000, 2)) + np.eye(2)[y]
    t = fit_temperature(logits * 4, y)
    assert 3.0 < t < 5.5
    assert expected_calibration_error(y, softmax(logits * 4, t)) < expected_calibration_error(y, softmax(logits * 4))


@pytest.mark.slow
def test_bootstrap_intervals_cover_the_estimate_and_resample_groups():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    probs = softmax(rng.normal(size=(300, 2)) + np.eye(2)[y])
    point = classification_metrics(y, probs, ["a", "b"])
    ci = bootstrap_intervals(y, probs, ["a", "b"], n_resamples=300)
    for key in ("accuracy", "roc_auc", "balanced_accuracy"):
        assert ci[key][0] < point[key] < ci[key][1]
    # 30 patients with 10 identical frames each: resampling patients gives a wider interval.
    groups = [str(i // 10) for i in range(300)]
    y_g, p_g = y.reshape(30, 10)[:, :1].repeat(10, 1).ravel(), probs.reshape(30, 10, 2)[:, :1].repeat(10, 1).reshape(300, 2)
    narrow = bootstrap_intervals(y_g, p_g, ["a", "b"], n_resamples=300)
    wide = bootstrap_intervals(y_g, p_g, ["a", "b"], groups=groups, n_resamples=300)
    assert (wide["roc_auc"][1] - wide["roc_auc"][0]) > 1.5 * (narrow["roc_auc"][1] - narrow["roc_auc"][0])


def test_offline_without_init_random_fails_at_once(sample_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["--data_dir", str(sample_dir), "--model", "resnet50", "--output_dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "microsoft/resnet-50" in err and "--init random" in err
    assert not (tmp_path / "resnet50").exists()  # stopped before any training


@pytest.mark.slow
def test_random_init_builds_registry_models_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = build_model(REGISTRY["vgg19"], ["benign", "malignant"], "random", image_size=64)
    assert model.config.id2label == {0: "benign", 1: "malignant"}
    assert processor.size == {"height": 64, "width": 64}
    with torch.no_grad():
        features = model.timm_model.forward_features(torch.randn(2, 3, 64, 64))
    # timm's own init, not TimmWrapper's N(0, 0.02) (which gives a std near 0.0006 and stalls training).
    assert features.std() > 0.02
    assert isinstance(target_layer(model), torch.nn.MaxPool2d)
    resnet, _ = build_model(REGISTRY["resnet50"], ["a", "b", "c"], "random")
    assert resnet.config.num_labels == 3 and target_layer(resnet) is resnet.resnet.encoder.stages[-1]


@pytest.mark.slow
def test_help_documents_every_option_and_json_config(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--data_dir", "--model", "--init", "--image_size", "--resume", "--seed", "--num_train_epochs", "--drop_duplicates", "--class_weighting"):
        assert option in out
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data_dir": "x", "model": ["vgg19"], "init": "random", "num_train_epochs": 3}))
    data_args, model_args, run_args = parse_args([str(config)])
    assert (data_args.data_dir, model_args.model, model_args.init, run_args.num_train_epochs) == ("x", ["vgg19"], "random", 3)


@pytest.mark.slow
def test_two_process_run_evaluates_each_example_once(tiny_models, sample_dir, tmp_path):
    """`accelerate launch` with two CPU processes: every validation and test example counted once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train.py"),
        "--data_dir", str(sample_dir), "--model", str(tiny_models["tiny-resnet"]), "--image_size", "32",
        "--num_train_epochs", "1", "--per_device_eval_batch_size", "4", "--bootstrap_resamples", "20",
        "--output_dir", str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "tiny-resnet" / "metrics.json").read_text())
    assert metrics["training"]["processes"] == 2
    counts = metrics["data"]["counts"]
    assert metrics["test"]["n"] == sum(counts["test"].values())
    assert metrics["history"][0]["eval_n"] == sum(counts["validation"].values())
    with (tmp_path / "tiny-resnet" / "predictions_test.csv").open() as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    assert len(paths) == len(set(paths)) == metrics["test"]["n"]


def test_discriminative_learning_rates(tiny_models):
    from transformers import AutoModelForImageClassification

    from thyroid_classifier.tuning import head_parameters, make_optimizer

    for path in tiny_models.values():
        model = AutoModelForImageClassification.from_pretrained(path)
        head = head_parameters(model)
        optimizer = make_optimizer(model, RunArguments(learning_rate=1e-4, weight_decay=0.05), head_multiplier=10.0)
        seen = 0
        for group in optimizer.param_groups:
            is_head = {id(p) for p in group["params"]} <= head
            assert group["lr"] == pytest.approx(1e-3 if is_head else 1e-4)
            assert group["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in group["params"]) else 0.05)
            seen += len(group["params"])
        assert seen == len(list(model.parameters())) and head


@pytest.mark.slow
def test_linear_probing_then_fine_tuning(tiny_models, sample_dir, tmp_path):
    """With --freeze_backbone_epochs 1 the backbone does not move in epoch 1 and does in epoch 2."""
    from transformers import AutoModelForImageClassification, TrainerCallback

    snapshots = []

    class Snapshot(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            snapshots.append(model.resnet.embedder.embedder.convolution.weight.detach().clone())

    data_args, model_args, run_args = _args(sample_dir, [tiny_models["tiny-resnet"]], tmp_path, freeze_backbone_epochs=1)
    run(data_args, model_args, run_args, callbacks=[Snapshot()])
    start = AutoModelForImageClassification.from_pretrained(tiny_models["tiny-resnet"]).resnet.embedder.embedder.convolution.weight
    assert torch.equal(snapshots[0], start)
    assert not torch.equal(snapshots[1], start)


@pytest.mark.slow
def test_weight_average_is_the_saved_model(tiny_models, sample_dir, tmp_path):
    """--ema_decay: the saved weights are the moving average of the weights after every step."""
    from transformers import AutoModelForImageClassification, TrainerCallback

    steps = []

    class Snapshot(TrainerCallback):  # runs before the averaging callback (user callbacks come first)
        def on_step_end(self, args, state, control, model=None, **kwargs):
            steps.append(model.resnet.embedder.embedder.convolution.weight.detach().clone())

    data_args, model_args, run_args = _args(sample_dir, [tiny_models["tiny-resnet"]], tmp_path, ema_decay=0.5)
    run(data_args, model_args, run_args, callbacks=[Snapshot()])
    expected = steps[0]  # timm's ModelEmaV3 copies the weights at its first update, then averages
    for w in steps[1:]:
        expected = 0.5 * expected + 0.5 * w
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "tiny-resnet").resnet.embedder.embedder.convolution.weight
    assert len(steps) > 2
    assert torch.allclose(saved, expected, atol=1e-6)
    assert not torch.allclose(saved, steps[-1], atol=1e-6)


def test_weight_average_excludes_select_best(sample_dir, tmp_path):
    with pytest.raises(ValueError, match="drop --select_best"):
        run(*_args(sample_dir, ["resnet50"], tmp_path, ema_decay=0.99, select_best=True))


@pytest.mark.slow
def test_device_augment_trains_only_the_training_split_and_is_recorded(tiny_models, sample_dir, tmp_path):
    """--device_augment puts DeviceAugment into the training batches' augmentation (evaluation images are
    never augmented) and the setting is recorded in metrics.json and the card."""
    from transformers import TrainerCallback

    from thyroid_classifier.augment import DeviceAugment
    from thyroid_classifier.transforms import ImageTransforms

    seen = {}

    class Inspect(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            transform = train_dataloader.dataset._format_kwargs.get("transform")
            assert isinstance(transform, ImageTransforms) and transform.train
            seen["train"] = any(isinstance(t, DeviceAugment) for t in transform.appearance.transforms)  # the image's own changes, not the geometry

    data_args, model_args, run_args = _args(sample_dir, [tiny_models["tiny-resnet"]], tmp_path, device_augment=True, num_train_epochs=1)
    run(data_args, model_args, run_args, callbacks=[Inspect()])
    assert seen.get("train") is True
    metrics = json.loads((tmp_path / "tiny-resnet" / "metrics.json").read_text())
    assert metrics["training"]["device_augment"] is True
    card = (tmp_path / "tiny-resnet" / "README.md").read_text()
    assert "device_augment" in card and "Training randomised gain" in card
    # Split screens (the sample has them) stay whole by default; short_run's models split them (card: test_hub).
    assert metrics["training"]["preprocessing"]["split_views"] is False and "split into its views" not in card


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-vgg"])
def test_predictor_sees_what_evaluation_saw(short_run, name):
    """No train/serve skew: the Predictor's probabilities on the test split equal the ones training
    wrote (timm folders once got timm's resize-and-centre-crop instead of the saved processor; a
    split screen's views are averaged the same way in both)."""
    from PIL import Image

    from thyroid_classifier.predict import Predictor

    out, _ = short_run
    predictor = Predictor.from_pretrained(str(out / name), calibrated=False)
    assert type(predictor.processor).__name__ == "ViTImageProcessor"
    rows = list(csv.DictReader((out / name / "predictions_test.csv").open()))
    results = predictor.predict([Image.open(r["path"]) for r in rows], explain=False)
    assert {len(r.views) for r in results} == {1, 2}  # split screens too: their views averaged alike
    for row, result in zip(rows, results, strict=True):
        for label, p in result.probabilities.items():
            assert p == pytest.approx(float(row[f"p_{label}"]), abs=1e-4), (name, row["path"], label)


def test_training_draws_one_view_and_evaluation_reads_every_view(tiny_models, sample_dir):
    """A split screen is one training example that shows one of its views at a time (both, over
    epochs); for evaluation every view is a row, tied to its frame."""
    from datasets import Dataset

    from thyroid_classifier.models import get_spec
    from thyroid_classifier.preprocess import UltrasoundPreprocessor
    from thyroid_classifier.transforms import ImageTransforms, expand_views

    _, processor = build_model(get_spec(str(tiny_models["tiny-resnet"])), ["benign", "malignant"], "pretrained", 32)
    split, single = str(sample_dir / "malignant" / "3001_1.png"), str(sample_dir / "malignant" / "3000_1.png")
    train = ImageTransforms(UltrasoundPreprocessor(split_views=True), processor, 32, train=True)
    train.augment = lambda image: torch.as_tensor(np.asarray(image).copy())  # no augmentation: see the view itself
    views = [torch.as_tensor(np.asarray(v)) for v in train._load(split)]
    assert len(views) == 2 and views[0].shape == (32, 32, 3)
    torch.manual_seed(0)
    drawn = [train({"path": [split], "label": [1]})["pixel_values"][0] for _ in range(20)]
    assert {next(i for i, v in enumerate(views) if torch.equal(d, v)) for d in drawn} == {0, 1}

    evaluation = ImageTransforms(UltrasoundPreprocessor(split_views=True), processor, 32, train=False)
    frames = Dataset.from_dict({"path": [single, split], "label": [1, 1]})
    rows, owner = expand_views(frames, evaluation)
    assert owner.tolist() == [0, 1, 1] and rows["view"] == [0, 0, 1]
    rows.set_transform(evaluation, columns=["path", "label", "view"])
    assert not torch.equal(rows[1]["pixel_values"], rows[2]["pixel_values"])
    assert torch.equal(rows[2]["pixel_values"], evaluation._load(split)[1])
    # Without split screens nothing changes.
    same, owner = expand_views(frames.select([0]), evaluation)
    assert owner.tolist() == [0] and "view" not in same.column_names


def test_a_view_transform_plugs_in_at_one_stage_for_evaluation_and_the_predictor(short_run):
    """Stage 3 of the one inference path: a test-time change of each cropped view gives the same
    probabilities through Trainer evaluation's transforms and through the Predictor, and it sees
    views (the crop already done), not whole frames."""
    from PIL import Image, ImageOps

    from thyroid_classifier.inference import frame_probabilities
    from thyroid_classifier.predict import Predictor
    from thyroid_classifier.transforms import ImageTransforms

    out, _ = short_run
    predictor = Predictor.from_pretrained(str(out / "tiny-resnet"))
    rows = list(csv.DictReader((out / "tiny-resnet" / "predictions_test.csv").open()))[:6]
    images = [Image.open(r["path"]).convert("RGB") for r in rows]
    seen: list[tuple[int, int]] = []

    def invert(view):
        seen.append(view.size)
        return ImageOps.invert(view)

    results = predictor.predict(images, explain=False, view_transform=invert)
    plain = predictor.predict(images, explain=False)
    assert seen and all(size != image.size for size, image in zip(seen, images))  # cropped views, not frames
    assert max(abs(a.probabilities[k] - b.probabilities[k]) for a, b in zip(results, plain) for k in a.probabilities) > 1e-3
    evaluation = ImageTransforms(predictor.preprocessor, predictor.processor, 32, train=False, view_transform=invert)
    pixels, owner = [], []
    for i, r in enumerate(rows):
        views = evaluation._load(r["path"])
        pixels += views
        owner += [i] * len(views)
    logits = predictor.logits(torch.stack(pixels)).numpy()
    probs = frame_probabilities(logits, np.asarray(owner), len(rows), predictor.temperature)
    for result, p in zip(results, probs, strict=True):
        assert [result.probabilities[k] for k in predictor.labels] == pytest.approx(p.tolist(), abs=1e-5)


def test_trainer_flags_pass_through(tiny_models, sample_dir, tmp_path):
    """The TrainingArguments options an ML engineer reaches for: tracking, accumulation, precision,
    logging, and a quick subset of the data."""
    argv = [f"--data_dir={sample_dir}", f"--model={tiny_models['tiny-resnet']}", "--image_size=32", f"--output_dir={tmp_path}",
            "--num_train_epochs=1", "--per_device_train_batch_size=4", "--bootstrap_resamples=20", "--report_to", "none",
            "--gradient_accumulation_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "6", "--logging_steps", "1",
            "--bf16", "false"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "tiny-resnet" / "metrics.json").read_text())
    assert sum(metrics["data"]["counts"]["train"].values()) == 16
    assert sum(metrics["data"]["counts"]["test"].values()) == 6 and sum(metrics["data"]["counts"]["validation"].values()) <= 6
    checkpoint = next((tmp_path / "tiny-resnet" / "checkpoints").glob("checkpoint-*"))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # 16 images, batches of 4, a step every 2 batches
    assert sum(1 for entry in state["log_history"] if "loss" in entry) == 2  # logged every step, not once per epoch
    assert metrics["training"]["gradient_accumulation_steps"] == 2 and "report_to" not in metrics["training"]


def test_every_trainer_option_passes_through_and_help_stays_readable(tmp_path, capsys):
    """RunArguments is a TrainingArguments with the project's defaults: any Trainer option reaches the
    Trainer; the ones changed are recorded (never a token or a path); --help lists the project's options."""
    from thyroid_classifier.arguments import parse_args, recipe
    from thyroid_classifier.tuning import training_arguments

    _, _, run_args = parse_args(["--max_grad_norm", "0.5", "--optim", "adamw_torch", "--adam_beta2", "0.99", "--lr_scheduler_type", "linear",
                                 "--hub_token", "hf_secret_value", "--logging_steps", "3", "--num_train_epochs", "2",
                                 "--push_to_hub", "--hub_model_id", "someone/x"])
    args = training_arguments(run_args, tmp_path / "checkpoints", has_validation=True)
    assert (args.max_grad_norm, args.adam_beta2, str(args.lr_scheduler_type.value), args.num_train_epochs) == (0.5, 0.99, "linear", 2)
    assert str(args.logging_strategy.value) == "steps" and args.logging_steps == 3  # --logging_steps alone switches to steps
    assert run_args.push_to_hub and not args.push_to_hub  # the project pushes the finished folder; the Trainer never pushes checkpoints
    assert args.output_dir == str(tmp_path / "checkpoints") and str(args.eval_strategy.value) == "epoch"
    recorded = recipe(run_args)
    assert recorded["num_train_epochs"] == 2 and recorded["trainer_options"]["max_grad_norm"] == 0.5
    assert recorded["trainer_options"]["lr_scheduler_type"] == "linear" and "hf_secret_value" not in json.dumps(recorded)
    defaults = parse_args([])[2]
    assert (defaults.num_train_epochs, defaults.learning_rate, str(defaults.lr_scheduler_type.value), defaults.save_total_limit) == (15, 1e-4, "cosine", 2)
    assert "trainer_options" not in recipe(defaults)  # nothing changed: nothing listed
    with pytest.raises(ValueError, match="--label_smoothing"):
        training_arguments(parse_args(["--label_smoothing_factor", "0.2"])[2], tmp_path, True)
    for flag, shown in (("--help", False), ("--help_all", True)):
        with pytest.raises(SystemExit):
            parse_args([flag])
        text = capsys.readouterr().out
        assert "--data_dir" in text and "--select_best" in text and ("--adam_beta2" in text) is shown
    assert len(text.splitlines()) > 2 * len(parse_args.__doc__)  # --help_all is the long one


def test_dataset_name_offline_fails_clearly_and_a_hub_dataset_becomes_class_folders(sample_dir, tiny_models, tmp_path, capsys, monkeypatch):
    import datasets

    from thyroid_classifier.publish import dataset_folder
    from thyroid_classifier.training import main as train_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("THYROID_DATASETS_CACHE", str(tmp_path / "cache"))
    assert train_main(["--dataset_name", "someone/thyroid-images", "--model", str(tiny_models["tiny-resnet"]), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--dataset_name someone/thyroid-images" in err and "Nothing was trained" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    # What load_dataset returns for an imagefolder-style dataset on the Hub: image + ClassLabel columns.
    files = sorted(sample_dir.rglob("*.png"))
    names = ["benign", "malignant", "normal"]
    table = {"image": [str(f) for f in files], "label": [names.index(f.parent.name) for f in files]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features=features).select(range(0, len(files), 2)),
                                "test": datasets.Dataset.from_dict(table, features=features).select(range(1, len(files), 2))})
    monkeypatch.setattr(datasets, "load_dataset", lambda name: hub)
    folder = dataset_folder("someone/thyroid-images", cache=tmp_path / "cache")
    for split, part in hub.items():
        for k, label in enumerate(names):
            assert len(list((folder / split / label).glob("*.png"))) == part["label"].count(k)
    monkeypatch.setattr(datasets, "load_dataset", lambda name: pytest.fail("downloaded twice"))
    assert dataset_folder("someone/thyroid-images", cache=tmp_path / "cache") == folder  # written once
