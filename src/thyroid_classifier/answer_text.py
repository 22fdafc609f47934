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
    return "This model was trained on " + "; ".join(parts) + "."
