"""How much each training example counts: class weights, source x class weights, and the
``Trainer`` that applies per-example weights.

One source: the loss is ``F.cross_entropy(weight=class_weights)``. Several sources: every example
carries a weight (:func:`stratum_weights`) so that each (source, class) cell counts the same, and
:func:`SampleWeightedTrainer` averages the per-example losses with them.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .descriptors import OUTLINE, descriptor_logits, descriptor_loss, outline_loss


def stratum_weights(labels: Sequence[int], sources: Sequence[str]) -> np.ndarray:
    """Per-example loss weights n / (C * n_sc), C the number of (source, class) cells present: each cell counts the
    same in total, so neither a big source nor a class that one source has more of can win the loss
    (pooled, DDTI is 83% malignant and LES3BDD 52%: class weights alone would still reward
    "looks like DDTI, so malignant"). Mean weight 1."""
    cells = Counter(zip(sources, labels, strict=True))
    return np.array([len(labels) / (len(cells) * cells[(s, y)]) for s, y in zip(sources, labels, strict=True)], dtype=np.float64)


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """n / (k * n_c): every class contributes equally to the loss; absent classes get weight 0."""
    counts = Counter(labels)
    n = len(labels)
    return torch.tensor([n / (n_classes * counts[c]) if counts[c] else 0.0 for c in range(n_classes)], dtype=torch.float32)


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, sample_weight: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy weighted per example: sum(w_i * loss_i) / sum(w_i)."""
    per_example = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    w = sample_weight.to(device=per_example.device, dtype=per_example.dtype)
    return (per_example * w).sum() / w.sum().clamp_min(1e-12)


def make_loss(weights: torch.Tensor | None, label_smoothing: float):
    def loss(outputs, labels, num_items_in_batch=None):  # signature of Trainer's compute_loss_func
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        w = weights.to(device=logits.device, dtype=logits.dtype) if weights is not None else None
        return F.cross_entropy(logits, labels, weight=w, label_smoothing=label_smoothing)

    return loss


def SampleWeightedTrainer(*, label_smoothing: float, **kwargs):  # noqa: N802 - builds a Trainer
    """A ``transformers.Trainer`` whose training batches may carry ``sample_weight`` (several
    sources: :func:`stratum_weights`); batches without it use ``compute_loss_func`` as usual."""
    return _weighted_trainer_class()(label_smoothing=label_smoothing, **kwargs)


@functools.cache
def _weighted_trainer_class():
    from transformers import Trainer

    class _SampleWeightedTrainer(Trainer):
        def __init__(self, *args, label_smoothing: float = 0.0, descriptor_weight: float = 0.0, descriptor_class_weights: dict | None = None,
                     descriptor_view: str = "frame", outline_weight: float = 0.0, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.label_smoothing = label_smoothing
            self.descriptor_weight = descriptor_weight
            self.descriptor_class_weights = descriptor_class_weights
            self.descriptor_view = descriptor_view  # what the heads learn from: "frame", "nodule" or "both" (descriptors.VIEWS)
            self.outline_weight = outline_weight  # the outline head's loss weight (an auxiliary mask target; 0: none)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weight = inputs.pop("sample_weight", None)
            targets = inputs.pop("descriptor_labels", None)
            nodules, boxed = inputs.pop("nodule_pixel_values", None), inputs.pop("nodule_mask", None)
            outline_target, outlined = inputs.pop("outline_target", None), inputs.pop("outline_mask", None)
            unwrapped = self.accelerator.unwrap_model(model)
            heads = getattr(unwrapped, "descriptor_heads", None) if targets is not None else None
            n = len(inputs["labels"])
            if heads is not None and nodules is not None and bool(boxed.any()):
                # The nodules' squares ride in the frames' forward pass (one pass: BatchNorm sees both, DDP one graph);
                # their class logits are dropped, only the descriptor heads learn from them.
                inputs["pixel_values"] = torch.cat([inputs["pixel_values"], nodules[boxed].to(inputs["pixel_values"])])
                targets = torch.cat([targets, targets[boxed.to(targets.device)]])
            # The descriptor heads read the class head's input in the same forward pass (descriptors.descriptor_logits).
            with descriptor_logits(unwrapped, heads) as captured:
                if weight is None and len(inputs["pixel_values"]) == n:
                    loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
                else:
                    labels = inputs.pop("labels")
                    outputs = model(**inputs)
                    outputs.logits = outputs.logits[:n]
                    if weight is not None:
                        loss = weighted_loss(outputs.logits, labels, weight, self.label_smoothing)
                    elif self.compute_loss_func is not None:
                        loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
                    else:
                        loss = F.cross_entropy(outputs.logits, labels, label_smoothing=self.label_smoothing)
            if captured:
                rows = {"frame": slice(0, n), "nodule": slice(n, None)}.get(self.descriptor_view, slice(None))
                read = {name: captured[0][name][rows] for name in heads.names}
                loss = loss + self.descriptor_weight * descriptor_loss(read, targets[rows].to(loss.device), heads.names, self.descriptor_class_weights)
                if OUTLINE in captured[0] and outline_target is not None:
                    # The frames' outline maps (never the nodules' squares') against the radiologist's outlines.
                    loss = loss + self.outline_weight * outline_loss(captured[0][OUTLINE][:n], outline_target, outlined)
            return (loss, outputs) if return_outputs else loss

    return _SampleWeightedTrainer
