"""The public data sets the project knows by name, and DDTI's own conventions, in one place:
names and citations for the card, DDTI's ``<case>_<frame>`` file names and its outline XML."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

#: ``<case>_<frame>.ext`` (DDTI's naming): everything before the last ``_<digits>`` is the case.
CASE_FRAME_PATTERN = r"^(?P<group>.+?)_(?P<frame>\d+)$"

DDTI_CITATION = (
    "Pedraza L, Vargas C, Narváez F, Durán O, Muñoz E, Romero E. An open access thyroid ultrasound-image "
    "database. Proc. SPIE 9287, 10th International Symposium on Medical Information Processing and Analysis "
    "(2015). doi:10.1117/12.2073532"
)
#: Data sets the card recognises from their folder name, to name and cite them.
KNOWN_DATASETS = {
    "ddti": {"name": "DDTI (Digital Database of Thyroid Ultrasound Images)", "type": "ddti", "citation": DDTI_CITATION, "tirads_labels": True},
    "les3bdd": {"name": "LES3BDD (three merged public collections)", "type": "les3bdd", "citation": None, "tirads_labels": False},
}


def sources_facts(folders: dict[str, str]) -> dict:
    """:func:`dataset_facts` of one folder, or of several sources together (names joined; TI-RADS
    labels only when every source's are)."""
    if len(folders) <= 1:
        return dataset_facts(next(iter(folders.values()), ""))
    each = [dataset_facts(folder) for folder in folders.values()]
    citations = [f["citation"] for f in each if f.get("citation")]
    return {"name": " + ".join(f["name"] for f in each), "type": "+".join(f["type"] for f in each),
            "citation": " ".join(citations) or None, "tirads_labels": all(f["tirads_labels"] for f in each)}


def dataset_facts(data_dir: str) -> dict:
    """Name, slug, citation and label provenance of a data folder (recorded in metrics.json at training)."""
    from .sample import SYNTHETIC_MARKER

    parts = [p.lower() for p in Path(data_dir).parts]
    for key, facts in KNOWN_DATASETS.items():
        if key in parts:
            return facts
    name = Path(data_dir).name
    if (Path(data_dir) / SYNTHETIC_MARKER).is_file():
        return {"name": "the built-in SYNTHETIC sample (not real patients)", "type": "synthetic-sample", "citation": None, "tirads_labels": False}
    return {"name": name, "type": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "images", "citation": None, "tirads_labels": False}



def frame_number(path: str | Path) -> tuple[str, int] | None:
    """``"100_2.jpg"`` → ``("100", 2)``; None when the name is not ``<case>_<frame>``."""
    match = re.match(CASE_FRAME_PATTERN, Path(path).stem)
    return (match.group("group"), int(match.group("frame"))) if match else None


def ddti_outlines(xml_path: str | Path) -> dict[int, list[list[tuple[float, float]]]]:
    """``{frame number: [polygon, ...]}`` from one DDTI case file (pixel coordinates); frames whose
    outline cannot be parsed are left out."""
    root = ET.parse(xml_path).getroot()
    out: dict[int, list[list[tuple[float, float]]]] = {}
    for mark in root.iter("mark"):
        frame = int((mark.findtext("image") or "0").strip() or 0)
        svg = (mark.findtext("svg") or "").strip()
        if not svg:
            continue
        try:
            regions = json.loads(svg)
        except json.JSONDecodeError:
            continue  # a few DDTI outlines are cut-off JSON: that frame has no usable outline
        polygons = [[(p["x"], p["y"]) for p in region.get("points", [])] for region in regions]
        out.setdefault(frame, []).extend(p for p in polygons if len(p) >= 3)
    return out


def frame_outline(path: str | Path, xml_dir: str | Path) -> list[list[tuple[float, float]]] | None:
    """The radiologist's outline polygons of one ``<case>_<frame>`` image from ``xml_dir/<case>.xml``;
    None when the name has no frame number, the case has no file, or the frame no outline."""
    key = frame_number(path)
    xml = Path(xml_dir) / f"{key[0]}.xml" if key else None
    if xml is None or not xml.is_file():
        return None
    return ddti_outlines(xml).get(key[1]) or None



def outline_box(polygons: list[list[tuple[float, float]]]) -> tuple[float, float, float, float]:
    """The box (left, top, right, bottom) around a frame's outline polygons: the nodule the radiologist drew."""
    xs = [x for polygon in polygons for x, _ in polygon]
    ys = [y for polygon in polygons for _, y in polygon]
    return (min(xs), min(ys), max(xs) + 1, max(ys) + 1)


# --------------------------------------------------------------------------------------------
# DDTI's TI-RADS descriptors: the labels the descriptor heads learn (thyroid_classifier.descriptors)

#: The four descriptors DDTI's case files hold, by XML tag (echogenic foci are DDTI's "calcifications").
DESCRIPTORS = ("composition", "echogenicity", "margins", "calcifications")
#: DDTI's words (normalised: :func:`normalise_descriptor`) → the ACR TI-RADS lexicon's term and its points
#: (Tessler et al., J Am Coll Radiol 2017). None: a word of DDTI's the ACR lexicon does not define
#: (kept as DDTI wrote it; missing for anything that needs the ACR term). Where DDTI's vocabulary differs:
#: "predominantly solid" and "predominantly cystic" are both ACR's "mixed cystic and solid"; "well defined"
#: and "well defined smooth" are both "smooth"; micro- and macrolobulated and spiculated margins are all
#: "lobulated or irregular"; DDTI has no "extrathyroidal extension", no "anechoic", no rim or comet-tail foci.
ACR_LEXICON: dict[str, dict[str, tuple[str, int] | None]] = {
    "composition": {
        "cystic": ("cystic or almost completely cystic", 0), "spongiform": ("spongiform", 0),
        "predominantly cystic": ("mixed cystic and solid", 1), "predominantly solid": ("mixed cystic and solid", 1),
        "solid": ("solid or almost completely solid", 2), "dense": None,
    },
    "echogenicity": {
        "isoechogenicity": ("hyperechoic or isoechoic", 1), "hyperechogenicity": ("hyperechoic or isoechoic", 1),
        "hypoechogenicity": ("hypoechoic", 2), "marked hypoechogenicity": ("very hypoechoic", 3),
    },
    "margins": {
        "well defined": ("smooth", 0), "well defined smooth": ("smooth", 0), "ill defined": ("ill-defined", 0),
        "microlobulated": ("lobulated or irregular", 2), "macrolobulated": ("lobulated or irregular", 2),
        "spiculated": ("lobulated or irregular", 2),
    },
    "calcifications": {
        "none": ("none or large comet-tail artifacts", 0), "macrocalcifications": ("macrocalcifications", 1),
        "microcalcifications": ("punctate echogenic foci", 3),
    },
}
_SPELLINGS = {"non": "none", "no": "none", "microcalcification": "microcalcifications", "macrocalcification": "macrocalcifications"}


def normalise_descriptor(word: str | None) -> str | None:
    """One spelling per word: lower case, single spaces, "ill- defined" → "ill defined", singular
    calcification → plural, "non" → "none"; empty → None (missing, never a class)."""
    if word is None:
        return None
    text = re.sub(r"\s+", " ", re.sub(r"-\s*", " ", word.strip().lower())).strip()
    return _SPELLINGS.get(text, text) or None


def ddti_descriptors(xml_path: str | Path) -> dict[str, str | None]:
    """The radiologist's descriptors of one DDTI case, normalised (None: not given)."""
    root = ET.parse(xml_path).getroot()
    return {name: normalise_descriptor(root.findtext(name)) for name in DESCRIPTORS}


def acr_terms(descriptors: dict[str, str | None]) -> dict[str, tuple[str, int] | None]:
    """Each descriptor as the ACR lexicon's term and points; None when missing or not an ACR term.
    A word this table does not know raises: a new spelling must be added, never guessed."""
    out: dict[str, tuple[str, int] | None] = {}
    for name, word in descriptors.items():
        if word is None:
            out[name] = None
            continue
        if word not in ACR_LEXICON[name]:
            raise ValueError(f"{name}: {word!r} is not a known DDTI word (known: {', '.join(ACR_LEXICON[name])})")
        out[name] = ACR_LEXICON[name][word]
    return out


def case_files(data_dir: str | Path) -> Path | None:
    """The folder of DDTI's case files (``xml/``) for a DDTI data folder (``ddti/images`` or ``ddti``), else None:
    only DDTI's layout is known to hold a radiologist's descriptors."""
    if dataset_facts(str(data_dir)).get("type") != "ddti":
        return None
    folder = Path(data_dir).expanduser().resolve()
    for candidate in (folder / "xml", folder.parent / "xml", folder.parent.parent / "xml"):
        if candidate.is_dir():
            return candidate
    return None


def frame_descriptors(path: str | Path, xml_dir: str | Path) -> dict[str, str | None] | None:
    """The descriptors of one ``<case>_<frame>`` image (its case's), or None when it has no case file."""
    key = frame_number(path)
    xml = Path(xml_dir) / f"{key[0]}.xml" if key else None
    if xml is None or not xml.is_file():
        return None
    return ddti_descriptors(xml)
