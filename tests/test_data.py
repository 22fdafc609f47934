import csv
import logging

import pytest

from conftest import write_image
from thyroid_classifier.data import (
    DataError,
    GroupSpec,
    assign_splits,
    label_counts,
    load_image_folder,
    merge_groups,
    resolve_groups,
    scan_folder,
    split_leaks,
)


def _groups_by_split(ds):
    return {split: set(d["group"]) for split, d in ds.items()}


def _assert_no_group_on_two_sides(ds):
    seen = {}
    for split, groups in _groups_by_split(ds).items():
        for g in groups:
            assert seen.setdefault(g, split) == split, f"group {g} in {seen[g]} and {split}"


def test_flat_layout_makes_three_stratified_group_splits(sample_dir):
    ds = load_image_folder(sample_dir, seed=1)
    assert list(ds) == ["train", "validation", "test"]
    assert ds["train"].features["label"].names == ["normal", "benign", "malignant"]
    assert set(ds["train"].column_names) == {"image", "label", "path", "group", "source"}
    assert sum(len(d) for d in ds.values()) == 36
    _assert_no_group_on_two_sides(ds)
    counts = label_counts(ds)
    # Stratified: every class is in every split.
    assert all(n > 0 for per_split in counts.values() for n in per_split.values())
    image = ds["train"][0]["image"]
    assert image.size == (128, 96)


def test_split_layout_with_odd_folder_names(tmp_path):
    names = {"train": ["normal thyroid", "Benign", "Malignant"], "test": ["Normal", "benin", "malin"]}
    seed = 0
    for split, folders in names.items():
        for folder in folders:
            for case in range(6 if split == "train" else 2):
                write_image(tmp_path / split / folder / f"{folder[:3]}{case}_1.png", seed := seed + 1)
    ds = load_image_folder(tmp_path, seed=0)
    assert set(ds) == {"train", "validation", "test"}
    assert ds["test"].features["label"].names == ["normal", "benign", "malignant"]
    # The given test split is kept as it is; validation is carved from train only.
    assert len(ds["test"]) == 6
    assert all("/test/" in p for p in ds["test"]["path"])
    assert not any("/test/" in p for p in ds["validation"]["path"])
    assert len(ds["train"]) + len(ds["validation"]) == 18
    counts = label_counts(ds)
    assert counts["test"] == {"normal": 2, "benign": 2, "malignant": 2}


def test_given_validation_split_is_kept(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for label in ("benign", "malignant"):
            for i in range(n):
                write_image(tmp_path / split / label / f"{split}{label}{i}_1.png", hash((split, label, i)) % 1000)
    ds = load_image_folder(tmp_path)
    assert {k: len(v) for k, v in ds.items()} == {"train": 8, "validation": 4, "test": 4}


@pytest.mark.parametrize("seed", range(25))
def test_group_split_never_straddles(sample_dir, seed):
    scan = scan_folder(sample_dir)
    groups, source = resolve_groups(scan)
    assert "manifest.csv" in source
    labels = [e.label for e in scan.images]
    splits = assign_splits(labels, groups, [None] * len(labels), seed=seed)
    assert split_leaks(splits, groups) == {}
    assert set(splits) == {"train", "validation", "test"}


def test_group_split_many_seeds_with_filename_pattern(tmp_path):
    # 40 cases of 1-4 frames, no manifest: the <case>_<frame> file-name pattern is used.
    for case in range(40):
        label = "benign" if case % 3 else "malignant"
        for frame in range(1, 2 + case % 4):
            write_image(tmp_path / label / f"{case}_{frame}.png", case * 10 + frame, size=(8, 8))
    scan = scan_folder(tmp_path)
    groups, source = resolve_groups(scan)
    assert "<case>_<frame>" in source
    assert len(set(groups)) == 40
    labels = [e.label for e in scan.images]
    for seed in range(50):
        splits = assign_splits(labels, groups, [None] * len(labels), seed=seed)
        assert split_leaks(splits, groups) == {}, seed


def test_split_is_seeded(sample_dir):
    a = load_image_folder(sample_dir, seed=3)
    b = load_image_folder(sample_dir, seed=3)
    c = load_image_folder(sample_dir, seed=4)
    assert list(a["test"]["path"]) == list(b["test"]["path"])
    assert list(a["test"]["path"]) != list(c["test"]["path"])


def test_csv_group_mapping(tmp_path):
    rows = []
    for i in range(12):
        label = ("benign", "malignant")[i % 2]
        path = write_image(tmp_path / "imgs" / label / f"img{i:03d}.png", i, size=(8, 8))
        rows.append({"file": f"imgs/{label}/{path.name}", "patient": f"p{i // 4}"})
    mapping = tmp_path / "patients.csv"
    with mapping.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    groups, _ = resolve_groups(scan_folder(tmp_path / "imgs"), GroupSpec(csv_path=mapping, column="patient"))
    assert groups == [f"p{i // 4}" for i in sorted(range(12), key=lambda i: (("benign", "malignant")[i % 2], i))]


def test_img_numbering_is_not_taken_for_cases(tmp_path):
    for i in range(10):
        write_image(tmp_path / ("benign", "malignant")[i % 2] / f"IMG_{i:04d}.png", i, size=(8, 8))
    groups, source = resolve_groups(scan_folder(tmp_path))
    assert len(set(groups)) == 10
    assert "each image is its own group" in source


def test_merge_groups_links_duplicates(tmp_path):
    paths = [tmp_path / n for n in ("a", "b", "c", "d")]
    merged = merge_groups(["g1", "g2", "g3", "g4"], paths, [[paths[0], paths[2]], [paths[2], paths[3]]])
    assert merged[0] == merged[2] == merged[3] != merged[1]


def test_excluded_files_are_not_loaded(sample_dir):
    first = sorted((sample_dir / "benign").iterdir())[0]
    ds = load_image_folder(sample_dir, exclude=[first])
    assert str(first.resolve()) not in [p for d in ds.values() for p in d["path"]]


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_folder(tmp_path / "missing")
    write_image(tmp_path / "only" / "benign" / "a.png")
    with pytest.raises(DataError, match="at least two classes"):
        scan_folder(tmp_path / "only")
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        scan_folder(tmp_path / "empty")


def test_ddti_split_by_case_has_no_leak(ddti_dir, caplog):
    caplog.set_level(logging.INFO)
    ds = load_image_folder(ddti_dir / "images", seed=0)
    assert ds["train"].features["label"].names == ["benign", "malignant"]
    assert sum(len(d) for d in ds.values()) == 349
    _assert_no_group_on_two_sides(ds)
    assert "manifest.csv" in caplog.text
