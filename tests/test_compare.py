"""Paired comparison of two prediction files (thyroid_classifier.compare)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from thyroid_classifier.compare import main, read_predictions
from thyroid_classifier.metrics import bootstrap_intervals, group_resamples, macro_auc, paired_difference
from thyroid_classifier.folder import prediction_rows, write_predictions


def write_cv_predictions(path, paths, groups, fold_of, labels, y, probs) -> None:
    write_predictions(path, labels, prediction_rows(paths, labels, y, probs, group=groups, fold=list(fold_of)))

LABELS = ["benign", "malignant"]


def _data(n_groups: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = [f"case{g}" for g in range(n_groups) for _ in range(2)]  # two frames per patient
    y = np.array([g % 2 for g in range(n_groups) for _ in range(2)])
    good = np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.25, len(y)), 0.01, 0.99)
    weak = np.clip(0.5 + rng.normal(0, 0.25, len(y)), 0.01, 0.99)
    as_probs = lambda p: np.stack([1 - p, p], axis=1)  # noqa: E731
    return y, groups, as_probs(weak), as_probs(good)


def test_group_resamples_draw_whole_patients() -> None:
    groups = ["a", "a", "b", "c", "c", "c"]
    for idx in group_resamples(len(groups), groups, 50, seed=1):
        counts = {g: sum(groups[i] == g for i in idx) for g in set(groups)}
        assert all(c % groups.count(g) == 0 for g, c in counts.items())  # a patient comes whole or not at all


@pytest.mark.slow
def test_paired_difference_is_b_minus_a_on_the_same_resamples() -> None:
    """Fast, and able to fail: two different models (a model against itself gives 0 whatever the code does
    with its second argument). Bugs it catches: b compared with itself, a and b swapped, the difference
    of intervals instead of the interval of paired differences, resamples not shared by a and b."""
    y, groups, weak, good = _data()
    auc = paired_difference(y, weak, good, groups, n_resamples=100)["roc_auc"]
    assert auc["a"] == pytest.approx(macro_auc(y, weak)) and auc["b"] == pytest.approx(macro_auc(y, good))
    assert auc["difference"] == pytest.approx(auc["b"] - auc["a"]) and auc["difference"] > 0.05
    assert auc["ci"][0] <= auc["difference"] <= auc["ci"][1] and auc["ci"][0] > 0
    flipped = paired_difference(y, good, weak, groups, n_resamples=100)["roc_auc"]
    assert flipped["difference"] == pytest.approx(-auc["difference"])
    assert flipped["ci"] == pytest.approx([-auc["ci"][1], -auc["ci"][0]])  # the same resamples, read the other way
    same = paired_difference(y, weak, weak, groups, n_resamples=100)["roc_auc"]
    assert same["difference"] == 0.0 and same["ci"] == [0.0, 0.0]


@pytest.mark.slow
def test_paired_difference_finds_the_better_model_and_orders_a_and_b() -> None:
    y, groups, weak, good = _data()
    result = paired_difference(y, weak, good, groups, n_resamples=500)
    auc = result["roc_auc"]
    assert auc["a"] == pytest.approx(macro_auc(y, weak)) and auc["b"] == pytest.approx(macro_auc(y, good))
    assert auc["difference"] == pytest.approx(auc["b"] - auc["a"])
    assert auc["ci"][0] > 0 and auc["share_b_better"] > 0.97
    flipped = paired_difference(y, good, weak, groups, n_resamples=500)["roc_auc"]
    assert flipped["difference"] == pytest.approx(-auc["difference"]) and flipped["ci"][1] < 0


@pytest.mark.slow
def test_paired_interval_tells_a_small_consistent_gain_that_separate_intervals_cannot() -> None:
    # B = A nudged towards a good model: the two separate intervals overlap, the paired one excludes 0.
    y, groups, weak, good = _data(seed=3)
    better = 0.85 * weak + 0.15 * good
    paired = paired_difference(y, weak, better, groups, n_resamples=500)["roc_auc"]
    ci_a = bootstrap_intervals(y, weak, LABELS, groups, n_resamples=500)["roc_auc"]
    ci_b = bootstrap_intervals(y, better, LABELS, groups, n_resamples=500)["roc_auc"]
    assert ci_b[0] < ci_a[1]  # separately: overlapping intervals, "no difference shown"
    assert paired["ci"][0] > 0  # paired: the gain is told apart from zero


def _write(folder: Path, y, groups, probs, name: str = "cv_predictions.csv", paths=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    paths = paths or [f"/data/{LABELS[v]}/{i}.jpg" for i, v in enumerate(y)]
    write_cv_predictions(folder / name, paths, groups, np.ones(len(y), dtype=int), LABELS, np.asarray(y), probs)
    return folder / name


@pytest.mark.slow
def test_cli_compares_a_folder_with_a_file_and_writes_json(tmp_path: Path, capsys) -> None:
    y, groups, weak, good = _data()
    _write(tmp_path / "plain", y, groups, weak)
    b = _write(tmp_path / "recipe", y, groups, good)
    out = tmp_path / "cmp.json"
    assert main([str(tmp_path / "plain"), str(b), "--names", "plain", "recipe", "--bootstrap", "300", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # The file round trip keeps 6 decimals; row order in the file does not matter.
    assert result["roc_auc"]["a"] == pytest.approx(macro_auc(y, weak), abs=1e-4)
    assert result["roc_auc"]["b"] == pytest.approx(macro_auc(y, good), abs=1e-4)
    assert result["n"] == len(y) and result["groups"] == len(set(groups))
    printed = capsys.readouterr().out
    assert "plain" in printed and "| roc_auc |" in printed


def test_cli_refuses_files_that_do_not_cover_the_same_images(tmp_path: Path, capsys) -> None:
    y, groups, weak, good = _data()
    a = _write(tmp_path / "a", y, groups, weak)
    b = _write(tmp_path / "b", y, groups, good, paths=[f"/other/{i}.jpg" for i in range(len(y))])
    assert main([str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "do not cover the same images" in err and str(a) in err


def test_cli_refuses_disagreeing_labels_and_foreign_files(tmp_path: Path, capsys) -> None:
    y, groups, weak, good = _data()
    a = _write(tmp_path / "a", y, groups, weak)
    relabelled = tmp_path / "b" / "cv_predictions.csv"
    relabelled.parent.mkdir()
    text = a.read_text().replace(",benign,", ",malignant,", 1)
    relabelled.write_text(text)
    assert main([str(a), str(relabelled)]) == 2
    assert "label 1 images differently" in capsys.readouterr().err
    foreign = tmp_path / "other.csv"
    foreign.write_text("file,score\nx.jpg,0.3\n")
    with pytest.raises(ValueError, match="not a prediction file"):
        read_predictions(foreign)
    assert main([str(a), str(tmp_path / "empty_folder_that_is_missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_three_classes_use_macro_auc(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    labels = ["normal", "benign", "malignant"]
    y = np.tile([0, 1, 2], 30)
    groups = [f"case{i // 3}" for i in range(len(y))]
    a = rng.dirichlet(np.ones(3), len(y))
    b = 0.5 * a + 0.5 * np.eye(3)[y]
    for name, probs in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        write_cv_predictions(tmp_path / name / "cv_predictions.csv", [f"/d/{i}.jpg" for i in range(len(y))], groups,
                             np.ones(len(y), dtype=int), labels, y, probs)
    out = tmp_path / "r.json"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--bootstrap", "200", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["classes"] == labels
    assert result["roc_auc"]["a"] == pytest.approx(macro_auc(y, a), abs=1e-4)
    assert result["roc_auc"]["b"] == pytest.approx(macro_auc(y, b), abs=1e-4) and result["roc_auc"]["ci"][0] > 0
