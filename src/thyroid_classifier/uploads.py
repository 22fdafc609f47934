"""The files the app writes and deletes: uploads deleted some seconds after they are read, images
shown back written into gradio's cache atomically, file names made fit to show. (The page is
:mod:`app`; this is its file handling, apart from what the page says.)"""

from __future__ import annotations

import atexit
import heapq
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def safe_name(name: str) -> str:
    """A file name fit to show in a message: no markup, no control characters, not too long."""
    cleaned = "".join(c if c.isalnum() or c in "._- ()" else "_" for c in name)
    return cleaned[:80] or "upload"


def cache_image(array: np.ndarray, cache_dir: str, format: str = "jpeg") -> str:
    """``array`` encoded and written into gradio's cache as gradio names it (a folder per content,
    hashed with gradio's seed), but atomically: written aside, then renamed into place.

    gradio rewrites a cached image in place, so when two requests show the same picture (an
    example, or one frame sent twice) a page fetching the first copy could get an empty body while
    the second is written (seen under load: "peer closed connection", 1 fetch in 200)."""
    import tempfile

    from gradio import processing_utils
    from PIL import Image

    data = processing_utils.encode_pil_to_bytes(Image.fromarray(array), format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"image.{format}"
    fd, temporary = tempfile.mkstemp(dir=folder, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, target)  # a new file: a reader of the old one reads it whole
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return str(target.resolve())


class UploadJanitor:
    """Deletes uploads some seconds after they are read, from one background thread.

    Not at once: gradio stores uploads by content hash, so identical uploads share one path, and
    each new upload renames a new file onto it. A file is deleted only if it is still the one that
    was read (same inode and change time: inode numbers alone are reused)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._heap: list[tuple[float, str, tuple[int, int]]] = []  # (due time, path, signature)
        self._wake = threading.Condition()
        threading.Thread(target=self._run, name="upload-janitor", daemon=True).start()

    def forget_later(self, path: str, st: os.stat_result | None = None) -> None:
        """Delete ``path`` after the delay if it is still the file ``st`` describes (default: the one there now)."""
        if st is None:
            try:
                st = os.stat(path)
            except OSError:
                return
        with self._wake:
            heapq.heappush(self._heap, (time.monotonic() + self.delay, path, (st.st_ino, st.st_ctime_ns)))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(timeout=None if not self._heap else self._heap[0][0] - time.monotonic())
                _, path, signature = heapq.heappop(self._heap)
            try:
                st = os.stat(path)
                if (st.st_ino, st.st_ctime_ns) == signature:
                    os.remove(path)
            except OSError:
                pass


def private_file_folder() -> str:
    """A folder of this server's own for every file gradio writes and serves (uploads, images shown
    back), unless ``GRADIO_TEMP_DIR`` is set: created now, readable by this user only, removed when the
    process exits. Without it gradio uses the host-wide ``/tmp/gradio``, shared by every gradio
    process, and its file route serves what another process wrote there. Set before the page is built
    and launched (gradio reads it then)."""
    if os.environ.get("GRADIO_TEMP_DIR"):
        return os.environ["GRADIO_TEMP_DIR"]
    folder = tempfile.mkdtemp(prefix="thyroid-app-")  # mode 0700
    os.environ["GRADIO_TEMP_DIR"] = folder
    atexit.register(shutil.rmtree, folder, True)
    return folder
