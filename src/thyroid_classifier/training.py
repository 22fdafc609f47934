"""Fine-tune registry models with ``transformers.Trainer`` and write everything needed to judge them.

``run(data_args, model_args, run_args)`` audits and splits the data once, then for each model:
trains (class-weighted loss, a fixed cosine schedule or, with ``--select_best``, early stopping on
validation macro AUC; bf16/fp16 on GPU), fits a temperature on validation, evaluates on the test split with bootstrap
intervals, and writes ``OUTPUT_DIR/<model>/`` (safetensors weights, config with labels, image
processor, preprocessing settings, ``metrics.json``, plots, audit). ``accelerate launch`` runs the
same code on several GPUs or machines; evaluation gathers each example exactly once.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audit import DEFAULT_NEAR_THRESHOLD, audited_dataset
from .augment import DeviceAugment
from .data import GroupSpec
from .hub import check_hub_model, check_push_access, dataset_facts, is_local, push_folder, sources_facts, write_card
from .metrics import (
    HEADLINE,
    ThyroidMetrics,
    bootstrap_intervals,
    by_source,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    frame_logits,
    frame_mean,
    layout_breakdown,
    softmax,
    with_intervals,
)
from .models import HUB_HELP, INIT_CHOICES, ModelSpec, build_model, classifier_head, count_parameters, get_spec, guard_features
from .plots import plot_auc, plot_comparison, plot_confusion, plot_cv_roc, plot_loss, plot_roc
from .preprocess import UltrasoundPreprocessor
from .reliability import ConformalSets, DomainGuard, Reliability, coverage_report
from .sample import builtin_sample
from .weighting import SampleWeightedTrainer, class_weights, make_loss, stratum_weights

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Settings (HfArgumentParser turns these into `train.py --help`)


@dataclass
class DataArguments:
    data_dir: list[str] | None = field(
        default=None,
        metadata={"help": "Folder of class sub-folders, optionally under train/ validation/ test/. Several folders: each is a "
                  "*source* (hospital, scanner, collection); splits are stratified by source x class, the loss weighs each "
                  "source's classes equally and every metric is also given per source. "
                  "Default: the built-in SYNTHETIC sample (demonstrates the pipeline only)."},
    )
    source_names: list[str] | None = field(default=None, metadata={"help": "A name for each --data_dir folder (default: the folder's name, or its parent's for a folder called images)."})
    validation_size: float = field(default=0.15, metadata={"help": "Share of the data for validation when the folder has no validation/ split."})
    test_size: float = field(default=0.15, metadata={"help": "Share of the data for testing when the folder has no test/ split."})
    group_csv: str | None = field(default=None, metadata={"help": "CSV mapping files to patients/cases (columns 'file' and --group_column). Default: a manifest.csv beside or above the data folder, else the <case>_<frame> file-name pattern."})
    group_column: str = field(default="case", metadata={"help": "Column of the group CSV holding the patient/case id."})
    group_pattern: str | None = field(default=None, metadata={"help": "Regex on the file stem with a named group 'group', e.g. '^(?P<group>P\\d+)-'."})
    drop_duplicates: str = field(default="none", metadata={"help": "Drop duplicate images before splitting: none, exact (same bytes) or near (also perceptual-hash near duplicates). Duplicates are always kept on one side of every split.", "choices": ["none", "exact", "near"]})
    near_threshold: int = field(default=DEFAULT_NEAR_THRESHOLD, metadata={"help": "Hamming distance (of 64 bits) under which two images are near duplicates."})
    crop: bool = field(default=True, metadata={"help": "Crop each frame to the ultrasound region (drops borders and settings panels)."})
    mask_text: bool = field(default=False, metadata={"help": "Also mask burned-in text and caliper marks inside the region (inpainting)."})
    split_views: bool = field(default=False, metadata={"help": "Split a split-screen frame into its two views: training sees one at random, evaluation and prediction average both. Off by default: on DDTI it scored worse and the model still told the layouts apart (README, 'Preprocessing')."})

    def preprocessor(self) -> UltrasoundPreprocessor:
        return UltrasoundPreprocessor(crop=self.crop, mask_text=self.mask_text, split_views=self.split_views)


@dataclass
class ModelArguments:
    model: list[str] = field(
        default_factory=lambda: ["resnet50", "vgg19"],
        metadata={"help": "Models to train: registry names (resnet50, vgg19), any Hub image-classification id, or a local checkpoint folder."},
    )
    init: str = field(default="pretrained", metadata={"help": "pretrained: ImageNet weights of the checkpoint (Hub or local folder); random: train from scratch, offline.", "choices": list(INIT_CHOICES)})
    image_size: int | None = field(default=None, metadata={"help": "Square input size in pixels (default: the model's, 224). Smaller is much cheaper on CPU."})


@dataclass
class RunArguments:
    output_dir: str = field(default="outputs", metadata={"help": "Where OUTPUT_DIR/<model>/ and the comparison are written."})
    num_train_epochs: float = field(default=15, metadata={"help": "Epochs of the cosine schedule (with --select_best, early stopping may end sooner)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate (cosine schedule with warm-up); the new head gets --head_lr_multiplier times it when pretrained."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of the steps used for linear warm-up."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Evaluation batch size per device."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the cross-entropy loss."})
    class_weighting: bool = field(default=True, metadata={"help": "Weight the loss by inverse class frequency (n / (k * n_c)) so minority classes count as much as the majority."})
    select_best: bool = field(default=False, metadata={"help": "Keep the checkpoint with the best validation macro AUC and stop early (else: the whole schedule, last epoch's weights). Off by default: on a validation share of a few dozen frames the 'best' epoch is mostly noise (see README, 'Honest numbers on small data')."})
    device_augment: bool = field(default=True, metadata={"help": "Randomise what differs between ultrasound machines while training (gain curve, depth gain, resolution, speckle, burned-in calipers and text; thyroid_classifier.augment), so a model cannot lean on them (--no_device_augment: off). See benchmarks/recipe_curves.py --shifts."})
    ema_decay: float = field(default=0.0, metadata={"help": "Keep an exponential moving average of the weights with this decay per step (e.g. 0.99) and use it as the final model (0: off). Not with --select_best."})
    early_stopping_patience: int = field(default=6, metadata={"help": "Stop after this many epochs without a better validation macro AUC (0: never)."})
    seed: int = field(default=42, metadata={"help": "Seed for the split, initialisation, augmentation and data order."})
    resume: bool = field(default=False, metadata={"help": "Continue each model from its last checkpoint in OUTPUT_DIR/<model>/checkpoints."})
    bootstrap_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples for the 95%% intervals (patients are resampled when groups are known)."})
    channels_last: bool = field(default=True, metadata={"help": "Keep convolution weights in channels-last memory order while training: about 2x faster for conv nets on recent CPUs (oneDNN), and the usual choice on GPUs. Saved weights are the same."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes (0 keeps the decoded-image cache in one process)."})
    head_lr_multiplier: float = field(default=10.0, metadata={"help": "Discriminative learning rates with --init pretrained: the new classification head learns this many times faster than the pretrained backbone (1: one rate for all)."})
    freeze_backbone_epochs: int = field(default=0, metadata={"help": "With --init pretrained: train only the new head for this many epochs, then fine-tune everything (linear probing, then fine-tuning)."})
    cv: int = field(default=0, metadata={"help": "K-fold cross-validation (K >= 2), stratified by class and grouped by patient: writes OUTPUT_DIR/<model>/cv_metrics.json with pooled out-of-fold metrics. 0: one train/validation/test run."})
    cv_final: bool = field(default=False, metadata={"help": "With --cv: also train a final model on all the data; its card carries the cross-validation numbers."})
    loso: bool = field(default=False, metadata={"help": "Leave-one-source-out (needs 2+ --data_dir sources): train on all sources but one, score the one left out, for each in turn; writes OUTPUT_DIR/<model>/loso_metrics.json and loso_predictions.csv. Then trains the model on every source (as without --loso) and its card carries the unseen-source numbers."})
    conformal_alpha: float = field(default=0.1, metadata={"help": "Prediction sets cover the true class with probability 1 - alpha (class-conditional split conformal, calibrated on validation)."})
    guard_coverage: float = field(default=0.95, metadata={"help": "Share of held-out in-source images (validation) the in-domain guard lets through; the rest, and images unlike the training ones, are flagged."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push each trained model's folder (weights, config, processor, card, plots, metrics) to the Hub after training. The token comes from HF_TOKEN or the saved login."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub, e.g. someone/thyroid-resnet50. With several models, '-<model>' is appended to it."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})


# --------------------------------------------------------------------------------------------
# Transforms with a per-run cache of decoded, cropped images


class ImageTransforms:
    """Decode → ultrasound crop → views → square resize once per image (cached), then augment
    (train) or normalise with the saved image processor (evaluation: exactly what prediction does).

    A split-screen frame has two views: training draws one at random each time the frame is seen;
    evaluation reads the view named by the example's ``view`` column (see :func:`expand_views`)."""

    def __init__(self, preprocessor: UltrasoundPreprocessor, processor, image_size: int, train: bool, cache: dict | None = None,
                 device_augment: bool = False) -> None:
        from torchvision.transforms import v2
        from PIL import Image

        self.preprocessor, self.processor, self.train = preprocessor, processor, train
        self.train_size = (image_size, image_size)  # (width, height) of the cached training image
        # Shared across the folds of a cross-validation run: each file is decoded once per run.
        self._cache: dict = cache if cache is not None else {}
        self._open = Image.open
        self._resize = Image.Resampling.BILINEAR
        mean, std = processor.image_mean, processor.image_std
        # Ultrasound-safe augmentation: small rotation and scale, gain (brightness/contrast), left-
        # right flip. No hue or saturation jitter (grey images) and no vertical flip (depth axis).
        # DeviceAugment adds what differs between scanners, so none of it can carry the label.
        self.augment = v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(0.75, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.25, contrast=0.25),
            v2.ToDtype(torch.float32, scale=True),
            *([DeviceAugment()] if device_augment else []),
            v2.Normalize(mean, std),
        ])

    def _crop(self, path: str, image) -> list:
        """The views that are resized and cached: the ultrasound region's (benchmarks override it)."""
        return self.preprocessor.views(image)[0]

    def _load(self, path: str) -> list:
        key = (path, self.train)
        cached = self._cache.get(key)
        if cached is None:
            with self._open(path) as image:
                views = self._crop(path, image)
            if self.train:
                cached = [view.resize(self.train_size, self._resize) for view in views]
            else:
                cached = list(self.processor(views, return_tensors="pt")["pixel_values"])
            self._cache[key] = cached
        return cached

    def count_views(self, path: str) -> int:
        return len(self._load(path))

    def __call__(self, batch: dict) -> dict:
        loaded = [self._load(p) for p in batch["path"]]
        if self.train:
            # A random view of a split screen; a single view draws nothing (the augmentation's random
            # stream, and so a seeded run, stays what it was before views existed).
            pixels = [self.augment(views[int(torch.randint(len(views), ()))] if len(views) > 1 else views[0]) for views in loaded]
        else:
            chosen = batch.get("view") or [0] * len(loaded)
            pixels = [views[v] for views, v in zip(loaded, chosen, strict=True)]
        out = {"pixel_values": pixels, "labels": batch["label"]}
        if self.train and "weight" in batch:
            out["sample_weight"] = batch["weight"]
        return out


def expand_views(dataset, transforms: ImageTransforms):
    """``dataset`` with one row per view (a ``view`` column) for evaluation, and each row's frame
    index; unchanged when every frame has one view."""
    counts = [transforms.count_views(p) for p in dataset.with_format(None)["path"]]
    owner = np.repeat(np.arange(len(counts)), counts)
    if all(c == 1 for c in counts):
        return dataset, owner
    return dataset.select(owner.tolist()).add_column("view", [v for c in counts for v in range(c)]), owner


def recipe(run_args: RunArguments) -> dict:
    """The settings that shape a model (recorded in metrics.json); not where it goes or how it is published."""
    return {k: v for k, v in asdict(run_args).items() if k not in ("output_dir", "resume", "push_to_hub", "hub_model_id", "hub_private", "channels_last", "dataloader_num_workers")}


def collate(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
    }
    if "sample_weight" in examples[0]:
        batch["sample_weight"] = torch.tensor([e["sample_weight"] for e in examples], dtype=torch.float32)
    return batch


def make_compute_metrics(label_names: Sequence[str], owner: np.ndarray | None = None):
    """Trainer's per-epoch metrics; ``owner`` (each evaluation row's frame, :func:`expand_views`)
    scores frames, not views, as the final evaluation does."""
    metric = ThyroidMetrics(label_names)

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        if owner is not None and len(owner) == len(logits) and len(owner):
            n = int(owner.max()) + 1
            first = np.unique(owner, return_index=True)[1]  # a frame's views share its label
            logits, labels = frame_logits(logits, owner, n), np.asarray(labels)[first]
        result = metric.compute(predictions=softmax(logits), references=labels)
        # Trainer logs scalars only; the full per-class numbers are computed at the end.
        return {k: float(result[k]) for k in (*HEADLINE, "n")}

    return compute_metrics


# --------------------------------------------------------------------------------------------
# One model


def _training_arguments(run_args: RunArguments, checkpoints: Path, has_validation: bool):
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=run_args.num_train_epochs,
        learning_rate=run_args.learning_rate,
        weight_decay=run_args.weight_decay,
        warmup_steps=run_args.warmup_ratio,  # a float below 1 is a ratio in transformers 5
        lr_scheduler_type="cosine",
        per_device_train_batch_size=run_args.per_device_train_batch_size,
        per_device_eval_batch_size=run_args.per_device_eval_batch_size,
        eval_strategy="epoch" if has_validation else "no",
        save_strategy="epoch",
        logging_strategy="epoch",  # one training-loss point per epoch, beside the validation loss
        load_best_model_at_end=has_validation and run_args.select_best,
        metric_for_best_model="roc_auc" if has_validation else None,
        greater_is_better=True,
        save_total_limit=2,
        seed=run_args.seed,
        data_seed=run_args.seed,
        bf16=bf16,
        fp16=cuda and not bf16,
        remove_unused_columns=False,
        dataloader_num_workers=run_args.dataloader_num_workers,
        dataloader_pin_memory=cuda,
        report_to="none",
        disable_tqdm=False,
        use_cpu=not cuda,  # also makes `accelerate launch --multi_gpu` on CPUs run as MULTI_CPU (gloo)
    )


def _epoch_history(log_history: Sequence[dict]) -> list[dict]:
    """One row per epoch: mean training loss over the epoch and the validation numbers."""
    rows: dict[float, dict] = {}
    losses: dict[int, list[float]] = {}
    for entry in log_history:
        if "loss" in entry and "epoch" in entry:
            losses.setdefault(math.ceil(entry["epoch"] - 1e-9), []).append(entry["loss"])
        if "eval_loss" in entry:
            rows[round(entry["epoch"])] = {"epoch": round(entry["epoch"]), **{k: v for k, v in entry.items() if k.startswith("eval_")}}
    for epoch, values in losses.items():
        rows.setdefault(epoch, {"epoch": epoch})["loss"] = float(np.mean(values))
    return [rows[k] for k in sorted(rows)]


@dataclass
class FrameOutputs:
    """A split's frame logits and the pooled features of the same forward pass (None when they
    could not be gathered, e.g. several processes: each only sees its own shard)."""

    logits: np.ndarray
    features: np.ndarray | None


def _predict(trainer, views, owner: np.ndarray) -> FrameOutputs:
    """Frame logits (and features) of a dataset whose rows are views (:func:`expand_views`)."""
    with guard_features(trainer.model) as captured:
        output = trainer.predict(views)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) != len(owner):
        raise RuntimeError(f"evaluation returned {len(logits)} predictions for {len(owner)} views")
    n = int(owner.max()) + 1 if len(owner) else 0
    features = torch.cat(captured).numpy().astype(np.float64) if captured else None
    # A frame's features: the mean of its views' (as the Predictor does).
    features = frame_mean(features, owner, n) if features is not None and len(features) == len(owner) else None
    # One view per frame: log-softmax, a per-row shift of the logits (the same softmax at any temperature).
    return FrameOutputs(frame_logits(logits, owner, n), features)


def fit_reliability(trainer, splits: dict, preprocessor, processor, image_size: int, cache, outputs: dict[str, FrameOutputs],
                    temperature: float, run_args, eval_name: str, y_eval: Sequence[int], eval_sources: Sequence[str]) -> tuple[Reliability, dict]:
    """The guard (fitted on the training images' features, threshold from validation) and the
    conformal sets (calibrated on validation), and how they did on the evaluation split."""
    reliability = Reliability()
    checks: dict = {}
    if "validation" not in outputs:
        checks["note"] = "no validation split: no guard threshold and no prediction sets"
        return reliability, checks
    val_raw = splits["validation"].with_format(None)
    y_val = [int(x) for x in val_raw["label"]]
    reliability.conformal = ConformalSets.fit(softmax(outputs["validation"].logits, temperature), y_val, run_args.conformal_alpha)
    train_eval = splits["train"].with_format(None).remove_columns([c for c in ("weight",) if c in splits["train"].column_names])
    transforms = ImageTransforms(preprocessor, processor, image_size, train=False, cache=cache)
    train_views, owner = expand_views(train_eval, transforms)
    train_views.set_transform(transforms, columns=["path", "label", *(["view"] if "view" in train_views.column_names else [])])
    train_out = _predict(trainer, train_views, owner)
    if train_out.features is not None and outputs["validation"].features is not None:
        guard = DomainGuard.fit(train_out.features).calibrate(outputs["validation"].features, run_args.guard_coverage)
        reliability.guard = guard
        checks["guard"] = {"threshold": guard.threshold, "coverage_target": guard.coverage, "components": int(len(guard.variances)),
                           "fitted_on": f"{len(train_out.features)} training images", "threshold_from": f"{len(y_val)} validation images"}
    else:
        checks["note"] = "features could not be gathered (several processes): no guard"
    out = outputs[eval_name]
    probs = softmax(out.logits, temperature)
    member = reliability.conformal.sets(probs)
    checks["conformal"] = {"alpha": run_args.conformal_alpha, eval_name: coverage_report(y_eval, member),
                           "by_source": {s: coverage_report(np.asarray(y_eval)[np.asarray(eval_sources) == s], member[np.asarray(eval_sources) == s])
                                         for s in sorted(set(eval_sources))} if len(set(eval_sources)) > 1 else {}}
    if reliability.guard is not None and out.features is not None:
        flagged = reliability.guard.flags(out.features)
        checks["guard"][eval_name] = {"n": int(len(flagged)), "share_flagged": float(flagged.mean()) if len(flagged) else math.nan}
    reliability.facts = {"conformal": checks["conformal"], "guard": checks.get("guard")}
    return reliability, checks


def loso_summary(loso: dict) -> dict:
    """What the model folder's metrics.json (and so the card and the app) keep of a LOSO run."""
    return {"held_out": {name: {k: v for k, v in r.items() if k in ("n", "trained_on", "metrics", "guard", "conformal", "wall_seconds")}
                         for name, r in loso["held_out"].items()},
            "pooled": loso.get("pooled"), "wall_seconds": loso.get("wall_seconds")}


def source_facts(report, splits: dict) -> dict:
    """Per source: its folder, the data set it is (name, citation, label provenance), and its
    count per split and class (empty for a single source)."""
    if len(getattr(report, "sources", {})) < 2:
        return {}
    out = {}
    for name, folder in report.sources.items():
        counts = {}
        for split, ds in splits.items():
            raw = ds.with_format(None)
            names = ds.features["label"].names
            counts[split] = dict(Counter(names[y] for y, s in zip(raw["label"], raw["source"], strict=True) if s == name))
        out[name] = {"data_dir": folder, "dataset": dataset_facts(folder), "counts": counts}
    return out


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


@dataclass
class TrainResult:
    """One trained model: its ``metrics.json`` content and the predictions behind it."""

    metrics: dict
    probs: np.ndarray
    y_true: list[int]
    groups: list[str]
    paths: list[str]
    sources: list[str] = field(default_factory=list)
    reliability: Reliability | None = None
    outputs: dict = field(default_factory=dict)  # split -> FrameOutputs (logits, features)


def head_parameters(model) -> set[int]:
    """ids of the new classification head's parameters (timm: get_classifier(); transformers: .classifier)."""
    return {id(p) for p in classifier_head(model).parameters()}


class FreezeBackbone:
    """Linear probing, then fine-tuning: the backbone's parameters get no gradient (so no update)
    for the first ``epochs`` epochs (BatchNorm running statistics still adapt to the new images)."""

    def __init__(self, epochs: int) -> None:
        from transformers import TrainerCallback

        self.epochs = epochs
        outer = self

        class _Callback(TrainerCallback):
            def on_epoch_begin(self, args, state, control, model=None, **kwargs):
                outer.apply(model, frozen=(state.epoch or 0) < outer.epochs - 1e-6)

        self.callback = _Callback()

    @staticmethod
    def apply(model, frozen: bool) -> None:
        head = head_parameters(model)
        for p in model.parameters():
            if id(p) not in head:
                p.requires_grad_(not frozen)


class WeightAverage:
    """An exponential moving average of the weights (timm's ``ModelEmaV3``, buffers included),
    updated after every optimizer step and copied into the model when training ends. On a few
    hundred images the last epochs' weights jump about; their average is a steadier model than any
    one of them, and needs no validation set to pick it."""

    def __init__(self, decay: float) -> None:
        from transformers import TrainerCallback

        self.decay = decay
        self.ema = None
        outer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                from timm.utils import ModelEmaV3

                outer.ema = ModelEmaV3(model, decay=outer.decay)

            def on_step_end(self, args, state, control, model=None, **kwargs):
                outer.ema.update(model, step=state.global_step)

            def on_train_end(self, args, state, control, model=None, **kwargs):
                model.load_state_dict(outer.ema.module.state_dict())
                outer.ema = None  # free the copy

        self.callback = _Callback()


def make_optimizer(model, run_args: RunArguments, head_multiplier: float) -> torch.optim.Optimizer:
    """AdamW with discriminative learning rates (head x ``head_multiplier``); no decay on norms and biases."""
    head = head_parameters(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in head, p.ndim <= 1), []).append(p)
    return torch.optim.AdamW([
        {"params": params, "lr": run_args.learning_rate * (head_multiplier if is_head else 1.0),
         "weight_decay": 0.0 if no_decay else run_args.weight_decay}
        for (is_head, no_decay), params in groups.items()
    ], lr=run_args.learning_rate)


def train_one(
    spec: ModelSpec,
    dataset,
    report,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_args: RunArguments,
    callbacks: Sequence = (),
    out: Path | None = None,
    write: bool = True,
    cache: dict | None = None,
    loso: dict | None = None,
) -> TrainResult:
    """Train one model on ``dataset`` (train / validation / test) and evaluate it; with ``write``,
    write its folder (weights, card, plots, metrics) to ``out`` (default OUTPUT_DIR/<model>)."""
    from transformers import EarlyStoppingCallback, Trainer, set_seed

    state = distributed_state()
    out = out or Path(run_args.output_dir) / spec.name
    checkpoints = out / "checkpoints"
    labels = dataset["train"].features["label"].names
    set_seed(run_args.seed)
    model, processor = build_model(spec, labels, model_args.init, model_args.image_size)
    if run_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    image_size = processor.size["height"]
    preprocessor = data_args.preprocessor()

    splits = {name: ds for name, ds in dataset.items()}
    views = {}  # evaluation splits, one row per view, and each row's frame
    for name, ds in splits.items():
        transforms = ImageTransforms(preprocessor, processor, image_size, train=name == "train", cache=cache,
                                     device_augment=run_args.device_augment and name == "train")
        if name != "train":
            ds, owner = expand_views(ds, transforms)
            views[name] = (ds, owner)
        ds.set_transform(transforms, columns=["path", "label", *(["view"] if "view" in ds.column_names else [])])
    has_validation = "validation" in splits
    eval_name = "test" if "test" in splits else "validation" if has_validation else "train"
    train_raw = splits["train"].with_format(None)
    train_labels = [int(x) for x in train_raw["label"]]
    train_sources = list(train_raw["source"]) if "source" in train_raw.column_names else [""] * len(train_labels)
    weights = class_weights(train_labels, len(labels)) if run_args.class_weighting else None
    if run_args.class_weighting and len(set(train_sources)) > 1:
        # Several sources: weigh each (source, class) cell equally, per example (stratum_weights).
        weights = None
        splits["train"] = splits["train"].add_column("weight", stratum_weights(train_labels, train_sources).tolist())
        splits["train"].set_transform(ImageTransforms(preprocessor, processor, image_size, train=True, cache=cache, device_augment=run_args.device_augment),
                                      columns=["path", "label", "weight"])

    trainer_callbacks = list(callbacks)
    if run_args.freeze_backbone_epochs > 0 and model_args.init == "pretrained":
        trainer_callbacks.append(FreezeBackbone(run_args.freeze_backbone_epochs).callback)
    if run_args.ema_decay > 0:
        trainer_callbacks.append(WeightAverage(run_args.ema_decay).callback)
    if has_validation and run_args.select_best and run_args.early_stopping_patience > 0:
        trainer_callbacks.append(EarlyStoppingCallback(early_stopping_patience=run_args.early_stopping_patience))
    trainer = SampleWeightedTrainer(
        label_smoothing=run_args.label_smoothing,
        model=model,
        args=_training_arguments(run_args, checkpoints, has_validation),
        train_dataset=splits["train"],
        eval_dataset=views["validation"][0] if has_validation else None,  # a row per view; compute_metrics scores frames
        data_collator=collate,
        processing_class=processor,
        compute_metrics=make_compute_metrics(labels, views["validation"][1] if has_validation else None),
        compute_loss_func=make_loss(weights, run_args.label_smoothing),
        callbacks=trainer_callbacks,
        # The schedule is still the Trainer's. From scratch every layer is new: one learning rate.
        optimizers=(make_optimizer(model, run_args, run_args.head_lr_multiplier if model_args.init == "pretrained" else 1.0), None),
    )
    resume_from = _last_checkpoint(checkpoints) if run_args.resume else None
    if run_args.resume and resume_from is None:
        logger.info("%s: no checkpoint to resume from in %s; starting fresh", spec.name, checkpoints)
    logger.info("%s: %.1fM parameters, %s init, %d px, training on %d images", spec.name,
                count_parameters(model) / 1e6, model_args.init, image_size, len(splits["train"]))
    started = time.time()
    trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - started

    # Calibration: a temperature fitted on validation, judged on the evaluation split; conformal sets
    # and the in-domain guard's threshold also come from validation (never from what is scored).
    temperature = 1.0
    outputs = {}
    if has_validation:
        outputs["validation"] = _predict(trainer, *views["validation"])
        temperature = fit_temperature(outputs["validation"].logits, [int(x) for x in splits["validation"].with_format(None)["label"]])
    eval_ds = splits[eval_name]
    if eval_name not in outputs:
        outputs[eval_name] = _predict(trainer, *views[eval_name]) if eval_name in views else _predict(trainer, eval_ds, np.arange(len(eval_ds)))
    logits = outputs[eval_name].logits
    raw = eval_ds.with_format(None)
    y_true = [int(x) for x in raw["label"]]
    if len(y_true) != len(logits):
        raise RuntimeError(f"evaluation returned {len(logits)} predictions for {len(y_true)} examples")
    probs = softmax(logits)
    metrics = classification_metrics(y_true, probs, labels)
    intervals = bootstrap_intervals(y_true, probs, labels, groups=list(raw["group"]), n_resamples=run_args.bootstrap_resamples, seed=run_args.seed)
    eval_sources = list(raw["source"]) if "source" in raw.column_names else [""] * len(y_true)
    reliability, checks = fit_reliability(trainer, splits, preprocessor, processor, image_size, cache, outputs, temperature, run_args,
                                          eval_name, y_true, eval_sources)
    history = _epoch_history(trainer.state.log_history)
    result = {
        "model": spec.name,
        "checkpoint": spec.checkpoint,
        "init": model_args.init,
        "labels": labels,
        "split": eval_name,
        "n": len(y_true),
        eval_name: {**with_intervals(metrics, intervals), "split": eval_name,
                    "by_source": by_source(y_true, probs, labels, list(raw["group"]), eval_sources, run_args.bootstrap_resamples, run_args.seed)},
        "reliability": checks,
        **({"leave_one_source_out": loso_summary(loso)} if loso else {}),
        "calibration": {
            "temperature": temperature,
            "fitted_on": "validation" if has_validation else None,
            "ece_before": metrics["ece"],
            "ece_after": expected_calibration_error(np.asarray(y_true), softmax(logits, temperature)),
        },
        "best_validation": {k.removeprefix("eval_"): v for k, v in (max(
            (h for h in history if "eval_roc_auc" in h and not math.isnan(h["eval_roc_auc"])),
            key=lambda h: h["eval_roc_auc"], default={}) or {}).items()},
        "history": history,
        "data": {
            "data_dir": " + ".join(report.sources.values()) if len(report.sources) > 1 else report.root,
            "dataset": sources_facts(report.sources or {"": report.root}),
            "counts": {name: dict(Counter(labels[i] for i in ds.with_format(None)["label"])) for name, ds in splits.items()},
            "sources": source_facts(report, splits),
            "groups": len(set(g for ds in splits.values() for g in ds.with_format(None)["group"])),
        },
        "training": {
            "image_size": image_size,
            "epochs_run": float(trainer.state.epoch or 0),
            "train_seconds": round(train_seconds, 1),
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "preprocessing": asdict(preprocessor),
            "class_weights": None if weights is None else [round(float(w), 4) for w in weights],
            # Several sources: each (source, class) cell's weight per example, n / (cells * n_cell).
            "source_class_weights": {f"{s}|{labels[y]}": round(float(w), 4) for (s, y), w in sorted(
                {(s, y): w for s, y, w in zip(train_sources, train_labels, stratum_weights(train_labels, train_sources), strict=True)}.items())}
            if run_args.class_weighting and len(set(train_sources)) > 1 else None,
            **recipe(run_args),
            "init": model_args.init,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "processes": state.num_processes,
        },
    }
    if state.is_main_process and write:
        _write_model_folder(trainer, preprocessor, report, result, out, raw, probs, labels, temperature, reliability)
    state.wait_for_everyone()
    return TrainResult(metrics=result, probs=probs, y_true=y_true, groups=list(raw["group"]), paths=list(raw["path"]),
                       sources=eval_sources, reliability=reliability, outputs=outputs)


def _write_model_folder(trainer, preprocessor, report, result, out: Path, raw, probs, labels, temperature, reliability: Reliability) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = trainer.model
    model.config.calibration_temperature = temperature  # read by the project's Predictor
    trainer.save_model(str(out))  # safetensors weights + config (labels) + image processor
    preprocessor.save_pretrained(out)
    reliability.save_pretrained(out)
    report.save(out / "audit.json")
    (out / "fingerprints.json").write_text(json.dumps(report.fingerprints()) + "\n")
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    split = result["split"]
    plot_loss(trainer.state.log_history, out / "loss.png", result["model"])
    plot_auc(trainer.state.log_history, out / "auc.png", result["model"])
    plot_roc(raw["label"], probs, labels, out / "roc.png", f"{result['model']} ({split})")
    plot_confusion(result[split]["confusion_matrix"], labels, out / "confusion_matrix.png", f"{result['model']} ({split})")
    write_card(out)
    with (out / f"predictions_{split}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "group", "source", "label", "predicted", *[f"p_{name}" for name in labels]])
        sources = raw["source"] if "source" in raw.column_names else [""] * len(probs)
        for path, group, source, y, p in zip(raw["path"], raw["group"], sources, raw["label"], probs, strict=True):
            writer.writerow([path, group, source, labels[y], labels[int(np.argmax(p))], *[f"{v:.6f}" for v in p]])
    logger.info("%s: wrote %s", result["model"], out)


# --------------------------------------------------------------------------------------------
# The run


def distributed_state():
    """This process's place in a (possibly multi-process) run; CPU-only hosts use gloo, so
    `accelerate launch --multi_gpu --num_processes 2` and `torchrun` also work without GPUs."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def check_models_reachable(specs: Sequence[ModelSpec], init: str) -> None:
    """Before any data is read or any training time spent: can every checkpoint be had?"""
    if init != "pretrained":
        return
    for spec in specs:
        if not is_local(spec.checkpoint):
            check_hub_model(spec.checkpoint, what_to_do=HUB_HELP)


@dataclass
class PooledFolds:
    """Every split of a data set pooled into one, with K folds stratified by class and grouped by
    patient: what ``--cv`` trains on, and what the benchmarks reuse to score on the same folds."""

    full: object  # datasets.Dataset
    labels: list[str]
    y: np.ndarray
    groups: list[str]
    paths: list[str]
    folds: list[tuple[np.ndarray, np.ndarray]]
    sources: list[str] = field(default_factory=list)

    @property
    def fold_of(self) -> np.ndarray:
        """The fold (1..K) in which each example is held out."""
        out = np.zeros(len(self.y), dtype=int)
        for k, (_, held) in enumerate(self.folds, start=1):
            out[held] = k
        return out


def pooled(dataset) -> PooledFolds:
    """``dataset`` (a DatasetDict) pooled into one, without folds (leave-one-source-out splits by source)."""
    from datasets import concatenate_datasets

    full = concatenate_datasets(list(dataset.values())) if len(dataset) > 1 else dataset["train"]
    raw = full.with_format(None)
    y = np.array([int(v) for v in raw["label"]])
    sources = list(raw["source"]) if "source" in raw.column_names else [""] * len(y)
    return PooledFolds(full, full.features["label"].names, y, list(raw["group"]), list(raw["path"]), [], sources)


def pooled_folds(dataset, k: int, seed: int) -> PooledFolds:
    """``dataset`` (a DatasetDict) pooled, with ``data.cv_folds`` stratified by source x class."""
    from .data import cv_folds, strata

    pool = pooled(dataset)
    pool.folds = cv_folds(strata(pool.y, pool.sources), pool.groups, k, seed)
    return pool


def cross_validate(
    spec: ModelSpec,
    dataset,
    report,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_args: RunArguments,
    callbacks: Sequence = (),
) -> dict:
    """K-fold cross-validation grouped by patient and stratified by class, same recipe every fold.

    Each fold's training part gives up a group-aware validation share (the temperature, the
    validation curves, and early stopping with ``--select_best``); the held-out fold is predicted once. Pooled out-of-fold predictions give the
    headline numbers, with bootstrap intervals that resample patients.
    """
    import shutil

    state = distributed_state()
    out = Path(run_args.output_dir) / spec.name
    cv_set = pooled_folds(dataset, run_args.cv, run_args.seed)
    full, labels, y, groups, paths, folds = cv_set.full, cv_set.labels, cv_set.y, cv_set.groups, cv_set.paths, cv_set.folds
    oof = np.full((len(y), len(labels)), np.nan)
    per_fold = []
    cache: dict = {}
    started = time.time()
    for k, (pool, held) in enumerate(folds, start=1):
        fold_data = with_validation(full.select([int(i) for i in pool]), data_args, run_args.seed + k)
        fold_data["test"] = full.select([int(i) for i in held])
        logger.info("%s fold %d/%d: train %d, validation %d, test %d", spec.name, k, run_args.cv,
                    len(fold_data["train"]), len(fold_data["validation"]), len(fold_data["test"]))
        fold_dir = out / "cv" / f"fold-{k}"
        result = train_one(spec, fold_data, report, data_args, model_args, run_args, callbacks, out=fold_dir, write=False, cache=cache)
        oof[held] = result.probs
        m = result.metrics["test"]
        per_fold.append({"fold": k, "n": m["n"], **{key: m[key]["value"] for key in HEADLINE},
                         "recall": {label: v["recall"] for label, v in m["per_class"].items()},
                         "epochs_run": result.metrics["training"]["epochs_run"], "temperature": result.metrics["calibration"]["temperature"]})
        if state.is_main_process:
            print(f"{spec.name} fold {k}/{run_args.cv}: held-out macro ROC AUC {m['roc_auc']['value']:.3f}, n={m['n']}, "
                  f"{result.metrics['training']['epochs_run']:.0f} epochs", flush=True)
            shutil.rmtree(fold_dir / "checkpoints", ignore_errors=True)  # optimizer state of a fold is not needed again
    wall = time.time() - started
    fold_of = cv_set.fold_of
    pooled = classification_metrics(y, oof, labels)
    intervals = bootstrap_intervals(y, oof, labels, groups=groups, n_resamples=run_args.bootstrap_resamples, seed=run_args.seed)
    spread = {key: {"mean": float(np.nanmean([f[key] for f in per_fold])), "sd": float(np.nanstd([f[key] for f in per_fold], ddof=1)),
                    "min": float(np.nanmin([f[key] for f in per_fold])), "max": float(np.nanmax([f[key] for f in per_fold]))} for key in HEADLINE}
    cv = {
        "model": spec.name, "checkpoint": spec.checkpoint, "init": model_args.init, "k": run_args.cv, "labels": labels,
        "n": int(len(y)), "groups": len(set(groups)), "wall_seconds": round(wall, 1),
        "pooled": with_intervals(pooled, intervals),
        "by_source": by_source(y, oof, labels, groups, cv_set.sources, run_args.bootstrap_resamples, run_args.seed),
        "per_fold": per_fold, "spread": spread,
        "data": {"data_dir": " + ".join(report.sources.values()) if len(report.sources) > 1 else report.root,
                 "dataset": sources_facts(report.sources or {"": report.root}), "counts": dict(Counter(labels[i] for i in y))},
        "recipe": {"image_size": model_args.image_size, **recipe(run_args),
                   "preprocessing": asdict(data_args.preprocessor())},
    }
    # Split screens can stand in for the label (on DDTI they do): report how the score follows them.
    split = report.split_screens(paths)
    if split.any() and not split.all():
        cv["by_layout"] = layout_breakdown(y, oof, split, labels)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cv_metrics.json").write_text(json.dumps(cv, indent=2, default=float) + "\n")
        plot_cv_roc(y, oof, fold_of, labels, out / "cv_roc.png", f"{spec.name}, {run_args.cv}-fold CV")
        write_cv_predictions(out / "cv_predictions.csv", paths, groups, fold_of, labels, y, oof)
        a = cv["pooled"]["roc_auc"]
        print(f"{spec.name}: {run_args.cv}-fold CV pooled macro ROC AUC {a['value']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] "
              f"(folds {spread['roc_auc']['mean']:.3f} ± {spread['roc_auc']['sd']:.3f}), balanced accuracy "
              f"{cv['pooled']['balanced_accuracy']['value']:.3f}, n={len(y)}, {wall / 60:.1f} min -> {out / 'cv_metrics.json'}")
        for name, m in cv["by_source"].items():
            print(f"{spec.name}: source {name}: pooled out-of-fold macro ROC AUC {m['roc_auc']['value']:.3f} "
                  f"[{m['roc_auc']['ci'][0]:.3f}, {m['roc_auc']['ci'][1]:.3f}], balanced accuracy {m['balanced_accuracy']['value']:.3f}, n={m['n']} (in-source)")
        if "by_layout" in cv:
            b = cv["by_layout"]
            print(f"{spec.name}: split screens {b['split_screen']['n']} of {len(y)} frames; AUC on single-view frames {b['single_view']['roc_auc']:.3f}, "
                  f"on split screens {b['split_screen']['roc_auc']:.3f}; within each class the score tells split screens from single views with AUC "
                  + ", ".join(f"{label} {v:.2f}" for label, v in b["layout_auc"].items()) + " (0.5: it does not)")
    if run_args.cv_final:
        final_data = with_validation(full, data_args, run_args.seed)
        result = train_one(spec, final_data, report, data_args, model_args, run_args, callbacks, cache=cache)
        if state.is_main_process:
            path = out / "metrics.json"
            metrics = json.loads(path.read_text())
            metrics["cross_validation"] = {k: cv[k] for k in ("k", "n", "groups", "pooled", "by_source", "spread", "by_layout") if k in cv}
            path.write_text(json.dumps(metrics, indent=2, default=float) + "\n")
            write_card(out)
        del result
    return cv


def write_cv_predictions(path: Path, paths: Sequence[str], groups: Sequence[str], fold_of: np.ndarray, labels: Sequence[str],
                         y: np.ndarray, oof: np.ndarray) -> None:
    """Out-of-fold predictions, a row per image (what ``python -m thyroid_classifier.compare`` reads)."""
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "group", "fold", "label", *[f"p_{name}" for name in labels]])
        for i in range(len(y)):
            writer.writerow([paths[i], groups[i], int(fold_of[i]), labels[y[i]], *[f"{v:.6f}" for v in oof[i]]])


def with_validation(pool, data_args: DataArguments, seed: int):
    """``pool`` as train and validation (a group-aware share, at least 10%, for the temperature,
    the validation curves and, with ``--select_best``, early stopping): a cross-validation fold's training part, or all the data for a final model."""
    from datasets import DatasetDict

    from .data import group_holdout, strata

    raw = pool.with_format(None)
    sources = list(raw["source"]) if "source" in raw.column_names else [""] * len(raw)
    mask = group_holdout(strata([int(v) for v in raw["label"]], sources), list(raw["group"]), max(0.1, data_args.validation_size), seed)
    return DatasetDict({
        "train": pool.select([i for i, v in enumerate(mask) if not v]),
        "validation": pool.select([i for i, v in enumerate(mask) if v]),
    })


def hub_repos(run_args: RunArguments, specs: Sequence[ModelSpec]) -> dict[str, str]:
    """Model name → Hub repository for ``--push_to_hub`` (empty when not pushing)."""
    if not run_args.push_to_hub:
        return {}
    if not run_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. someone/thyroid-resnet50)")
    if len(specs) == 1:
        return {specs[0].name: run_args.hub_model_id}
    return {s.name: f"{run_args.hub_model_id}-{s.name}" for s in specs}


def write_comparison(results: dict[str, dict], output_dir: Path) -> None:
    """``comparison.png`` and ``comparison.md``: the models side by side with their intervals."""
    if not results:
        return
    split = next(iter(results.values()))["split"]
    table = {name: r[r["split"]] for name, r in results.items()}
    plot_comparison(table, output_dir / "comparison.png", split)
    lines = [
        f"# Model comparison ({split} split)",
        "",
        "95% bootstrap intervals (resampling patients/cases). ECE: expected calibration error, lower is better.",
        "",
        "| model | init | n | " + " | ".join(HEADLINE) + " |",
        "|---|---|---|" + "---|" * len(HEADLINE),
    ]
    for name, r in results.items():
        cells = [f"{table[name][m]['value']:.3f} [{table[name][m]['ci'][0]:.3f}, {table[name][m]['ci'][1]:.3f}]" for m in HEADLINE]
        lines.append(f"| {name} | {r['init']} | {r['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Per-class recall:", ""]
    for name, r in results.items():
        per_class = table[name]["per_class"]
        lines.append(f"- {name}: " + ", ".join(f"{label} {v['recall']:.3f} (n={v['support']})" for label, v in per_class.items()))
    (output_dir / "comparison.md").write_text("\n".join(lines) + "\n")


def run(data_args: DataArguments, model_args: ModelArguments, run_args: RunArguments, callbacks: Sequence = ()) -> dict[str, dict]:
    """The whole job: audit, split, train and evaluate each model, compare. Returns each model's metrics."""
    state = distributed_state()
    specs = [get_spec(name) for name in model_args.model]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"two models share an output folder name: {[s.name for s in specs]}")
    # Settings first: a wrong flag should not wait for the Hub or the data.
    if run_args.cv == 1 or run_args.cv < 0:
        raise ValueError("--cv needs K >= 2 folds")
    if run_args.loso and run_args.cv:
        raise ValueError("--loso and --cv are two ways to validate: run them one at a time")
    if run_args.loso and len(data_args.data_dir or []) < 2:
        raise ValueError("--loso needs at least two --data_dir folders (one per source)")
    if run_args.ema_decay > 0 and run_args.select_best:
        raise ValueError("--ema_decay keeps the weights' average as the model; drop --select_best (a best checkpoint would replace it)")
    if not 0 <= run_args.ema_decay < 1:
        raise ValueError(f"--ema_decay must be in [0, 1), not {run_args.ema_decay}")
    check_models_reachable(specs, model_args.init)
    repos = hub_repos(run_args, specs)
    if repos and state.is_main_process:
        check_push_access(next(iter(repos.values())))
    data_dir = data_args.data_dir
    if data_dir is None:
        data_dir = str(builtin_sample())
        logger.warning("no --data_dir given: using the built-in SYNTHETIC sample at %s (it demonstrates the pipeline only)", data_dir)
    groups = GroupSpec(csv_path=Path(data_args.group_csv) if data_args.group_csv else None, column=data_args.group_column, pattern=data_args.group_pattern)
    with state.main_process_first():
        dataset, report = audited_dataset(
            data_dir,
            drop_duplicates=data_args.drop_duplicates,
            near_threshold=data_args.near_threshold,
            progress=state.is_main_process,
            # Cross-validation folds are made from all the data, so nothing is held out here.
            validation_size=0.0 if run_args.cv else data_args.validation_size,
            test_size=0.0 if run_args.cv else data_args.test_size,
            seed=run_args.seed,
            groups=groups,
            source_names=data_args.source_names,
        )
    if state.is_main_process:
        print(report.summary())
    output_dir = Path(run_args.output_dir)
    results = {}
    for spec in specs:
        if run_args.cv:
            results[spec.name] = cross_validate(spec, dataset, report, data_args, model_args, run_args, callbacks)
            continue
        loso = None
        if run_args.loso:
            from .loso import leave_one_source_out

            loso = leave_one_source_out(spec, dataset, report, data_args, model_args, run_args, callbacks)
        results[spec.name] = train_one(spec, dataset, report, data_args, model_args, run_args, callbacks, loso=loso).metrics
    if run_args.cv:
        return results
    if state.is_main_process:
        write_comparison(results, output_dir)
        for name, repo_id in repos.items():
            try:
                pushed = push_folder(output_dir / name, repo_id, private=run_args.hub_private)
                print(f"{name}: pushed {len(pushed)} files to {repo_id}")
            except Exception as exc:  # noqa: BLE001 - the trained folder stays on disk whatever happens
                print(f"{name}: push to {repo_id} failed ({type(exc).__name__}: {exc}); the model is safe in {output_dir / name}. "
                      f"Retry with: python -m thyroid_classifier.hub push {output_dir / name} {repo_id}", file=sys.stderr)
        for name, r in results.items():
            m = r[r["split"]]
            print(f"{name}: {r['split']} macro ROC AUC {m['roc_auc']['value']:.3f} [{m['roc_auc']['ci'][0]:.3f}, {m['roc_auc']['ci'][1]:.3f}], "
                  f"balanced accuracy {m['balanced_accuracy']['value']:.3f}, n={r['n']} -> {output_dir / name}")
    return results


def parse_args(argv: Sequence[str] | None = None) -> tuple[DataArguments, ModelArguments, RunArguments]:
    """Command-line flags, or a single JSON file holding the same keys."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((DataArguments, ModelArguments, RunArguments), description=(
        "Fine-tune ResNet50 and the VGG19 baseline (or any image-classification checkpoint) on a folder "
        "of thyroid ultrasound images, and write metrics with 95% intervals, plots and Hub-ready model folders. "
        "Pass a single .json file instead of flags to read the same settings from it."))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: Sequence[str] | None = None) -> int:
    from .hub import HubUnreachableError
    from .data import DataError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    data_args, model_args, run_args = parse_args(argv)
    try:
        run(data_args, model_args, run_args)
    except (HubUnreachableError, DataError, ValueError) as exc:
        logging.getLogger("thyroid_classifier").error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
