"""Shared fixtures: everything is made here or read from ../shared; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from thyroid_classifier.sample import make_sample_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DDTI = REPO.parent / "shared" / "data" / "ddti"


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset (3 classes x 6 cases x 2 frames; every second case in split-screen
    frames), made once per test session."""
    return make_sample_dataset(tmp_path_factory.mktemp("sample"), cases_per_class=6, size=(96, 128), split_screen_every=2)


@pytest.fixture(scope="session")
def ddti_dir() -> Path:
    if not (DDTI / "images").is_dir():
        pytest.skip(f"real DDTI data not found at {DDTI} (CI lays ../shared beside the clone)")
    return DDTI


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (48, 64), fmt: str | None = None) -> Path:
    """A random grey-speckle RGB image at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    gray = rng.integers(20, 230, size=size, dtype=np.uint8)
    Image.fromarray(gray).convert("RGB").save(path, format=fmt)
    return path


def save_tiny_models(folder: Path) -> dict[str, Path]:
    """A tiny ResNet and a tiny VGG (timm vgg11 with a narrow pre-logits MLP) as local checkpoints:
    the same classes and code paths as ResNet50 and VGG19, at a fraction of the cost."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

    from thyroid_classifier.models import make_processor

    torch.manual_seed(0)
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=2))
    # Like every timm checkpoint on the Hub, it carries timm's own eval transform in pretrained_cfg
    # (which AutoImageProcessor prefers for local timm folders: the skew test_training checks).
    timm_eval = {"architecture": "vgg11", "input_size": [3, 224, 224], "crop_pct": 0.875, "crop_mode": "center",
                 "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    vgg = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="vgg11", model_args={"mlp_ratio": 0.01}, num_labels=2, pretrained_cfg=timm_eval))
    paths = {}
    for name, model in (("tiny-resnet", resnet), ("tiny-vgg", vgg)):
        paths[name] = folder / name
        model.save_pretrained(paths[name])
        make_processor(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def saved_folder(tiny_models, tmp_path_factory) -> Path:
    """A model folder as training writes its model (``ModelFolder.save_model``: temperature 0.5 in the
    weights, the pipeline processor and its code, the crop settings), from the untrained tiny ResNet with
    the sample's three labels: the Predictor's loading paths without a training run."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from thyroid_classifier.folder import ModelFolder
    from thyroid_classifier.preprocess import UltrasoundPreprocessor

    labels = ["normal", "benign", "malignant"]
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_pretrained(tiny_models["tiny-resnet"], num_labels=3, id2label=dict(enumerate(labels)),
                                                            label2id={k: i for i, k in enumerate(labels)}, ignore_mismatched_sizes=True)
    processor = AutoImageProcessor.from_pretrained(tiny_models["tiny-resnet"], image_processor_filename="preprocessor_config.json")
    folder = tmp_path_factory.mktemp("saved") / "tiny-resnet"
    ModelFolder(folder).save_model(model, processor, UltrasoundPreprocessor(), 0.5)
    return folder


@pytest.fixture(scope="session")
def short_run(tiny_models, sample_dir, tmp_path_factory):
    """Both tiny models trained for two epochs on the sample: ``(output_dir, results)``."""
    from thyroid_classifier.training import DataArguments, ModelArguments, RunArguments, run

    out = tmp_path_factory.mktemp("run")
    results = run(
        DataArguments(data_dir=str(sample_dir), split_views=True),  # the sample's split screens as views: that path end to end
        ModelArguments(model=[str(p) for p in tiny_models.values()], image_size=32),
        RunArguments(output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=8, bootstrap_resamples=50, early_stopping_patience=0,
                     learning_rate=3e-4),  # a tiny random model needs a bolder rate than fine-tuning a real one
    )
    return out, results


def shift_source(src: Path, dst: Path, drop_every: dict[str, int] | None = None) -> Path:
    """A copy of a sample folder as another machine would show it: higher gain, smoother and coarser speckle
    (blur, then multiplicative noise); ``drop_every={label: k}`` keeps only every k-th case of a class, so the
    new source has another class balance (a source-class confound once the sources are pooled)."""
    import csv

    import cv2

    rng = np.random.default_rng(1)
    dst.mkdir(parents=True, exist_ok=True)
    with (src / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    kept = []
    for row in rows:
        label, case = row["label"], row["case"]
        if drop_every and label in drop_every and int(case[1:]) % drop_every[label]:
            continue
        gray = np.asarray(Image.open(src / row["file"]).convert("L"), dtype=np.float32) / 255
        # Multiplicative: the black background stays black, so the crop finds the same region.
        gray = 1.6 * cv2.GaussianBlur(gray, (3, 3), 0) * (1 + 0.3 * rng.normal(size=gray.shape))
        out = dst / row["file"]
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.uint8(np.clip(gray, 0, 1) * 255)).convert("RGB").save(out)
        kept.append(row)
    with (dst / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return dst


@pytest.fixture(scope="session")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two synthetic sources: ``site_a`` as made, ``site_b`` another draw shown as another machine
    would (other gain and texture) with fewer benign cases (a source-class confound)."""
    root = tmp_path_factory.mktemp("sources")
    site_a = make_sample_dataset(root / "site_a", cases_per_class=6, size=(96, 128), seed=11)
    drawn = make_sample_dataset(root / "drawn_b", cases_per_class=6, size=(96, 128), seed=12)
    return site_a, shift_source(drawn, root / "site_b", drop_every={"benign": 2})
