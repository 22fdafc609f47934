"""The app's model threads: every model call on a few fixed threads, and predictions that wait batched.

Two reasons, both measured on a 2-core CPU (docs/app.md, "Speed"):

- torch's CPU thread pool (OpenMP) belongs to the thread that calls into it. gradio runs each event
  on a worker thread of its own choosing; once a second thread had used torch, every later forward
  pass ran up to 1.8x slower for the life of the process. So models are loaded and run only here.
- A request that arrives while the model is busy waits anyway; when the model is free, everything
  that waits goes through it as one batch (a 224-px ResNet50 with Grad-CAM: 133 ms for one image,
  ~105 ms an image for two to eight). A request alone never waits for company.

A burst of batches leaves the server's allocator holding a few hundred MiB it no longer uses (gradio's
worker threads and the model thread each keep their own malloc arenas); once the model has been idle
for :data:`GIVE_BACK_AFTER` seconds after a batch, that memory is returned to the system
(:func:`release_free_memory`). Lone requests never trigger it: they would pay the page faults again.
"""

from __future__ import annotations

import ctypes
import functools
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

#: Requests one forward pass may serve at most: everyone who waits, for up to 8 people at once (a
#: cap below that makes some wait two passes). 224-px ResNet50 with Grad-CAM on this 2-core CPU:
#: 133 ms for one image, ~105 ms an image for 2 to 8; a burst of batches of 8 raises the server's
#: memory by ~250-430 MiB while it lasts (given back after it: GIVE_BACK_AFTER).
MAX_BATCH = 8
#: Seconds of idleness after a pass of several requests before freed memory goes back to the system
#: (under steady load the model is never idle this long, so the trim costs nothing there).
GIVE_BACK_AFTER = 1.0


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the memory that every malloc arena holds but no longer uses to the system (glibc's
    ``malloc_trim(0)``, about 1 ms); whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@dataclass
class _Call:
    """Any callable to run on a model thread (loading a model, for one)."""

    fn: Callable[..., Any]
    args: tuple
    future: Future = field(default_factory=Future)


@dataclass
class _Prediction:
    """One image for one predictor's ``predict`` (the rest of its keyword arguments: ``kwargs``)."""

    predictor: Any
    image: Any
    kwargs: dict
    future: Future = field(default_factory=Future)


class ModelRunner:
    """``workers`` fixed threads that run every model call; each pass of a thread takes everything
    that waits (up to ``max_batch`` requests) and gives each predictor's images one ``predict`` call.

    ``run(load_predictors, names)`` loads on a model thread; ``predict(predictor, image)`` blocks
    until that image's :class:`~thyroid_classifier.predict.Prediction` is ready. Images of one batch
    never affect each other's results (the models are in eval mode); an image whose batch fails is
    retried alone, so one bad image fails only its own request."""

    def __init__(self, workers: int = 1, max_batch: int = MAX_BATCH, give_back_after: float = GIVE_BACK_AFTER) -> None:
        if workers < 1 or max_batch < 1:
            raise ValueError(f"workers and max_batch must be at least 1 (got {workers}, {max_batch})")
        if not give_back_after > 0:  # a negative timeout would kill the model thread at its first idle moment
            raise ValueError(f"give_back_after must be a positive number of seconds (got {give_back_after})")
        self.workers = workers
        self.max_batch = max_batch
        self.give_back_after = give_back_after
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        #: the sizes of the last 1000 batches, in order (for tests and benchmarks; bounded: a server runs for months)
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        for i in range(workers):
            threading.Thread(target=self._work, name=f"models-{i}", daemon=True).start()

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a model thread; its result, or its exception raised here."""
        job = _Call(fn, args)
        self._queue.put(job)
        return job.future.result()

    def predict(self, predictor: Any, image: Any, **kwargs: Any) -> Any:
        """``predictor.predict([image], **kwargs)[0]``, batched with whatever else waits."""
        job = _Prediction(predictor, image, kwargs)
        self._queue.put(job)
        return job.future.result()

    def _work(self) -> None:
        batched = False  # a pass of several requests since memory was last given back
        while True:
            try:  # wait for work; then take whatever else already waits
                jobs = [self._queue.get(timeout=self.give_back_after if batched else None)]
            except queue.Empty:  # idle after a burst: give its memory back
                release_free_memory()
                batched = False
                continue
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            groups: list[list[_Prediction]] = []
            for job in jobs:
                if isinstance(job, _Call):
                    try:
                        job.future.set_result(job.fn(*job.args))
                    except BaseException as exc:  # noqa: BLE001 - raised again in the waiting thread
                        job.future.set_exception(exc)
                    continue
                mine = next((g for g in groups if g[0].predictor is job.predictor and _same(g[0].kwargs, job.kwargs)), None)
                if mine is None:
                    groups.append([job])
                else:
                    mine.append(job)
            for group in groups:
                self._predict(group)
            batched = batched or any(len(group) > 1 for group in groups)

    def _predict(self, group: Sequence[_Prediction]) -> None:
        self.batch_sizes.append(len(group))
        try:
            results = group[0].predictor.predict([job.image for job in group], **group[0].kwargs)
            if len(results) != len(group):
                raise RuntimeError(f"predict returned {len(results)} results for {len(group)} images")
        except BaseException as exc:  # noqa: BLE001 - raised again in the waiting thread; this thread goes on
            if len(group) == 1:
                group[0].future.set_exception(exc)
            else:  # one by one: only the bad image's request fails
                for job in group:
                    self._predict([job])
            return
        for job, result in zip(group, results, strict=True):
            job.future.set_result(result)


def _same(a: dict, b: dict) -> bool:
    """Whether two calls' keyword arguments are equal (values that cannot be compared: not equal)."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. arrays: such calls simply do not share a pass
        return False
