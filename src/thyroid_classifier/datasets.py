"""The public data sets the public model is trained on, fetched from their public homes and laid out
as the project reads them.

    python -m thyroid_classifier.datasets fetch ddti les3bdd [--to data]

writes ``data/ddti/`` and ``data/les3bdd/``, each with ``images/<class>/`` (an ``imagefolder``),
``manifest.csv`` (file, case: the patient groups every split keeps together, label, md5) and, for
DDTI, the radiologists' case files in ``xml/``. Every file is checked against the checksum list that
ships in the package (``data_sets/<name>.csv``); a data set is written aside and moved into place only
when every file checks, so a failed or interrupted fetch leaves nothing half-written. Offline, or when
a home cannot be reached, it says so in one line.

The homes (override with ``--ddti_url`` / ``--les3bdd_url``, e.g. for a mirror):

* **DDTI** — the archive the CIM@LAB (Universidad Nacional de Colombia) publishes; the frames are
  found in it by name, the labels come from the checksum list (TI-RADS 2-3 benign, 4a-5 malignant,
  as derived from its case files).
* **LES3BDD** — the frames of ``lyndachaouchi/Ultrasound-imaging-classifications-of-Thyroid-nodules``
  at a pinned commit (folder ``BDD20test80train/LES3BDD/``), fetched one by one from GitHub's raw files;
  the frames byte-identical to DDTI's are left out.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CHECKSUMS = Path(__file__).resolve().parent / "data_sets"
TIMEOUT = 30.0


@dataclass(frozen=True)
class PublicDataSet:
    """One public data set: where it lives, how it is shipped, and the list its files are checked against."""

    name: str
    home: str  # the page a person reads
    url: str  # an archive (``archive``) or the folder the list's ``member`` paths are relative to (``files``)
    shipped_as: str  # "archive" | "files"
    checksums: Path  # CSV: file (where it goes), member (where it is in the source), md5, and the manifest's other columns
    extra_suffix: str | None = None  # members of the archive kept beside the images (DDTI's case files: ".xml")
    citation: str = ""


REGISTRY: dict[str, PublicDataSet] = {
    "ddti": PublicDataSet(
        name="ddti", home="http://cimalab.unal.edu.co/?lang=en&mod=program&id=5",
        url="http://cimalab.unal.edu.co/applications/thyroid/thyroid.zip", shipped_as="archive",
        checksums=CHECKSUMS / "ddti.csv", extra_suffix=".xml",
        citation="Pedraza et al., Proc. SPIE 9287 (2015), doi:10.1117/12.2073532"),
    "les3bdd": PublicDataSet(
        name="les3bdd", home="https://github.com/lyndachaouchi/Ultrasound-imaging-classifications-of-Thyroid-nodules",
        url="https://raw.githubusercontent.com/lyndachaouchi/Ultrasound-imaging-classifications-of-Thyroid-nodules/dc32fe3b",
        shipped_as="files", checksums=CHECKSUMS / "les3bdd.csv"),
}


class FetchError(RuntimeError):
    """A data set could not be fetched or did not check; nothing of it was written."""


def _read(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # noqa: S310 - http(s) URLs of the registry or the user's mirror
            return response.read()
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"cannot reach {url} ({reason}); check the network, or pass a mirror's address") from None


def _rows(spec: PublicDataSet) -> list[dict[str, str]]:
    with spec.checksums.open(newline="") as f:
        return list(csv.DictReader(f))


def _archive_members(data: bytes, url: str) -> dict[str, bytes]:
    """Every file of a zip archive by its base name (the layout inside an archive varies between releases)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise FetchError(f"{url}: not a zip archive ({len(data)} bytes)") from None
    return {Path(info.filename).name: archive.read(info) for info in archive.infolist() if not info.is_dir()}


def fetch(spec: PublicDataSet, to: Path, read: Callable[[str], bytes] = _read, say: Callable[[str], None] = print) -> Path:
    """Fetch ``spec`` into ``to/<name>``, every file checked; returns the folder. Already there and
    checking: left as is. Raises :class:`FetchError` (nothing written) when anything is missing or differs."""
    rows = _rows(spec)
    dest = to / spec.name
    if dest.is_dir() and all(_md5_file(dest / r["file"]) == r["md5"] for r in rows):
        say(f"{spec.name}: already in {dest} ({len(rows)} files, every checksum right)")
        return dest
    if dest.exists():
        raise FetchError(f"{dest} exists but does not match {spec.name}'s checksum list; move it away and fetch again")
    partial = to / f".{spec.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if spec.shipped_as == "archive":
            say(f"{spec.name}: downloading {spec.url}")
            members = _archive_members(read(spec.url), spec.url)
            get = lambda row: members.get(Path(row["member"]).name)  # noqa: E731
        else:
            say(f"{spec.name}: downloading {len(rows)} files from {spec.url}")
            members = {}
            get = lambda row: read(f"{spec.url.rstrip('/')}/{row['member']}")  # noqa: E731
        bad = []
        for row in rows:
            data = get(row)
            if data is None:
                bad.append(f"{row['member']} (missing)")
                continue
            if hashlib.md5(data).hexdigest() != row["md5"]:  # noqa: S324 - a checksum, not security
                bad.append(f"{row['member']} (checksum differs)")
                continue
            target = partial / row["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if bad:
            raise FetchError(f"{spec.name}: {len(bad)} of {len(rows)} files did not check: {', '.join(bad[:5])}"
                             + (" ..." if len(bad) > 5 else "") + "; nothing was written")
        extras = 0
        if spec.extra_suffix:
            for name, data in members.items():
                if name.lower().endswith(spec.extra_suffix):
                    (partial / spec.extra_suffix.strip(".")).mkdir(parents=True, exist_ok=True)
                    (partial / spec.extra_suffix.strip(".") / name).write_bytes(data)
                    extras += 1
        with (partial / "manifest.csv").open("w", newline="") as f:
            columns = [c for c in rows[0] if c != "member"]
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        partial.replace(dest)  # one rename: the data set appears whole or not at all
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["label"] or "unlabelled"] = counts.get(row["label"] or "unlabelled", 0) + 1
    say(f"{spec.name}: wrote {dest}: " + ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
        + (f", {extras} case files in xml/" if extras else "") + f"; every file checked (md5). Cite: {spec.citation or spec.home}")
    return dest


def _md5_file(path: Path) -> str | None:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None  # noqa: S324


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thyroid_classifier.datasets",
                                     description="Fetch the public data sets the public model is trained on, checked, laid out for train.py.")
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("fetch", help="download, check and lay out data sets")
    get.add_argument("names", nargs="+", choices=sorted(REGISTRY))
    get.add_argument("--to", type=Path, default=Path("data"), help="parent folder (default: data/); each set goes in its own folder")
    for name in REGISTRY:
        get.add_argument(f"--{name}_url", default=None, help=f"another address for {name} (a mirror; default {REGISTRY[name].url})")
    args = parser.parse_args(argv)
    args.to.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        spec = REGISTRY[name]
        url = getattr(args, f"{name}_url")
        if url:
            spec = PublicDataSet(**{**spec.__dict__, "url": url})
        try:
            fetch(spec, args.to)
        except FetchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print("train on them: python train.py --data_dir " + " ".join(str(args.to / n / "images") for n in args.names) + " ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
