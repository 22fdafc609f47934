"""Start a run from a trained model folder: a new hospital (a *site*) adapting the public model.

``train.py --model MODEL_FOLDER --data_dir SITE [OTHER ...]``: when ``MODEL_FOLDER`` (a local folder or a
Hub id) is a model this project trained, the run keeps what makes it that model, its head (the
class head's weights, the calibration temperature taken back out of them), its labels and their order, its
preprocessing (crop, text masking, views) and its input size, and fine-tunes it on the given folders.
Everything fitted on data (the temperature, the prediction sets, the in-domain guard, the headline
rule) is fitted again on the new run's own validation frames, since the model has changed. The new folder records
what it started from and how many frames of each site it was given, so its card and page say
"adapted to SITE with k labelled frames, measured on its other frames".
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .folder import ModelFolder
from .folder_files import (
    CONFIG,
    INFERENCE_FILES,
    PREPROCESSING,
    PROCESSOR,
    RELIABILITY_FILE,
)
from .locations import check_hub_model, hub_snapshot, is_local
from .models import HUB_HELP, ModelSpec, build_model, get_spec, temperature_out_of_weights
from .preprocess import UltrasoundPreprocessor

logger = logging.getLogger(__name__)

__all__ = ["StartingModel", "align_labels"]


@dataclass(frozen=True)
class StartingModel:
    """A model this project trained, read from its folder, to be fine-tuned further."""

    location: str  # as the person gave it: a local folder or a Hub id
    folder: Path  # the local folder (a Hub id: the snapshot of its inference files)
    labels: list[str]
    preprocessor: UltrasoundPreprocessor
    image_size: int
    training_sources: list[str]
    metrics: dict = field(repr=False, default_factory=dict)

    @classmethod
    def read(cls, location: str) -> StartingModel | None:
        """The trained model at ``location``, or None when it is not one of this project's folders
        (an ImageNet checkpoint, a registry name: those start a new model)."""
        local = is_local(location)
        if local:
            folder = Path(location).expanduser()
        elif "/" in location and not location.startswith((".", "/")):
            # A Hub id: its small files say whether it is one of this project's models (an unreachable Hub
            # fails here, at once, with what to do; a repository without them is a plain checkpoint).
            local_only = check_hub_model(location, what_to_do=HUB_HELP)
            folder = hub_snapshot(location, [*INFERENCE_FILES, CONFIG, PROCESSOR], local_only)
        else:
            return None
        metrics = ModelFolder(folder).metrics()
        if not (metrics.get("labels") and (folder / PREPROCESSING).is_file() and (folder / CONFIG).is_file()):
            return None
        processor = ModelFolder(folder).read_json(PROCESSOR, {})
        size = (processor.get("size") or {}).get("height") or (metrics.get("training") or {}).get("image_size")
        reliability = ModelFolder(folder).read_json(RELIABILITY_FILE, {}) or {}
        sources = list(reliability.get("training_sources") or (metrics.get("data") or {}).get("sources") or [])
        return cls(location=location, folder=folder, labels=list(metrics["labels"]),
                   preprocessor=UltrasoundPreprocessor.from_pretrained(folder), image_size=int(size or 224),
                   training_sources=sources, metrics=metrics)

    def spec(self) -> ModelSpec:
        """The registry's view of the model (Grad-CAM and guard layers found from the loaded model), named after the folder."""
        return get_spec(self.location)

    def build(self, labels: Sequence[str]):
        """The model with its trained head and its image processor, for a dataset whose labels are ``labels``
        (already :func:`align_labels`-ed). The saved weights divide the logits by the calibration temperature
        (for ``pipeline()`` users); training goes on from the logits the model was trained to give."""
        if list(labels) != self.labels:
            raise ValueError(f"{self.location}: labels {list(labels)} are not the model's {self.labels} (align_labels first)")
        model, processor = build_model(self.spec(), self.labels, "pretrained", self.image_size)
        temperature_out_of_weights(model)
        return model, processor

    def record(self, splits: Mapping) -> dict:
        """What ``metrics.json`` keeps of the start: the model, what it was trained on and measured at, and
        for each *site* (a source it never saw) how many labelled frames of it this run trained and
        calibrated on and how many it was measured on."""
        own = self.metrics.get(self.metrics.get("split", "test")) or {}
        auc = own.get("roc_auc") or {}
        sites: dict[str, dict[str, int]] = {}
        for split, ds in splits.items():
            raw = ds.with_format(None)
            sources = raw["source"] if "source" in raw.column_names else [""] * len(raw)
            for source, n in Counter(sources).items():
                if source not in self.training_sources:
                    sites.setdefault(source, {})[split] = n
        return {
            "model": self.location,
            "architecture": self.metrics.get("checkpoint"),
            "trained_on": self.training_sources,
            "dataset": ((self.metrics.get("data") or {}).get("dataset") or {}).get("name"),
            "its_evaluation": {"split": self.metrics.get("split"), "n": self.metrics.get("n"),
                               "roc_auc": auc.get("value"), "ci": auc.get("ci")},
            "sites": {name: {"labelled": counts.get("train", 0) + counts.get("validation", 0), "train": counts.get("train", 0),
                             "validation": counts.get("validation", 0), "measured_on": counts.get("test", 0)}
                      for name, counts in sorted(sites.items())},
        }


def align_labels(dataset, labels: Sequence[str], what: str):
    """``dataset``'s label column re-expressed in ``labels``' order (the model's head), by name. A class the
    model does not know, or one the data lacks, is refused: the head and the sets are fitted per class."""
    from datasets import ClassLabel

    names = dataset[next(iter(dataset))].features["label"].names
    if list(names) == list(labels):
        return dataset
    unknown, missing = sorted(set(names) - set(labels)), sorted(set(labels) - set(names))
    if unknown or missing:
        problem = "; ".join(p for p in (
            f"the data has classes the model does not know: {unknown}" if unknown else "",
            f"the data has no images of: {missing}" if missing else "") if p)
        raise ValueError(f"{what} was trained on the classes {list(labels)} and keeps its head: {problem}. Give every class a folder "
                         "of its frames (the sets and the headline rule are fitted per class), or train a new model from ImageNet "
                         "weights (e.g. --model resnet50).")
    index = {i: labels.index(name) for i, name in enumerate(names)}
    target = ClassLabel(names=list(labels))
    out = {}
    for split, ds in dataset.items():
        ds = ds.map(lambda row: {"label": [index[y] for y in row["label"]]}, batched=True, desc=f"labels in {what}'s order")
        out[split] = ds.cast_column("label", target)
    return type(dataset)(out)
