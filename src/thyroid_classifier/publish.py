"""Hub I/O for a model folder and a data set: the publishable files staged (local paths removed), the
repository checked writable before any work, one commit per push, a Hub data set downloaded once.
The command line is :mod:`hub`; the card is rendered by :mod:`card`, the files named by :mod:`folder_files`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .folder_files import METRICS, PUSH_FILES, PUSH_PATTERNS
from .locations import HubUnreachableError, _offline, is_local

logger = logging.getLogger(__name__)

#: Where --dataset_name writes a Hub dataset out as class folders ($THYROID_DATASETS_CACHE overrides).
DATASETS_CACHE = Path.home() / ".cache" / "thyroid_classifier" / "datasets"
_SPLITS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation", "test": "test"}


def dataset_folder(name: str, cache: Path | None = None) -> Path:
    """A Hub image-classification dataset as the folder layout every command reads,
    ``CACHE/<owner--name>/<split>/<class>/<index>.png`` (written once; file names are row numbers).

    Needs an image column and a ``ClassLabel`` column. Offline, or when the dataset cannot be loaded,
    raises :class:`HubUnreachableError` saying so (nothing is trained)."""
    from datasets import ClassLabel, Image as ImageFeature, load_dataset

    dest = Path(cache or os.environ.get("THYROID_DATASETS_CACHE") or DATASETS_CACHE) / name.replace("/", "--")
    if (dest / ".complete").is_file():
        return dest
    try:
        dataset = load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - offline, no such dataset, no access: one clear line
        reason = "HF_HUB_OFFLINE is set" if _offline() else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        raise HubUnreachableError(f"--dataset_name {name}: cannot load it from the Hugging Face Hub ({reason}). Nothing was trained. "
                                  "Pass --data_dir with a local folder of class sub-folders instead.") from None
    for split, part in dataset.items():
        image_col = next((c for c, f in part.features.items() if isinstance(f, ImageFeature)), None)
        label_col = next((c for c, f in part.features.items() if isinstance(f, ClassLabel)), None)
        if image_col is None or label_col is None:
            raise ValueError(f"--dataset_name {name}: split {split!r} needs an image column and a ClassLabel column (has {dict(part.features)})")
        if split not in _SPLITS:
            raise ValueError(f"--dataset_name {name}: split {split!r} is not one of train, validation, test")
        names = part.features[label_col].names
        for i, row in enumerate(part):
            out = dest / _SPLITS[split] / names[row[label_col]] / f"{split}-{i:06d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            row[image_col].save(out)
    (dest / ".complete").write_text(name + "\n")
    return dest


# --------------------------------------------------------------------------------------------
# Pushing


def files_to_push(folder: str | Path) -> list[str]:
    folder = Path(folder)
    names = {name for name in PUSH_FILES if (folder / name).is_file()}
    for pattern in PUSH_PATTERNS:
        names |= {p.name for p in folder.glob(pattern) if p.is_file()}
    return sorted(names)


def _public_metrics(metrics: dict) -> dict:
    """metrics.json without local paths (user names, hospital folder names)."""
    clean = json.loads(json.dumps(metrics))
    if "data_dir" in clean.get("data", {}):
        clean["data"]["data_dir"] = " + ".join(Path(d).name for d in clean["data"]["data_dir"].split(" + "))
    for facts in (clean.get("data", {}).get("sources") or {}).values():
        facts["data_dir"] = Path(facts.get("data_dir", "")).name
    training = clean.get("training", {})
    if training.get("best_checkpoint"):
        training["best_checkpoint"] = Path(training["best_checkpoint"]).name
    if is_local(clean.get("checkpoint", "")):
        clean["checkpoint"] = Path(clean["checkpoint"]).name
    return clean


def stage_publishable(folder: Path, dest: Path) -> list[str]:
    """Copy a model folder's publishable files (:func:`files_to_push`) into ``dest``, ``metrics.json``
    without local paths; returns their names."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    names = files_to_push(folder)
    for name in names:
        if name == METRICS:
            (dest / name).write_text(json.dumps(_public_metrics(json.loads((folder / name).read_text())), indent=2) + "\n")
        else:
            shutil.copy2(folder / name, dest / name)
    return names


def check_push_access(repo_id: str, private: bool = False, api=None, repo_type: str = "model", nothing_done: str = "Nothing was trained.") -> None:
    """Before any training time is spent: the Hub is reachable, the token is valid, the repository
    exists (created now if need be, ``private`` as asked; a Space with the gradio SDK) and the token can write to it."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    if _offline():
        raise HubUnreachableError(f"--push_to_hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be pushed. Unset it, or train without --push_to_hub and push later with `python -m thyroid_classifier.hub push FOLDER {repo_id}`.")
    step = "log in"
    try:
        api.whoami()
        step = "create the repository"
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, **({"space_sdk": "gradio"} if repo_type == "space" else {}))
        step = "check write access"
        api.auth_check(repo_id, repo_type=repo_type, write=True)
    except Exception as exc:  # noqa: BLE001 - network down, no / invalid token, no write access
        reason = type(exc).__name__
        text = str(exc).lower()
        hint = ("log in with `hf auth login` or set HF_TOKEN (a token with write access)" if "401" in text or "403" in text or "token" in text
                or step != "log in" else "check the network")
        raise HubUnreachableError(f"--push_to_hub {repo_id}: cannot {step} on the Hugging Face Hub ({reason}); {hint}. {nothing_done}") from None


def push_folder(folder: str | Path, repo_id: str, private: bool = False, api=None) -> list[str]:
    """Upload a trained model's publishable files to ``repo_id``; returns the uploaded file names.

    The token comes from ``HF_TOKEN`` or the saved login (never an argument that could be logged).
    The local folder is never modified except for (re)writing its card.
    """
    import tempfile

    from huggingface_hub import HfApi

    api = api or HfApi()
    folder = Path(folder)
    from .card import write_card

    write_card(folder, repo_id)
    with tempfile.TemporaryDirectory(prefix="thyroid-push-") as staging:
        names = stage_publishable(folder, Path(staging))
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # One commit: these files, and every other file of an earlier push removed (.gitattributes is kept).
        api.upload_folder(folder_path=staging, repo_id=repo_id, repo_type="model", commit_message="Upload thyroid-classifier model",
                          delete_patterns="*")
    logger.info("pushed %d files of %s to %s", len(names), folder, repo_id)
    return names
