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
    """A small synthetic dataset (3 classes x 6 cases x 2 frames), made once per test session."""
    return make_sample_dataset(tmp_path_factory.mktemp("sample"), cases_per_class=6, size=(96, 128))


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
