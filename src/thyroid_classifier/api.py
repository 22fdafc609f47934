"""The two verbs a Python user needs, beside :class:`Predictor` and :class:`ModelFolder`:
``train(...)`` and ``evaluate(...)``, each the same code path as its command line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path


def train(data_dir: str | Sequence[str] | None = None, model: str | Sequence[str] = "resnet50", output_dir: str = "outputs",
          **settings) -> dict[str, dict]:
    """Train (or, with ``cv=K`` / ``loso=True``, validate) like ``train.py``; ``settings`` are
    ``train.py``'s flags as keyword arguments (``num_train_epochs=5``, ``init="random"`` ...).
    Returns each model's metrics; the model folders are written under ``output_dir``."""
    from .arguments import DataArguments, ModelArguments, RunArguments
    from .training import run

    groups: dict[type, dict] = {DataArguments: {}, ModelArguments: {}, RunArguments: {}}
    for key, value in settings.items():
        owner = next((cls for cls in groups if key in {f.name for f in fields(cls)}), None)
        if owner is None:
            raise TypeError(f"train() got an unknown setting {key!r} (see `python train.py --help`)")
        groups[owner][key] = value
    dirs = None if data_dir is None else [str(data_dir)] if isinstance(data_dir, str | Path) else [str(d) for d in data_dir]
    models = [model] if isinstance(model, str) else list(model)
    return run(DataArguments(data_dir=dirs, **groups[DataArguments]), ModelArguments(model=models, **groups[ModelArguments]),
               RunArguments(output_dir=str(output_dir), **groups[RunArguments]))


def evaluate(model: str, data_dir: str | Sequence[str], out_dir: str | None = None, **kwargs) -> dict:
    """Score a trained model on labelled folders it never saw (one source each), like
    ``python -m thyroid_classifier.evaluate``: metrics with intervals, per source, leakage check."""
    from .evaluate import evaluate_model

    return evaluate_model(model, data_dir, out_dir, **kwargs)
