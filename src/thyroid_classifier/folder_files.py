"""The names of a model folder's files and the columns of its prediction files: the layout, in one
place, for the modules that read a folder (the card, the Predictor, the Hub I/O) without its writer
(:mod:`folder`)."""

from __future__ import annotations

from .preprocess import CONFIG_NAME as PREPROCESSING

GUARD_FILE = "guard.safetensors"
RELIABILITY_FILE = "reliability.json"
DESCRIPTOR_HEADS = "descriptors.safetensors"  # the TI-RADS descriptor heads' weights (descriptors.DescriptorState)
DESCRIPTOR_CONFIG = "descriptors.json"  # their classes (ACR terms, points) and what they measured
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PROCESSOR = "preprocessor_config.json"
METRICS = "metrics.json"
CV_METRICS = "cv_metrics.json"
LOSO_METRICS = "loso_metrics.json"
FINGERPRINTS = "fingerprints.json"
AUDIT = "audit.json"
CARD = "README.md"
CV_PREDICTIONS = "cv_predictions.csv"
LOSO_PREDICTIONS = "loso_predictions.csv"
PREDICTIONS = "predictions.csv"  # evaluate and predict write this name into their output folder
#: The crop as an image processor that ``config.json`` names in ``auto_map`` (Hub users'
#: ``pipeline(..., trust_remote_code=True)``); copied from the package, unchanged.
PIPELINE_CODE = ("ultrasound_processor.py", "ultrasound_crop.py", "answer_rule.py", "thyroid_pipeline.py")


def test_predictions(split: str = "test") -> str:
    """A trained model's predictions on its evaluation split."""
    return f"predictions_{split}.csv"


#: Prediction files this project writes, in the order ``compare`` looks for them inside a folder.
PREDICTION_FILES = (CV_PREDICTIONS, LOSO_PREDICTIONS, test_predictions(), PREDICTIONS)
#: Every prediction file's columns, in order; ``p_<class>`` columns follow ``predicted``. A value
#: a writer does not know (no true label in ``predict``, no fold outside ``--cv``) is left empty.
PREDICTION_COLUMNS = ("path", "group", "source", "fold", "label", "predicted")
TRAILING_COLUMNS = ("in_domain_score", "flagged", "prediction_set", "answer", "headlined", "tirads_descriptors", "error")
#: What a model folder publishes to the Hub. Never: checkpoints (optimizer state),
#: training_args.bin (a pickle of every setting), audit.json and predictions (file names can hold
#: patient identifiers).
PUSH_FILES = (WEIGHTS, CONFIG, PROCESSOR, PREPROCESSING, CARD, METRICS, CV_METRICS, LOSO_METRICS, FINGERPRINTS,
              RELIABILITY_FILE, GUARD_FILE, DESCRIPTOR_HEADS, DESCRIPTOR_CONFIG, *PIPELINE_CODE)
PUSH_PATTERNS = ("*.png",)
#: What the Predictor needs of a Hub model beside its weights, config and image processor (fingerprints:
#: ``evaluate MODEL_ID`` checks the data against the pushed model's training images).
INFERENCE_FILES = (PREPROCESSING, METRICS, RELIABILITY_FILE, GUARD_FILE, FINGERPRINTS, DESCRIPTOR_HEADS, DESCRIPTOR_CONFIG)
