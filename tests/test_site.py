"""A new site's frames before anyone labels them (issue 31, part 1): ``evaluate MODEL SITE --unlabelled``."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import shift_source
from thyroid_classifier.evaluate import main as evaluate_main
from thyroid_classifier.site import advice


def test_the_report_sets_a_sites_frames_against_the_training_sources(short_run, sample_dir, tmp_path, capsys):
    """The model's own sample against the same frames shown as another machine would: the other
    machine's frames are flagged more, none of them is a copy of a training image while the sample's
    own training frames are found, and every number of the paragraph comes from the report."""
    out, _ = short_run
    model = out / "tiny-resnet"
    other_machine = shift_source(sample_dir, tmp_path / "other_machine")
    reports = {}
    for name, site in (("own", sample_dir), ("other", other_machine)):
        assert evaluate_main([str(model), str(site), "--unlabelled", "--out", str(tmp_path / name), "--quiet"]) == 0
        printed = capsys.readouterr().out
        reports[name] = json.loads((tmp_path / name / "site_report.json").read_text())
        assert reports[name]["advice"] in printed
        assert (tmp_path / name / "site_guard_scores.png").stat().st_size > 5_000
    own, other = reports["own"], reports["other"]
    frames = sum(1 for _ in sample_dir.rglob("*.png"))
    assert own["n"] == frames and sorted(u["path"] for u in own["unreadable"]) == ["SYNTHETIC.txt", "manifest.csv"]  # reported, not fatal
    assert other["guard"]["flagged"] > own["guard"]["flagged"] + 0.2
    assert f"{other['guard']['flagged']:.0%}" in other["advice"]
    metrics = json.loads((model / "metrics.json").read_text())
    trained_on = sum(metrics["data"]["counts"]["train"].values())
    assert sum(o["kind"] == "exact" for o in own["training_overlap"]) >= trained_on  # its own training frames, found
    assert not any(o["kind"] == "exact" for o in other["training_overlap"])
    counts = metrics["data"]["counts"]["train"]
    assert own["training_balance"] == pytest.approx({c: n / trained_on for c, n in counts.items()})
    for report in (own, other):
        assert sum(report["set_sizes"].values()) == pytest.approx(1) and sum(report["predicted_balance"].values()) == pytest.approx(1)
    with (tmp_path / "other" / "site_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == other["n"] and sum(r["flagged"] == "1" for r in rows) == round(other["guard"]["flagged"] * other["n"])
    from thyroid_classifier.predict import Predictor

    predictor = Predictor.from_pretrained(str(model))
    for row in rows[:: max(1, len(rows) // 4)]:  # each row is its own file's answer
        [alone] = predictor.predict([other_machine / row["path"]], explain=False)
        assert [float(row[f"p_{c}"]) for c in predictor.labels] == pytest.approx([alone.probabilities[c] for c in predictor.labels], abs=1e-5)
        assert row["answer"] == alone.headline and float(row["in_domain_score"]) == pytest.approx(alone.in_domain_score, rel=1e-4)


def _report(flagged: float, predicted: dict, overlap: int = 0) -> dict:
    return {"n": 100, "guard": {"flagged": flagged, "expected_flagged_in_source": 0.05}, "headlined": 0.1, "unreadable": [],
            "predicted_balance": predicted, "training_balance": {"benign": 0.2, "malignant": 0.8},
            "training_overlap": [{"path": "x.png", "kind": "exact", "distance": 0}] * overlap}


def test_the_paragraph_says_what_the_numbers_mean():
    foreign = advice(_report(0.87, {"benign": 0.25, "malignant": 0.75}))
    assert "Most of these frames (87%)" in foreign and "cannot be used here" in foreign and "far from its training balance" not in foreign
    different = advice(_report(0.2, {"benign": 0.7, "malignant": 0.3}, overlap=3))
    assert "20% of these frames look unlike" in different and "cannot be used here" not in different
    assert "benign 70% (trained on 20%)" in different and "3 frame(s) are copies" in different
    alike = advice(_report(0.06, {"benign": 0.2, "malignant": 0.8}))
    assert "look like the training images (6% flagged, 5% expected)" in alike and "label a sample" in alike
    assert "it would state a label for 10% of them" in alike
    never_measured = advice({**_report(0.06, {"benign": 0.2, "malignant": 0.8}), "measured_on_unseen_sources": False})
    assert "never measured on a source it did not see" in never_measured and "state a label for" not in never_measured
