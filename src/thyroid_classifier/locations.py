"""Where a model or data set lives: a local folder, or a Hugging Face Hub id; and whether the Hub can
be reached for it, checked fast and said plainly (a base module: the registry, the Predictor and the
training job ask it; it imports nothing of the package)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


class HubUnreachableError(RuntimeError):
    """The Hub cannot be reached and the file is not in the local cache."""


def is_local(name_or_path: str | os.PathLike) -> bool:
    return Path(name_or_path).expanduser().is_dir()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def is_cached(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def check_hub_model(repo_id: str, *, what_to_do: str = "", timeout: float = 10.0) -> bool:
    """Make sure ``repo_id`` can be loaded: reachable on the Hub, or already in the local cache.

    Returns ``True`` when only the cache can serve it (load with ``local_files_only=True``). Raises
    :class:`HubUnreachableError` at once otherwise, instead of the ~45 s of retries a plain
    ``from_pretrained`` spends before failing.
    """
    cached = is_cached(repo_id)
    reason = "HF_HUB_OFFLINE is set"
    if not _offline():
        from huggingface_hub import HfApi

        try:
            HfApi().model_info(repo_id, timeout=timeout)
            return False
        except Exception as exc:  # noqa: BLE001 - every failure means "not reachable now"
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    if cached:
        logger.warning("Hub unreachable (%s); using the cached copy of %s", reason, repo_id)
        return True
    raise HubUnreachableError(
        f"Cannot download '{repo_id}' from the Hugging Face Hub ({reason}), and it is not in the "
        f"local cache. {what_to_do}".strip()
    )


def hub_snapshot(repo_id: str, patterns: list[str], local_only: bool) -> Path:
    """The local snapshot folder of the files of ``repo_id`` that match ``patterns`` (downloaded, or
    from the cache when ``local_only``)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=list(patterns), local_files_only=local_only))
