"""How the weights move: the Trainer's arguments, discriminative learning rates, linear probing
then fine-tuning, a moving average of the weights, and the per-epoch history and metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from .arguments import RunArguments
from .metrics import HEADLINE, ThyroidMetrics, frame_logits, softmax
from .models import classifier_head


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


def training_arguments(run_args: RunArguments, checkpoints: Path, has_validation: bool):
    """The Trainer's TrainingArguments for one model: every option as parsed (``run_args`` is a
    TrainingArguments), with what the project decides per run filled in."""
    from transformers import TrainingArguments

    if run_args.label_smoothing_factor:
        raise ValueError("--label_smoothing_factor would be ignored (the project's loss does the smoothing): use --label_smoothing")
    cuda = torch.cuda.is_available()
    bf16 = run_args.bf16 if run_args.bf16 is not None else cuda and torch.cuda.is_bf16_supported()
    fp16 = run_args.fp16 if run_args.fp16 is not None else cuda and not bf16
    values = {f.name: getattr(run_args, f.name) for f in fields(TrainingArguments) if f.init}
    return TrainingArguments(**{**values, **dict(
        output_dir=str(checkpoints),
        warmup_steps=run_args.warmup_steps or run_args.warmup_ratio,  # a float below 1 is a ratio in transformers 5
        eval_strategy="epoch" if has_validation else "no",  # the curves, early stopping and --select_best need it
        save_strategy="epoch",
        load_best_model_at_end=has_validation and run_args.select_best,
        metric_for_best_model="roc_auc" if has_validation else None,
        greater_is_better=True,
        data_seed=run_args.data_seed if run_args.data_seed is not None else run_args.seed,
        bf16=bf16,
        fp16=fp16,
        push_to_hub=False,  # pushed after training by hub.push_folder (the Trainer's push would upload checkpoints)
        dataloader_pin_memory=run_args.dataloader_pin_memory and cuda,
    )})  # use_cpu comes with the values: RunArguments sets it on GPU-less hosts


def epoch_history(log_history: Sequence[dict]) -> list[dict]:
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


def head_parameters(model) -> set[int]:
    """ids of the new heads' parameters: the classification head (timm: get_classifier(); transformers:
    .classifier) and, when the model carries them, the descriptor heads (new too)."""
    extra = model.get_submodule("descriptor_heads").parameters() if hasattr(model, "descriptor_heads") else ()
    return {id(p) for p in classifier_head(model).parameters()} | {id(p) for p in extra}


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

