"""Leave-one-source-out: how the model meets a hospital whose images it never saw.

For each source in turn, the model is trained (same recipe, same code as any run) on every other
source, with a validation share carved from them for the temperature, the conformal sets and the
guard's threshold, and scored on the source left out. Nothing of the held-out source is seen in
training, validation or calibration. Written to ``OUTPUT_DIR/<model>/``:

* ``loso_metrics.json`` — per held-out source: accuracy, balanced accuracy, macro ROC AUC, macro
  F1, ECE (each with a 95% interval resampling patients / cases), per-class recall; how well the
  in-domain guard tells the unseen source from the training sources' held-out images (AUROC), the
  AUC on the images it accepts and on those it flags; conformal coverage and set size; wall time.
  Also the pooled out-of-source predictions' metrics.
* ``loso_predictions.csv`` — a row per image, readable by ``python -m thyroid_classifier.compare``.

The out-of-source scores are also the evidence of the headline rule's ``unseen`` regime
(:mod:`answer_rule`): returned under ``out_of_source`` for the final model to fit it on, and
cross-fitted here (:func:`crossfit`): fitted on one held-out source, measured on another.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .folder import LOSO_METRICS, LOSO_PREDICTIONS, ModelFolder, prediction_rows, write_predictions
from .metrics import HEADLINE, scored, separation_auc, softmax
from .answer_rule import headlined
from .reliability import DEFAULT_MAX_ERROR, ConformalSets, coverage_report, fit_headline_threshold, guard_report, regime_report

logger = logging.getLogger(__name__)



def source_splits(sources: Sequence[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(held-out source, training rows, held-out rows)`` for each source, in sorted order."""
    sources = np.asarray(sources)
    names = sorted(set(sources.tolist()))
    if len(names) < 2:
        raise ValueError(f"leave-one-source-out needs at least two sources, found {names}")
    return [(name, np.flatnonzero(sources != name), np.flatnonzero(sources == name)) for name in names]


def leave_one_source_out(spec, dataset, report, data_args, model_args, run_args, callbacks: Sequence = ()) -> dict:
    """Train on all sources but one and score that one, for each source; write and return the results."""
    import shutil

    from .cv import pooled, with_validation
    from .fit import distributed_state, train_one

    state = distributed_state()
    out = Path(run_args.output_dir) / spec.name
    pool = pooled(dataset)
    full, labels, y, groups, paths, sources = pool.full, pool.labels, pool.y, pool.groups, pool.paths, np.asarray(pool.sources)
    probs = np.full((len(y), len(labels)), np.nan)
    scores = np.full(len(y), np.nan)
    flagged = np.zeros(len(y), dtype=bool)
    member = np.zeros((len(y), len(labels)), dtype=bool)
    cache: dict = {}
    held_out: dict[str, dict] = {}
    started = time.time()
    for name, train_rows, test_rows in source_splits(sources):
        fold_started = time.time()
        fold = with_validation(full.select([int(i) for i in train_rows]), data_args, run_args.seed)
        fold["test"] = full.select([int(i) for i in test_rows])
        trained_on = sorted(set(sources[train_rows].tolist()))
        logger.info("%s: leave out %s; train on %s (%d train, %d validation), score %d", spec.name, name, ", ".join(trained_on),
                    len(fold["train"]), len(fold["validation"]), len(fold["test"]))
        folder = out / "loso" / f"held-out-{name}"
        result = train_one(spec, fold, report, data_args, model_args, run_args, callbacks, out=folder, write=False, cache=cache)
        temperature = result.metrics["calibration"]["temperature"]
        p = softmax(result.outputs["test"].logits, temperature)  # what a user of this model would see
        probs[test_rows] = p
        yt = y[test_rows]
        entry: dict = {
            "n": int(len(test_rows)), "trained_on": trained_on, "temperature": temperature,
            "metrics": scored(yt, p, labels, [groups[i] for i in test_rows], run_args.bootstrap_resamples, run_args.seed),
        }
        rel = result.reliability
        if rel is not None and rel.conformal is not None:
            sets = rel.conformal.sets(p)  # the fold's in-source sets: what the page used before the unseen regime
            member[test_rows] = sets
            entry["conformal"] = {"alpha": rel.conformal.alpha, **coverage_report(yt, sets)}
        test_features = result.outputs["test"].features
        val_features = result.outputs.get("validation").features if result.outputs.get("validation") is not None else None
        if rel is not None and rel.guard is not None and test_features is not None and val_features is not None:
            s_test, s_val = rel.guard.score(test_features), rel.guard.score(val_features)
            f = s_test > rel.guard.threshold
            scores[test_rows], flagged[test_rows] = s_test, f
            entry["guard"] = {
                "auroc_unseen_vs_in_source": separation_auc(s_val, s_test),
                "in_source_validation_passed": float((s_val <= rel.guard.threshold).mean()),
                **{k: v for k, v in guard_report(yt, p, f).items() if k != "n"},
            }
        entry["wall_seconds"] = round(time.time() - fold_started, 1)
        held_out[name] = entry
        if state.is_main_process:
            m = entry["metrics"]["roc_auc"]
            print(f"{spec.name}: trained on {'+'.join(trained_on)} -> unseen {name}: macro ROC AUC {m['value']:.3f} "
                  f"[{m['ci'][0]:.3f}, {m['ci'][1]:.3f}], n={entry['n']}, {entry['wall_seconds'] / 60:.1f} min", flush=True)
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    wall = time.time() - started
    names = sorted(set(sources.tolist()))
    result = {
        "model": spec.name, "checkpoint": spec.checkpoint, "init": model_args.init, "labels": labels,
        "sources": names, "n": int(len(y)), "wall_seconds": round(wall, 1),
        "held_out": held_out,
        # Pooled across held-out sources: one number, but it mixes sources (read the per-source rows first).
        "pooled": scored(y, probs, labels, groups, run_args.bootstrap_resamples, run_args.seed),
        "probabilities": "calibrated with each run's validation temperature",
        "crossfit": crossfit(probs, y, sources, groups, labels, run_args.conformal_alpha, run_args.headline_max_error,
                             run_args.bootstrap_resamples, run_args.seed, today=(member, flagged)),
    }
    if state.is_main_process:
        ModelFolder(out).write_json(LOSO_METRICS, result)
        sets = [[labels[k] for k in np.flatnonzero(row)] for row in member]
        write_predictions(out / LOSO_PREDICTIONS, labels, prediction_rows(paths, labels, y, probs, group=groups, source=sources.tolist(),
                                                                          in_domain_score=scores.tolist(), flagged=flagged.tolist(), prediction_set=sets))
        print(loso_table(result))
        print(crossfit_table(result["crossfit"]))
        print(f"-> {out / LOSO_METRICS}, {out / LOSO_PREDICTIONS}")
    # Not written: the per-frame evidence the final model's unseen regime is fitted on.
    result["out_of_source"] = {"probs": probs, "y": y, "sources": sources.tolist(), "groups": list(groups)}
    return result


#: The rules cross-fitting compares. Each is fitted on one held-out source's out-of-source scores.
CANDIDATES = {
    "unseen sets: headline any single-class set": dict(per_class=False, threshold=False, with_in_source=False),
    "unseen sets + threshold, error bound on all headlined": dict(per_class=False, threshold=True, with_in_source=False),
    "unseen sets + threshold, error bound per true class": dict(per_class=True, threshold=True, with_in_source=False),
    "unseen and in-source sets: headline any single-class set": dict(per_class=False, threshold=False, with_in_source=True),
    "unseen and in-source sets + threshold, error bound per true class (the rule)": dict(per_class=True, threshold=True, with_in_source=True),
}
TODAY = "in-source sets and guard (the rule before)"


def crossfit(probs: np.ndarray, y: np.ndarray, sources: np.ndarray, groups: Sequence[str], labels: Sequence[str], alpha: float,
             max_error: float = DEFAULT_MAX_ERROR, n_resamples: int = 1000, seed: int = 0,
             today: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Each headline rule fitted on one held-out source's out-of-source scores and measured on another's
    (both ways with two sources): set coverage, mean set size, share headlined and error among headlined,
    with 95% intervals resampling the measured source's patients. ``today``: the in-source sets and
    guard flags each fold's own model gave its unseen source (the rule before), measured the same way."""
    sources, y, groups = np.asarray(sources), np.asarray(y), np.asarray(groups)
    names = sorted(set(sources.tolist()))
    out: dict = {}
    for cal in names:
        for test in names:
            if cal == test:
                continue
            c, t = sources == cal, sources == test
            rows = {}
            if today is not None:
                member, flagged = today
                rows[TODAY] = regime_report(y[t], probs[t], member[t], headlined(probs[t], member[t], 0.0, flagged[t]),
                                            groups[t].tolist(), n_resamples, seed, labels)
                rows[TODAY]["share_flagged"] = float(flagged[t].mean())
            sets = ConformalSets.fit(probs[c], y[c], alpha)  # the calibration source's unseen sets, shared by every candidate
            for name, how in CANDIDATES.items():
                member_c, member_t = sets.sets(probs[c]), sets.sets(probs[t])
                if how["with_in_source"] and today is not None:  # never rule out a class the fold's own in-source sets keep
                    member_c, member_t = member_c | today[0][c], member_t | today[0][t]
                threshold = (fit_headline_threshold(probs[c], y[c], member_c, max_error, how["per_class"]) if how["threshold"] else 0.0)
                rows[name] = regime_report(y[t], probs[t], member_t, headlined(probs[t], member_t, threshold), groups[t].tolist(), n_resamples, seed, labels)
                rows[name]["threshold"] = None if math.isinf(threshold) else threshold
            out[f"{cal} -> {test}"] = {"fitted_on": cal, "measured_on": test, "rules": rows}
    return out


def crossfit_table(crossfit_result: dict) -> str:
    """The printed cross-fitting table: one row per direction and rule."""
    def cell(m: dict, pct: bool = False) -> str:
        if m["value"] != m["value"]:
            return "n/a"
        f = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.2f}")
        return f"{f(m['value'])} [{f(m['ci'][0])}, {f(m['ci'][1])}]" if m["ci"][0] == m["ci"][0] else f(m["value"])

    lines = ["Headline rules cross-fitted (fitted on one source's unseen scores, measured on the other's)",
             "| fitted on -> measured on | rule | threshold | set coverage | mean set size | headlined | error among headlined (95% upper bound) |",
             "|---|---|---|---|---|---|---|"]
    for direction, d in crossfit_result.items():
        for name, r in d["rules"].items():
            threshold = r.get("threshold")
            lines.append(f"| {direction} | {name} | {'never' if threshold is None and 'threshold' in r else (threshold if threshold is not None else '-')} | "
                         f"{cell(r['coverage'])} | {cell(r['mean_set_size'])} | {cell(r['share_headlined'], True)} ({r['n_headlined']}/{r['n']}) | "
                         f"{cell(r['error_headlined'], True)} ({r['error_headlined_upper_95']:.0%}) |")
    return "\n".join(lines)


def loso_table(result: dict) -> str:
    """The printed table: one row per held-out source."""
    def cell(m: dict) -> str:
        return f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]" if not math.isnan(m["value"]) else "n/a"

    lines = [f"Leave-one-source-out, {result['model']} (each row: trained on the other sources, scored on this one, never seen)",
             "| unseen source | n | " + " | ".join(HEADLINE) + " | recall per class | guard AUROC | flagged | AUC accepted / flagged | set coverage / size |",
             "|---|---|" + "---|" * len(HEADLINE) + "---|---|---|---|---|"]
    for name, r in result["held_out"].items():
        m = r["metrics"]
        recall = ", ".join(f"{label} {v['recall']:.2f}" for label, v in m["per_class"].items())
        g = r.get("guard") or {}
        c = r.get("conformal") or {}
        guard = (f"{g['auroc_unseen_vs_in_source']:.3f} | {g['share_flagged']:.0%} | {g['roc_auc_accepted']:.3f} (n={g['n_accepted']}) / "
                 f"{g['roc_auc_flagged']:.3f} (n={g['n_flagged']})") if g else "n/a | n/a | n/a"
        conf = f"{c['coverage']:.2f} / {c['mean_set_size']:.2f}" if c else "n/a"
        lines.append(f"| {name} | {r['n']} | " + " | ".join(cell(m[k]) for k in HEADLINE) + f" | {recall} | {guard} | {conf} |")
    return "\n".join(lines)
