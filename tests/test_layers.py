"""The package's layers (pyproject.toml's import-linter contracts) hold, and a planted upward import
or circle breaks them: the contract can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")


def lint(src: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``src`` (first on the path), with the repository's contracts."""
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(src), "HOME": str(tmp_path)}
    return subprocess.run([LINT, "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[dev]')")


def test_the_layers_hold(tmp_path):
    result = lint(REPO / "src", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, planted, broken", [
    # the registry (base) asking the Predictor (model layer): an upward import, and a circle (predict imports models)
    ("models.py", "\n\ndef _planted():\n    from .predict import Predictor  # noqa: F401\n", ("Layers", "No import circles")),
    # the folder's writer importing the training job
    ("folder.py", "\n\ndef _planted():\n    from .training import run  # noqa: F401\n", ("Layers",)),
    # the pipeline code a model folder ships, importing the package
    ("answer_rule.py", "\n\ndef _planted():\n    from .metrics import softmax  # noqa: F401\n", ("Shipped folder code stands alone",)),
])
def test_a_planted_upward_import_breaks_the_build(tmp_path, module, planted, broken):
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "thyroid_classifier", src / "thyroid_classifier", ignore=shutil.ignore_patterns("__pycache__", "*.pyi"))
    with (src / "thyroid_classifier" / module).open("a") as f:
        f.write(planted)
    result = lint(src, tmp_path)
    assert result.returncode != 0
    for name in broken:
        assert any(name in line and "BROKEN" in line for line in result.stdout.splitlines()), result.stdout
