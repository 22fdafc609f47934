"""Several sources: splits and weights that cannot be won by recognising the scanner, leave-one-
source-out, the in-domain guard and conformal prediction sets, and what the app shows for them."""

from __future__ import annotations

import copy
import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from thyroid_classifier.data import cv_folds, load_image_folder, scan_sources, strata
from thyroid_classifier.metrics import separation_auc
from thyroid_classifier.reliability import ConformalSets, DomainGuard, Reliability, coverage_report
from thyroid_classifier.weighting import class_weights, stratum_weights, weighted_loss

# --------------------------------------------------------------------------------------------
# Data: sources named, recorded, split by source x class, groups kept apart


def test_sources_are_named_recorded_and_split_by_source_and_class(two_sources):
    site_a, site_b = two_sources
    scan = scan_sources([site_a, site_b])
    assert scan.sources == ["site_a", "site_b"]
    ds = load_image_folder([site_a, site_b], seed=0)
    rows = [(s, ds[split].features["label"].names[y], g, split) for split in ds
            for s, y, g in zip(ds[split]["source"], ds[split]["label"], ds[split]["group"], strict=True)]
    # Every source is in every split (stratified by source x class; cv_folds' test checks every cell on more data).
    for split in ("train", "validation", "test"):
        assert {s for s, _, _, sp in rows if sp == split} == {"site_a", "site_b"}
    # Groups are prefixed with their source (case 1000 of site_a is not case 1000 of site_b) and never straddle.
    assert all(g.startswith(f"{s}:") for s, _, g, _ in rows)
    sides: dict[str, set] = {}
    for _, _, g, split in rows:
        sides.setdefault(g, set()).add(split)
    assert all(len(v) == 1 for v in sides.values())


def test_source_names_must_match_the_folders(two_sources):
    from thyroid_classifier.data import DataError

    with pytest.raises(DataError, match="2 data folder"):
        scan_sources(list(two_sources), ["only-one"])
    with pytest.raises(DataError, match="share the source name"):
        scan_sources(list(two_sources), ["same", "same"])
    assert scan_sources(list(two_sources), ["a", "b"]).sources == ["a", "b"]


def test_cv_folds_by_strata_hold_out_every_source_in_every_fold():
    labels = [0] * 40 + [1] * 40
    sources = ["a"] * 30 + ["b"] * 10 + ["a"] * 10 + ["b"] * 30  # a: 30/10, b: 10/30
    groups = [f"g{i // 2}" for i in range(80)]
    for _, held in cv_folds(strata(labels, sources), groups, 5, seed=0):
        cells = Counter((sources[i], labels[i]) for i in held)
        assert set(cells) == {("a", 0), ("a", 1), ("b", 0), ("b", 1)}


def test_audit_reports_per_source_counts_and_cross_source_duplicates(two_sources, tmp_path):
    import shutil

    from thyroid_classifier.audit import audit_folder

    site_a, site_b = two_sources
    copy_b = tmp_path / "site_c"
    shutil.copytree(site_b, copy_b)
    shutil.copy(site_a / "benign" / "2000_1.png", copy_b / "benign" / "republished.png")  # the same frame in two sources
    report = audit_folder([site_a, copy_b], progress=False).to_dict()
    assert set(report["sources"]) == {"site_a", "site_c"}
    assert report["sources"]["site_a"]["counts"] == {"benign": 12, "malignant": 12, "normal": 12}
    crossing = report["cross_source_duplicates"]
    assert any({Path(p).name for p in g} >= {"2000_1.png", "republished.png"} for g in crossing)


# --------------------------------------------------------------------------------------------
# Loss weights: a source-only model must gain nothing


def _confounded():
    """Source a: 80 malignant, 20 benign; source b: 20 malignant, 80 benign (as pooled DDTI + LES3BDD, exaggerated)."""
    labels = np.array([1] * 80 + [0] * 20 + [1] * 20 + [0] * 80)
    sources = np.array(["a"] * 100 + ["b"] * 100)
    return labels, sources


def _source_only_loss(weights: np.ndarray, labels: np.ndarray, sources: np.ndarray) -> tuple[float, float]:
    """Weighted loss of the best model that sees only the source, and of a constant 50/50 model."""
    logits = np.zeros((len(labels), 2))
    for s in ("a", "b"):
        m = sources == s
        share = weights[m & (labels == 1)].sum() / weights[m].sum()  # the weighted optimum for this source
        logits[m, 1] = math.log(share / (1 - share))
    y, w = torch.tensor(labels), torch.tensor(weights)
    source_only = weighted_loss(torch.tensor(logits), y, w, 0.0).item()
    constant = weighted_loss(torch.zeros(len(labels), 2, dtype=torch.float64), y, w, 0.0).item()
    return source_only, constant


def test_stratum_weights_remove_the_source_class_confound():
    labels, sources = _confounded()
    w = stratum_weights(labels.tolist(), sources.tolist())
    assert w.mean() == pytest.approx(1.0)
    totals = {cell: w[(sources == cell[0]) & (labels == cell[1])].sum() for cell in [("a", 0), ("a", 1), ("b", 0), ("b", 1)]}
    assert max(totals.values()) == pytest.approx(min(totals.values()))  # every (source, class) cell counts the same
    source_only, constant = _source_only_loss(w, labels, sources)
    assert source_only == pytest.approx(constant, abs=1e-9)  # knowing the scanner buys nothing

    # The same check bites on class weights alone (pooled classes are balanced here: weights 1, 1).
    per_class = class_weights(labels.tolist(), 2).numpy()[labels]
    source_only, constant = _source_only_loss(per_class.astype(np.float64), labels, sources)
    assert source_only < constant - 0.1


def test_weighted_loss_equals_cross_entropy_with_class_weights():
    torch.manual_seed(0)
    logits, labels = torch.randn(12, 3), torch.tensor([0, 1, 2, 2, 2, 2, 1, 1, 1, 1, 1, 0])
    cw = class_weights(labels.tolist(), 3)
    assert weighted_loss(logits, labels, cw[labels], 0.0).item() == pytest.approx(F.cross_entropy(logits, labels, weight=cw).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# The guard and the prediction sets, on numbers whose answer is known


def test_guard_flags_a_shifted_source_and_passes_its_share_of_in_source_images():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(8, 48))  # in-source features live near an 8-dimensional subspace
    def source(n, shift=0.0):
        return rng.normal(size=(n, 8)) @ mixing + 0.1 * rng.normal(size=(n, 48)) + shift

    guard = DomainGuard.fit(source(300)).calibrate(source(200), coverage=0.95)
    in_test, shifted = guard.score(source(1000)), guard.score(source(1000, shift=rng.normal(0, 0.6, 48)))
    passed = (in_test <= guard.threshold).mean()
    assert 0.91 <= passed <= 0.99  # the 95% target, up to sampling
    assert (shifted > guard.threshold).mean() > 0.9
    assert separation_auc(in_test, shifted) > 0.95


def test_conformal_sets_cover_each_class_at_the_nominal_level():
    rng = np.random.default_rng(0)

    def draw(n):  # a calibrated model: labels drawn from the probabilities it gives
        p = rng.dirichlet([0.7, 0.7, 0.7], n)
        return p, np.array([rng.choice(3, p=row) for row in p])

    p_cal, y_cal = draw(3000)
    sets = ConformalSets.fit(p_cal, y_cal, alpha=0.1)
    p_test, y_test = draw(3000)
    member = sets.sets(p_test)
    assert member.any(1).all()  # never an empty set
    for k in range(3):  # class-conditional: each class is covered, not only on average
        assert coverage_report(y_test[y_test == k], member[y_test == k])["coverage"] == pytest.approx(0.9, abs=0.03)
    # A near-uniform answer is never a single label; a confident one is.
    assert sets.sets(np.array([[0.34, 0.33, 0.33]])).sum() >= 2
    assert sets.sets(np.array([[0.98, 0.01, 0.01]])).sum() == 1


def test_reliability_round_trips_through_the_folder(tmp_path):
    rng = np.random.default_rng(0)
    guard = DomainGuard.fit(rng.normal(size=(50, 6))).calibrate(rng.normal(size=(30, 6)))
    conformal = ConformalSets(alpha=0.1, thresholds=[0.4, math.inf], n_calibration=[20, 3])
    Reliability(guard, conformal, {"x": 1}).save_pretrained(tmp_path)
    back = Reliability.from_pretrained(tmp_path)
    probe = rng.normal(size=(5, 6))
    assert np.allclose(back.guard.score(probe), guard.score(probe), rtol=1e-5)
    assert back.guard.threshold == guard.threshold and back.conformal.thresholds == [0.4, math.inf]
    assert Reliability.from_pretrained(tmp_path / "missing").guard is None
    # A guard fitted on other features (an older folder) is not used: its scores would mean nothing.
    payload = json.loads((tmp_path / "reliability.json").read_text())
    del payload["guard"]["features"]
    (tmp_path / "reliability.json").write_text(json.dumps(payload))
    assert Reliability.from_pretrained(tmp_path).guard is None and Reliability.from_pretrained(tmp_path).conformal is not None


# --------------------------------------------------------------------------------------------
# Leave-one-source-out, end to end with a tiny model


@pytest.fixture(scope="module")
def loso_run(two_sources, tiny_models, tmp_path_factory):
    """A LOSO run on the two synthetic sources; ``seen``: the sources of each split of every model it trained."""
    from thyroid_classifier import fit, training
    from thyroid_classifier.training import DataArguments, ModelArguments, RunArguments, run

    seen: list[dict] = []
    real = fit.train_one

    def spy(spec, dataset, *args, **kwargs):
        seen.append({split: sorted(set(ds["source"])) for split, ds in dataset.items()})
        return real(spec, dataset, *args, **kwargs)

    out = tmp_path_factory.mktemp("loso")
    with pytest.MonkeyPatch.context() as mp:  # only while this run trains
        mp.setattr(fit, "train_one", spy)  # the LOSO runs
        mp.setattr(training, "train_one", spy)  # the final model on every source
        results = run(
            DataArguments(data_dir=[str(p) for p in two_sources]),
            ModelArguments(model=[str(tiny_models["tiny-resnet"])], image_size=32),
            RunArguments(output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=8, bootstrap_resamples=30, learning_rate=3e-4, loso=True),
        )
    return out / "tiny-resnet", results["tiny-resnet"], seen


@pytest.mark.slow
def test_loso_never_trains_on_the_held_out_source_and_scores_each_image_once(loso_run, two_sources):
    folder, metrics, seen = loso_run
    # Two held-out runs, then the final model on both sources.
    assert len(seen) == 3 and seen[2]["train"] == ["site_a", "site_b"]
    held = seen[:2]
    assert [s["test"] for s in held] == [["site_a"], ["site_b"]]
    for s in held:
        assert s["test"][0] not in s["train"] and s["test"][0] not in s["validation"]
    with (folder / "loso_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    n_files = sum(1 for p in two_sources for _ in p.rglob("*.png"))
    assert len(rows) == n_files == len({r["path"] for r in rows})
    assert {r["source"] for r in rows} == {"site_a", "site_b"}
    loso = json.loads((folder / "loso_metrics.json").read_text())
    for name, entry in loso["held_out"].items():
        assert entry["trained_on"] == [s for s in ("site_a", "site_b") if s != name]
        auc = entry["metrics"]["roc_auc"]
        assert auc["ci"][0] <= auc["value"] <= auc["ci"][1]
        assert set(entry["metrics"]["per_class"]) == {"normal", "benign", "malignant"}
        assert "auroc_unseen_vs_in_source" in entry["guard"] and "coverage" in entry["conformal"]
    # The final model's metrics and card carry the unseen-source numbers beside the in-source ones.
    assert set(metrics["leave_one_source_out"]["held_out"]) == {"site_a", "site_b"}
    with (folder / "predictions_test.csv").open(newline="") as f:
        tested = {r["source"] for r in csv.DictReader(f)}
    assert set(metrics["test"]["by_source"]) == (tested if len(tested) > 1 else set())
    card = (folder / "README.md").read_text()
    assert "On a source it never saw" in card and "| site_b | site_a |" in card
    assert "not measured on any unseen source" not in card
    assert "stratified by source × class" in card
    # A run from a local pretrained checkpoint says so (it once read "from randomly initialised weights").
    assert "pretrained weights of `tiny-resnet`" in card and "randomly initialised" not in card


@pytest.mark.slow
def test_a_loso_run_fits_the_unseen_regime_on_its_out_of_source_scores(loso_run):
    """The final model's unseen regime is fitted on every frame of the leave-one-source-out predictions (not
    on validation), its cross-fitting is in the card's metrics, and the test split's predictions carry the
    one rule's answer for each frame."""
    from thyroid_classifier.answer_rule import IN_SOURCE, UNSEEN
    from thyroid_classifier.loso import crossfit
    from thyroid_classifier.reliability import ConformalSets, Reliability

    folder, metrics, _ = loso_run
    rel = Reliability.from_pretrained(folder)
    with (folder / "loso_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    labels = metrics["labels"]
    probs = np.array([[float(r[f"p_{k}"]) for k in labels] for r in rows])
    y = np.array([labels.index(r["label"]) for r in rows])
    sources = [r["source"] for r in rows]
    unseen = rel.regimes[UNSEEN]
    assert unseen.n == len(rows) and unseen.per_class and "leave-one-source-out" in unseen.evidence
    # Fitted on the out-of-source scores (per source, the larger), never ruling out a class the in-source sets keep.
    expected = [max(a, b) for a, b in zip(ConformalSets.fit_worst_case(probs, y, sources, unseen.alpha).thresholds, rel.conformal.thresholds)]
    assert unseen.thresholds == pytest.approx(expected, abs=1e-5)
    assert rel.regimes[IN_SOURCE].n == sum(metrics["data"]["counts"]["validation"].values())
    assert rel.training_sources == sorted(set(sources))
    again = crossfit(probs, y, np.array(sources), [r["group"] for r in rows], labels, unseen.alpha, n_resamples=0)
    assert set(metrics["leave_one_source_out"]["crossfit"]) == set(again) == {f"{a} -> {b}" for a in set(sources) for b in set(sources) if a != b}
    with (folder / "predictions_test.csv").open(newline="") as f:
        test_rows = list(csv.DictReader(f))
    assert all(r["answer"] and r["headlined"] in ("0", "1") and r["flagged"] in ("0", "1") and r["prediction_set"] for r in test_rows)
    tested = metrics["reliability"]["headline"]["test"]
    assert tested[IN_SOURCE]["n_headlined"] == sum(r["headlined"] == "1" for r in test_rows)
    assert "When a label is stated" in (folder / "README.md").read_text()


@pytest.mark.slow
def test_loso_predictions_are_read_by_compare(loso_run):
    from thyroid_classifier.compare import compare, read_predictions

    folder, _, _ = loso_run
    a = read_predictions(folder)  # finds loso_predictions.csv in the folder
    assert a.source.name == "loso_predictions.csv"
    same = compare(a, a, n_resamples=50)
    assert same["roc_auc"]["difference"] == 0


@pytest.fixture(scope="module")
def site_a_model(two_sources, tiny_models, tmp_path_factory) -> Path:
    """The tiny ResNet trained on site_a alone."""
    from thyroid_classifier.training import DataArguments, ModelArguments, RunArguments, run

    out = tmp_path_factory.mktemp("site_a_only")
    run(DataArguments(data_dir=[str(two_sources[0])]), ModelArguments(model=[str(tiny_models["tiny-resnet"])], image_size=32),
        RunArguments(output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=8, bootstrap_resamples=30, learning_rate=3e-4))
    return out / "tiny-resnet"


@pytest.mark.slow
def test_guard_flags_the_shifted_source_more_than_in_source_images(loso_run, site_a_model, two_sources):
    from thyroid_classifier.predict import Predictor

    folder, _, _ = loso_run
    loso = json.loads((folder / "loso_metrics.json").read_text())
    # Trained on site_a only, the guard tells the shifted site_b from site_a's held-out images.
    assert loso["held_out"]["site_b"]["guard"]["auroc_unseen_vs_in_source"] > 0.9
    # And through the Predictor of a model trained on site_a alone: site_b flagged far more often.
    predictor = Predictor.from_pretrained(str(site_a_model))
    site_a, site_b = two_sources
    flagged = {name: np.mean([r.flagged for r in predictor.predict(sorted(root.rglob("*.png")), explain=False)])
               for name, root in (("a", site_a), ("b", site_b))}
    assert flagged["b"] > 0.8 and flagged["a"] < 0.3


@pytest.mark.slow
def test_evaluate_reports_guard_and_sets_per_source(site_a_model, two_sources, tmp_path):
    from thyroid_classifier.evaluate import evaluate_folder, report_markdown
    from thyroid_classifier.predict import Predictor

    predictor = Predictor.from_pretrained(str(site_a_model))
    result = evaluate_folder(predictor, [], list(two_sources), tmp_path, bootstrap=30, progress=False)
    assert set(result["by_source"]) == {"site_a", "site_b"}
    guard, sets = result["reliability"]["guard"], result["reliability"]["conformal"]
    assert guard["site_b"]["share_flagged"] > guard["site_a"]["share_flagged"]
    assert guard["site_b"]["n_flagged"] + guard["site_b"]["n_accepted"] == guard["site_b"]["n"]
    assert set(sets) >= {"alpha", "all", "site_a", "site_b"} and 1 <= sets["all"]["mean_set_size"] <= 3
    with (tmp_path / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"source", "in_domain_score", "flagged", "prediction_set"} <= set(rows[0])
    flagged_b = np.mean([r["flagged"] == "1" for r in rows if r["source"] == "site_b"])
    assert flagged_b == pytest.approx(guard["site_b"]["share_flagged"])
    text = report_markdown(result)
    assert "In-domain guard" in text and "Prediction sets" in text and "Per source" in text


def test_card_without_loso_says_no_unseen_source_was_measured(short_run):
    out, results = short_run
    card = (out / next(iter(results)) / "README.md").read_text()
    assert "This model was not measured on any unseen source" in card


def test_loso_needs_two_sources(sample_dir, tiny_models, tmp_path):
    from thyroid_classifier.training import main

    assert main(["--data_dir", str(sample_dir), "--model", str(tiny_models["tiny-resnet"]), "--loso", "--output_dir", str(tmp_path)]) == 2


# --------------------------------------------------------------------------------------------
# What the app shows for a flagged image and for a two-label set


@pytest.mark.slow
def test_app_shows_not_reliable_and_cannot_tell(short_run, sample_dir):
    from gradio_client import Client, handle_file

    from thyroid_classifier.answer_rule import UNSEEN, Regime
    from thyroid_classifier.app import build_demo, load_predictors

    out, _ = short_run
    base = load_predictors([str(out / "tiny-resnet")])["tiny-resnet"]
    flagged, unsure = copy.copy(base), copy.copy(base)
    flagged.reliability = Reliability(guard=copy.deepcopy(base.reliability.guard), conformal=None)
    flagged.reliability.guard.threshold = -math.inf  # every image is unlike the training ones
    no_class_ruled_out = Regime(thresholds=[math.inf] * 3, alpha=0.1, headline_threshold=0.0, max_error=0.2, per_class=True, evidence="test frames")
    unsure.reliability = Reliability(guard=None, conformal=ConformalSets(alpha=0.1, thresholds=[math.inf] * 3), regimes={UNSEEN: no_class_ruled_out})
    demo = build_demo({"flagged": flagged, "unsure": unsure}, forget_uploads_after=5.0)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{demo.server_port}/", verbose=False)
        image = handle_file(str(sample_dir / "malignant" / "3000_1.png"))
        label, _, message, *_ = client.predict(image, "flagged", 0.45, api_name="/predict")
        assert label["label"] == "Not reliable"
        assert "Not reliable: this image is unlike the images the model learned from" in message and "at 95% confidence" not in message
        assert not label.get("confidences")  # no bars under an answer that is not one ...
        assert "The model's scores, not an answer" in message  # ... the numbers stay visible, said not to be an answer
        label, _, message, *_ = client.predict(image, "unsure", 0.45, api_name="/predict")
        assert label["label"] == "normal or benign or malignant: cannot tell"
        assert "cannot rule out" in message and "at 95% confidence" not in message
    finally:
        demo.close()


def test_metrics_per_source_reveal_what_the_pooled_number_hides():
    from thyroid_classifier.metrics import by_source, macro_auc

    y = np.array([0, 1] * 20)
    right = np.where(y[:, None] == np.arange(2), 0.8, 0.2)  # source a: always right
    probs = np.r_[right[:20], right[20:, ::-1]]  # source b: always wrong
    sources = ["a"] * 20 + ["b"] * 20
    groups = [f"g{i}" for i in range(40)]
    per = by_source(y, probs, ["benign", "malignant"], groups, sources, n_resamples=50)
    assert per["a"]["roc_auc"]["value"] == 1.0 and per["b"]["roc_auc"]["value"] == 0.0
    assert per["a"]["n"] == per["b"]["n"] == 20
    assert macro_auc(y, probs) == pytest.approx(0.5)
    assert by_source(y, probs, ["benign", "malignant"], groups, ["a"] * 40) == {}


def test_frame_mean_and_guard_report():
    from thyroid_classifier.metrics import frame_mean
    from thyroid_classifier.reliability import guard_report

    views = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 5.0]])  # frame 0 has two views, frame 1 one
    np.testing.assert_allclose(frame_mean(views, np.array([0, 0, 1]), 2), [[2.0, 4.0], [5.0, 5.0]])
    y = np.array([0, 1, 0, 1, 0, 1])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.9, 0.1]])  # right, right, right, right | wrong, wrong
    report = guard_report(y, p, np.array([False, False, False, False, True, True]))
    assert report["roc_auc_accepted"] == 1.0 and report["roc_auc_flagged"] == 0.0
    assert (report["n_accepted"], report["n_flagged"], report["share_flagged"]) == (4, 2, pytest.approx(1 / 3))
    assert math.isnan(guard_report(y[:2], p[:2], np.array([True, False]))["roc_auc_flagged"])  # one class only
