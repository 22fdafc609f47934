"""Loading a folder of images as a ``datasets.DatasetDict``, with leak-free, group-aware splits.

Two layouts are accepted::

    DATA/<class>/*                              one pool, split here
    DATA/{train,validation,test}/<class>/*      splits given (missing ones are carved from train)

Class folder names are normalised by :mod:`thyroid_classifier.labels`. Each example carries its
``path``, its ``group`` (patient / case) so that no group ever straddles two splits, and its
``source``: several folders (hospitals, scanners, public sets) can be loaded together, each one a
source, and splits are then stratified by source x class so every source is in every split.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .known_data import CASE_FRAME_PATTERN
from .labels import normalize_label, sort_labels

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
#: ``<case>_<frame>.ext`` (DDTI's naming): everything before the last ``_<digits>``.
DEFAULT_GROUP_PATTERN = CASE_FRAME_PATTERN
#: Files at the top of a data folder that describe it rather than belong to a class.
_METADATA_SUFFIXES = frozenset({".csv", ".json", ".md", ".txt", ".xml", ".yaml", ".yml"})


class DataError(ValueError):
    """A data folder that cannot be used, with a message naming the folder or file and the problem."""


@dataclass(frozen=True)
class FileEntry:
    """One file found in a class folder."""

    path: Path
    folder: str  # the class folder's own name, as on disk
    split: str | None  # "train" / "validation" / "test" when the layout gives it
    source: str = ""  # the data folder it came from (see :func:`scan_sources`)

    @property
    def label(self) -> str:
        return normalize_label(self.folder)


@dataclass
class FolderScan:
    """What a data folder holds, before any image is opened."""

    root: Path
    layout: str  # "flat" or "split"
    images: list[FileEntry] = field(default_factory=list)
    non_images: list[FileEntry] = field(default_factory=list)  # files in class folders
    #: source name -> its folder; one entry for a single folder
    roots: dict[str, Path] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return sort_labels(entry.label for entry in self.images)

    @property
    def sources(self) -> list[str]:
        return list(self.roots)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def source_name(data_dir: str | Path) -> str:
    """A source's default name: its folder's, or the parent's when the folder is a generic one
    (``ddti/images`` -> ``ddti``)."""
    path = Path(data_dir).expanduser().resolve()
    generic = {"images", "data", "dataset", "imgs", "frames"}
    return path.parent.name if path.name.lower() in generic and path.parent.name else path.name


def _class_files(class_dir: Path, split: str | None, scan: FolderScan, source: str) -> None:
    for path in sorted(p for p in class_dir.iterdir() if _visible(p)):
        if path.is_dir():
            logger.warning("ignoring nested folder %s (images must sit directly in a class folder)", path)
            continue
        entry = FileEntry(path=path.resolve(), folder=class_dir.name, split=split, source=source)
        (scan.images if path.suffix.lower() in IMAGE_EXTENSIONS else scan.non_images).append(entry)


def scan_folder(data_dir: str | Path, source: str | None = None) -> FolderScan:
    """List the class folders and files of ``data_dir`` (either layout); nothing is decoded."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    source = source or source_name(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    split_dirs = {_SPLIT_ALIASES[p.name.lower()]: p for p in subdirs if p.name.lower() in _SPLIT_ALIASES}
    scan = FolderScan(root=root.resolve(), layout="split" if split_dirs else "flat", roots={source: root.resolve()})
    if split_dirs:
        if "train" not in split_dirs:
            raise DataError(f"{root}: has split folders {sorted(split_dirs)} but no train/ folder")
        for other in sorted(set(subdirs) - set(split_dirs.values())):
            logger.warning("ignoring %s: beside train/validation/test only split folders are read", other)
        for split, split_dir in split_dirs.items():
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and _visible(p)):
                _class_files(class_dir, split, scan, source)
    else:
        for class_dir in subdirs:
            _class_files(class_dir, None, scan, source)
    if not scan.images:
        raise DataError(
            f"{root}: no images found; expected {root}/<class>/*.jpg or {root}/train/<class>/*.jpg"
        )
    if len(scan.labels) < 2:
        raise DataError(f"{root}: found only the class {scan.labels}; at least two classes are needed")
    return scan


def as_dirs(data_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    """One folder or several, as a list."""
    return [Path(data_dir)] if isinstance(data_dir, (str, Path)) else [Path(d) for d in data_dir]


def scan_sources(data_dirs: str | Path | Sequence[str | Path], names: Sequence[str] | None = None) -> FolderScan:
    """Scan one or several data folders, each a *source* (named after its folder, or ``names``).

    Several folders become one scan whose entries remember their source; each folder may have
    either layout, but all of them the same one (a given test split of one source and none of
    another would make "the test split" mean two things)."""
    dirs = as_dirs(data_dirs)
    if not dirs:
        raise DataError("no data folder given")
    if names is not None and len(names) != len(dirs):
        raise DataError(f"--source_names gives {len(names)} name(s) for {len(dirs)} data folder(s)")
    names = list(names) if names else [source_name(d) for d in dirs]
    if len(set(names)) != len(names):
        raise DataError(f"two data folders share the source name {sorted({n for n in names if names.count(n) > 1})}; "
                        "name them with --source_names")
    scans = [scan_folder(d, n) for d, n in zip(dirs, names, strict=True)]
    if len(scans) == 1:
        return scans[0]
    layouts = {s.layout for s in scans}
    if len(layouts) > 1:
        raise DataError("data folders mix layouts: " + ", ".join(f"{s.root} is {s.layout}" for s in scans)
                        + "; give every source its own train/validation/test folders, or none")
    merged = FolderScan(root=scans[0].root, layout=scans[0].layout, roots={n: s.root for n, s in zip(names, scans, strict=True)})
    for scan in scans:
        merged.images += scan.images
        merged.non_images += scan.non_images
    return merged


def strata(labels: Sequence, sources: Sequence[str]) -> list[str]:
    """What splits are stratified by: the label, and the source when there are several."""
    if len(set(sources)) <= 1:
        return list(labels)
    return [f"{s}|{y}" for y, s in zip(labels, sources, strict=True)]


# --------------------------------------------------------------------------------------------
# Groups (patient / case)


@dataclass(frozen=True)
class GroupSpec:
    """Where the group key of each image comes from."""

    csv_path: Path | None = None  # a CSV mapping file -> group (DDTI's manifest.csv)
    column: str = "case"
    file_column: str = "file"
    pattern: str | None = None  # a regex on the file stem with a named group "group"


def _find_manifest(root: Path, column: str) -> Path | None:
    for candidate in (root / "manifest.csv", root.parent / "manifest.csv"):
        if candidate.is_file():
            with candidate.open(newline="") as f:
                header = next(csv.reader(f), [])
            if column in header and "file" in header:
                return candidate
    return None


def _groups_from_csv(entries: Sequence[FileEntry], csv_path: Path, spec: GroupSpec) -> list[str]:
    by_path: dict[Path, str] = {}
    by_name: dict[str, set[str]] = {}
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {spec.file_column, spec.column} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {sorted(missing)}")
        for row in reader:
            file, group = row[spec.file_column], row[spec.column]
            by_path[(csv_path.parent / file).resolve()] = group
            by_name.setdefault(Path(file).name, set()).add(group)
    groups = []
    for entry in entries:
        group = by_path.get(entry.path)
        if group is None and len(by_name.get(entry.path.name, ())) == 1:
            group = next(iter(by_name[entry.path.name]))
        # A file the CSV does not list is its own group: safe (it can only sit on one side).
        groups.append(group if group is not None else f"file:{entry.path}")
    unmatched = sum(g.startswith("file:") for g in groups)
    if unmatched:
        logger.warning("%s lists no group for %d of %d images; each is its own group", csv_path, unmatched, len(entries))
    return groups


def _groups_from_pattern(entries: Sequence[FileEntry], pattern: str) -> tuple[list[str], int]:
    regex = re.compile(pattern)
    groups, misses = [], 0
    for entry in entries:
        match = regex.match(entry.path.stem)
        if match is None:
            misses += 1
            groups.append(f"file:{entry.path}")
        else:
            groups.append(match.group("group") if "group" in regex.groupindex else match.group(1))
    return groups, misses


def resolve_groups(scan: FolderScan, spec: GroupSpec | None = None) -> tuple[list[str], str]:
    """The group key of each image in ``scan.images`` and a sentence saying where it came from.

    Order of precedence: an explicit CSV, an explicit pattern, a ``manifest.csv`` beside or above
    the folder, the ``<case>_<frame>`` file-name pattern when every file follows it, else none.
    With several sources each is resolved on its own and its keys are prefixed with its name
    (case "12" of one hospital is not case "12" of another).
    """
    if len(scan.roots) > 1:
        groups: list[str] = [""] * len(scan.images)
        said = []
        for name, root in scan.roots.items():
            index = [i for i, e in enumerate(scan.images) if e.source == name]
            part = FolderScan(root=root, layout=scan.layout, images=[scan.images[i] for i in index], roots={name: root})
            keys, how = _resolve_one(part, spec)
            for i, key in zip(index, keys, strict=True):
                groups[i] = f"{name}:{key}"
            said.append(f"{name}: {how}")
        return groups, "; ".join(said)
    return _resolve_one(scan, spec)


def _resolve_one(scan: FolderScan, spec: GroupSpec | None) -> tuple[list[str], str]:
    spec = spec or GroupSpec()
    entries = scan.images
    if spec.csv_path is not None:
        return _groups_from_csv(entries, Path(spec.csv_path), spec), f"{spec.csv_path} column '{spec.column}'"
    if spec.pattern is not None:
        groups, misses = _groups_from_pattern(entries, spec.pattern)
        if misses:
            logger.warning("%d file names do not match %r; each is its own group", misses, spec.pattern)
        return groups, f"file-name pattern {spec.pattern!r}"
    manifest = _find_manifest(scan.root, spec.column)
    if manifest is not None:
        return _groups_from_csv(entries, manifest, spec), f"{manifest} column '{spec.column}'"
    groups, misses = _groups_from_pattern(entries, DEFAULT_GROUP_PATTERN)
    # Guard against names like IMG_0001.jpg, where the "case" would be one group for everything.
    if misses == 0 and len(set(groups)) >= max(2, len(entries) // 10):
        return groups, f"file-name pattern <case>_<frame> ({len(set(groups))} cases)"
    return [f"file:{e.path}" for e in entries], "none found: each image is its own group"


def merge_groups(groups: Sequence[str], paths: Sequence[Path], links: Iterable[Iterable[str | Path]]) -> list[str]:
    """Merge the groups of files that are linked (e.g. byte-identical frames of two cases).

    Linked files then always land on the same side of a split, so duplicates cannot leak.
    """
    parent: dict[str, str] = {g: g for g in groups}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    index = {Path(p).resolve(): g for p, g in zip(paths, groups, strict=True)}
    for link in links:
        linked = [index[Path(p).resolve()] for p in link if Path(p).resolve() in index]
        for other in linked[1:]:
            a, b = find(linked[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [find(g) for g in groups]


# --------------------------------------------------------------------------------------------
# Splits


def group_holdout(labels: Sequence[str], groups: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out share of ``fraction``, stratified by label, whole groups only."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups))
    if n_groups < 2:
        raise DataError("cannot split: all images belong to one group (patient / case)")
    # Very small data: at most as many splits as the largest class has members (sklearn refuses
    # more), so the held-out share grows rather than the run failing.
    largest = max(Counter(labels).values())
    n_splits = int(max(2, min(round(1 / fraction), n_groups, largest)))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def cv_folds(labels: Sequence, groups: Sequence[str], k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds ``(train_index, held_out_index)``: stratified by label, whole groups only, seeded.
    Every example is held out exactly once."""
    from sklearn.model_selection import StratifiedGroupKFold

    if len(set(groups)) < k:
        raise DataError(f"cannot make {k} folds from {len(set(groups))} groups (patients / cases)")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups))


def assign_splits(
    labels: Sequence[str],
    groups: Sequence[str],
    given: Sequence[str | None],
    *,
    validation_size: float = 0.15,
    test_size: float = 0.15,
    seed: int = 42,
) -> list[str]:
    """Split names for every example: given splits are kept, missing test/validation are carved
    from train (stratified by ``labels``, seeded, whole groups only). Pass :func:`strata` as
    ``labels`` to stratify by source x class."""
    splits = [s if s is not None else "train" for s in given]
    present = set(splits)
    for name, size in (("test", test_size), ("validation", validation_size)):
        if name in present or size <= 0:
            continue
        pool = [i for i, s in enumerate(splits) if s == "train"]
        # The share is of the whole data set; carving validation after test takes a larger share of what is left.
        share = min(0.5, size * len(splits) / len(pool))
        mask = group_holdout([labels[i] for i in pool], [groups[i] for i in pool], share, seed)
        for i, held in zip(pool, mask, strict=True):
            if held:
                splits[i] = name
    return splits


def split_leaks(splits: Sequence[str], groups: Sequence[str]) -> dict[str, list[str]]:
    """Groups found in more than one split: ``{group: [split, ...]}`` (empty when leak-free)."""
    seen: dict[str, set[str]] = {}
    for split, group in zip(splits, groups, strict=True):
        seen.setdefault(group, set()).add(split)
    return {g: sorted(s) for g, s in seen.items() if len(s) > 1}


# --------------------------------------------------------------------------------------------
# The DatasetDict


def load_image_folder(
    data_dir: str | Path | Sequence[str | Path],
    *,
    validation_size: float = 0.15,
    test_size: float = 0.15,
    seed: int = 42,
    groups: GroupSpec | None = None,
    exclude: Iterable[str | Path] = (),
    links: Iterable[Iterable[str | Path]] = (),
    cache_dir: str | None = None,
    source_names: Sequence[str] | None = None,
):
    """Load ``data_dir`` (one folder, or several: one source each) with the ``imagefolder``
    builder as a ``DatasetDict``.

    Columns: ``image`` (decoded lazily), ``label`` (``ClassLabel`` of canonical names), ``path``,
    ``group``, ``source``. ``exclude`` drops files (e.g. the audit's unreadable ones) before anything is
    decoded; ``links`` are sets of files that must share a split (e.g. duplicates).
    """
    from datasets import ClassLabel, DatasetDict, Image, load_dataset

    scan = scan_sources(data_dir, source_names)
    excluded = {Path(p).resolve() for p in exclude}
    scan.images = [e for e in scan.images if e.path not in excluded]
    group_keys, source = resolve_groups(scan, groups)
    paths = [e.path for e in scan.images]
    group_keys = merge_groups(group_keys, paths, links)
    labels = [e.label for e in scan.images]
    sources = [e.source for e in scan.images]
    splits = assign_splits(
        strata(labels, sources), group_keys, [e.split for e in scan.images],
        validation_size=validation_size, test_size=test_size, seed=seed,
    )
    leaks = split_leaks(splits, group_keys)
    if leaks:
        # Only possible when the folder's own split folders put one case on two sides.
        logger.warning("%d group(s) appear in more than one given split folder, e.g. %s", len(leaks), next(iter(leaks)))
    logger.info("groups: %s", source)

    label_names = sort_labels(labels)
    class_label = ClassLabel(names=label_names)
    meta = {str(p): (class_label.str2int(lab), g, src) for p, lab, g, src in zip(paths, labels, group_keys, sources, strict=True)}
    data_files = {
        split: [str(p) for p, s in zip(paths, splits, strict=True) if s == split]
        for split in SPLITS
        if split in splits
    }
    raw = load_dataset("imagefolder", data_files=data_files, drop_labels=True, cache_dir=cache_dir)
    out = {}
    for split in SPLITS:
        if split not in raw:
            continue
        ds = raw[split]
        # Read the stored paths rather than trusting row order, then attach label and group.
        stored = [item["path"] for item in ds.cast_column("image", Image(decode=False))["image"]]
        ds = ds.add_column("path", stored)
        ds = ds.add_column("label", [meta[p][0] for p in stored])
        ds = ds.add_column("group", [meta[p][1] for p in stored])
        ds = ds.add_column("source", [meta[p][2] for p in stored])
        out[split] = ds.cast_column("label", class_label)
    return DatasetDict(out)


def label_counts(dataset_dict) -> dict[str, dict[str, int]]:
    """``{split: {label: n}}`` for a DatasetDict produced by :func:`load_image_folder`."""
    counts = {}
    for split, ds in dataset_dict.items():
        names = ds.features["label"].names
        tally = Counter(ds["label"])
        counts[split] = {name: tally.get(i, 0) for i, name in enumerate(names)}
    return counts
