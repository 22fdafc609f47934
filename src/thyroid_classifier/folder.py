"""The saved model folder, owned in one place.

Everything the project writes beside the weights (preprocessing, metrics, fingerprints, guard and
calibration state, predictions, plots, card) is named here and read and written through
:class:`ModelFolder`. The card is re-rendered from the folder whenever its metrics change, so the
card never depends on the order in which commands ran (train, ``--cv_final``, ``localize``).

One prediction-file schema serves every writer (training, cross-validation, leave-one-source-out,
``evaluate``, ``predict``): :data:`PREDICTION_COLUMNS` with a ``p_<class>`` column per class, so
``compare`` reads any of them.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .folder_files import (  # noqa: F401 - the layout, re-exported: ModelFolder's users name files through it
    WEIGHTS, CONFIG, PROCESSOR, METRICS, CV_METRICS, LOSO_METRICS,
    FINGERPRINTS, AUDIT, CARD, CV_PREDICTIONS, LOSO_PREDICTIONS, PREDICTIONS,
    PIPELINE_CODE, test_predictions, PREDICTION_FILES, PREDICTION_COLUMNS, TRAILING_COLUMNS, PUSH_FILES,
    PUSH_PATTERNS, INFERENCE_FILES, GUARD_FILE, RELIABILITY_FILE, PREPROCESSING,
)

logger = logging.getLogger(__name__)



def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "" if value != value else f"{float(value):.6f}"
    if isinstance(value, list | tuple):
        return "|".join(str(v) for v in value)
    return str(value)


def write_predictions(path: str | Path, labels: Sequence[str], rows: Iterable[dict]) -> Path:
    """Write prediction rows (dicts with any of :data:`PREDICTION_COLUMNS`, ``probs`` (one per
    class, in ``labels`` order) and :data:`TRAILING_COLUMNS`) in the one schema. ``predicted`` is
    filled from ``probs`` when not given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*PREDICTION_COLUMNS, *[f"p_{name}" for name in labels], *TRAILING_COLUMNS])
        for row in rows:
            probs = row.get("probs")
            if row.get("predicted") is None and probs is not None:
                row = {**row, "predicted": labels[int(np.argmax(probs))]}
            writer.writerow([*(_cell(row.get(c)) for c in PREDICTION_COLUMNS),
                             *([_cell(float(v)) for v in probs] if probs is not None else [""] * len(labels)),
                             *(_cell(row.get(c)) for c in TRAILING_COLUMNS)])
    return path


def prediction_rows(paths: Sequence[str], labels: Sequence[str], y: Sequence[int] | None, probs: np.ndarray, **columns: Sequence) -> list[dict]:
    """Rows for :func:`write_predictions` from parallel sequences (``group=``, ``source=``, ``fold=`` ...)."""
    return [{"path": p, "label": labels[int(y[i])] if y is not None else None, "probs": probs[i],
             **{k: v[i] for k, v in columns.items() if v is not None}} for i, p in enumerate(paths)]


def pipeline_processor_settings(processor, preprocessor) -> dict:
    """The saved image processor's settings (resize, normalisation) and the crop's, as
    :class:`~thyroid_classifier.ultrasound_processor.UltrasoundImageProcessor` takes them."""
    settings = {k: v for k, v in processor.to_dict().items() if k not in ("image_processor_type", "auto_map", "_processor_class")}
    return {**settings, "ultrasound_crop": preprocessor.crop, "ultrasound_mask_text": preprocessor.mask_text,
            "ultrasound_threshold": preprocessor.threshold, "ultrasound_split_views": preprocessor.split_views}


class ModelFolder:
    """A model folder written by ``train.py`` (or pulled from the Hub): the one place that knows
    its file names and writes its files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return self.file(name).is_file()

    # ---- JSON files

    def read_json(self, name: str, default=None):
        path = self.file(name)
        return json.loads(path.read_text()) if path.is_file() else default

    def write_json(self, name: str, content) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.file(name)
        path.write_text(json.dumps(content, indent=2, default=float) + "\n")
        return path

    def metrics(self) -> dict:
        """``metrics.json`` ({} when the folder has none, e.g. a foreign Hub model)."""
        return self.read_json(METRICS, {})

    def write_metrics(self, metrics: dict) -> Path:
        """Write ``metrics.json`` and re-render the card from the folder (it reads every number from it)."""
        path = self.write_json(METRICS, metrics)
        self.render_card()
        return path

    def update_metrics(self, **sections) -> dict:
        """Merge ``sections`` into ``metrics.json`` (e.g. ``localization=``, ``cross_validation=``); the card follows."""
        metrics = {**self.metrics(), **sections}
        self.write_metrics(metrics)
        return metrics

    def fingerprints(self) -> list:
        return self.read_json(FINGERPRINTS, [])

    def render_card(self, repo_id: str | None = None) -> Path | None:
        """Re-render ``README.md`` when the folder holds a trained model (weights' config and metrics)."""
        from .card import write_card

        if not (self.exists(CONFIG) and "split" in self.metrics()):
            return None
        return write_card(self.path, repo_id)

    def save_model(self, model, processor, preprocessor, temperature: float, save=None) -> None:
        """The model as every loader reads it: safetensors weights with the calibration temperature in them,
        a config naming the pipeline processor, the processor with its code, the preprocessing settings.
        ``save`` writes the weights (``Trainer.save_model`` in training: the main process only)."""
        from .models import temperature_in_weights
        from .thyroid_pipeline import CUSTOM_PIPELINES
        from .ultrasound_processor import AUTO_MAP

        self.path.mkdir(parents=True, exist_ok=True)
        # Calibrated on every path: the temperature goes into the saved weights (the Predictor reads that it did).
        with temperature_in_weights(model, temperature):
            # AutoImageProcessor finds the processor class here (preprocessor_config.json has no type): the
            # crop with trust_remote_code, else the plain class, without a prompt, for both architectures
            # (a local timm folder no longer falls back to timm's ImageNet transform either).
            model.config.auto_map, model.config.image_processor_type = dict(AUTO_MAP), "ViTImageProcessor"
            if getattr(model.config, "model_type", None) == "timm_wrapper":
                # transformers >= 5.25 builds a local timm folder's image processor from config.json, not from
                # preprocessor_config.json: the same settings there too, or pipeline(model=folder) would resize and
                # normalise with ViTImageProcessor's defaults.
                for key, value in pipeline_processor_settings(processor, preprocessor).items():
                    setattr(model.config, key, value)
            # pipeline("image-classification", trust_remote_code=True) runs the folder's own pipeline: the answer, not only scores.
            model.config.custom_pipelines = {task: dict(info) for task, info in CUSTOM_PIPELINES.items()}
            (save or model.save_pretrained)(str(self.path))
        self.write_pipeline_processor(processor, preprocessor)
        preprocessor.save_pretrained(self.path)

    def write_pipeline_processor(self, processor, preprocessor) -> Path:
        """``preprocessor_config.json`` as :class:`~thyroid_classifier.ultrasound_processor.UltrasoundImageProcessor`
        (the saved resize and normalisation, plus the crop settings) and its code beside it."""
        import shutil

        from .ultrasound_processor import UltrasoundImageProcessor

        UltrasoundImageProcessor(**pipeline_processor_settings(processor, preprocessor)).save_pretrained(self.path)
        for name in PIPELINE_CODE:
            shutil.copyfile(Path(__file__).with_name(name), self.file(name))
        return self.file(PROCESSOR)

    def predictions(self, split: str = "test") -> Path:
        return self.file(test_predictions(split))

    # ---- a trained model

    def save_trained(self, trainer, preprocessor, report, metrics: dict, labels: Sequence[str], rows: Sequence[dict],
                     temperature: float, reliability, descriptors=None) -> None:
        """Everything a training run leaves: safetensors weights, config (labels, temperature), image
        processor, preprocessing, guard and sets, audit, fingerprints, metrics, plots, predictions, card."""
        from .plots import plot_auc, plot_confusion, plot_loss, plot_roc

        out = self.path
        self.save_model(trainer.model, trainer.processing_class, preprocessor, temperature, save=trainer.save_model)
        reliability.save_pretrained(out)
        if descriptors is not None:  # the TI-RADS descriptor heads (descriptors.DescriptorState)
            descriptors.save_pretrained(out)
        report.save(self.file(AUDIT))
        self.write_json(FINGERPRINTS, report.fingerprints())
        split, name = metrics["split"], metrics["model"]
        probs = np.asarray([r["probs"] for r in rows])
        plot_loss(trainer.state.log_history, out / "loss.png", name)
        plot_auc(trainer.state.log_history, out / "auc.png", name)
        plot_roc([labels.index(r["label"]) for r in rows], probs, labels, out / "roc.png", f"{name} ({split})")
        plot_confusion(metrics[split]["confusion_matrix"], labels, out / "confusion_matrix.png", f"{name} ({split})")
        write_predictions(self.predictions(split), labels, rows)
        self.write_metrics(metrics)  # last: the card reads everything above
        logger.info("%s: wrote %s", name, out)
