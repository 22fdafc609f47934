"""The settings of a training run: three typed dataclasses that ``HfArgumentParser`` turns into
``train.py --help`` (or reads from one JSON file), as transformers' own examples do."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from .audit import DEFAULT_NEAR_THRESHOLD
from .descriptors import VIEWS
from .models import INIT_CHOICES
from .preprocess import UltrasoundPreprocessor


@dataclass
class DataArguments:
    data_dir: list[str] | None = field(
        default=None,
        metadata={"help": "Folder of class sub-folders, optionally under train/ validation/ test/. Several folders: each is a "
                  "*source* (hospital, scanner, collection); splits are stratified by source x class, the loss weighs each "
                  "source's classes equally and every metric is also given per source. "
                  "Default: the built-in SYNTHETIC sample (demonstrates the pipeline only)."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "An image-classification dataset on the Hub (an image and a ClassLabel column, e.g. one pushed with datasets' imagefolder) instead of --data_dir: downloaded once and written out as class folders under ~/.cache/thyroid_classifier/datasets."})
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
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on at most this many training images (a seeded random subset): quick checks, debugging."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many validation and test images each (a seeded random subset)."})
    split_views: bool = field(default=False, metadata={"help": "Split a split-screen frame into its two views: training sees one at random, evaluation and prediction average both. Off by default: on DDTI it scored worse and the model still told the layouts apart (docs/data.md, 'Preprocessing')."})

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
class RunArguments(TrainingArguments):
    """Every ``transformers.TrainingArguments`` option (``--help_all`` lists them), with the project's
    defaults, and the project's own. A few the project sets per run itself (the Trainer's ``output_dir``
    is ``OUTPUT_DIR/<model>/checkpoints``; evaluation and saving every epoch; ``load_best_model_at_end``
    follows ``--select_best``; the Hub push happens after training, from this project's code)."""

    # TrainingArguments options with the project's defaults (and help)
    output_dir: str = field(default="outputs", metadata={"help": "Where OUTPUT_DIR/<model>/ and the comparison are written."})
    num_train_epochs: float = field(default=15, metadata={"help": "Epochs of the cosine schedule (with --select_best, early stopping may end sooner)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate (cosine schedule with warm-up); the new head gets --head_lr_multiplier times it when pretrained."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Evaluation batch size per device."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (TrainingArguments)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept per model (each holds the optimizer state)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Image training needs the image column: keep False."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Optimizer step every N batches (TrainingArguments): a larger effective batch in the same memory."})
    bf16: bool | None = field(default=None, metadata={"help": "bfloat16 mixed precision (TrainingArguments). Default: on when the GPU supports it, else fp16 on GPU, never on CPU."})
    fp16: bool | None = field(default=None, metadata={"help": "float16 mixed precision (TrainingArguments). Default: on a GPU without bf16."})
    logging_strategy: str = field(default="epoch", metadata={"help": "When to log the training loss (TrainingArguments; default: once per epoch, beside the validation loss)."})
    logging_steps: float = field(default=0, metadata={"help": "Log the training loss every N optimizer steps (sets --logging_strategy steps; default: once per epoch)."})
    seed: int = field(default=42, metadata={"help": "Seed for the split, initialisation, augmentation and data order."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes (0 keeps the decoded-image cache in one process)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push each trained model's folder (weights, config, processor, card, plots, metrics) to the Hub after training; the repository is created and write access checked before training. The token comes from HF_TOKEN or the saved login."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub, e.g. someone/thyroid-resnet50. With several models, '-<model>' is appended to it."})
    # The project's own
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of the steps used for linear warm-up (--warmup_steps, if given, wins)."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the cross-entropy loss (the project's loss; not --label_smoothing_factor)."})
    class_weighting: bool = field(default=True, metadata={"help": "Weight the loss by inverse class frequency (n / (k * n_c)) so minority classes count as much as the majority."})
    select_best: bool = field(default=False, metadata={"help": "Keep the checkpoint with the best validation macro AUC and stop early (else: the whole schedule, last epoch's weights). Off by default: on a validation share of a few dozen frames the 'best' epoch is mostly noise (see docs/validation.md)."})
    device_augment: bool = field(default=True, metadata={"help": "Randomise what differs between ultrasound machines while training (gain curve, depth gain, resolution, speckle, burned-in calipers and text; thyroid_classifier.augment), so a model cannot lean on them (--no_device_augment: off). See research/recipe_curves.py --shifts."})
    ema_decay: float = field(default=0.0, metadata={"help": "Keep an exponential moving average of the weights with this decay per step (e.g. 0.99) and use it as the final model (0: off). Not with --select_best."})
    early_stopping_patience: int = field(default=6, metadata={"help": "Stop after this many epochs without a better validation macro AUC (0: never)."})
    resume: bool = field(default=False, metadata={"help": "Continue each model from its last checkpoint in OUTPUT_DIR/<model>/checkpoints."})
    bootstrap_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples for the 95%% intervals (patients are resampled when groups are known)."})
    channels_last: bool = field(default=True, metadata={"help": "Keep convolution weights in channels-last memory order while training: about 2x faster for conv nets on recent CPUs (oneDNN), and the usual choice on GPUs. Saved weights are the same."})
    head_lr_multiplier: float = field(default=10.0, metadata={"help": "Discriminative learning rates with --init pretrained: the new classification head learns this many times faster than the pretrained backbone (1: one rate for all)."})
    freeze_backbone_epochs: int = field(default=0, metadata={"help": "With --init pretrained: train only the new head for this many epochs, then fine-tune everything (linear probing, then fine-tuning)."})
    cv: int = field(default=0, metadata={"help": "K-fold cross-validation (K >= 2), stratified by class and grouped by patient: writes OUTPUT_DIR/<model>/cv_metrics.json with pooled out-of-fold metrics. 0: one train/validation/test run."})
    cv_final: bool = field(default=False, metadata={"help": "With --cv: also train a final model on all the data; its card carries the cross-validation numbers."})
    loso: bool = field(default=False, metadata={"help": "Leave-one-source-out (needs 2+ --data_dir sources): train on all sources but one, score the one left out, for each in turn; writes OUTPUT_DIR/<model>/loso_metrics.json and loso_predictions.csv. Then trains the model on every source (as without --loso) and its card carries the unseen-source numbers."})
    conformal_alpha: float = field(default=0.1, metadata={"help": "Prediction sets cover the true class with probability 1 - alpha (class-conditional split conformal, calibrated on validation)."})
    headline_max_error: float = field(default=0.2, metadata={"help": "A label is headlined only where, on the frames the rule was fitted on (validation for a frame of a training source; leave-one-source-out scores for any other, per true class), the one-sided 95 percent upper bound of the error among headlined answers stays under this."})
    guard_coverage: float = field(default=0.95, metadata={"help": "Share of held-out in-source images (validation) the in-domain guard lets through; the rest, and images unlike the training ones, are flagged."})
    descriptor_loss_weight: float = field(default=0.0, metadata={"help": "Train TI-RADS descriptor heads (composition, echogenicity, margin, echogenic foci) beside the class head, in the same pass, on the frames whose source has a radiologist's descriptors (DDTI's case files), with this weight on their loss; 0: no heads. See docs/descriptors.md."})
    outline_loss_weight: float = field(default=0.0, metadata={"help": "With --descriptor_loss_weight: also learn where the nodule is, an outline head on the Grad-CAM layer's map trained on the radiologists' outlines (DDTI's case files) with this weight on its loss (an auxiliary mask target). At prediction the box around its outline is the nodule the descriptor heads read when the person gives no box (the answer says so). 0: none. See docs/descriptors.md."})
    descriptor_view: str = field(default="frame", metadata={"choices": list(VIEWS), "help": "What the descriptor heads learn from (with --descriptor_loss_weight): the whole frame (in the class head's own pass), the nodule (a square around the radiologist's outline, DDTI's case files), or both, as two views of each frame. The nodule's squares ride in the same training pass; at prediction a nodule box given by the person is read the same way. See docs/descriptors.md."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repository as private (also --hub_private_repo)."})

    def __post_init__(self) -> None:
        import torch

        if self.outline_loss_weight > 0 and self.descriptor_loss_weight <= 0:
            raise ValueError("--outline_loss_weight trains the outline head of the TI-RADS descriptor heads: give --descriptor_loss_weight too")

        # TrainingArguments sets up the (singleton) distributed state here, before the project's own code:
        # on a host without GPUs it must be the CPU one, or `accelerate launch --multi_gpu` on CPUs (gloo)
        # would run as a single process.
        self.use_cpu = bool(self.use_cpu or not torch.cuda.is_available())
        if self.logging_steps and str(self.logging_strategy) in ("epoch", "IntervalStrategy.EPOCH"):
            self.logging_strategy = "steps"  # --logging_steps N alone means every N steps
        if self.logging_steps == 0:
            self.logging_steps = 500  # TrainingArguments' own default; unused when logging per epoch
        super().__post_init__()
        self.hub_private = bool(self.hub_private or self.hub_private_repo)


#: The project's own recipe settings and the Trainer options that shape a model, recorded in metrics.json
#: (the rest of TrainingArguments goes in as ``trainer_options`` when changed from the default).
RECIPE_KEYS = ("num_train_epochs", "learning_rate", "weight_decay", "warmup_ratio", "per_device_train_batch_size", "per_device_eval_batch_size",
               "label_smoothing", "class_weighting", "select_best", "device_augment", "ema_decay", "early_stopping_patience", "seed",
               "bootstrap_resamples", "head_lr_multiplier", "freeze_backbone_epochs", "cv", "cv_final", "loso", "conformal_alpha", "headline_max_error", "guard_coverage",
               "gradient_accumulation_steps", "bf16", "fp16", "descriptor_loss_weight", "descriptor_view", "outline_loss_weight")
#: Never recorded: where files go, secrets, trackers, the Hub.
_UNRECORDED = ("token", "dir", "hub", "push", "report_to", "logging", "run_name", "resume", "output")


def recipe(run_args: RunArguments) -> dict:
    """The settings that shape a model (recorded in metrics.json); not where it goes or how it is published.
    TrainingArguments options changed from the project's defaults are listed under ``trainer_options``."""
    out = {k: getattr(run_args, k) for k in RECIPE_KEYS}
    default = _defaults()
    changed = {}
    for f in fields(TrainingArguments):
        if f.name in RECIPE_KEYS or not f.init or any(word in f.name for word in _UNRECORDED):
            continue
        value = _plain(getattr(run_args, f.name))
        if value != default.get(f.name):
            changed[f.name] = value
    if changed:
        out["trainer_options"] = changed
    return out


def _plain(value):
    value = getattr(value, "value", value)  # enums (IntervalStrategy, SchedulerType, ...) as their strings
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


@functools.cache
def _defaults() -> dict:
    """The project's defaults of every TrainingArguments option, as a parsed run holds them."""
    base = RunArguments()
    return {f.name: _plain(getattr(base, f.name)) for f in fields(TrainingArguments) if f.init}


def parse_args(argv: Sequence[str] | None = None) -> tuple[DataArguments, ModelArguments, RunArguments]:
    """Command-line flags, or a single JSON file holding the same keys. ``--help`` lists the project's
    options; ``--help_all`` also every other TrainingArguments option (all are accepted either way)."""
    import argparse

    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((DataArguments, ModelArguments, RunArguments), description=(
        "Fine-tune ResNet50 and the VGG19 baseline (or any image-classification checkpoint) on a folder "
        "of thyroid ultrasound images, and write metrics with 95% intervals, plots and Hub-ready model folders. "
        "Pass a single .json file instead of flags to read the same settings from it. Every transformers "
        "TrainingArguments option is accepted too (--help_all lists them)."))
    if "--help_all" in argv:
        argv = ["--help"]
    else:
        ours = {f.name for cls in (DataArguments, ModelArguments) for f in fields(cls)} | set(RunArguments.__annotations__)
        for action in parser._actions:
            if action.dest not in ours and action.dest != "help":
                action.help = argparse.SUPPRESS  # readable --help: the ~100 other Trainer options are in --help_all
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=argv[0])
    return parser.parse_args_into_dataclasses(args=argv)
