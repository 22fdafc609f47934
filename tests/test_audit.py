import json
import shutil

import pytest
from PIL import Image

from conftest import write_image
from thyroid_classifier.audit import audit_folder, audited_dataset, main


@pytest.fixture
def planted(tmp_path):
    """A split folder with every problem the audit must find, each planted once."""
    root = tmp_path / "data"
    for split, n in (("train", 6), ("test", 3)):
        for label in ("benign", "malignant"):
            for i in range(n):
                write_image(root / split / label / f"{split[:2]}{label[:3]}{i}_1.png", seed=hash((split, label, i)) % 10_000)
    # Unreadable: a truncated JPEG, an empty file, text named .jpg, and a non-image file.
    jpeg = write_image(tmp_path / "full.jpg", seed=1, size=(64, 64), fmt="JPEG")
    (root / "train" / "benign" / "truncated_1.jpg").write_bytes(jpeg.read_bytes()[:300])
    (root / "train" / "benign" / "empty_1.png").write_bytes(b"")
    (root / "train" / "malignant" / "text_1.jpg").write_text("not an image")
    (root / "train" / "malignant" / "notes.txt").write_text("radiologist notes")
    # Exact duplicate across splits (leakage).
    shutil.copy(root / "train" / "benign" / "trben0_1.png", root / "test" / "benign" / "copy_1.png")
    # Near duplicate across splits: the same picture re-encoded as JPEG at another size.
    src = Image.open(root / "train" / "malignant" / "trmal1_1.png")
    src.resize((80, 60)).save(root / "test" / "malignant" / "near_1.jpg", quality=90)
    # Conflict: the same bytes filed under both labels.
    shutil.copy(root / "train" / "benign" / "trben2_1.png", root / "train" / "malignant" / "conflict_1.png")
    return root


def test_audit_finds_every_planted_problem(planted):
    report = audit_folder(planted, progress=False).to_dict()
    unreadable = {p["path"].rsplit("/", 1)[1]: p["error"] for p in report["unreadable"]}
    assert set(unreadable) == {"truncated_1.jpg", "empty_1.png", "text_1.jpg", "notes.txt"}
    assert "0 bytes" in unreadable["empty_1.png"]
    assert "not an image" in unreadable["notes.txt"]
    names = lambda group: sorted(p.rsplit("/", 1)[1] for p in group)  # noqa: E731
    assert sorted(names(g) for g in report["exact_duplicates"]) == [["conflict_1.png", "trben2_1.png"], ["copy_1.png", "trben0_1.png"]]
    assert [names(g) for g in report["near_duplicates"]] == [["near_1.jpg", "trmal1_1.png"]]
    kinds = {(names([x["a"], x["b"]])[0], x["kind"]) for x in report["leakage"]}
    assert kinds == {("copy_1.png", "exact"), ("near_1.jpg", "near")}
    assert [names(g) for g in report["conflicts"]] == [["conflict_1.png", "trben2_1.png"]]
    assert report["counts"]["test"] == {"benign": 4, "malignant": 4}
    assert report["counts"]["train"]["benign"] == 6
    assert report["modes"] == {"RGB": report["n_readable"]}


def test_cli_json_and_strict(planted, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main([str(planted), "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    for key in ("counts", "unreadable", "exact_duplicates", "near_duplicates", "leakage", "conflicts"):
        assert key in report
    text = capsys.readouterr().out
    assert "LEAKAGE across splits: 2" in text and "truncated_1.jpg" in text
    assert main([str(planted), "--strict", "--quiet"]) == 1


def test_strict_passes_on_clean_data(sample_dir):
    assert main([str(sample_dir), "--strict", "--quiet"]) == 0


def test_training_data_skips_unreadable_and_keeps_duplicates_together(planted):
    dataset, report = audited_dataset(planted, progress=False)
    loaded = [p for d in dataset.values() for p in d["path"]]
    assert not any(name in p for p in loaded for name in ("truncated", "empty_1", "text_1", "notes"))
    # Every image decodes: nothing unreadable is left to fail mid-run.
    for ds in dataset.values():
        for row in ds:
            row["image"].load()
    split_of = {p: s for s, d in dataset.items() for p in d["path"]}
    dup_a = next(p for p in loaded if p.endswith("trben2_1.png"))
    dup_b = next(p for p in loaded if p.endswith("conflict_1.png"))
    assert split_of[dup_a] == split_of[dup_b]
    # Given splits are kept, so the planted cross-split copies still show up as leakage.
    assert len(report.to_dict()["leakage"]) == 2


def test_drop_duplicates_option(planted):
    dataset, report = audited_dataset(planted, drop_duplicates="near", progress=False)
    loaded = {p.rsplit("/", 1)[1] for d in dataset.values() for p in d["path"]}
    # One file of each duplicate group is kept (the first by path), the others are dropped.
    assert len(loaded & {"conflict_1.png", "trben2_1.png"}) == 1
    assert len(loaded & {"copy_1.png", "trben0_1.png"}) == 1
    assert len(loaded & {"near_1.jpg", "trmal1_1.png"}) == 1
    assert report.to_dict()["leakage"] == []


def test_ddti_audit(ddti_dir, tmp_path):
    out = tmp_path / "ddti.json"
    assert main([str(ddti_dir / "images"), "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["counts"] == {"all": {"benign": 61, "malignant": 288}}
    assert report["unreadable"] == []
    # DDTI's split screens: 6 of 61 benign frames, 117 of 288 malignant ones, a cue of the protocol.
    assert report["split_screens"] == {"benign": 6, "malignant": 117}
    assert report["class_cues"] == {"split screen": {"benign": round(6 / 61, 3), "malignant": round(117 / 288, 3)}}


def test_frame_properties_that_differ_by_class_are_reported(sample_dir, tmp_path, capsys):
    """A size or a screen layout that one class has far more often than another is reported; the
    sample's split screens (every second case of every class) are not."""
    assert audit_folder(sample_dir, progress=False).class_cues() == {}
    root = tmp_path / "data"
    for i in range(6):
        write_image(root / "benign" / f"b{i}_1.png", seed=i, size=(48, 64))
        write_image(root / "malignant" / f"m{i}_1.png", seed=10 + i, size=(48, 64) if i < 2 else (60, 80))
    cues = audit_folder(root, progress=False).class_cues()
    assert cues == {"size 64x48": {"benign": 1.0, "malignant": round(2 / 6, 3)}, "size 80x60": {"benign": 0.0, "malignant": round(4 / 6, 3)}}
    assert main([str(root), "--quiet"]) == 0
    assert "size 80x60: benign 0%, malignant 67%" in capsys.readouterr().out


def test_summary_lists_every_finding_and_the_cli_passes_its_options(planted, tmp_path, capsys):
    """The printed report is what a user reads: every section with its count and items, per-source lines
    with several sources; the CLI's options reach the audit (threshold, names) and its exit codes hold."""
    out = tmp_path / "report.json"
    assert main([str(planted), "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(audit_folder(planted, progress=False).to_dict()))  # the JSON is the report
    lines = text.splitlines()
    assert lines[0] == f"Audit of {planted.resolve()}" and lines[1] == f"  files: {saved['n_files']}, readable images: {saved['n_readable']}"
    assert "  test       benign: 4, malignant: 4  (total 8)" in lines
    for heading, n in (("unreadable / not images (skipped)", 4), ("exact duplicate groups (same bytes)", 2), ("near-duplicate groups (≤8 bits)", 1),
                       ("LEAKAGE across splits", 2), ("CONFLICTS: same image, different labels", 1), ("near duplicates with different labels", 0)):
        assert f"  {heading}: {n}" in lines, heading
    assert any(line.startswith("    - ") and "copy_1.png" in line and " = " in line for line in lines)
    assert any(line.startswith("    - [exact] ") and "<->" in line for line in lines)
    assert f"report written to {out}" in text
    assert "duplicates ACROSS sources" not in text  # one source: no such section
    assert saved["near_threshold_bits"] == 8

    # --near_threshold reaches the audit. (How many bits the re-encoded copy lands from its original depends on
    # the fixture's drawn pixels, so the count at 0 bits is not asserted.)
    assert main([str(planted), "--json", str(out), "--quiet", "--near_threshold", "0"]) == 0
    assert json.loads(out.read_text())["near_threshold_bits"] == 0 and "near-duplicate groups (≤0 bits): " in capsys.readouterr().out
    # --strict: exit 1 and a line on stderr saying why.
    assert main([str(planted), "--strict", "--quiet"]) == 1
    assert "strict: 2 leakage pair(s), 1 conflict(s)" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--quiet"]) == 2 and "error: data folder not found" in capsys.readouterr().err


def test_summary_of_several_sources_names_each(sample_dir, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(sample_dir / "benign", other / "benign")
    shutil.copytree(sample_dir / "malignant", other / "malignant")
    assert main([str(sample_dir), str(other), "--source_names", "north", "south", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "Audit of 2 sources"
    assert f"  source south ({other.resolve()}): benign: 12, malignant: 12  (total 24)" in text
    # The same frames in both sources: every one is a duplicate across sources.
    assert "duplicates ACROSS sources (an unseen source would be partly seen): 24" in text


def test_training_data_keeps_each_duplicate_pair_on_one_side_and_its_sources(tmp_path):
    """Byte copies filed as other cases (other names, other groups) must still land in one split, or the
    test split holds training images; the sources' names reach the dataset and the report keys are stable."""
    root = tmp_path / "flat"
    for label, offset in (("benign", 0), ("malignant", 500)):
        for i in range(16):
            write_image(root / label / f"{label[0]}{i}_1.png", seed=offset + i)
        for i in range(8):  # a copy of eight images under new case names
            shutil.copy(root / label / f"{label[0]}{i}_1.png", root / label / f"copy{label[0]}{i}_1.png")
    other = tmp_path / "other"
    write_image(other / "benign" / "z1_1.png", seed=900)
    write_image(other / "malignant" / "z2_1.png", seed=901)
    dataset, report = audited_dataset([root, other], source_names=["north", "south"], progress=False, seed=7, cache_dir=str(tmp_path / "hf"))
    split_of = {p.rsplit("/", 1)[1]: split for split, ds in dataset.items() for p in ds["path"]}
    pairs = [(f"{c}{i}_1.png", f"copy{c}{i}_1.png") for c in "bm" for i in range(8)]
    assert all(split_of[a] == split_of[b] for a, b in pairs), [(a, split_of[a], split_of[b]) for a, b in pairs]
    assert len({split_of[a] for a, _ in pairs}) > 1  # the pairs are spread over splits, each kept whole
    assert {s for ds in dataset.values() for s in ds["source"]} == {"north", "south"}
    d = report.to_dict()
    assert set(d) >= {"root", "n_files", "n_readable", "counts", "unreadable", "exact_duplicates", "near_duplicates", "near_threshold_bits",
                      "leakage", "conflicts", "near_conflicts", "sizes", "modes", "split_screens", "class_cues", "sources", "cross_source_duplicates"}
    assert d["leakage"] == [] and len(d["exact_duplicates"]) == 16 and d["sizes"] == {"64x48": 50}
    assert d["sources"]["south"] == {"folder": str(other.resolve()), "counts": {"benign": 1, "malignant": 1}}
