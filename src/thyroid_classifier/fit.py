"""One model: build it, train it with ``transformers.Trainer``, evaluate it once, fit what it
needs to say when not to trust it (temperature, conformal sets, the in-domain guard) and hand the
whole result to :class:`folder.ModelFolder`. ``accelerate launch`` runs the same code on several
GPUs or machines; evaluation gathers each example exactly once."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adaptation import StartingModel
from .arguments import DataArguments, ModelArguments, RunArguments, recipe
from .descriptors import (MISSING, DescriptorHeads, answered_descriptors, DescriptorState, describe, descriptor_class_weights, descriptor_logits,
                          descriptor_report, frame_labels, frame_nodule_boxes, frame_outlines, head_name, map_channels, nodule_report, one_line, outline_layer_name, outline_reads,
                          pooled_width, predicted_report, read_outlined)
from .folder import ModelFolder, prediction_rows
from .known_data import dataset_facts, sources_facts
from .metrics import (
    bootstrap_intervals,
    by_source,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    frame_logits,
    frame_mean,
    softmax,
    with_intervals,
)
from .models import ModelSpec, build_model, count_parameters, guard_features, style_layer
from .answer_rule import IN_SOURCE, UNSEEN, headlined
from .reliability import ConformalSets, DomainGuard, Reliability, coverage_report, fit_regime, regime_report
from .transforms import ImageTransforms, collate, expand_views
from .tuning import FreezeBackbone, WeightAverage, epoch_history, make_compute_metrics, make_optimizer, training_arguments
from .weighting import SampleWeightedTrainer, class_weights, make_loss, stratum_weights

logger = logging.getLogger(__name__)


def distributed_state():
    """This process's place in a (possibly multi-process) run; CPU-only hosts use gloo, so
    `accelerate launch --multi_gpu --num_processes 2` and `torchrun` also work without GPUs."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


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


def unseen_evidence(loso: dict | None) -> str:
    """How the unseen regime's evidence reads on the page and the card."""
    oos = (loso or {}).get("out_of_source") or {}
    names = sorted(set(oos.get("sources", [])))
    return f"sources it never saw (leave-one-source-out over {', '.join(names)}: {len(oos.get('y', []))} frames)"


def fit_reliability(trainer, splits: dict, preprocessor, processor, image_size: int, cache, outputs: dict[str, FrameOutputs],
                    temperature: float, run_args, eval_name: str, y_eval: Sequence[int], eval_sources: Sequence[str],
                    training_sources: Sequence[str] = (), loso: dict | None = None, eval_groups: Sequence[str] | None = None,
                    labels: Sequence[str] | None = None) -> tuple[Reliability, dict]:
    """The guard (fitted on the training images' features, threshold from validation), the conformal
    sets and the headline rule's regimes (in-source: from validation; unseen: from ``loso``'s
    out-of-source scores), and how they did on the evaluation split."""
    reliability = Reliability(training_sources=list(training_sources))
    checks: dict = {}
    oos = (loso or {}).get("out_of_source")

    def fit_unseen(at_least: Sequence[float] | None = None) -> None:
        # Every frame scored by a model that never saw its source: the rule for a new hospital comes from these.
        # Its sets never rule out a class the in-source sets keep (``at_least``): on the two real sources, sets
        # fitted on one unseen source alone covered 72% of the other's frames; with the in-source ones, 86%.
        if oos is not None:
            reliability.regimes[UNSEEN] = fit_regime(oos["probs"], oos["y"], unseen_evidence(loso), alpha=run_args.conformal_alpha,
                                                     max_error=run_args.headline_max_error, per_class=True, sources=oos["sources"],
                                                     at_least=at_least)

    if "validation" not in outputs:
        fit_unseen()
        checks["note"] = "no validation split: no guard threshold and no prediction sets"
        return reliability, checks
    val_raw = splits["validation"].with_format(None)
    y_val = [int(x) for x in val_raw["label"]]
    val_probs = softmax(outputs["validation"].logits, temperature)
    reliability.conformal = ConformalSets.fit(val_probs, y_val, run_args.conformal_alpha)
    # The same validation probabilities (calibrated) fit the in-source regime: its sets are the conformal sets above.
    reliability.regimes[IN_SOURCE] = fit_regime(val_probs, y_val, f"held-out frames of its training sources ({len(y_val)} validation frames)",
                                                alpha=run_args.conformal_alpha, max_error=run_args.headline_max_error)
    fit_unseen(at_least=reliability.conformal.thresholds)
    train_eval = splits["train"].with_format(None).remove_columns([c for c in ("weight",) if c in splits["train"].column_names])
    transforms = ImageTransforms(preprocessor, processor, image_size, train=False, cache=cache)
    train_views, owner = expand_views(train_eval, transforms)
    train_views.set_transform(transforms, columns=["path", "label", *(["view"] if "view" in train_views.column_names else [])])
    train_out = _predict(trainer, train_views, owner)
    if train_out.features is not None and outputs["validation"].features is not None:
        guard = DomainGuard.fit(train_out.features).calibrate(outputs["validation"].features, run_args.guard_coverage)
        reliability.guard = guard
        layer = style_layer(trainer.model)
        reliability.guard_layer = next((name for name, module in trainer.model.named_modules() if module is layer), None)
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
    flagged = np.zeros(len(probs), dtype=bool)
    if reliability.guard is not None and out.features is not None:
        flagged = reliability.guard.flags(out.features)
        checks["guard"][eval_name] = {"n": int(len(flagged)), "share_flagged": float(flagged.mean()) if len(flagged) else math.nan}
    # The headline rule on the evaluation split (in-source frames): under the in-source regime, which a person
    # who says where the frame comes from gets, and under the unseen regime, which everyone else gets.
    checks["headline"] = {"max_error": run_args.headline_max_error, eval_name: {}}
    # The rule before the regimes (in-source sets and the guard; any single-class set headlined), for comparison.
    before = reliability.conformal.sets(probs)
    checks["headline"][f"{eval_name}_before"] = regime_report(y_eval, probs, before, headlined(probs, before, 0.0, flagged), eval_groups,
                                                              run_args.bootstrap_resamples, run_args.seed, labels)
    for name, regime in reliability.regimes.items():
        member = np.asarray(reliability.regime_sets(name, probs))
        checks["headline"][eval_name][name] = regime_report(y_eval, probs, member, headlined(probs, member, regime.headline_threshold, flagged),
                                                            eval_groups, run_args.bootstrap_resamples, run_args.seed, labels)
    reliability.facts = {"conformal": checks["conformal"], "guard": checks.get("guard")}
    return reliability, checks


def answer_columns(reliability: Reliability, out: FrameOutputs, calibrated: np.ndarray, labels: Sequence[str], regime: str) -> dict[str, list]:
    """The prediction file's guard and answer columns for frames of known origin (``regime``), decided by
    the one rule (:mod:`answer_rule`) as every other face decides them."""
    scores = reliability.guard.score(out.features) if reliability.guard is not None and out.features is not None else None
    flagged = scores > reliability.guard.threshold if scores is not None else np.zeros(len(calibrated), dtype=bool)
    answers = [reliability.answer(calibrated[i], labels, bool(flagged[i]), regime) for i in range(len(calibrated))]
    return {"in_domain_score": None if scores is None else scores.tolist(), "flagged": flagged.tolist(),
            "prediction_set": [a.prediction_set for a in answers], "answer": [a.headline for a in answers],
            "headlined": [a.headlined for a in answers]}


def loso_summary(loso: dict) -> dict:
    """What the model folder's metrics.json (and so the card and the app) keep of a LOSO run."""
    return {"held_out": {name: {k: v for k, v in r.items() if k in ("n", "trained_on", "metrics", "guard", "conformal", "headline", "wall_seconds")}
                         for name, r in loso["held_out"].items()},
            "pooled": loso.get("pooled"), "crossfit": loso.get("crossfit"), "wall_seconds": loso.get("wall_seconds")}


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


def library_versions() -> dict[str, str]:
    """The versions this run used (the card states them: a reloaded model is only as reproducible as its stack)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("thyroid-classifier", "torch", "transformers", "timm", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


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
    descriptor_logits: dict | None = None  # descriptor -> (frames, classes) logits of the evaluation split (a model with heads)
    #: the same read from each frame's nodule box (the radiologist's outline's), NaN rows for frames without one
    nodule_descriptor_logits: dict | None = None
    #: the same as a frame without a box is read (an outline head's predicted nodule where found, else the frame), and
    #: the boxes it predicted (frames, 4; NaN: none)
    predicted_descriptor_logits: dict | None = None
    predicted_nodule_boxes: np.ndarray | None = None


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
    start: StartingModel | None = None,
) -> TrainResult:
    """Train one model on ``dataset`` (train / validation / test) and evaluate it; with ``write``,
    write its folder (weights, card, plots, metrics) to ``out`` (default OUTPUT_DIR/<model>).
    ``start``: a trained model to go on from (its head, labels, preprocessing and size kept)."""
    from transformers import EarlyStoppingCallback, set_seed

    state = distributed_state()
    out = out or Path(run_args.output_dir) / spec.name
    checkpoints = out / "checkpoints"
    labels = dataset["train"].features["label"].names
    set_seed(run_args.seed)
    if start is not None:
        model, processor = start.build(labels)
        preprocessor = start.preprocessor
    else:
        model, processor = build_model(spec, labels, model_args.init, model_args.image_size)
        preprocessor = data_args.preprocessor()
    if run_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    image_size = processor.size["height"]

    splits = {name: ds for name, ds in dataset.items()}
    views = {}  # evaluation splits, one row per view, and each row's frame
    for name, ds in splits.items():
        if name == "train":
            continue  # its transform is set below, once its extra columns (weights, descriptors) are in
        transforms = ImageTransforms(preprocessor, processor, image_size, train=False, cache=cache)
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

    heads, descriptor_targets, descriptor_weights = None, {}, None
    kept = DescriptorState.from_pretrained(start.folder) if start is not None else None  # a starting model's heads
    if run_args.descriptor_loss_weight > 0:
        # The radiologist's descriptors, where a source's case files give them (DDTI); the rest train the class head only.
        descriptor_targets = {name: frame_labels(ds.with_format(None)["path"], ds.with_format(None)["source"], report.sources or {},
                                                 str(report.root)) for name, ds in splits.items()}
        if (descriptor_targets["train"] != MISSING).any():
            heads = DescriptorHeads(pooled_width(model), outline_channels=map_channels(model, image_size) if run_args.outline_loss_weight > 0 else None)
            if kept is not None and kept.heads.names == heads.names:
                # A starting model's heads go on learning, as its class head does (an outline head it lacks starts new).
                heads.load_state_dict(kept.heads.state_dict(), strict=False)
            model.descriptor_heads = heads  # a submodule while training: the optimizer, the device and checkpoints include it
            # Each descriptor's classes weighed as the class head's are (--class_weighting).
            descriptor_weights = descriptor_class_weights(descriptor_targets["train"]) if run_args.class_weighting else None
            splits["train"] = splits["train"].add_column("descriptors", descriptor_targets["train"].tolist())
            if run_args.descriptor_view != "frame":  # the nodule's square, a view of its own (transforms.ImageTransforms)
                boxes = frame_nodule_boxes(train_raw["path"], train_sources, report.sources or {}, str(report.root))
                splits["train"] = splits["train"].add_column("nodule_box", boxes.tolist())
                logger.info("descriptor heads learn from %s: %d of %d training frames have an outline", run_args.descriptor_view,
                            int((~np.isnan(boxes).any(axis=1)).sum()), len(boxes))
            if heads.outline is not None:  # the outline head's target: the radiologist's outline, moved with each augmented frame
                outlines = frame_outlines(train_raw["path"], train_sources, report.sources or {}, str(report.root))
                splits["train"] = splits["train"].add_column("outline", outlines)
                logger.info("outline head: %d of %d training frames have a radiologist's outline", sum(1 for o in outlines if o), len(outlines))
        else:
            logger.warning("--descriptor_loss_weight: no training frame has a radiologist's descriptors (only DDTI's case files give them): class head only")

    splits["train"].set_transform(ImageTransforms(preprocessor, processor, image_size, train=True, cache=cache, device_augment=run_args.device_augment),
                                  columns=[c for c in ("path", "label", "weight", "descriptors", "nodule_box", "outline") if c in splits["train"].column_names])
    if heads is None and kept is not None:
        logger.warning("%s: its TI-RADS descriptor heads are not kept: fine-tuning changes the features they read, and this run has no "
                       "radiologist's descriptors to refit them on (--descriptor_loss_weight and a source with case files would)", start.location)

    trainer_callbacks = list(callbacks)
    if run_args.freeze_backbone_epochs > 0 and model_args.init == "pretrained" and start is None:
        trainer_callbacks.append(FreezeBackbone(run_args.freeze_backbone_epochs).callback)
    if run_args.ema_decay > 0:
        trainer_callbacks.append(WeightAverage(run_args.ema_decay).callback)
    if has_validation and run_args.select_best and run_args.early_stopping_patience > 0:
        trainer_callbacks.append(EarlyStoppingCallback(early_stopping_patience=run_args.early_stopping_patience))
    trainer = SampleWeightedTrainer(
        label_smoothing=run_args.label_smoothing,
        descriptor_weight=run_args.descriptor_loss_weight,
        descriptor_class_weights=descriptor_weights,
        descriptor_view=run_args.descriptor_view,
        outline_weight=run_args.outline_loss_weight,
        model=model,
        args=training_arguments(run_args, checkpoints, has_validation),
        train_dataset=splits["train"],
        eval_dataset=views["validation"][0] if has_validation else None,  # a row per view; compute_metrics scores frames
        data_collator=collate,
        processing_class=processor,
        compute_metrics=make_compute_metrics(labels, views["validation"][1] if has_validation else None),
        compute_loss_func=make_loss(weights, run_args.label_smoothing),
        callbacks=trainer_callbacks,
        # The schedule is still the Trainer's. From scratch every layer is new, from a trained model none is: one learning rate.
        optimizers=(make_optimizer(model, run_args, run_args.head_lr_multiplier if model_args.init == "pretrained" and start is None else 1.0), None),
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
    # The descriptor heads' logits of the evaluation split, from the same passes as its class logits.
    described: list = []
    if has_validation:
        with descriptor_logits(trainer.model, heads) as described:
            outputs["validation"] = _predict(trainer, *views["validation"])
        temperature = fit_temperature(outputs["validation"].logits, [int(x) for x in splits["validation"].with_format(None)["label"]])
    eval_ds = splits[eval_name]
    if eval_name not in outputs:
        with descriptor_logits(trainer.model, heads) as described:
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
    # A person may say a frame comes from one of these (the in-source regime); one unnamed source is named after its folder.
    training_sources = sorted({s for s in train_sources if s}) or [Path(str(report.root)).name or "its training data"]
    reliability, checks = fit_reliability(trainer, splits, preprocessor, processor, image_size, cache, outputs, temperature, run_args,
                                          eval_name, y_true, eval_sources, training_sources, loso, list(raw["group"]), labels)
    descriptor_metrics, frame, nodule, predicted, found = None, None, None, None, None
    owner = views[eval_name][1] if eval_name in views else np.arange(len(eval_ds))
    if heads is not None and described and sum(len(next(iter(b.values()))) for b in described) != len(owner):
        logger.warning("descriptor heads: the evaluation's logits could not be gathered (several processes): no agreement measured")
        described = []
    if heads is not None and described:
        frame = {name: frame_mean(torch.cat([b[name].detach().float().cpu() for b in described]).numpy().astype(np.float64), owner, len(y_true))
                 for name in heads.names}
        descriptor_metrics = descriptor_report({name: softmax(v) for name, v in frame.items()}, descriptor_targets[eval_name], list(raw["group"]), y_true, labels,
                                               run_args.bootstrap_resamples, run_args.seed)
        descriptor_metrics["split"] = f"the {eval_name} split's"
        descriptor_metrics["read_from"] = "frame"
        # The same heads read from the radiologist's box of each evaluation frame (what a person drawing the box gets).
        boxes = frame_nodule_boxes(list(raw["path"]), eval_sources, report.sources or {}, str(report.root))
        nodule = read_outlined(trainer.model, heads, processor, list(raw["path"]), boxes)
        if nodule is not None:
            from_box = nodule_report(nodule, descriptor_targets[eval_name], list(raw["group"]), y_true, labels, run_args.bootstrap_resamples, run_args.seed)
            if from_box:
                descriptor_metrics["from_nodule_box"] = {**from_box, "split": descriptor_metrics["split"]}
        if heads.outline is not None:
            # As a frame without a box is read: the nodule the outline head predicts, where it finds one, else the whole frame.
            found = outline_reads(described, list(raw["path"]), owner, preprocessor)
            read = read_outlined(trainer.model, heads, processor, list(raw["path"]), found)
            predicted = {name: np.where(np.isnan(read[name]), v, read[name]) for name, v in frame.items()} if read is not None else dict(frame)
            descriptor_metrics["from_predicted_nodule"] = {**predicted_report(predicted, found, boxes, descriptor_targets[eval_name], list(raw["group"]),
                                                                              y_true, labels, run_args.bootstrap_resamples, run_args.seed),
                                                           "split": descriptor_metrics["split"]}
    history = epoch_history(trainer.state.log_history)
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
        **({"adapted_from": start.record(splits)} if start else {}),
        **({"descriptors": descriptor_metrics} if descriptor_metrics else {}),
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
            **({"descriptor_class_weights": {k: [round(float(x), 4) for x in v] for k, v in descriptor_weights.items()}} if descriptor_weights else {}),
            **recipe(run_args),
            "init": model_args.init,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "processes": state.num_processes,
            "versions": library_versions(),
        },
    }
    if state.is_main_process and write:
        rows = prediction_rows(list(raw["path"]), labels, y_true, probs, group=list(raw["group"]), source=eval_sources,
                               **answer_columns(reliability, outputs[eval_name], softmax(logits, temperature), labels, IN_SOURCE),
                               tirads_descriptors=[one_line(d) for d in answered_descriptors(frame, predicted, found)] if frame else None)
        if heads is not None:
            del trainer.model.descriptor_heads  # saved in a file of their own: model.safetensors stays the plain classifier pipeline() loads
        ModelFolder(out).save_trained(trainer, preprocessor, report, result, labels, rows, temperature, reliability,
                                      descriptors=DescriptorState(heads, descriptor_metrics or {}, head_name(trainer.model),
                                                                                outline_layer_name(trainer.model) if heads.outline is not None else None)
                                      if heads is not None else None)
    state.wait_for_everyone()
    return TrainResult(metrics=result, probs=probs, y_true=y_true, groups=list(raw["group"]), paths=list(raw["path"]),
                       sources=eval_sources, reliability=reliability, outputs=outputs, descriptor_logits=frame, nodule_descriptor_logits=nodule,
                       predicted_descriptor_logits=predicted, predicted_nodule_boxes=found)

