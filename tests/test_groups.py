"""Patient groups and splits, exactly: where each image's group comes from (a CSV by path or by name,
a file-name pattern), what happens to files a CSV does not list, and the splits' edges. A wrong group
puts one patient on both sides of a split, which no metric would show."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from conftest import write_image
from thyroid_classifier.data import (
    DataError,
    GroupSpec,
    _groups_from_pattern,
    assign_splits,
    group_holdout,
    resolve_groups,
    scan_sources,
    split_leaks,
    strata,
)


@pytest.fixture()
def hospital(tmp_path):
    root = tmp_path / "hospital"
    for label, names in {"benign": ["a_1.png", "a_2.png", "dup.png", "lonely.png"], "malignant": ["b_1.png", "dup.png", "c_1.png"]}.items():
        for i, name in enumerate(names):
            write_image(root / label / name, seed=hash((label, i)) % 1000)
    return root


def test_group_csv_by_path_by_unique_name_and_unlisted(hospital, tmp_path, caplog):
    csv_path = tmp_path / "groups.csv"
    csv_path.write_text("file,patient\n"
                        "hospital/benign/a_1.png,P1\n"        # by path, relative to the CSV's folder
                        "a_2.png,P1\n"                        # by a name no other file has
                        "hospital/benign/dup.png,P2\n"        # two files share this name: by path only
                        "hospital/malignant/dup.png,P3\n"
                        "b_1.png,P4\n"
                        "other/c_1.png,P5\n")                # c_1.png's name is unique in the CSV: it matches by name
    scan = scan_sources(hospital)
    with caplog.at_level(logging.WARNING):
        groups, how = resolve_groups(scan, GroupSpec(csv_path=csv_path, column="patient"))
    by_file = {f"{e.folder}/{e.path.name}": g for e, g in zip(scan.images, groups, strict=True)}
    lonely = next(e for e in scan.images if e.path.name == "lonely.png")
    assert by_file == {"benign/a_1.png": "P1", "benign/a_2.png": "P1", "benign/dup.png": "P2", "benign/lonely.png": f"file:{lonely.path}",
                       "malignant/b_1.png": "P4", "malignant/dup.png": "P3", "malignant/c_1.png": "P5"}
    assert "column 'patient'" in how
    assert f"{csv_path} lists no group for 1 of 7 images; each is its own group" in caplog.text


def test_group_csv_ambiguous_name_is_not_guessed(hospital, tmp_path):
    csv_path = tmp_path / "groups.csv"
    csv_path.write_text("file,case\nx/dup.png,P1\ny/dup.png,P2\n")  # the same name in two groups, paths that do not exist
    scan = scan_sources(hospital)
    groups, _ = resolve_groups(scan, GroupSpec(csv_path=csv_path))
    assert all(g.startswith("file:") for e, g in zip(scan.images, groups, strict=True) if e.path.name == "dup.png")


def test_group_csv_missing_column_names_the_file_and_column(hospital, tmp_path):
    csv_path = tmp_path / "groups.csv"
    csv_path.write_text("file,patient\na_1.png,P1\n")
    with pytest.raises(DataError, match=r"groups\.csv: missing column\(s\) \['case'\]"):
        resolve_groups(scan_sources(hospital), GroupSpec(csv_path=csv_path))


def test_group_pattern_named_group_first_group_and_misses(hospital, caplog):
    scan = scan_sources(hospital)
    groups, misses = _groups_from_pattern(scan.images, r"^(?P<group>[a-z])_\d+$")
    names = [e.path.name for e in scan.images]
    assert dict(zip(names, groups, strict=True))["a_2.png"] == "a" and misses == names.count("dup.png") + names.count("lonely.png")
    assert groups[names.index("lonely.png")] == f"file:{scan.images[names.index('lonely.png')].path}"
    groups, _ = _groups_from_pattern(scan.images, r"^([a-z])_(\d+)$")  # no named group: the first one
    assert dict(zip(names, groups, strict=True))["b_1.png"] == "b"
    with caplog.at_level(logging.WARNING):
        resolve_groups(scan, GroupSpec(pattern=r"^(?P<group>[a-z])_\d+$"))
    assert "3 file names do not match" in caplog.text


def test_several_sources_prefix_their_groups(hospital, tmp_path):
    other = tmp_path / "clinic"
    write_image(other / "benign" / "a_1.png", seed=5)
    write_image(other / "malignant" / "z_1.png", seed=6)
    scan = scan_sources([hospital, other])
    groups, how = resolve_groups(scan, GroupSpec(pattern=r"^(?P<group>[a-z])_\d+$"))
    # Case "a" of the hospital is not case "a" of the clinic.
    assert {g for e, g in zip(scan.images, groups, strict=True) if e.path.name == "a_1.png"} == {"hospital:a", "clinic:a"}
    assert how.startswith("hospital: ") and "; clinic: " in how


def test_strata_only_with_several_sources():
    assert strata(["b", "m"], ["x", "x"]) == ["b", "m"]
    assert strata(["b", "m"], ["x", "y"]) == ["x|b", "y|m"]
    with pytest.raises(ValueError):
        strata(["b", "m", "m"], ["x", "y"])  # one source per label, or a bug upstream


def test_group_holdout_needs_two_groups_and_keeps_groups_whole():
    with pytest.raises(DataError, match="one group"):
        group_holdout(["b", "m", "b"], ["p", "p", "p"], 0.3, seed=0)
    labels = ["b", "m"] * 10
    groups = [f"p{i // 2}" for i in range(20)]  # ten patients of two frames
    mask = group_holdout(labels, groups, 0.3, seed=0)
    held = {g for g, m in zip(groups, mask, strict=True) if m}
    assert held and all(mask[i] == (groups[i] in held) for i in range(20))
    assert 0 < mask.sum() < 20
    mask2 = group_holdout(labels, ["p0", "p1"] * 10, 0.3, seed=0)  # exactly two groups: still a split
    assert 0 < mask2.sum() < 20


def test_assign_splits_keeps_given_splits_and_never_splits_a_group():
    labels = ["b", "m"] * 30
    groups = [f"p{i // 3}" for i in range(60)]
    given = [None] * 51 + ["test"] * 9  # a given test split (patients p17-p19) is kept; validation is carved from train
    splits = assign_splits(labels, groups, given, validation_size=0.2, test_size=0.2, seed=3)
    assert splits[51:] == ["test"] * 9 and splits.count("test") == 9
    assert 0 < splits.count("validation") < 51 and split_leaks(splits, groups) == {}
    nothing = assign_splits(labels, groups, [None] * 60, validation_size=0, test_size=0, seed=3)
    assert nothing == ["train"] * 60
    fresh = assign_splits(labels, groups, [None] * 60, validation_size=0.15, test_size=0.15, seed=3)
    assert split_leaks(fresh, groups) == {} and {"train", "validation", "test"} == set(fresh)
    # The test share is of the whole data set (about 15%), not of what is left.
    assert abs(fresh.count("test") - 9) <= 6


def test_split_leaks_lists_each_straddling_group_once():
    assert split_leaks(["train", "test", "train", "validation"], ["a", "a", "b", "c"]) == {"a": ["test", "train"]}
    assert split_leaks(["train", "train"], ["a", "a"]) == {}
    assert np.array_equal(sorted(split_leaks(["train", "test", "validation"], ["a", "a", "a"])["a"]), ["test", "train", "validation"])


def test_scan_sources_names_counts_duplicates_and_layouts(tmp_path):
    a, b = tmp_path / "one" / "site", tmp_path / "two" / "site"
    for root, seed in ((a, 1), (b, 2)):
        write_image(root / "benign" / "x_1.png", seed=seed)
        write_image(root / "malignant" / "y_1.png", seed=seed + 10)
        (root / "benign" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"share the source name \['site'\]; name them with --source_names"):
        scan_sources([a, b])
    with pytest.raises(DataError, match=r"--source_names gives 1 name\(s\) for 2 data folder\(s\)"):
        scan_sources([a, b], names=["only"])
    with pytest.raises(DataError, match="no data folder given"):
        scan_sources([])
    scan = scan_sources([a, b], names=["north", "south"])
    assert scan.sources == ["north", "south"] and scan.roots == {"north": a.resolve(), "south": b.resolve()}
    assert sorted({(e.source, e.path.parent.parent) for e in scan.images}) == [("north", a.resolve()), ("south", b.resolve())]
    assert len(scan.non_images) == 2 and scan.root == a.resolve() and scan.layout == "flat"  # both sources' non-images kept
    split = tmp_path / "three"
    write_image(split / "train" / "benign" / "x_1.png", seed=3)
    write_image(split / "train" / "malignant" / "y_1.png", seed=4)
    with pytest.raises(DataError, match=rf"data folders mix layouts: {a.resolve()} is flat, {split.resolve()} is split; give every source"):
        scan_sources([a, split], names=["north", "east"])


def test_a_manifest_beside_or_above_the_folder_gives_the_groups(tmp_path):
    root = tmp_path / "ddti_like" / "images"
    for label, name in (("benign", "q_1.png"), ("benign", "q_2.png"), ("malignant", "r_1.png")):
        write_image(root / label / name, seed=len(name) + ord(name[0]))
    (root.parent / "manifest.csv").write_text("file,case\nimages/benign/q_1.png,7\nimages/benign/q_2.png,7\nimages/malignant/r_1.png,8\n")
    groups, how = resolve_groups(scan_sources(root))
    assert groups == ["7", "7", "8"] and str(root.parent / "manifest.csv") in how
    (root.parent / "manifest.csv").write_text("name,case\nq_1.png,7\n")  # no "file" column: not a manifest of files
    _, how = resolve_groups(scan_sources(root))
    assert "manifest" not in how


def test_load_image_folder_uses_the_group_csv_sizes_and_counts_absent_classes(tmp_path, caplog):
    """End to end through the imagefolder builder: the given group CSV decides the groups (not the file
    names), the sizes asked for are the sizes made, and a class absent from a split counts 0."""
    from thyroid_classifier.data import label_counts, load_image_folder

    root = tmp_path / "data"
    rows = ["file,patient"]
    for label in ("benign", "malignant"):
        for i in range(20):
            name = f"{label[0]}{i}_1.png"  # the file-name pattern would make 40 cases; the CSV says 10 patients
            write_image(root / label / name, seed=i + (100 if label == "malignant" else 0))
            rows.append(f"data/{label}/{name},{label}-P{i // 4}")
    (tmp_path / "patients.csv").write_text("\n".join(rows) + "\n")
    ds = load_image_folder(root, groups=GroupSpec(csv_path=tmp_path / "patients.csv", column="patient"),
                           validation_size=0.2, test_size=0.3, seed=1, cache_dir=str(tmp_path / "hf"))
    all_groups = {g for split in ds.values() for g in split["group"]}
    assert all_groups == {f"{c}-P{k}" for c in ("benign", "malignant") for k in range(5)}
    by_group = {}
    for name, split in ds.items():
        for g in split["group"]:
            by_group.setdefault(g, set()).add(name)
    assert all(len(s) == 1 for s in by_group.values())  # whole patients only
    n = {name: len(split) for name, split in ds.items()}
    # 30% and 20% asked: 4 and 2 of the 10 patients (whole patients; the defaults, 15% each, give 2 and 2).
    assert n == {"train": 16, "validation": 8, "test": 16}

    # Given split folders: a class missing from one split counts 0; a patient in two given splits is reported.
    given = tmp_path / "given"
    for split, label, name in (("train", "benign", "p1_1.png"), ("train", "malignant", "p2_1.png"), ("train", "benign", "p3_1.png"),
                               ("test", "benign", "p1_2.png"), ("validation", "malignant", "p4_1.png")):
        write_image(given / split / label / name, seed=len(name) + ord(split[0]) + ord(label[0]))
    with caplog.at_level(logging.WARNING):
        ds = load_image_folder(given, cache_dir=str(tmp_path / "hf2"))
    assert label_counts(ds) == {"train": {"benign": 2, "malignant": 1}, "validation": {"benign": 0, "malignant": 1},
                                "test": {"benign": 1, "malignant": 0}}
    assert "1 group(s) appear in more than one given split folder, e.g. p1" in caplog.text


@pytest.mark.parametrize("generic", ["images", "Images", "data", "dataset", "imgs", "FRAMES"])
def test_a_generic_folder_is_named_after_its_parent(tmp_path, generic):
    from thyroid_classifier.data import source_name

    assert source_name(tmp_path / "ddti" / generic) == "ddti"
    assert source_name(tmp_path / "ddti" / "scans") == "scans"


def test_split_layout_needs_train_and_skips_hidden_and_nested(tmp_path, caplog):
    from thyroid_classifier.data import scan_folder

    root = tmp_path / "split"
    write_image(root / "test" / "benign" / "a_1.png", seed=1)
    write_image(root / "test" / "malignant" / "b_1.png", seed=2)
    with pytest.raises(DataError, match=r"has split folders \['test'\] but no train/ folder"):
        scan_folder(root)
    write_image(root / "train" / "benign" / "c_1.png", seed=3)
    write_image(root / "train" / "malignant" / "d_1.png", seed=4)
    write_image(root / "train" / ".hidden" / "e_1.png", seed=5)  # not a class
    write_image(root / "train" / "benign" / "deeper" / "f_1.png", seed=6)  # nested: not read
    write_image(root / "extra" / "benign" / "g_1.png", seed=7)  # beside the split folders: not read
    with caplog.at_level(logging.WARNING):
        scan = scan_folder(root, source="north")
    assert scan.layout == "split" and scan.roots == {"north": root.resolve()}
    assert sorted((e.split, e.folder, e.path.name, e.source) for e in scan.images) == [
        ("test", "benign", "a_1.png", "north"), ("test", "malignant", "b_1.png", "north"),
        ("train", "benign", "c_1.png", "north"), ("train", "malignant", "d_1.png", "north")]
    assert "ignoring nested folder" in caplog.text and "beside train/validation/test only split folders are read" in caplog.text


def test_the_file_name_pattern_is_used_only_with_enough_cases(tmp_path):
    """<case>_<frame> names give the groups when every file follows the pattern and there are at least
    max(2, n / 10) cases: at the edge, and one case fewer."""
    root = tmp_path / "frames"
    for i in range(20):
        write_image(root / ("benign" if i % 2 else "malignant") / f"{i % 2}_{i}.png", seed=i)  # 2 cases = max(2, 20 // 10)
    groups, how = resolve_groups(scan_sources(root))
    assert sorted(set(groups)) == ["0", "1"] and "pattern" in how
    for i in range(20, 30):
        write_image(root / "benign" / f"1_{i}.png", seed=i)  # 30 files, still 2 cases < max(2, 3)
    groups, how = resolve_groups(scan_sources(root))
    assert len(set(groups)) == 30 and "pattern" not in how
