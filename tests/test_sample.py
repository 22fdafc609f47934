import csv
import hashlib

from thyroid_classifier.sample import main, make_sample_dataset


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))}


def test_sample_is_deterministic(tmp_path):
    a = make_sample_dataset(tmp_path / "a", cases_per_class=2, size=(64, 96))
    b = make_sample_dataset(tmp_path / "b", cases_per_class=2, size=(64, 96))
    c = make_sample_dataset(tmp_path / "c", cases_per_class=2, size=(64, 96), seed=1)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert len(_digest(a)) == 12


def test_manifest_records_cases_and_nodules(sample_dir):
    rows = list(csv.DictReader((sample_dir / "manifest.csv").open()))
    assert len(rows) == 36
    assert {r["label"] for r in rows} == {"normal", "benign", "malignant"}
    for r in rows:
        assert (sample_dir / r["file"]).is_file()
        if r["label"] == "normal":
            assert r["cx"] == "nan"
        else:
            rx, ry = float(r["rx"]), float(r["ry"])
            # TI-RADS-like shape: malignant taller-than-wide, benign wider-than-tall.
            assert (ry > rx) if r["label"] == "malignant" else (rx > ry)


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "s"), "--cases_per_class", "1", "--frames_per_case", "1"]) == 0
    assert "synthetic" in capsys.readouterr().out
    assert len(list((tmp_path / "s").rglob("*.png"))) == 3


def test_app_examples_are_drawn_apart_from_the_builtin_sample(tmp_path, monkeypatch):
    """The quick start trains on the built-in sample; the app's examples must be frames it never saw."""
    import hashlib

    import numpy as np
    from PIL import Image

    from thyroid_classifier.sample import BUILTIN_CASES, SAMPLE_LABELS, builtin_sample, example_frames

    monkeypatch.setenv("THYROID_CLASSIFIER_CACHE", str(tmp_path))
    examples = example_frames()
    assert [p.parent.name for p in examples] == list(SAMPLE_LABELS)
    training = builtin_sample()
    assert len(list(training.rglob("*.png"))) == BUILTIN_CASES * 3 * 2
    digest = {hashlib.sha256(p.read_bytes()).hexdigest() for p in training.rglob("*.png")}
    assert not any(hashlib.sha256(p.read_bytes()).hexdigest() in digest for p in examples)
    # Not merely other bytes: another drawing (pixels far from every training frame of the class).
    for example in examples:
        pixels = np.asarray(Image.open(example).convert("L"), dtype=np.float32)
        gaps = [np.abs(pixels - np.asarray(Image.open(p).convert("L"), dtype=np.float32)).mean() for p in (training / example.parent.name).glob("*.png")]
        assert min(gaps) > 5
