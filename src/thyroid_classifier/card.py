"""The model card: rendered from a model folder's files with the template shipped in the package
(``thyroid_classifier/model_card.md``; the repository's top-level ``model_card.md`` is the same file)."""

from __future__ import annotations

import json
from pathlib import Path

from .folder_files import AUDIT, CARD, CONFIG, METRICS, PROCESSOR, RELIABILITY_FILE
from .locations import is_local
from .known_data import dataset_facts

#: Package data, so an installed wheel renders cards too.
CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card.md"
CARD_METRICS = (  # (metrics.json key, model-index metric type, display name, model-index args: how it averages)
    ("accuracy", "accuracy", "Accuracy", None),
    ("roc_auc", "roc_auc", "Macro ROC AUC (one vs rest)", {"average": "macro", "multi_class": "ovr"}),
    ("f1_macro", "f1", "Macro F1", {"average": "macro"}),
    ("balanced_accuracy", "balanced_accuracy", "Balanced accuracy", {"average": "macro"}),  # the mean of per-class recall
)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and value != value) else f"{value:.3f}"


def _ci(ci) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def render_card(folder: str | Path, repo_id: str | None = None, template: str | Path | None = None):
    """The model card for a trained model folder, every number read from its ``metrics.json``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = Path(folder)
    metrics = json.loads((folder / METRICS).read_text())
    config = json.loads((folder / CONFIG).read_text())
    processor = json.loads((folder / PROCESSOR).read_text()) if (folder / PROCESSOR).is_file() else {}
    split, labels = metrics["split"], metrics["labels"]
    test = metrics[split]
    data = metrics.get("data", {})
    facts = data.get("dataset") or dataset_facts(data.get("data_dir", ""))
    repo_id = repo_id or f"your-name/thyroid-{metrics['model']}"
    base_model = metrics["checkpoint"] if metrics.get("init") == "pretrained" and not is_local(metrics["checkpoint"]) else None
    eval_results = [
        EvalResult(
            task_type="image-classification", dataset_type=facts["type"], dataset_name=facts["name"],
            dataset_split=split, metric_type=metric_type, metric_name=name, metric_value=round(float(test[key]["value"]), 4),
            metric_args=args,
        )
        for key, metric_type, name, args in CARD_METRICS
        if test[key]["value"] == test[key]["value"]  # NaN (undefined) is left out
    ]
    card_data = ModelCardData(
        model_name=f"thyroid-{metrics['model']}",
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="image-classification",
        license="apache-2.0",
        tags=["image-classification", "medical-imaging", "ultrasound", "thyroid", "grad-cam", "research-only"],
        metrics=["accuracy", "roc_auc", "f1", "balanced_accuracy"],
        datasets=facts["type"].split("+"),  # the data sets' short names, as in the model-index
        eval_results=eval_results,
    )
    counts = data.get("counts", {})
    audit = _audit_text(folder / AUDIT)
    training = metrics.get("training", {})
    hyperparameters = {k: training[k] for k in (
        "image_size", "num_train_epochs", "epochs_run", "learning_rate", "weight_decay", "warmup_ratio",
        "per_device_train_batch_size", "label_smoothing", "class_weighting", "class_weights", "device_augment",
        "early_stopping_patience", "seed", "device", "processes", "train_seconds") if k in training}
    # Folders trained before --select_best existed always kept the best checkpoint.
    selected = training.get("select_best", True)
    if selected:
        selection = "best validation macro ROC AUC (early stopping)"
    else:
        hyperparameters.pop("early_stopping_patience", None)  # no early stopping without selection
        selection = "none: the whole schedule, last epoch's weights"
        if training.get("ema_decay"):
            selection += f" (moving average of the weights, decay {training['ema_decay']})"
    hyperparameters = {"initialisation": metrics.get("init"), **hyperparameters, "optimizer": "AdamW, cosine schedule with warm-up",
                       "selection": selection}
    localization = metrics.get("localization")
    loc = None
    if localization:
        loc = {
            "n": localization["n"], "subset": localization.get("subset", "all outlined frames"),
            "model_pg": f"{_fmt(localization['model']['pointing_game']['value'])} {_ci(localization['model']['pointing_game']['ci'])}",
            "model_energy": f"{_fmt(localization['model']['energy_inside']['value'])} {_ci(localization['model']['energy_inside']['ci'])}",
            "base_pg": f"{_fmt(localization['centred_gaussian']['pointing_game']['value'])} {_ci(localization['centred_gaussian']['pointing_game']['ci'])}",
            "base_energy": f"{_fmt(localization['centred_gaussian']['energy_inside']['value'])} {_ci(localization['centred_gaussian']['energy_inside']['ci'])}",
        }
    cv = metrics.get("cross_validation")
    cv_text = None
    if cv:
        pooled = cv["pooled"]
        cv_text = (f"{cv['k']}-fold, grouped by patient, pooled out-of-fold macro ROC AUC {_fmt(pooled['roc_auc']['value'])} "
                   f"{_ci(pooled['roc_auc']['ci'])}, balanced accuracy {_fmt(pooled['balanced_accuracy']['value'])} {_ci(pooled['balanced_accuracy']['ci'])}.")
        layout = cv.get("by_layout")
        if layout:  # the screen layout can stand in for the label: say how much the score follows it
            cv_text += (f" On single-view frames alone (n = {layout['single_view']['n']}) the pooled AUC is {_fmt(layout['single_view']['roc_auc'])}, "
                        f"on split screens alone (n = {layout['split_screen']['n']}) {_fmt(layout['split_screen']['roc_auc'])}; within a class, the "
                        "score tells split screens from single views with AUC " + ", ".join(f"{label} {_fmt(v)}" for label, v in layout["layout_auc"].items())
                        + " (0.5 would mean not at all).")
    calibration = metrics.get("calibration", {})
    sources = data.get("sources") or {}
    source_rows = [{"name": name, "dataset": (facts_.get("dataset") or {}).get("name", name),
                    "counts": {label: sum(c.get(label, 0) for c in facts_.get("counts", {}).values()) for label in labels}}
                   for name, facts_ in sources.items()]
    by_source_rows = [{"name": name, "n": v["n"], "auc": f"{_fmt(v['roc_auc']['value'])} {_ci(v['roc_auc']['ci'])}",
                       "bacc": f"{_fmt(v['balanced_accuracy']['value'])} {_ci(v['balanced_accuracy']['ci'])}"}
                      for name, v in (test.get("by_source") or {}).items()]
    loso_rows = []
    for name, r in ((metrics.get("leave_one_source_out") or {}).get("held_out") or {}).items():
        m, g, c = r["metrics"], r.get("guard") or {}, r.get("conformal") or {}
        loso_rows.append({
            "name": name, "trained_on": " + ".join(r["trained_on"]), "n": r["n"],
            "auc": f"{_fmt(m['roc_auc']['value'])} {_ci(m['roc_auc']['ci'])}",
            "bacc": f"{_fmt(m['balanced_accuracy']['value'])} {_ci(m['balanced_accuracy']['ci'])}",
            "ece": f"{_fmt(m['ece']['value'])} {_ci(m['ece']['ci'])}",
            "recall": ", ".join(f"{label} {_fmt(v['recall'])}" for label, v in m["per_class"].items()),
            "guard": _fmt(g.get("auroc_unseen_vs_in_source")), "flagged": f"{g['share_flagged']:.0%}" if g else "n/a",
            "sets": f"{_fmt(c.get('coverage'))} / {_fmt(c.get('mean_set_size'))}" if c else "n/a",
        })
    reliability = metrics.get("reliability") or {}
    guard_text = conformal_text = None
    if reliability.get("guard"):
        g = reliability["guard"]
        guard_text = (f"Every prediction carries an in-domain score: how far the statistics of an early layer of the model (per-channel "
                      f"mean and spread: how the image looks, gain, speckle, resolution) lie from those of the "
                      f"{g['fitted_on']} (Mahalanobis distance in their top {g['components']} principal directions plus the distance "
                      f"from them). Above the threshold ({_fmt(g['threshold'])}, set so that {g['coverage_target']:.0%} of the "
                      f"{g['threshold_from']} pass) the answer is flagged: the app reads \"not reliable: this image is unlike the images the "
                      "model learned from\" instead of a label. It catches images unlike the training ones; it cannot catch an image that "
                      "looks familiar and is still misread.")
        if split in g:
            guard_text += f" On the {split} split {g[split]['share_flagged']:.0%} were flagged."
    if reliability.get("conformal"):
        c = reliability["conformal"]
        part = c.get(split) or {}
        conformal_text = (f"For frames of its training sources: class-conditional split-conformal sets at {1 - c['alpha']:.0%} coverage (calibrated on validation): every "
                          "class the model cannot rule out is in the set, and a set of several classes reads \"A or B: cannot tell\" "
                          "instead of a headline label."
                          + (f" On the {split} split: coverage {_fmt(part.get('coverage'))}, mean set size {_fmt(part.get('mean_set_size'))}, "
                             f"single-label sets {part.get('share_singletons', 0):.0%}." if part else "")
                          + " Coverage holds on images like the calibration images; on an unseen source it can fall (see the table above).")
    from .answer_rule import REGIMES, Regime
    from .answer_text import adaptation_lines, descriptor_facts, rule_lines

    # The folder's headline rule, read as data (the card renders from the folder's files, not its code).
    state = json.loads((folder / RELIABILITY_FILE).read_text()) if (folder / RELIABILITY_FILE).is_file() else {}
    regimes = {name: Regime.from_dict(r) for name, r in (state.get("regimes") or {}).items() if name in REGIMES}
    descriptors = descriptor_facts(metrics)
    kwargs = dict(
        headline_lines=rule_lines(metrics, regimes),
        adaptation_lines=adaptation_lines(metrics),
        descriptor_rows=descriptor_rows(descriptors),
        descriptor_route=_descriptor_route(descriptors),
        descriptor_split=(descriptors or {}).get("split"),
        descriptor_located=_located((descriptors or {}).get("from_predicted_nodule")),
        descriptor_view=VIEW_WORDS.get((metrics.get("training") or {}).get("descriptor_view") or "frame"),
        training_sources=", ".join(state.get("training_sources") or []) or "none recorded",
        source_rows=source_rows if len(source_rows) > 1 else [],
        by_source_rows=by_source_rows,
        loso_rows=loso_rows,
        guard_text=guard_text,
        conformal_text=conformal_text,
        model_name=f"thyroid-{metrics['model']}",
        architecture=config.get("architecture") or (config.get("architectures") or ["model"])[0],
        labels=labels,
        labels_text=", ".join(f"`{label}`" for label in labels),
        base_model=base_model,
        checkpoint_name=Path(metrics["checkpoint"]).name if is_local(metrics["checkpoint"]) else metrics["checkpoint"],
        init=metrics.get("init"),
        tirads_labels=facts["tirads_labels"],
        dataset_name=facts["name"],
        dataset_citation=facts["citation"],
        n_total=sum(sum(v.values()) for v in counts.values()),
        n_groups=data.get("groups"),
        split_text=" / ".join(f"{k} {sum(v.values())}" for k, v in counts.items()),
        counts=counts,
        audit_text=audit,
        mask_text=training.get("preprocessing", {}).get("mask_text", False),
        split_views=training.get("preprocessing", {}).get("split_views", False),
        device_augment=training.get("device_augment", False),
        image_size=training.get("image_size"),
        mean=processor.get("image_mean"), std=processor.get("image_std"),
        hyperparameters=hyperparameters,
        split=split,
        n_eval=test["n"],
        metric_rows=[{"name": name, "value": _fmt(test[key]["value"]), "ci": _ci(test[key]["ci"])} for key, _, name, _ in CARD_METRICS]
        + [{"name": "Expected calibration error", "value": _fmt(test["ece"]["value"]), "ci": _ci(test["ece"]["ci"])}],
        class_rows=[{"label": label, **{k: _fmt(v[k]) for k in ("precision", "recall", "f1")}, "auc": _fmt(v["roc_auc"]), "support": v["support"]}
                    for label, v in test["per_class"].items()],
        confusion=test["confusion_matrix"],
        cv_text=cv_text,
        ece_before=_fmt(calibration.get("ece_before")), ece_after=_fmt(calibration.get("ece_after")),
        temperature=_fmt(calibration.get("temperature")),
        temperature_in_weights=bool(config.get("temperature_in_weights")),
        versions=", ".join(f"{name} {v}" for name, v in (training.get("versions") or {}).items()),
        localization=loc,
        missing_labels=", ".join(label for label in ("normal", "benign", "malignant") if label not in labels),
        repo_id=repo_id,
    )
    return ModelCard.from_template(card_data, template_path=str(template or CARD_TEMPLATE), **kwargs)


#: What the descriptor heads learned from (``--descriptor_view``), in the card's words.
VIEW_WORDS = {"frame": "the whole frame", "nodule": "the nodule's square (the box around the radiologist's outline, with some tissue)",
              "both": "both the whole frame and the nodule's square (the box around the radiologist's outline, with some tissue)"}


def descriptor_rows(report: dict | None) -> list[dict]:
    """The card's TI-RADS descriptor table: each head's agreement with the radiologist (Cohen's kappa, 95% interval over patients)."""
    from .answer_text import DESCRIPTOR_NAMES

    rows = []
    for part, read in _readings(report):
        for name, r in (part.get("per_descriptor") or {}).items():
            k = r["kappa"]
            rows.append({"name": DESCRIPTOR_NAMES.get(name, name), "read": read, "kappa": _fmt(k["value"]), "ci": _ci(k["ci"]), "n": k["n"],
                         "patients": k.get("patients"), "classes": ", ".join(r["classes"])})
    return rows


def _readings(report: dict | None) -> list[tuple[dict, str]]:
    """The heads' evaluations: read from the whole frame, and from the radiologists' nodule boxes where measured."""
    report = report or {}
    return ([(report, "whole frame")] + ([(report["from_nodule_box"], "nodule box")] if report.get("from_nodule_box") else [])
            + ([(report["from_predicted_nodule"], "located nodule, else whole frame")] if report.get("from_predicted_nodule") else []))


def _located(part: dict | None) -> str | None:
    """How often the outline head located a nodule, and how its boxes overlap the radiologists' (None: no outline head)."""
    if not part:
        return None
    loc = part["localisation"]
    overlap = (f"; on {loc['outlined']} frames the radiologist outlined, its box overlapped theirs by at least half (IoU ≥ 0.5) on "
               f"{loc['iou_at_least_half']:.0%} (median IoU {_fmt(loc['iou_median'])})") if loc["outlined"] else ""
    return f"On the same split it located a nodule on {part['found']} of {part['frames']} frames{overlap}."


def _descriptor_route(report: dict | None) -> str | None:
    parts = []
    for part, read in _readings(report):
        route = part.get("route")
        if route:
            auc = route["auc_malignant"]
            parts.append(f"{_fmt(auc['value'])} {_ci(auc['ci'])} read from the {read} (n = {route['n']})")
    return "; ".join(parts) or None


def _audit_text(path: Path) -> str:
    if not path.is_file():
        return "no audit report found."
    audit = json.loads(path.read_text())
    return (f"{len(audit.get('unreadable', []))} unreadable file(s) skipped; {len(audit.get('exact_duplicates', []))} group(s) of "
            f"byte-identical images and {len(audit.get('near_duplicates', []))} of near duplicates, each kept within one split; "
            f"{len(audit.get('leakage', []))} leakage pair(s) across splits; {len(audit.get('conflicts', []))} label conflict(s)."
            + "".join(f" Frame property whose rate differs by class, which a model can learn instead of the nodule: {cue} ("
                      + ", ".join(f"{label} {share:.0%}" for label, share in shares.items()) + ")."
                      for cue, shares in audit.get("class_cues", {}).items()))


def write_card(folder: str | Path, repo_id: str | None = None) -> Path:
    """Render the card into ``folder/README.md`` (what the Hub shows)."""
    path = Path(folder) / CARD
    render_card(folder, repo_id).save(path)
    return path
