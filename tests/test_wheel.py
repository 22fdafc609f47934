"""The wheel a user installs holds everything the package reads at run time (the card template, the
pipeline processor's code), and an installed (non-editable) copy renders a card."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_holds_the_package_data_and_an_installed_copy_renders_a_card(short_run, tmp_path):
    source = tmp_path / "source"  # a clean copy: the build writes build/ and egg-info beside the sources
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyi", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    # No index needed: the dev extra installs the build backend into the environment.
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("thyroid_classifier-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("thyroid_classifier/model_card.md", "thyroid_classifier/ultrasound_processor.py", "thyroid_classifier/ultrasound_crop.py",
                   "thyroid_classifier/answer_rule.py", "thyroid_classifier/thyroid_pipeline.py", "thyroid_classifier/data_sets/ddti.csv",
                   "thyroid_classifier/data_sets/les3bdd.csv"):
        assert needed in names, needed

    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    folder = shutil.copytree(short_run[0] / "tiny-resnet", tmp_path / "model", ignore=shutil.ignore_patterns("checkpoints"))
    (folder / "README.md").unlink()
    code = ("import sys, thyroid_classifier, thyroid_classifier.card as c; assert thyroid_classifier.__file__.startswith(sys.argv[2]), "
            "thyroid_classifier.__file__; print(c.write_card(sys.argv[1]))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code, str(folder), str(target)], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    assert "## How to use" in (folder / "README.md").read_text()
