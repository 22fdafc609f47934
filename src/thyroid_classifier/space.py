"""A ready Hugging Face Space (gradio SDK) for one trained model.

    python -m thyroid_classifier.hub space MODEL OUT_DIR [--push SPACE_ID] [--private]

writes ``OUT_DIR`` with

- ``README.md``: the Space's front matter (``sdk: gradio``, the ``sdk_version`` installed here,
  ``app_file: app.py``, ``models:`` when MODEL is a Hub id) and what the page is for;
- ``app.py``: the project's page with its module-level ``demo`` (what a Space runs), the model from
  ``$MODEL_ID`` or MODEL;
- ``requirements.txt``: this package's runtime requirements, as its metadata declares them;
- ``thyroid_classifier/``: the package itself, so the Space needs nothing that is not on PyPI;
- ``model/``: a local MODEL folder's publishable files (as a push uploads them; never checkpoints,
  audit or per-image predictions). A Hub id is downloaded by the Space when it starts instead.

The folder runs as is: ``cd OUT_DIR && python app.py`` serves the page on 127.0.0.1 (a Space sets
``GRADIO_SERVER_NAME=0.0.0.0`` itself). ``--push`` creates the Space (gradio SDK), checks write access,
and uploads the folder in one commit that also removes files of an earlier upload.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from .folder import ModelFolder
from .locations import is_local
from .publish import check_push_access, stage_publishable

logger = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
LOCAL_MODEL = "model"  # a local model's folder inside the Space

APP = '''"""Hugging Face Space: a thyroid ultrasound classifier with Grad-CAM (research use only, not a diagnosis).
Written by `python -m thyroid_classifier.hub space`; the model comes from $MODEL_ID, else {model!r}."""

import os

os.environ.setdefault("MODEL_ID", {model!r})

from thyroid_classifier.app import main, module_demo  # noqa: E402 - after MODEL_ID

if __name__ == "__main__":
    raise SystemExit(main())

demo = module_demo()
'''

README = """---
title: {title}
emoji: 🩻
colorFrom: gray
colorTo: blue
sdk: gradio
sdk_version: {sdk_version}
app_file: app.py
pinned: false
license: apache-2.0
short_description: Thyroid ultrasound classifier with Grad-CAM (research only)
{models}---

# {title}

Upload a grey-scale B-mode thyroid ultrasound frame: the page shows the model's probabilities for
{labels}, a Grad-CAM heatmap of where it looked, and says when the answer is not reliable (an image
unlike the training images, or a prediction set of several classes).

**Research software, not a diagnostic device.** The model's numbers, how they were measured and its
limits are in its model card{card}. Uploads are deleted from the Space's disk within two minutes.

Made with thyroid-classifier (`python -m thyroid_classifier.hub space`).
"""


def requirements() -> list[str]:
    """This package's runtime requirements (its installed metadata; extras left out)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        declared = requires("thyroid-classifier") or []
    except PackageNotFoundError as exc:
        raise RuntimeError("thyroid-classifier is not installed (pip install -e .): its requirements are read from its metadata") from exc
    return [r for r in declared if "extra ==" not in r]


def write_space(model: str, out_dir: str | Path) -> list[str]:
    """Write the Space folder for ``model`` (a folder written by train.py, or a Hub id); returns its files."""
    import gradio

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: give a new folder for the Space")
    out.mkdir(parents=True, exist_ok=True)
    local = is_local(model)
    if local:
        folder = Path(model)
        metrics = ModelFolder(folder).metrics()
        if "labels" not in metrics:
            raise FileNotFoundError(f"{folder} is not a model folder written by train.py (no metrics)")
        stage_publishable(folder, out / LOCAL_MODEL)
        labels = metrics["labels"]
        model_id, name = LOCAL_MODEL, folder.name
    else:
        labels, model_id, name = ["its classes"], model, model.split("/")[-1]
    (out / "app.py").write_text(APP.format(model=model_id))
    (out / "requirements.txt").write_text("\n".join(requirements()) + "\n")
    shutil.copytree(PACKAGE, out / "thyroid_classifier", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyi"))
    title = re.sub(r"[^A-Za-z0-9 ._-]+", " ", f"Thyroid classifier {name}").strip()[:60]
    (out / "README.md").write_text(README.format(
        title=title, sdk_version=gradio.__version__, models="" if local else f"models:\n- {model}\n",
        labels=", ".join(f"`{label}`" for label in labels),
        card=f" (`{LOCAL_MODEL}/README.md`)" if local else f" ([{model}](https://huggingface.co/{model}))"))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    logger.info("wrote the Space folder %s (%d files)", out, len(files))
    return files


def push_space(out_dir: str | Path, space_id: str, private: bool = False, api=None) -> None:
    """Create the Space (gradio SDK) if need be, check write access, upload the folder in one commit."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    check_push_access(space_id, private=private, api=api, repo_type="space", nothing_done="Nothing was uploaded.")
    api.upload_folder(folder_path=str(out_dir), repo_id=space_id, repo_type="space", commit_message="Upload thyroid-classifier Space",
                      delete_patterns="*")
