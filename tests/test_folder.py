"""The model folder has one owner (folder.ModelFolder) and every prediction file one schema."""

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np

from thyroid_classifier import folder as folder_module
from thyroid_classifier.compare import read_predictions
from thyroid_classifier.folder import PREDICTION_COLUMNS, TRAILING_COLUMNS, ModelFolder, prediction_rows, write_predictions
from thyroid_classifier.predict import main as predict_main

PACKAGE = Path(folder_module.__file__).parent


def header(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return next(csv.reader(f))


def test_every_prediction_file_has_one_schema(short_run, sample_dir, tmp_path):
    out, _ = short_run
    trained = ModelFolder(out / "tiny-resnet")
    labels = json.loads(trained.file("metrics.json").read_text())["labels"]
    expected = [*PREDICTION_COLUMNS, *[f"p_{c}" for c in labels], *TRAILING_COLUMNS]
    assert header(trained.predictions("test")) == expected
    images = tmp_path / "images"
    shutil.copytree(sample_dir / "benign", images)
    assert predict_main([str(trained.path), str(images), "--out", str(tmp_path / "pred"), "--no_heatmaps"]) == 0
    assert header(tmp_path / "pred" / "predictions.csv") == expected
    # compare reads what training wrote, row for row.
    read = read_predictions(trained.path)
    with trained.predictions("test").open(newline="") as f:
        assert len(read.rows) == sum(1 for _ in csv.DictReader(f))


def test_write_predictions_cells_round_trip(tmp_path):
    labels = ["benign", "malignant"]
    rows = prediction_rows(["a.png", "b.png"], labels, [0, 1], np.array([[0.9, 0.1], [0.4, 0.6]]), group=["g1", "g2"],
                           in_domain_score=[1.5, math.nan], flagged=[True, False], prediction_set=[["benign"], ["benign", "malignant"]])
    path = write_predictions(tmp_path / "p.csv", labels, rows)
    got = list(csv.DictReader(path.open(newline="")))
    assert [r["predicted"] for r in got] == ["benign", "malignant"]  # filled from the probabilities
    assert [r["label"] for r in got] == ["benign", "malignant"]
    assert got[0]["flagged"] == "1" and got[1]["flagged"] == "0"
    assert float(got[0]["in_domain_score"]) == 1.5 and got[1]["in_domain_score"] == ""  # NaN: unknown, not "nan"
    assert got[1]["prediction_set"] == "benign|malignant" and got[0]["fold"] == ""


def test_card_follows_every_metrics_change(short_run, tmp_path):
    """Whatever command writes the metrics, the card is re-rendered from the folder (no command order matters)."""
    out, _ = short_run
    copy = tmp_path / "model"
    shutil.copytree(out / "tiny-resnet", copy, ignore=shutil.ignore_patterns("checkpoints"))
    folder = ModelFolder(copy)
    metrics = folder.metrics()
    metrics["calibration"]["temperature"] = 1.2345
    folder.write_metrics(metrics)
    assert "1.234" in (copy / "README.md").read_text()
    folder.update_metrics(calibration={**metrics["calibration"], "temperature": 2.5})
    assert "2.500" in (copy / "README.md").read_text() and "1.234" not in (copy / "README.md").read_text()
    assert ModelFolder(tmp_path / "nothing").metrics() == {} and ModelFolder(tmp_path / "nothing").render_card() is None


def test_only_the_folder_module_names_the_folder_files():
    """File names of the model folder are literals in the folder's room only (folder_files.py, the layout;
    folder.py, the writer), not in the modules that read or write through it (they were in six modules)."""
    names = ("metrics.json", "cv_metrics.json", "loso_metrics.json", "fingerprints.json", "audit.json", "predictions_test.csv",
             "cv_predictions.csv", "loso_predictions.csv")
    offenders = []
    for path in PACKAGE.glob("*.py"):
        if path.name in ("folder.py", "folder_files.py"):
            continue
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith(("#", "help=")))
        for name in names:
            if re.search(rf"[\"']{re.escape(name)}[\"']", code):
                offenders.append(f"{path.name}: {name}")
    assert not offenders, offenders
