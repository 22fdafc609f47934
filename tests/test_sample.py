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
