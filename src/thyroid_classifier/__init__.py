"""thyroid-classifier: normal / benign / malignant thyroid ultrasound classification with Grad-CAM.
Research software, not a diagnostic device.

    from thyroid_classifier import Predictor
    result = Predictor.from_pretrained("outputs/resnet50").predict(["frame.png"])[0]
    result.headline, result.headlined, result.reason, result.probabilities, result.prediction_set, result.overlay

The public names are below; everything else is internal and may change. Imports are lazy, so
``import thyroid_classifier`` stays cheap (no torch until a name is used).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["ModelFolder", "Prediction", "Predictor", "ThyroidImageClassificationPipeline", "UltrasoundImageProcessor", "evaluate", "train",
           "__version__"]

_WHERE = {"ModelFolder": "folder", "Prediction": "predict", "Predictor": "predict", "evaluate": "api", "train": "api",
          "UltrasoundImageProcessor": "ultrasound_processor", "ThyroidImageClassificationPipeline": "thyroid_pipeline"}

if TYPE_CHECKING:  # for type checkers and IDEs
    from .api import evaluate, train
    from .folder import ModelFolder
    from .predict import Prediction, Predictor
    from .thyroid_pipeline import ThyroidImageClassificationPipeline
    from .ultrasound_processor import UltrasoundImageProcessor


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
