"""Data audit: unreadable files, exact and near duplicates, leakage across splits, label conflicts.

Run it alone::

    python -m thyroid_classifier.audit DATA_DIR [--json OUT.json] [--strict]

Training runs it first (:func:`audited_dataset`), drops what cannot be read, keeps duplicates on one
side of every split, and saves the report beside the model.

Near duplicates are found with a 64-bit perceptual hash (DCT of the grey ultrasound region, after
the same crop that training uses, so the shared scanner layout does not make every frame alike).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn
from tqdm.auto import tqdm

from .data import FileEntry, FolderScan, load_image_folder, scan_sources
from .preprocess import MAX_PIXELS, UltrasoundPreprocessor, find_views, to_rgb

logger = logging.getLogger(__name__)

#: Hamming distance (of 64 bits) at or below which two images are near duplicates.
DEFAULT_NEAR_THRESHOLD = 8
#: The split name of files left out of training (dropped duplicates).
EXCLUDED = "excluded"
#: A frame property whose rate differs by at least this much between two classes is reported.
CUE_GAP = 0.2


@dataclass
class ImageInfo:
    """What the audit learned about one file."""

    path: str
    label: str
    split: str
    error: str | None = None
    width: int = 0
    height: int = 0
    mode: str = ""
    sha256: str = ""
    phash: int = 0
    views: int = 0  # 2 for a split screen (preprocess.find_views)
    source: str = ""  # the data folder it came from (data.scan_sources)


def perceptual_hash(image: Image.Image, crop: bool = True) -> int:
    """64-bit DCT hash of the (cropped) grey image: robust to re-encoding and small rescaling."""
    if crop:
        image = UltrasoundPreprocessor(crop=True).apply(image)[0]
    small = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(small, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term is left out of the median, as in pHash
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def inspect_file(path: Path, label: str, split: str, source: str = "") -> ImageInfo:
    """Open, fully decode and fingerprint one file; any failure becomes ``error``, never an exception."""
    info = ImageInfo(path=str(path), label=label, split=split, source=source)
    try:
        data = path.read_bytes()
        if not data:
            raise ValueError("empty file (0 bytes)")
        info.sha256 = hashlib.sha256(data).hexdigest()
        with Image.open(path) as probe:
            info.width, info.height, info.mode = probe.width, probe.height, probe.mode
            if probe.width * probe.height > MAX_PIXELS:
                raise ValueError(f"{probe.width}x{probe.height} pixels exceeds the {MAX_PIXELS:,} limit")
            probe.verify()  # structure and checksums
        with Image.open(path) as image:
            image.load()  # the pixels themselves: catches truncated JPEGs
            region = UltrasoundPreprocessor(crop=True).apply(to_rgb(image))[0]
            info.phash = perceptual_hash(region, crop=False)
            info.views = len(find_views(np.asarray(region.convert("L"))))
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none is fatal
        info.error = f"{type(exc).__name__}: {exc}"
    return info


def training_overlap(images: Iterable[ImageInfo], fingerprints: Sequence[dict], near_threshold: int = DEFAULT_NEAR_THRESHOLD) -> list[dict]:
    """The (readable) ``images`` that match a model's training fingerprint: byte-identical or perceptually near."""
    if not fingerprints:
        return []
    shas = {f["sha256"] for f in fingerprints}
    hashes = np.array([int(f["phash"], 16) for f in fingerprints], dtype=np.uint64)
    found = []
    for info in images:
        if info.sha256 in shas:
            found.append({"path": info.path, "kind": "exact", "distance": 0})
            continue
        distance = int(np.bitwise_count(hashes ^ np.uint64(info.phash)).min())
        if distance <= near_threshold:
            found.append({"path": info.path, "kind": "near", "distance": distance})
    return found


@dataclass
class AuditReport:
    """The audit's findings; ``to_dict()`` is the JSON written beside each model."""

    root: str
    images: list[ImageInfo]
    unreadable: list[dict[str, str]] = field(default_factory=list)
    near_threshold: int = DEFAULT_NEAR_THRESHOLD
    #: source name -> folder (one entry for a single folder)
    sources: dict[str, str] = field(default_factory=dict)
    _near_pairs: list | None = field(default=None, init=False, repr=False, compare=False)

    # ---- derived views -------------------------------------------------------------------
    @property
    def readable(self) -> list[ImageInfo]:
        return [i for i in self.images if i.error is None]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for (split, label), n in sorted(Counter((i.split, i.label) for i in self.readable).items()):
            out[split][label] = n
        return dict(out)

    def source_counts(self) -> dict[str, dict[str, int]]:
        """``{source: {label: n}}`` of the readable images."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for (source, label), n in sorted(Counter((i.source, i.label) for i in self.readable).items()):
            out[source][label] = n
        return dict(out)

    def cross_source_duplicates(self) -> list[list[str]]:
        """Exact or near duplicate groups whose members come from more than one source (the same
        frame published twice: it would make an "unseen" source partly seen)."""
        return [[i.path for i in g] for g in self.exact_groups() + self.near_groups() if len({i.source for i in g}) > 1]

    def exact_groups(self) -> list[list[ImageInfo]]:
        by_hash: dict[str, list[ImageInfo]] = defaultdict(list)
        for info in self.readable:
            by_hash[info.sha256].append(info)
        return [g for g in by_hash.values() if len(g) > 1]

    def near_pairs(self) -> list[tuple[ImageInfo, ImageInfo]]:
        """Pairs within ``near_threshold`` bits that are not byte-identical (computed once: the
        search is quadratic, and every view of the report needs it; splits do not change it)."""
        if self._near_pairs is None:
            self._near_pairs = self._find_near_pairs()
        return self._near_pairs

    def _find_near_pairs(self) -> list[tuple[ImageInfo, ImageInfo]]:
        items = self.readable
        if len(items) < 2:
            return []
        hashes = np.array([i.phash for i in items], dtype=np.uint64)
        pairs = []
        for a in range(len(items) - 1):  # vectorised per row: fine for tens of thousands of images
            distance = np.bitwise_count(hashes[a] ^ hashes[a + 1 :])
            for offset in np.nonzero(distance <= self.near_threshold)[0]:
                b = a + 1 + int(offset)
                if items[a].sha256 != items[b].sha256:
                    pairs.append((items[a], items[b]))
        return pairs

    def near_groups(self) -> list[list[ImageInfo]]:
        return _components(self.near_pairs())

    def leakage(self) -> list[dict[str, str]]:
        def leaks(a: ImageInfo, b: ImageInfo) -> bool:
            return a.split != b.split and EXCLUDED not in (a.split, b.split)

        found = []
        for group in self.exact_groups():
            for i, a in enumerate(group):
                found += [{"a": a.path, "b": b.path, "kind": "exact"} for b in group[i + 1 :] if leaks(a, b)]
        found += [{"a": a.path, "b": b.path, "kind": "near"} for a, b in self.near_pairs() if leaks(a, b)]
        return found

    def split_screens(self, paths: Sequence[str]) -> np.ndarray:
        """Which of ``paths`` are split screens (two views side by side), as the audit found them."""
        views = {info.path: info.views for info in self.images}
        return np.array([views.get(p) == 2 for p in paths], dtype=bool)

    def class_cues(self) -> dict[str, dict[str, float]]:
        """Properties of the frame, not of the nodule, whose rate differs between classes by at
        least :data:`CUE_GAP` (share of each class's images): a model can learn them instead.
        Checked: split screens and each image size held by at least 5% of the images."""
        by_label: dict[str, list[ImageInfo]] = defaultdict(list)
        for info in self.readable:
            by_label[info.label].append(info)
        if len(by_label) < 2:
            return {}
        sizes = Counter(f"{i.width}x{i.height}" for i in self.readable)
        cues = {"split screen": lambda i: i.views == 2}
        cues.update({f"size {size}": (lambda i, size=size: f"{i.width}x{i.height}" == size)
                     for size, n in sizes.items() if n >= 0.05 * len(self.readable) and len(sizes) > 1})
        found = {}
        for name, has in cues.items():
            shares = {label: sum(map(has, items)) / len(items) for label, items in sorted(by_label.items())}
            if max(shares.values()) - min(shares.values()) >= CUE_GAP:
                found[name] = {label: round(v, 3) for label, v in shares.items()}
        return found

    def conflicts(self) -> list[list[str]]:
        """Byte-identical images filed under two or more labels."""
        return [[i.path for i in g] for g in self.exact_groups() if len({i.label for i in g}) > 1]

    def near_conflicts(self) -> list[list[str]]:
        return [[i.path for i in g] for g in self.near_groups() if len({i.label for i in g}) > 1]

    def links(self) -> list[list[str]]:
        """Files that must share a split: every exact and near duplicate group."""
        return [[i.path for i in g] for g in self.exact_groups() + self.near_groups()]

    def duplicates_to_drop(self, kind: str = "exact") -> list[str]:
        """All but the first file of each duplicate group (``exact``, or ``near`` for both kinds)."""
        if kind not in ("exact", "near"):
            raise ValueError(f"unknown duplicate kind {kind!r}: use 'exact' or 'near'")
        groups = self.exact_groups() + (self.near_groups() if kind == "near" else [])
        drop: list[str] = []
        for group in _components([(a, b) for g in groups for a, b in zip(g, g[1:])]):
            drop += [i.path for i in sorted(group, key=lambda i: i.path)[1:]]
        return drop

    def with_splits(self, splits: Mapping[str, str], others: str | None = None) -> AuditReport:
        """The same findings with the split each file was finally assigned to (for leakage);
        files not in ``splits`` get ``others`` (when given)."""
        for info in self.images:
            info.split = splits.get(info.path, others or info.split)
        return self

    # ---- output ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        readable = self.readable
        return {
            "root": self.root,
            "n_files": len({i.path for i in self.images} | {u["path"] for u in self.unreadable}),
            "n_readable": len(readable),
            "counts": self.counts(),
            "unreadable": self.unreadable,
            "exact_duplicates": [[i.path for i in g] for g in self.exact_groups()],
            "near_duplicates": [[i.path for i in g] for g in self.near_groups()],
            "near_threshold_bits": self.near_threshold,
            "leakage": self.leakage(),
            "conflicts": self.conflicts(),
            "near_conflicts": self.near_conflicts(),
            "sizes": dict(Counter(f"{i.width}x{i.height}" for i in readable).most_common()),
            "modes": dict(Counter(i.mode for i in readable).most_common()),
            "split_screens": dict(Counter(i.label for i in readable if i.views == 2)),
            "class_cues": self.class_cues(),
            "sources": {name: {"folder": folder, "counts": self.source_counts().get(name, {})} for name, folder in self.sources.items()},
            "cross_source_duplicates": self.cross_source_duplicates(),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def fingerprints(self) -> list[dict[str, str]]:
        """Hashes of the readable images (never the images): to recognise them elsewhere later."""
        return [{"sha256": i.sha256, "phash": f"{i.phash:016x}", "label": i.label} for i in self.readable]

    def summary(self) -> str:
        d = self.to_dict()
        lines = [f"Audit of {self.root}" if len(self.sources) <= 1 else f"Audit of {len(self.sources)} sources", f"  files: {d['n_files']}, readable images: {d['n_readable']}"]
        if len(self.sources) > 1:
            for name, facts in d["sources"].items():
                counts = facts["counts"]
                lines.append(f"  source {name} ({facts['folder']}): " + ", ".join(f"{label}: {n}" for label, n in counts.items()) + f"  (total {sum(counts.values())})")
        for split, per_label in d["counts"].items():
            lines.append(f"  {split:<10} " + ", ".join(f"{label}: {n}" for label, n in per_label.items()) + f"  (total {sum(per_label.values())})")
        lines.append("  sizes: " + ", ".join(f"{s} ×{n}" for s, n in list(d["sizes"].items())[:5]) + (" …" if len(d["sizes"]) > 5 else ""))
        lines.append("  colour modes: " + ", ".join(f"{m} ×{n}" for m, n in d["modes"].items()))
        sections = (
            ("unreadable / not images (skipped)", [f"{u['path']}: {u['error']}" for u in d["unreadable"]]),
            ("exact duplicate groups (same bytes)", [" = ".join(g) for g in d["exact_duplicates"]]),
            (f"near-duplicate groups (≤{self.near_threshold} bits)", [" ~ ".join(g) for g in d["near_duplicates"]]),
            ("LEAKAGE across splits", [f"[{x['kind']}] {x['a']} <-> {x['b']}" for x in d["leakage"]]),
            ("CONFLICTS: same image, different labels", [" | ".join(g) for g in d["conflicts"]]),
            ("near duplicates with different labels", [" | ".join(g) for g in d["near_conflicts"]]),
            *((("duplicates ACROSS sources (an unseen source would be partly seen)", [" ~ ".join(g) for g in d["cross_source_duplicates"]]),)
              if len(self.sources) > 1 else ()),
            ("frame properties whose rate differs by class (a model can learn them instead of the nodule)",
             [f"{cue}: " + ", ".join(f"{label} {share:.0%}" for label, share in shares.items()) for cue, shares in d["class_cues"].items()]),
        )
        for title, items in sections:
            lines.append(f"  {title}: {len(items)}")
            lines += [f"    - {item}" for item in items]
        return "\n".join(lines)


def _components(pairs: Iterable[tuple[ImageInfo, ImageInfo]]) -> list[list[ImageInfo]]:
    """Connected components of a pair list, in first-seen order."""
    neighbours: dict[str, set[str]] = defaultdict(set)
    by_path: dict[str, ImageInfo] = {}
    for a, b in pairs:
        neighbours[a.path].add(b.path)
        neighbours[b.path].add(a.path)
        by_path[a.path], by_path[b.path] = a, b
    seen: set[str] = set()
    groups = []
    for start in neighbours:
        if start in seen:
            continue
        stack, group = [start], []
        seen.add(start)
        while stack:
            node = stack.pop()
            group.append(by_path[node])
            for nxt in neighbours[node] - seen:
                seen.add(nxt)
                stack.append(nxt)
        groups.append(sorted(group, key=lambda i: i.path))
    return groups


def audit_scan(scan: FolderScan, *, near_threshold: int = DEFAULT_NEAR_THRESHOLD, progress: bool = True) -> AuditReport:
    """Audit every file of a scanned folder. Flat folders are reported as the split ``all``."""
    infos = []
    for entry in tqdm(scan.images, desc="audit", unit="img", disable=not progress, leave=False):
        infos.append(inspect_file(entry.path, entry.label, entry.split or "all", entry.source))
    unreadable = [{"path": i.path, "error": i.error} for i in infos if i.error]
    unreadable += [{"path": str(e.path), "error": f"not an image file ({e.path.suffix or 'no extension'})"} for e in scan.non_images]
    return AuditReport(root=str(scan.root), images=infos, unreadable=unreadable, near_threshold=near_threshold,
                       sources={name: str(root) for name, root in scan.roots.items()})


def audit_folder(data_dir: str | Path | Sequence[str | Path], source_names: Sequence[str] | None = None, **kwargs) -> AuditReport:
    """Scan and audit ``data_dir`` (either layout; one folder or several sources)."""
    return audit_scan(scan_sources(data_dir, source_names), **kwargs)


def audited_dataset(
    data_dir: str | Path | Sequence[str | Path],
    *,
    drop_duplicates: str = "none",
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    progress: bool = True,
    source_names: Sequence[str] | None = None,
    **load_kwargs,
):
    """What training starts with: audit, then load without the unreadable files (and, on request,
    without duplicates), keeping every duplicate group on one side of each split.

    Returns ``(DatasetDict, AuditReport)``; the report's splits are the final ones.
    """
    report = audit_folder(data_dir, source_names, near_threshold=near_threshold, progress=progress)
    for item in report.unreadable:
        logger.warning("skipping %s: %s", item["path"], item["error"])
    exclude = [u["path"] for u in report.unreadable]
    if drop_duplicates != "none":
        dropped = report.duplicates_to_drop(drop_duplicates)
        logger.info("dropping %d %s duplicate(s) from the data", len(dropped), drop_duplicates)
        exclude += dropped
    dataset = load_image_folder(data_dir, exclude=exclude, links=report.links(), source_names=source_names, **load_kwargs)
    report.with_splits({p: split for split, ds in dataset.items() for p in ds["path"]}, others=EXCLUDED)
    return dataset, report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m thyroid_classifier.audit",
        description="Audit an image folder: unreadable files, duplicates, leakage across splits, label conflicts.",
    )
    parser.add_argument("data_dir", type=Path, nargs="+", help="DATA/<class>/* or DATA/{train,validation,test}/<class>/*; several folders: one source each")
    parser.add_argument("--source_names", nargs="+", default=None, help="a name per data folder (default: the folder's name)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 on leakage or label conflicts")
    parser.add_argument("--near_threshold", type=int, default=DEFAULT_NEAR_THRESHOLD, help="Hamming distance (of 64 bits) for near duplicates")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = audit_folder(args.data_dir, args.source_names, near_threshold=args.near_threshold, progress=not args.quiet)
    except ValueError as exc:  # DataError: a folder that cannot be used at all
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.json:
        print(f"report written to {report.save(args.json)}")
    d = report.to_dict()
    if args.strict and (d["leakage"] or d["conflicts"]):
        print(f"strict: {len(d['leakage'])} leakage pair(s), {len(d['conflicts'])} conflict(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
