"""Canonical label names and folder-name normalisation.

This is the one list of labels in the project. Every other module gets its labels from the
dataset's ``ClassLabel`` (built here from folder names), never from a list of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: The three seed classes, in clinical order (least to most concerning). Label ids follow this
#: order, so ``malignant`` is always the last of the three when present.
SEED_LABELS: tuple[str, ...] = ("normal", "benign", "malignant")

# Spellings seen in public thyroid datasets (Kaggle folders, the reference paper's layout, Spanish
# abbreviations of DDTI-derived sets). Keys are compared after `_key`.
_ALIASES: dict[str, str] = {
    "normal": "normal",
    "normal thyroid": "normal",
    "normal thyroid gland": "normal",
    "benign": "benign",
    "benin": "benign",
    "benigno": "benign",
    "benign nodule": "benign",
    "malignant": "malignant",
    "malin": "malignant",
    "maligno": "malignant",
    "malignant nodule": "malignant",
}


def _key(name: str) -> str:
    """Case-, space- and separator-insensitive form of a folder name."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def normalize_label(name: str) -> str:
    """Map a class folder name to its canonical label.

    ``"normal thyroid"``/``"Normal"`` → ``normal``, ``"Benign"``/``"benin"`` → ``benign``,
    ``"Malignant"``/``"malin"`` → ``malignant``. Any other name is kept (stripped), so any label set
    of two or more classes works.
    """
    if not name or not name.strip():
        raise ValueError("empty class folder name")
    return _ALIASES.get(_key(name), name.strip())


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Order canonical labels: seed classes in clinical order first, then the rest alphabetically."""
    unique = set(labels)
    seeds = [label for label in SEED_LABELS if label in unique]
    return seeds + sorted(unique - set(SEED_LABELS))


def canonical_label_names(folder_names: Iterable[str]) -> list[str]:
    """The sorted canonical label set for a collection of raw folder names."""
    return sort_labels(normalize_label(name) for name in folder_names)
