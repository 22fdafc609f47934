"""DDTI's TI-RADS descriptors as labels (issue 30, part 1): parsed once, one spelling per word, mapped to
the ACR lexicon where it defines the word, missing kept missing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from thyroid_classifier.known_data import ACR_LEXICON, DESCRIPTORS, acr_terms, ddti_descriptors, frame_descriptors, normalise_descriptor

CASE = """<case><number>{n}</number><composition>{c}</composition><echogenicity>{e}</echogenicity>
<margins>{m}</margins><calcifications>{k}</calcifications><tirads>4a</tirads></case>"""


def test_spellings_are_normalised_and_empty_is_missing(tmp_path: Path):
    xml = tmp_path / "7.xml"
    xml.write_text(CASE.format(n=7, c="Predominantly  solid", e="", m="ill- defined", k="microcalcification"))
    words = ddti_descriptors(xml)
    assert words == {"composition": "predominantly solid", "echogenicity": None, "margins": "ill defined", "calcifications": "microcalcifications"}
    assert acr_terms(words) == {"composition": ("mixed cystic and solid", 1), "echogenicity": None, "margins": ("ill-defined", 0),
                                "calcifications": ("punctate echogenic foci", 3)}
    assert normalise_descriptor("non") == "none" and normalise_descriptor("  ") is None and normalise_descriptor(None) is None
    assert frame_descriptors(tmp_path / "7_2.png", tmp_path) == words  # a frame takes its case's descriptors
    assert frame_descriptors(tmp_path / "8_1.png", tmp_path) is None and frame_descriptors(tmp_path / "odd.png", tmp_path) is None
    xml.write_text(CASE.format(n=7, c="solid", e="anechoic", m="", k=""))
    with pytest.raises(ValueError, match="echogenicity: 'anechoic' is not a known DDTI word"):
        acr_terms(ddti_descriptors(xml))  # a new word is added to the table, never guessed


def test_every_word_in_ddtis_case_files_is_known(ddti_dir: Path):
    """All of DDTI's case files parse; each descriptor's words are in the table (ACR term or DDTI-only)."""
    xml_dir = ddti_dir / "xml"
    files = sorted(xml_dir.glob("*.xml"))
    assert len(files) > 300
    counts = {name: Counter() for name in DESCRIPTORS}
    for xml in files:
        words = ddti_descriptors(xml)
        acr_terms(words)  # raises on an unknown word
        for name, word in words.items():
            counts[name][word] += 1
    given = {name: sum(n for w, n in c.items() if w is not None) for name, c in counts.items()}
    assert all(given[name] >= 150 for name in DESCRIPTORS), given  # ~200 composition and echogenicity, ~300 margins and foci
    assert set(counts["calcifications"]) - {None} == set(ACR_LEXICON["calcifications"])  # micro/macro and none, both spellings merged
    assert counts["margins"]["ill defined"] >= 30  # "ill defined" and "ill- defined" together
