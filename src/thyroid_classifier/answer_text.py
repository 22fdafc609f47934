"""How the headline rule (:mod:`answer_rule`) and what it measured read to a person: one text for the
page and the card, every number read from the model folder (``reliability.json``: each regime and
what it was fitted on; ``metrics.json``: the rule on the test split and cross-fitted across unseen
sources)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from .answer_rule import IN_SOURCE, UNSEEN

#: The cross-fitted rule reported beside the regimes (``loso.CANDIDATES``' chosen one).
CHOSEN = "unseen and in-source sets + threshold, error bound per true class (the rule)"


def _pct(m) -> str:
    if isinstance(m, Mapping):
        v, ci = m.get("value", math.nan), m.get("ci", [math.nan, math.nan])
        if v != v:
            return "n/a"
        return f"{v:.0%} [{ci[0]:.0%}, {ci[1]:.0%}]" if ci[0] == ci[0] else f"{v:.0%}"
    return "n/a" if m is None or m != m else f"{m:.0%}"


def regime_sentence(name: str, regime) -> str:
    """One regime: when a label is headlined, and what that did where it was fitted."""
    who = "a frame from another hospital or scanner (the default)" if name == UNSEEN else "a frame said to come from one of its training sources"
    if regime is None:
        if name == UNSEEN:
            return (f"For {who}: no label, ever. The model was not measured on any source it never saw (trained without "
                    "leave-one-source-out), so nothing supports a label there.")
        return f"For {who}: no label (no held-out calibration)."
    bound = f"{regime.max_error:.0%}" + (" for each true class, whatever the mix of classes" if regime.per_class else "")
    if math.isinf(regime.headline_threshold):
        rule = f"no label, ever: on {regime.evidence} no confidence level kept the wrong answers' 95% upper bound under {bound}"
    else:
        rule = (f"a label only when its {1 - regime.alpha:.0%} prediction set holds that one class and its probability reaches "
                f"{regime.headline_threshold:.0%}, the loosest level at which the wrong answers' 95% upper bound stayed under {bound} "
                f"on {regime.evidence}")
    m = regime.measured or {}
    seen = (f" There it headlined {_pct(m.get('share_headlined'))} of frames, {_pct(m.get('error_headlined'))} of them wrong."
            if m and not math.isinf(regime.headline_threshold) else "")
    return f"For {who}: {rule}.{seen}"


def rule_lines(info: Mapping, regimes: Mapping) -> list[str]:
    """The headline rule (``regimes``: name -> :class:`~thyroid_classifier.answer_rule.Regime`) in
    sentences, and its measured numbers from ``info`` (``metrics.json``), each saying where it holds."""
    lines = [regime_sentence(name, regimes.get(name)) for name in (UNSEEN, IN_SOURCE)]
    split = info.get("split")
    tested = ((info.get("reliability") or {}).get("headline") or {}).get(split) or {}
    for name, r in tested.items():
        where = "the default (another hospital)" if name == UNSEEN else "said to be in-source"
        lines.append(f"On the held-out {split} split (in-source frames, n = {r['n']}), answered as {where}: headlined "
                     f"{_pct(r['share_headlined'])}, wrong among those {_pct(r['error_headlined'])}, set coverage {_pct(r['coverage'])}.")
    crossfit = ((info.get("leave_one_source_out") or {}).get("crossfit")) or {}
    for direction in crossfit.values():
        r = direction["rules"].get(CHOSEN)
        if r:
            lines.append(f"Cross-fitted on sources it never saw (fitted on {direction['fitted_on']}'s unseen scores, measured on "
                         f"{direction['measured_on']}'s, n = {r['n']}): headlined {_pct(r['share_headlined'])}, wrong among those "
                         f"{_pct(r['error_headlined'])}, set coverage {_pct(r['coverage'])}.")
    return lines


def training_notice(info: Mapping) -> str:
    """What the model was trained on and what its labels mean, in a sentence or two, from its
    ``metrics.json`` (``data``): a synthetic model says so first; each real source says where its labels
    come from; a model with no record says that nothing is known."""
    data = info.get("data") or {}
    sources = data.get("sources") or {}
    facts = [(name, s.get("dataset") or {}) for name, s in sources.items()] or ([("", data["dataset"])] if data.get("dataset") else [])
    if not facts:
        return "Nothing is recorded about the images this model was trained on: treat every answer as unmeasured."
    if any(f.get("type") == "synthetic-sample" for _, f in facts):
        return ("**This model was trained on SYNTHETIC images** (the project's built-in sample: drawn speckle, no patient). "
                "It only shows that the software runs; its answers mean nothing for a real ultrasound frame.")
    parts = []
    for _, f in facts:
        if f.get("tirads_labels"):
            why = "labels are radiologists' TI-RADS risk categories, not pathology"
        elif f.get("type") == "les3bdd":
            why = "labels of unknown provenance (pathology, cytology or TI-RADS: not said)"
        else:
            why = "labels as given in its folders (how they were made is not recorded)"
        name = f.get("name", "a folder of images").replace(", labels of unknown provenance", "")  # folders trained before it left the name
        parts.append(f"{name}: {why}")
    return "This model was trained on " + "; ".join(parts) + "." + "".join(" " + line for line in adaptation_lines(info))


def _estimate(m: Mapping | None) -> str:
    """``{"value", "ci"}`` as "0.63 [0.58, 0.67]" ("n/a" when not measured)."""
    m = m or {}
    ci = m.get("ci") or [math.nan, math.nan]
    value = m.get("value", math.nan)
    if value is None or value != value:
        return "n/a"
    return f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] is not None and ci[0] == ci[0] else "")


def adaptation_lines(info: Mapping) -> list[str]:
    """For a model adapted from another (``metrics.json``'s ``adapted_from``): what it started from and, per
    site, how many labelled frames of it the adaptation used and what it measured on the site's other frames
    (in-source for the site: the test split holds other patients of the same site, never a new one)."""
    start = info.get("adapted_from")
    if not start:
        return []
    own = start.get("its_evaluation") or {}
    trained_on = ", ".join(start.get("trained_on") or []) or "sources not recorded"
    lines = [f"It was adapted from {start['model']} (trained on {trained_on}"
             + (f"; macro ROC AUC {_estimate({'value': own.get('roc_auc'), 'ci': own.get('ci')})} on {own.get('n')} held-out frames of those sources"
                if own.get("roc_auc") is not None else "") + ")."]
    split = info.get("split", "test")
    evaluation = info.get(split) or {}
    by_source = evaluation.get("by_source") or {}
    for site, counts in (start.get("sites") or {}).items():
        scored = by_source.get(site) or (evaluation if not by_source else None)
        what = f"macro ROC AUC {_estimate((scored or {}).get('roc_auc'))}" if scored and counts.get("measured_on") else "not measured (no test frames)"
        lines.append(f"Adapted to {site} with {counts['labelled']} labelled frames of it ({counts['train']} trained on, "
                     f"{counts['validation']} calibrated on); on its other {counts.get('measured_on', 0)} frames: {what}.")
    return lines


#: ``read_from`` of descriptors read from the box around the nodule the model's outline head located (a box given: "nodule").
PREDICTED = "predicted nodule"

#: What the page and the card call each descriptor (DDTI's "calcifications" are ACR's echogenic foci).
DESCRIPTOR_NAMES = {"composition": "Composition", "echogenicity": "Echogenicity", "margins": "Margin", "calcifications": "Echogenic foci"}


def _kappa(facts: Mapping, name: str) -> str:
    k = (((facts.get("per_descriptor") or {}).get(name) or {}).get("kappa")) or {}
    value = _estimate(k)  # the same "value [low, high]" at two decimals
    return "agreement not measured" if value == "n/a" else f"κ {value}, n = {k.get('n')}"


def descriptor_facts(info: Mapping, saved: Mapping | None = None) -> Mapping | None:
    """Where the descriptor heads' agreement was measured best: the cross-validation's pooled out-of-fold frames
    (``--cv_final``), else the heads' own evaluation split (``metrics.json``, or ``saved``: ``descriptors.json``)."""
    return (info.get("cross_validation") or {}).get("descriptors") or info.get("descriptors") or saved


def descriptor_lines(described: Mapping, facts: Mapping, flagged: bool = False, regime: str = UNSEEN) -> list[str]:
    """The predicted TI-RADS descriptors of one frame in the lexicon's words with their confidence, the ACR points and
    level they imply, what they were read from (the whole frame, or the nodule box given), and, per descriptor, the
    agreement with the radiologists measured where the heads were evaluated, read the same way (``facts``: the model
    folder's descriptor report; its ``from_nodule_box`` part for a box)."""
    read_from = described.get("read_from")
    # Each reading's agreement as it was measured: from the radiologists' boxes, as read without a box (the located
    # nodule where found, else the frame), or from the whole frame; "not measured" where the folder has none.
    part, read, said = {
        "nodule": ("from_nodule_box", ", read from the radiologists' nodule boxes",
                   "_Read from the nodule box given (a square around it with some tissue); the class and the heatmap read the whole frame._"),
        PREDICTED: ("from_predicted_nodule", ", read as here: from the nodule the model located where it found one, else the whole frame",
                    "_Read from the nodule the model located (the box drawn on the image; no box was given): it may have picked the wrong "
                    "region; draw a box around the nodule to read that one instead. The class and the heatmap read the whole frame._"),
    }.get(read_from, (None, "", "_Read from the whole frame: no nodule box was given, so the model is not told where the nodule is, and a frame with "
                               "several nodules gets one reading._"))
    if part:
        facts = facts.get(part) or {}
    where = facts.get("split") or "held-out"
    lines = [f"**TI-RADS descriptors, as the model reads them** (agreement with the radiologists' descriptors on {where} frames "
             f"of its training sources, held-out patients{read}; Cohen's κ: 1 is perfect, 0 is chance)"]
    lines += ["", said]
    if regime == UNSEEN:
        lines.append("_Measured only on its training sources' patients: on a frame from another hospital or scanner their agreement is unknown._")
    if flagged:
        lines.append("_This frame is unlike the images the model learned from: these readings are not reliable either._")
    lines.append("")
    for name, label in DESCRIPTOR_NAMES.items():
        d = described.get(name)
        if d:
            lines.append(f"- {label}: {d['term']} ({d['probabilities'][d['term']]:.0%}; {_kappa(facts, name)})")
    tirads = described.get("tirads")
    if tirads:
        lines.append(f"- ACR points these four imply (expected under the probabilities): {tirads['points']:.1f} of 10 (shape is not read: "
                     f"not in the training descriptors) → {tirads['level']}. A radiologist's TI-RADS also weighs shape and size.")
    return lines
